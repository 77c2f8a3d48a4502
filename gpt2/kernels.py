"""The matrix products of the block projections and the LM head, and the CPU kernels that compute them.

Which kernel is fastest depends on the CPU (AVX2 or AVX-512, native bfloat16, AMX) and the torch build,
so a CPU model's products run on kernels chosen by timing them on the machine (gpt2.tuning). Each
precision has its candidates here, each a `Kernel` that reads its weight in one stored `Form`. Every
candidate keeps its precision's contract: float32 ones compute in float32; 16-bit ones keep the weights'
values (activations rounded to 16 bits at most inside the product); int8 ones keep the int8 contract
(see gpt2.quantize).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.errors import GPT2Error
from gpt2.native import available as native_available
from gpt2.native import native_run, native_stream_run

# oneDNN's packed layout is tuned for a row count: decoding's few rows.
PACK_ROWS = 8
# oneDNN builds (and keeps) one primitive per input shape, and sizes its scratch memory by it: prompts of
# many lengths would each add some. So a product of more than PACK_ROWS rows runs in pieces of PIECE_ROWS
# rows and one last piece padded up to a power of two: oneDNN only ever sees 14 row counts (1..8, 16..512),
# and a prompt of any length touches at most two of them.
PIECE_ROWS = 512
# A product of at most this many rows runs on the decode kernel (a decode step of up to 8 prompts), of
# more on the prefill kernel.
DECODE_ROWS = 8
FLOAT16_MAX = 65504.0


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU run oneDNN's linear op on `dtype`: x86 builds do for float32, and for
    16-bit types where the CPU has AVX-512 or newer (an AVX2-only CPU has no oneDNN bfloat16 product)."""
    ones = torch.ones(1, 1, dtype=dtype)
    return _runs(lambda: torch.ops.mkldnn._linear_pointwise(ones, ones, None, "none", [None], ""))


def _runs(probe: Callable[[], Any]) -> bool:
    """Whether a tiny call of an optional kernel works on this build and CPU."""
    try:
        probe()
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return False
    return True


@functools.cache
def onednn_packed_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies `dtype` weights here (bfloat16 needs AVX-512 or newer)."""
    def probe() -> None:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), PACK_ROWS)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), weight, None, "none", [None], "")

    return torch.backends.mkldnn.is_available() and _runs(probe)


@functools.cache
def float16_fbgemm_available() -> bool:
    """Whether this torch build has FBGEMM's float16-weight product (x86 CPU builds do)."""
    return _runs(lambda: torch.ops.quantized.linear_dynamic_fp16(
        torch.ones(1, 1), torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)))


@functools.cache
def int8_weight_only_available() -> bool:
    """Whether torch has the int8-weight product `torch._weight_int8pack_mm` (torch 2.3 and later)."""
    return _runs(lambda: torch._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16),
                                                   torch.ones(8, 32, dtype=torch.int8),
                                                   torch.ones(8, dtype=torch.bfloat16)))


@functools.cache
def int8_dynamic_available() -> bool:
    """Whether FBGEMM's dynamically quantized int8 product is there (x86 CPU builds)."""
    def probe() -> None:
        with warnings.catch_warnings():  # torch deprecates quantized tensors, FBGEMM's input format
            warnings.simplefilter("ignore")
            weight = torch.quantize_per_channel(torch.ones(8, 32), torch.ones(8, dtype=torch.double),
                                                torch.zeros(8, dtype=torch.long), 0, torch.qint8)
        torch.ops.quantized.linear_dynamic(torch.ones(1, 32), torch.ops.quantized.linear_prepack(weight, None), True)

    return "fbgemm" in torch.backends.quantized.supported_engines and _runs(probe)


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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """F.linear(x, weight, bias) through oneDNN on CPU (which also takes a packed weight, pack_weight), in
    row_pieces; F.linear where oneDNN is missing, has no product for the weight's dtype on this CPU, or the
    tensors are elsewhere. `gelu`: gelu (tanh form) of the result, which oneDNN applies as it writes it (a pass
    over the MLP's widest activations saved, where the CPU makes that pay: gpt2.tuning measures it)."""
    if not weight.is_mkldnn and (x.device.type != "cpu" or not weight.is_contiguous()
                                 or not onednn_linear_available(weight.dtype)):
        y = F.linear(x, weight, bias)  # which also reads a transposed view as it is
        return F.gelu(y, approximate="tanh") if gelu else y
    post = ("gelu", [None], "tanh") if gelu else ("none", [None], "")
    rows = x.numel() // x.size(-1)
    pieces = row_pieces(rows)
    if len(pieces) == 1 and pieces[0] == rows:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *post)
    flat = x.reshape(rows, x.size(-1))  # (rows, in)
    flat = F.pad(flat, (0, 0, 0, sum(pieces) - rows))  # zero rows at the end; their outputs are dropped
    out = torch.cat([torch.ops.mkldnn._linear_pointwise(piece, weight, bias, *post) for piece in flat.split(pieces)])
    return out[:rows].view(*x.shape[:-1], -1)  # (..., out)


