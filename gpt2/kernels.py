"""The matrix products of the block projections and the LM head, and the CPU kernels that compute them."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Decoding multiplies a few rows by each large weight. For float32 on CPU, oneDNN's inner product does
# that faster than F.linear (whose MKL matrix-vector product runs on one thread), and faster still once
# the weight is reordered into oneDNN's blocked layout (pack_weight). PACK_ROWS is the row count that
# layout is tuned for.
PACK_ROWS = 8
# oneDNN builds (and keeps) one primitive per input shape, and sizes its scratch memory by it: prompts of
# many lengths would each add some. So a product of more than PACK_ROWS rows runs in pieces of PIECE_ROWS
# rows and one last piece padded up to a power of two: oneDNN only ever sees 14 row counts (1..8, 16..512),
# and a prompt of any length touches at most two of them.
PIECE_ROWS = 512


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's linear op (x86 and most CPU builds do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        one = torch.ones(1, 1, device="cpu")
        torch.ops.mkldnn._linear_pointwise(one, one, None, "none", [None], "")
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


def row_pieces(rows: int) -> list[int]:
    """Row counts to run a product of `rows` rows in: as is up to PACK_ROWS, else PIECE_ROWS at a time and
    the rest as is (up to PACK_ROWS) or padded up to a power of two. They add up to `rows` or a little more."""
    if rows <= PACK_ROWS:
        return [rows]
    pieces = [PIECE_ROWS] * (rows // PIECE_ROWS)
    rest = rows % PIECE_ROWS
    if rest:
        pieces.append(rest if rest <= PACK_ROWS else 1 << (rest - 1).bit_length())
    return pieces


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias): float32 on CPU through oneDNN, which also takes a packed weight."""
    if not weight.is_mkldnn and (x.dtype != torch.float32 or x.device.type != "cpu" or not onednn_linear_available()):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.size(-1)
    pieces = row_pieces(rows)
    if len(pieces) == 1 and pieces[0] == rows:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    flat = x.reshape(rows, x.size(-1))  # (rows, in)
    flat = F.pad(flat, (0, 0, 0, sum(pieces) - rows))  # zero rows at the end; their outputs are dropped
    out = torch.cat([torch.ops.mkldnn._linear_pointwise(piece, weight, bias, "none", [None], "")
                     for piece in flat.split(pieces)])
    return out[:rows].view(*x.shape[:-1], -1)  # (..., out)


def pack_weight(weight: Tensor) -> Tensor:
    """The (out, in) float32 CPU weight in oneDNN's blocked layout: an opaque tensor only `linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


class PackedWeight(nn.Parameter):
    """A parameter holding a packed weight (pack_weight). Its memory is opaque, so copy.deepcopy clones
    it whole instead of element by element."""

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        if id(self) not in memo:
            memo[id(self)] = PackedWeight(self.data.clone(), self.requires_grad)
        return memo[id(self)]


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
