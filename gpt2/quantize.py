"""Opt-in reduced-precision weights: int8 (any device) and 16-bit weights for CPU matrix products.

Decoding is bound by how many weight bytes each step reads, so fewer bytes per weight is faster.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.heap import return_free_memory
from gpt2.model import GPT2LMHeadModel, Linear

FLOAT16_MAX = 65504.0


class Int8Linear(nn.Module):
    """y = x @ (weight_int8 * scales).T + bias, with symmetric per-output-channel scales.

    Activations stay in the model's dtype (bfloat16 is fastest). On CPU `torch._weight_int8pack_mm`
    reads a quarter of the bytes of float32 weights. Elsewhere each product widens its weight first
    (`dequantized`): torch's GPU kernel for int8 weights ran several times slower than a 16-bit product
    on an H100. There int8 stores smaller weights but is no faster than 16 bits, and each product
    briefly holds its widened weight.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()  # (out, in)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        out_features = self.weight.size(0)
        rows = x.reshape(-1, x.size(-1))  # (rows, in)
        if x.device.type != "cpu":
            y = F.linear(rows, self.dequantized(), self.bias)  # (rows, out), the bias added in the product
        else:
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)  # (rows, out)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], out_features)

    def dequantized(self) -> Tensor:
        """The weight as weight_int8 * scales (out, in), in the activations' dtype."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]


def _projection_places(model: GPT2LMHeadModel) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every block projection: no reference that would keep a weight alive
    once the projection is replaced."""
    return [(module, name) for module in model.modules() for name, child in module.named_children()
            if isinstance(child, Linear)]


def quantize_int8(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Replace every block projection, and the tied LM head, by Int8Linear; in place."""
    dtype = model.transformer.wte.weight.dtype
    for module, name in _projection_places(model):
        setattr(module, name, Int8Linear(getattr(module, name).weight, getattr(module, name).bias, dtype))
    # The embedding keeps its full-precision rows for lookups; the head gets its own int8 copy.
    model.lm_head = Int8Linear(model.transformer.wte.weight, None, dtype)
    return model


@functools.cache
def float16_kernel_available() -> bool:
    """Whether this torch build has FBGEMM's float16-weight product (x86 CPU builds do)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 1), packed)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


class Float16Linear(nn.Module):
    """y = x @ weight.T + bias for float32 x and y, the weight stored in float16 and packed for FBGEMM.

    The kernel widens the half-precision weights to float32 in registers: a decode step reads half the
    bytes of float32 weights and the activations keep float32's precision. On CPUs without native
    bfloat16 arithmetic (AVX2) this is also much faster than torch's bfloat16 products.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float(), None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)  # (..., out)

    def weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The stored weight (out, in) and bias, as float32."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)


def _within_float16(weight: Tensor) -> bool:
    low, high = torch.aminmax(weight.detach())  # one pass, no temporary the size of the weight
    return -FLOAT16_MAX <= float(low) and float(high) <= FLOAT16_MAX


def float16_weights_for_cpu(model: GPT2LMHeadModel) -> bool:
    """Give a bfloat16 or float16 CPU model float32 activations and Float16Linear projections; in place.

    The weights keep the values of the model's dtype: every bfloat16 value of magnitude 2**-14 (6.1e-5)
    to 65504 is exactly a float16 one (float16 has more mantissa bits), and below that float16 rounds it
    by at most 3e-8. The token table stays in the model's dtype for lookups; the LM head gets a packed
    copy. Returns False, changing nothing, where FBGEMM is missing or a weight is beyond float16's range.
    """
    wte = model.transformer.wte.weight
    if wte.device.type != "cpu" or wte.dtype not in (torch.bfloat16, torch.float16) or not float16_kernel_available():
        return False
    places = _projection_places(model)
    if not all(_within_float16(getattr(module, name).weight) for module, name in places) or not _within_float16(wte):
        return False

    def replace(place: tuple[nn.Module, str]) -> None:  # the original weight is freed once its copy is made
        module, name = place
        setattr(module, name, Float16Linear(getattr(module, name).weight, getattr(module, name).bias))

    # FBGEMM packs on one thread (about 10 ns a weight) and lets go of the GIL: one packer per thread.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        head = pool.submit(Float16Linear, wte, None)
        list(pool.map(replace, places))
        model.lm_head = head.result()
    for module in model.modules():  # layer norms and the position table: float32 from here on
        if isinstance(module, nn.LayerNorm) or module is model.transformer.wpe:
            module.float()
    return_free_memory()
    return True