def pack_weight(weight: Tensor) -> Tensor:
    """The (out, in) CPU weight in oneDNN's blocked layout: an opaque tensor only `linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) computed by `linear`: the model's projections
    until load_model gives them their chosen kernels (Projection), and on a GPU."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------
# stored forms and the kernels that read them

Stored = tuple[Any, ...]  # a form's tensors (or FBGEMM's packed object) for one weight


@dataclass(frozen=True)
class Form:
    """How one weight is kept: built from the (out, in) weight and bias in the loaded dtype, and read
    back (`unpack`) as the plain weight (out, in) and bias for state_dict. `build` also gets a sample of
    the product's inputs (n, in) where load_model calibrated the model (forms that quantize activations
    need one; None when tuning), and returns None where this weight cannot take the form within its
    precision's contract."""

    name: str
    available: Callable[[], bool]
    build: Callable[[Tensor, Tensor | None, Tensor | None], Stored | None]
    unpack: Callable[[Stored], tuple[Tensor, Tensor | None]]
    value_bytes: int  # bytes a weight value takes in this form
    # Whether the stored form is plain tensors that gpt2.prepared can keep on disk for later loads (whose
    # build then costs nothing from the second load on); packed forms are opaque and built on every load.
    plain: bool = False
    # Whether it lays the weight out (in, out): for the LM head, a second copy of the token table, which the
    # lookups read (out, in).
    transposed: bool = False
    # For a form built from a calibration run (int8's): the plain tensors gpt2.prepared keeps of it, and the
    # form rebuilt from those. None: a later load builds it from the weight.
    to_kept: Callable[[Stored], Stored] | None = None
    from_kept: Callable[[Stored], Stored] | None = None

    @property
    def kept(self) -> bool:
        """Whether gpt2.prepared keeps it for later loads, which then do not build it."""
        return self.plain or self.to_kept is not None


@dataclass(frozen=True)
class Kernel:
    """One product y = x @ weight.T + bias: x (rows, in) in one of the dtypes it `takes` -> y (rows, out) in
    the same dtype (Projection widens any other x to float32)."""

    name: str
    form: Form
    run: Callable[[Tensor, Stored], Tensor]
    takes: tuple[torch.dtype, ...] = (torch.float32,)
    # Whether it is a candidate for a prompt's hundreds of rows: not one made for a few rows (or that is another
    # candidate there, as `mv` is F.linear).
    prefills: bool = True
    # Whether it needs its form's tensors aligned to 64 bytes (_weight_int8pack_mm crashes on a weight that is
    # not aligned to 16), which a tensor mapped from a file (gpt2.prepared) may not be: see `aligned`.
    aligned: bool = False
    # The product followed by gelu (tanh form) in one call, reading the same form, for a prompt's MLP
    # (Projection.forward_gelu); None: the product, then F.gelu.
    run_gelu: Callable[[Tensor, Stored], Tensor] | None = None


def aligned(stored: Stored) -> Stored:
    """The form with every tensor not aligned to 64 bytes copied."""
    return tuple(part.clone() if isinstance(part, Tensor) and not part.is_mkldnn and part.data_ptr() % 64 else part
                 for part in stored)


def _dense_form(dtype: torch.dtype) -> Form:
    return Form(f"{_short(dtype)} dense", lambda: True,
                lambda w, b, _: (w.detach().to(dtype).contiguous(), _cast(b, dtype)), lambda s: (s[0], s[1]),
                dtype.itemsize, plain=True)


def _transposed_form(dtype: torch.dtype) -> Form:
    return Form(f"{_short(dtype)} (in, out)", lambda: True,
                lambda w, b, _: (w.detach().to(dtype).t().contiguous(), _cast(b, dtype)), lambda s: (s[0].t(), s[1]),
                dtype.itemsize, plain=True, transposed=True)


def _onednn_packed_form(dtype: torch.dtype) -> Form:
    return Form(f"{_short(dtype)} oneDNN packed", functools.partial(onednn_packed_available, dtype),
                lambda w, b, _: (pack_weight(w.to(dtype)), _cast(b, dtype)), lambda s: (s[0].to_dense(), s[1]),
                dtype.itemsize)


def _cast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.detach().to(dtype)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _in(dtype: torch.dtype) -> Callable[[Callable[..., Tensor]], Callable[[Tensor, Stored], Tensor]]:
    """A product run with x rounded to `dtype` and its result given in x's dtype."""
    def wrap(product: Callable[..., Tensor]) -> Callable[[Tensor, Stored], Tensor]:
        return lambda x, s: product(x.to(dtype), *s).to(x.dtype)
    return wrap


