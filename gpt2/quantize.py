"""Opt-in weight-only int8: each projection's weights as int8 with one scale per output channel.

Activations stay in the model's dtype (bfloat16 is fastest); `torch._weight_int8pack_mm` reads a
quarter of the bytes of float32 weights, and decoding is bound by how many bytes it reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpt2.model import GPT2LMHeadModel, Linear


class Int8Linear(nn.Module):
    """y = x @ (weight_int8 * scales).T + bias, with symmetric per-output-channel scales."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()  # (out, in)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        out_features = self.weight.size(0)
        y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight, self.scales)  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], out_features)


def quantize_int8(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Replace every block projection, and the tied LM head, by Int8Linear; in place."""
    dtype = model.transformer.wte.weight.dtype
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias, dtype))
    # The embedding keeps its full-precision rows for lookups; the head gets its own int8 copy.
    model.lm_head = Int8Linear(model.transformer.wte.weight, None, dtype)
    return model