def _float16_build(weight: Tensor, bias: Tensor | None, _: Tensor | None) -> Stored | None:
    """FBGEMM's packed float16 weight, where every value is within float16's range. A bfloat16 value of
    magnitude 2**-14 to 65504 is exactly a float16 one; below that float16 rounds it by at most 3e-8."""
    weight = weight.detach().float().contiguous()  # (out, in): FBGEMM packs from this layout
    low, high = torch.aminmax(weight)  # one pass, no temporary the size of the weight
    if float(low) < -FLOAT16_MAX or float(high) > FLOAT16_MAX:
        return None
    return (torch.ops.quantized.linear_prepack_fp16(weight, _cast(bias, torch.float32)),)


def _float16_unpack(stored: Stored) -> tuple[Tensor, Tensor | None]:
    return torch.ops.quantized.linear_unpack_fp16(stored[0])


FLOAT16_FBGEMM = Form("float16 FBGEMM packed", float16_fbgemm_available, _float16_build, _float16_unpack, 2)


def float_kernels(dtype: torch.dtype, native: bool = False) -> list[Kernel]:
    """The candidates for weights whose values are `dtype`'s (float32, bfloat16 or float16), the one to use
    without measuring first. 16-bit ones take float32 x (other than FBGEMM they round it to 16 bits inside
    the product only) or x in their own dtype (a bfloat16 model's prompt, gpt2.model). `native`: with the
    kernel compiled here (gpt2.native, which has one for float32 and bfloat16)."""
    dense, packed = _dense_form(dtype), _onednn_packed_form(dtype)
    takes = (torch.float32,) if dtype == torch.float32 else (torch.float32, dtype)
    # oneDNN's product with gelu fused reads both forms (used for c_fc where gpt2.tuning measures it faster).
    fused = _in(dtype)(functools.partial(linear, gelu=True))
    dense_fused = fused if onednn_linear_available(dtype) else None  # without oneDNN `linear` is F.linear
    kernels = [Kernel(f"{_short(dtype)} F.linear", dense, _in(dtype)(F.linear), takes, run_gelu=dense_fused),
               Kernel(f"{_short(dtype)} mv", dense, _in(dtype)(_matvec), takes, prefills=False),
               *([Kernel(f"{_short(dtype)} oneDNN", dense, _in(dtype)(linear), takes, run_gelu=fused)]
                 if dense_fused else []),
               Kernel(f"{_short(dtype)} oneDNN packed", packed, _in(dtype)(linear), takes, run_gelu=fused)]
    if native:
        kernels += [Kernel(f"{_short(dtype)} native", dense, native_run, prefills=False),
                    Kernel(f"{_short(dtype)} native streaming", dense, native_stream_run, prefills=False)]
    if dtype == torch.float32:  # and transformers' own product, on the Conv1D layout
        return [*kernels, Kernel("float32 x @ w", _transposed_form(dtype), _addmm)]
    # For a prompt on the dense form where the CPU has no fast 16-bit product (AVX2 only): the weight widened
    # to float32 for each product, which hundreds of rows repay.
    kernels.append(Kernel(f"{_short(dtype)} widened to float32", dense, _widened_run))
    # First (the choice without measuring): float32 activations, the weights widened in registers.
    return [Kernel("float16 FBGEMM", FLOAT16_FBGEMM, _float16_run, takes), *kernels]


def _float16_run(x: Tensor, stored: Stored) -> Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x.float(), stored[0]).to(x.dtype)


def _widened_run(x: Tensor, stored: Stored) -> Tensor:
    weight, bias = stored
    return F.linear(x, weight.float(), None if bias is None else bias.float())


def _matvec(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """One row by torch.mv (its own matrix-vector kernel, which on some CPUs reads 16-bit weights faster
    than the matrix products do), more by F.linear."""
    if x.size(0) != 1:
        return F.linear(x, weight, bias)
    y = torch.mv(weight, x[0]).unsqueeze(0)  # (1, out)
    return y if bias is None else y.add_(bias)


def _addmm(x: Tensor, stored: Stored) -> Tensor:
    """x @ weight (in, out) + bias, as transformers' Conv1D computes it."""
    weight, bias = stored
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


def kernels_for(precision: str, native: bool = True) -> list[Kernel]:
    """Every candidate of a precision ("float32", "bfloat16", "float16" or "int8") on this build and CPU;
    `native`: with the kernel compiled here (gpt2.native), where it builds (compiling it once per machine)."""
    if precision == "int8":
        from gpt2.quantize import int8_kernels

        candidates = int8_kernels(native and native_available(torch.int8))
    else:
        dtype = getattr(torch, precision)
        candidates = float_kernels(dtype, native and native_available(dtype))
    return [kernel for kernel in candidates if kernel.form.available()]


# ---------------------------------------------------------------------------------------------------
# the module


class Projection(nn.Module):
    """y = x @ weight.T + bias on CPU, the weight kept in one Form and multiplied by the decode kernel
    (up to DECODE_ROWS rows) or the prefill kernel (more rows), which read the same form.

    Outside forward it behaves as the nn.Linear it replaces: state_dict gives `weight` (out, in) and
    `bias` as plain tensors in `dtype` (int8: dequantized), and nothing when `tied` (the LM head, a copy
    of the token embedding). The stored form is CPU-only and opaque: moving the module to another device
    or dtype raises GPT2Error, saying to load the model again.
    """

    def __init__(self, stored: Stored, decode: Kernel, prefill: Kernel, dtype: torch.dtype,
                 shape: tuple[int, int], tied: bool = False) -> None:
        super().__init__()
        if decode.form.name != prefill.form.name:
            raise ValueError(f"{decode.name} and {prefill.name} read different forms")
        self.stored, self.decode, self.prefill = stored, decode, prefill
        self.dtype, self.tied = dtype, tied
        self.out_features, self.in_features = shape

    def forward(self, x: Tensor) -> Tensor:
        """x @ weight.T + bias, in x's dtype where the kernel takes it, else in float32."""
        return self._run(x, gelu=False)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """gelu(forward(x)) (tanh form), in one call where the prefill kernel has it fused (Kernel.run_gelu).
        A decode step's few rows keep their kernel and F.gelu."""
        return self._run(x, gelu=True)

    def _run(self, x: Tensor, gelu: bool) -> Tensor:
        rows = x.reshape(-1, x.size(-1))  # (rows, in)
        prompt = rows.size(0) > DECODE_ROWS
        kernel = self.prefill if prompt else self.decode
        if rows.dtype not in kernel.takes:
            rows = rows.float()
        if gelu and prompt and kernel.run_gelu is not None:
            return kernel.run_gelu(rows, self.stored).view(*x.shape[:-1], self.out_features)  # (..., out)
        y = kernel.run(rows, self.stored).view(*x.shape[:-1], self.out_features)  # (..., out)
        return F.gelu(y, approximate="tanh") if gelu else y

    def weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight (out, in) and bias as plain tensors in `dtype`."""
        weight, bias = self.decode.form.unpack(self.stored)
        return weight.to(self.dtype), _cast(bias, self.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.tied:
            return
        weight, bias = self.weight_and_bias()
        destination[prefix + "weight"] = weight.contiguous()
        if bias is not None:
            destination[prefix + "bias"] = bias

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Projection:
        check_movable(fn, self.dtype)
        return self

    def __deepcopy__(self, memo: dict) -> Projection:
        """A copy with its own stored form; oneDNN's packed tensors are opaque, cloned whole."""
        stored = tuple(part.clone() if isinstance(part, Tensor) and part.is_mkldnn else copy.deepcopy(part, memo)
                       for part in self.stored)
        memo[id(self)] = Projection(stored, self.decode, self.prefill, self.dtype,
                                    (self.out_features, self.in_features), self.tied)
        return memo[id(self)]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, decode={self.decode.name}, "
                f"prefill={self.prefill.name}")

    def nbytes(self) -> int:
        """Bytes of the stored weight (about: packed layouts may pad it), for bandwidth figures."""
        return self.out_features * self.in_features * self.decode.form.value_bytes

    def reads(self, tensor: Tensor) -> bool:
        """Whether the stored form is `tensor`'s memory itself (a dense head reading the token table)."""
        return any(isinstance(part, Tensor) and not part.is_mkldnn and part.data_ptr() == tensor.data_ptr()
                   for part in self.stored)


def check_movable(fn: Callable[[Tensor], Tensor], dtype: torch.dtype) -> None:
    """Raise GPT2Error unless `fn` (what Module.to, .half(), .cuda() apply) leaves `dtype` CPU tensors as
    they are: packed CPU kernels cannot follow the model elsewhere."""
    try:
        probe = fn(torch.empty(0, dtype=dtype))
        target = f"{probe.device.type} {_short(probe.dtype)}"
    except (RuntimeError, AssertionError) as exc:  # no such device here
        probe, target = None, f"another device ({str(exc).strip().splitlines()[0][:80] if str(exc) else exc})"
    if probe is None or probe.device.type != "cpu" or probe.dtype != dtype:
        raise GPT2Error(f"this model's weights are packed for CPU kernels and cannot move to {target}: "
                        "load it again with load_model(..., device=..., dtype=...)")
