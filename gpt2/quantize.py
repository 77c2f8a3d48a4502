"""int8 weights: Int8Linear on a GPU, and the CPU's int8 kernel candidates (gpt2.tuning picks one).

Decoding is bound by how many weight bytes each step reads, so fewer bytes per weight is faster.

The int8 contract: logits within 5% of the largest float32 logit, and float32's greedy choice wherever its
top-2 margin is clear. Weights are symmetric int8 with one scale per output channel. On CPU there are two
candidates: int8 weights times bfloat16 activations (`torch._weight_int8pack_mm`), and FBGEMM's dynamic
int8, which also quantizes the activations: to 8-bit integers (7 where FBGEMM's sums would saturate) with
one scale per product call. GPT-2's activations have a few hidden dimensions tens of times larger than the
rest, which would leave the others a few levels. So at load a short calibration run of the float model
finds them: their products stay in float32 (LLM.int8), the other input dimensions are divided by smoothing
factors that multiply the weight's columns (SmoothQuant); a projection whose dynamic product still strays
from the float one on the calibration activations, and the LM head (whose error is the logits'), keep int8
weights with bfloat16 activations. Errors each gate allows add up over the blocks, so the loaded model is then
checked whole on the calibration tokens, and all its dynamic products go back to weight-only if it strays.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.kernels import (
    DECODE_ROWS,
    Form,
    Kernel,
    Projection,
    Stored,
    int8_dynamic_available,
    int8_weight_only_available,
)
from gpt2.model import GPT2LMHeadModel
from gpt2.native import native_run, native_stream_run
from gpt2.tuning import Choice, projection, projection_places

# A projection takes the dynamic kernel only where, on the calibration activations, its largest error is
# at most this fraction of the float product's largest output and this many times the weight-only kernel's.
DYNAMIC_ERROR = 0.01
WEIGHT_ONLY_RATIO = 1.5
CALIBRATION_TOKENS = 64  # random token ids run through the float model at load, for the activation statistics
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: half of the activations' range moves to the weights
OUTLIER_RATIO = 6.0
MAX_OUTLIERS = 8
# Each projection's gate bounds its own error, not how the errors add up over the blocks: after them, the whole
# model with its dynamic products must stay within this fraction of the largest float logit on the calibration
# tokens, half the contract's 5%, as prompts other than the calibration ones can show twice its error.
WHOLE_MODEL_ERROR = 0.025
HEAD_CHUNK_ROWS = 8192  # the float reference logits read the token table this many rows at a time
CHECK_TOKENS = 16  # the whole model is checked on the first this-many calibration tokens (a quarter of the cost)


def settling_limits() -> list[float]:
    """The limits an int8 load settles its forms under: an outcome kept under others is settled again."""
    return [DYNAMIC_ERROR, WEIGHT_ONLY_RATIO, CALIBRATION_TOKENS, SMOOTHING_ALPHA, OUTLIER_RATIO, MAX_OUTLIERS,
            WHOLE_MODEL_ERROR, CHECK_TOKENS]


class Int8Linear(nn.Module):
    """y = x @ (weight_int8 * scales).T + bias, with symmetric per-output-channel scales.

    What load_model gives a GPU model (a CPU one gets the tuned kernels below). Activations stay in the
    model's dtype. On CPU `torch._weight_int8pack_mm` reads a quarter of the bytes of float32 weights.
    Elsewhere each product widens its weight first
    (`dequantized`): torch's GPU kernel for int8 weights ran several times slower than a 16-bit product
    on an H100. There int8 stores smaller weights but is no faster than 16 bits, and each product
    briefly holds its widened weight.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        quantized, scales = quantize_rows(weight)
        self.register_buffer("weight", quantized)
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
        return widen(self.weight, self.scales)


def widen(quantized: Tensor, scales: Tensor) -> Tensor:
    """int8 weights (out, in) times their row's scale, in the scales' dtype."""
    return quantized.to(scales.dtype) * scales[:, None]


def quantize_int8(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Replace every block projection, and the tied LM head, by Int8Linear (off the CPU); in place."""
    dtype = model.transformer.wte.weight.dtype
    for module, name in projection_places(model):
        setattr(module, name, Int8Linear(getattr(module, name).weight, getattr(module, name).bias, dtype))
    # The embedding keeps its full-precision rows for lookups; the head gets its own int8 copy.
    model.lm_head = Int8Linear(model.transformer.wte.weight, None, dtype)
    return model




def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one float32 scale per output channel: weight (out, in) ~ int8 * scales[:, None]."""
    w = weight.detach().float()  # (out, in)
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
    return torch.round(w / scales[:, None]).to(torch.int8), scales


# ---------------------------------------------------------------------------------------------------
# CPU kernels


def _outliers(inputs: Tensor | None) -> Tensor:
    """The input dimensions (k,) whose calibration range exceeds OUTLIER_RATIO times the median one's, the
    MAX_OUTLIERS largest: their products stay in float32 (LLM.int8), since an error in a weight or
    activation of theirs is multiplied by their size."""
    if inputs is None:
        return torch.zeros(0, dtype=torch.long)
    ranges = inputs.abs().amax(dim=0).float()  # (in,)
    count = int((ranges > OUTLIER_RATIO * ranges.median()).sum())
    return ranges.topk(min(count, MAX_OUTLIERS)).indices.sort().values


def _with_outliers(y: Tensor, x: Tensor, outliers: Tensor, columns: Tensor) -> Tensor:
    """y plus the float32 product of x's outlier dimensions (rows, k) with their weight columns (out, k)."""
    return y if outliers.numel() == 0 else torch.addmm(y, x.index_select(1, outliers), columns.t())


def _split(weight: Tensor, inputs: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The float32 weight (out, in) with its outlier columns zeroed, the outliers (k,), their columns (out, k)."""
    w = weight.detach().float().contiguous()  # (out, in)
    outliers = _outliers(inputs)
    columns = w.index_select(1, outliers)  # (out, k)
    if outliers.numel():
        w = w.index_fill(1, outliers, 0.0)
    return w, outliers, columns


def _unsplit(weight: Tensor, outliers: Tensor, columns: Tensor) -> Tensor:
    return weight.index_copy(1, outliers, columns) if outliers.numel() else weight


def _weight_only_build(weight: Tensor, bias: Tensor | None, inputs: Tensor | None) -> Stored:
    w, outliers, columns = _split(weight, inputs)
    quantized, scales = quantize_rows(w)
    bias = None if bias is None else bias.detach().to(torch.bfloat16)
    return quantized, scales.to(torch.bfloat16), bias, outliers, columns


def _weight_only_unpack(stored: Stored) -> tuple[Tensor, Tensor | None]:
    quantized, scales, bias, outliers, columns = stored
    return _unsplit(quantized.float() * scales.float()[:, None], outliers, columns), bias


def _weight_only_run(x: Tensor, stored: Stored) -> Tensor:
    quantized, scales, bias, outliers, columns = stored
    y = torch._weight_int8pack_mm(x.to(torch.bfloat16), quantized, scales)  # (rows, out)
    y = (y if bias is None else y + bias).float()
    return _with_outliers(y, x, outliers, columns)


def _widened_run(x: Tensor, stored: Stored, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The weight-only form's product as a GPU runs it (Int8Linear.dequantized): the weight widened to `dtype`,
    then torch's product in it. Widening costs a pass over the weight, which a prompt's hundreds of rows repay:
    there _weight_int8pack_mm is several times slower than the 16-bit product, itself slower than the float32
    one on a CPU without native bfloat16 (AVX2 only)."""
    quantized, scales, bias, outliers, columns = stored
    bias = None if bias is None else bias.to(dtype)
    y = F.linear(x.to(dtype), widen(quantized, scales.to(dtype)), bias).float()  # (rows, out)
    return _with_outliers(y, x, outliers, columns)


def _smoothing(weight: Tensor, inputs: Tensor) -> Tensor:
    """SmoothQuant's per-input-dimension factors (in,): activations are divided by them, weight columns
    multiplied, so both have similar ranges and the product is unchanged."""
    activation_range = inputs.abs().amax(dim=0).float().clamp(min=1e-5)  # (in,)
    weight_range = weight.abs().amax(dim=0).float().clamp(min=1e-5)  # (in,)
    return (activation_range**SMOOTHING_ALPHA / weight_range ** (1 - SMOOTHING_ALPHA)).clamp(1e-4, 1e4)


def _dynamic_build(weight: Tensor, bias: Tensor | None, inputs: Tensor | None) -> Stored | None:
    """FBGEMM's packed int8 weight, or None where the product strays from the float one on the calibration
    inputs by more than _allowed_error. x is multiplied by `scale` (in,) first: the smoothing factors'
    inverses, zero for the outlier dimensions, whose products run apart in float32."""
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    w, outliers, columns = _split(weight, inputs)
    scale = None
    if inputs is not None:
        smooth = _smoothing(w, inputs)
        w, scale = w * smooth, (1 / smooth).index_fill(0, outliers, 0.0)
    quantized, scales = quantize_rows(w)
    float_bias = None if bias is None else bias.float()
    stored = _prepack(quantized, scales, float_bias), scale, outliers, columns
    if inputs is None:
        return stored
    x = inputs.float()
    exact = F.linear(x, weight.float(), float_bias)  # (n, out)
    # Run in decode-sized calls: each call quantizes its rows with one scale.
    error = (torch.cat([_dynamic_run(rows, stored) for rows in x.split(DECODE_ROWS)]) - exact).abs().max()
    return stored if float(error) <= _allowed_error(weight, bias, x, exact) else None


def _allowed_error(weight: Tensor, bias: Tensor | None, x: Tensor, exact: Tensor) -> float:
    """DYNAMIC_ERROR of the float product's largest output, and at most WEIGHT_ONLY_RATIO times the error of
    int8 weights with bfloat16 activations on the same inputs: errors add up over the blocks, so the dynamic
    kernel is taken only where it costs about no more accuracy than the weight-only one."""
    allowed = DYNAMIC_ERROR * float(exact.abs().max())
    quantized, scales = quantize_rows(weight)
    widened = quantized.to(torch.bfloat16) * scales.to(torch.bfloat16)[:, None]  # what the other kernel reads
    weight_only = F.linear(x.to(torch.bfloat16), widened, None if bias is None else bias.to(torch.bfloat16))
    return min(allowed, WEIGHT_ONLY_RATIO * float((weight_only.float() - exact).abs().max()))


def _dynamic_unpack(stored: Stored) -> tuple[Tensor, Tensor | None]:
    packed, scale, outliers, columns = stored
    qweight, bias = torch.ops.quantized.linear_unpack(packed)
    weight = qweight.dequantize()
    if scale is not None:
        weight = weight * scale
    return _unsplit(weight, outliers, columns), bias


def _dynamic_run(x: Tensor, stored: Stored) -> Tensor:
    packed, scale, outliers, columns = stored
    y = torch.ops.quantized.linear_dynamic(x if scale is None else x * scale, packed, not int8_full_range())
    return _with_outliers(y, x, outliers, columns)


@functools.cache
def int8_full_range() -> bool:
    """Whether FBGEMM's dynamic product takes 8-bit activations without saturating its sums: the AVX2 kernel
    adds pairs of products in 16 bits (and torch's quantize_dynamic uses 7 bits for that); VNNI's do not."""
    packed = _prepack(torch.full((8, 64), 127, dtype=torch.int8), torch.full((8,), 1 / 127), None)
    y = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)  # x -> 255, sums of 255 * 127
    return bool((y - 64).abs().max() < 0.5)


def _prepack(quantized: Tensor, scales: Tensor, bias: Tensor | None) -> object:
    """FBGEMM's packed form of int8 weights (out, in) with their row scales (out,) and float32 bias."""
    with warnings.catch_warnings():  # torch deprecates quantized tensors (they remain FBGEMM's input format)
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(quantized, scales.double(),
                                                           torch.zeros_like(scales, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def _dynamic_to_kept(stored: Stored) -> Stored:
    """The packed form as plain tensors (gpt2.prepared): int8 values (out, in), their scales, the bias."""
    packed, scale, outliers, columns = stored
    qweight, bias = torch.ops.quantized.linear_unpack(packed)
    return qweight.int_repr(), qweight.q_per_channel_scales(), bias, scale, outliers, columns


def _dynamic_from_kept(kept: Stored) -> Stored:
    quantized, scales, bias, scale, outliers, columns = kept
    return _prepack(quantized, scales, bias), scale, outliers, columns


def _as_it_is(stored: Stored) -> Stored:
    return stored


# The probes are looked up when called, so that a test can take them away.
INT8_WEIGHT_ONLY = Form("int8 weight-only", lambda: int8_weight_only_available(), _weight_only_build,
                        _weight_only_unpack, 1, to_kept=_as_it_is, from_kept=_as_it_is)
INT8_DYNAMIC = Form("int8 FBGEMM packed", lambda: int8_dynamic_available(), _dynamic_build, _dynamic_unpack, 1,
                    to_kept=_dynamic_to_kept, from_kept=_dynamic_from_kept)


def int8_kernels(native: bool = False) -> list[Kernel]:
    """int8's candidates, the one to use without measuring first (it quantizes no activations); `native`: with
    the kernel compiled here (gpt2.native), which widens the int8 weight to float32 in registers."""
    return [Kernel("int8 weight x bfloat16 (_weight_int8pack_mm)", INT8_WEIGHT_ONLY, _weight_only_run, aligned=True),
            Kernel("int8 dynamic (FBGEMM)", INT8_DYNAMIC, _dynamic_run),
            Kernel("int8 weight widened to bfloat16", INT8_WEIGHT_ONLY, _widened_run),
            Kernel("int8 weight widened to float32", INT8_WEIGHT_ONLY,
                   functools.partial(_widened_run, dtype=torch.float32)),
            *([Kernel("int8 native", INT8_WEIGHT_ONLY, native_run, prefills=False),
               Kernel("int8 native streaming", INT8_WEIGHT_ONLY, native_stream_run, prefills=False)]
              if native else [])]


def for_the_head(kernels: list[Kernel]) -> list[Kernel]:
    """The LM head's candidates: its error is the logits' error, so its activations are not quantized
    (where no other kernel is there, it must)."""
    kept = [kernel for kernel in kernels if kernel.form is not INT8_DYNAMIC]
    return kept or kernels


@dataclass
class Calibration:
    """What a calibration run of the float model gives: the inputs (CALIBRATION_TOKENS, in) each block
    projection and the LM head receive (key: id(module), the head's under id(model.transformer.ln_f)), the
    token ids it read (1, CALIBRATION_TOKENS), and its final hidden states (after ln_f) at the first ones
    (CHECK_TOKENS, n_embd), whose float logits are computed only where the whole model is checked."""

    inputs: dict[int, Tensor]
    ids: Tensor
    hidden: Tensor


def calibrate(model: GPT2LMHeadModel) -> Calibration:
    """Run the model, as loaded, on random token ids, keeping every projection's inputs and the hidden states.
    A weight given as stored (its form kept by gpt2.prepared under other settings) is cast first."""
    dtype = model.transformer.wte.weight.dtype
    for parent, name in projection_places(model):
        weight = getattr(parent, name).weight
        if weight.dtype != dtype:
            weight.data = weight.data.to(dtype)
    inputs: dict[int, Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args: inputs.__setitem__(id(m), args[0][0].float()))
             for parent, name in projection_places(model) for module in [getattr(parent, name)]]
    ids = torch.randint(0, model.config.vocab_size, (1, CALIBRATION_TOKENS),
                        generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            hidden = model.transformer.ln_f(model.hidden_states(ids))[0].float()  # (tokens, n_embd)
    finally:
        for hook in hooks:
            hook.remove()
    inputs[id(model.transformer.ln_f)] = hidden
    return Calibration(inputs, ids, hidden[:CHECK_TOKENS])


def _float_logits(hidden: Tensor, table: Tensor) -> Tensor:
    """hidden (n, n_embd) @ table.T in float32, widening the token table a slice at a time."""
    with torch.inference_mode():
        return torch.cat([F.linear(hidden, rows.float()) for rows in table.split(HEAD_CHUNK_ROWS)], dim=1)


def whole_model_error(model: GPT2LMHeadModel, calibration: Calibration) -> float:
    """The int8 model's largest logit error on the first calibration tokens, as a fraction of the largest float
    one (causal: the first tokens' logits do not depend on the others)."""
    with torch.inference_mode():
        logits = model(calibration.ids[:, :CHECK_TOKENS])[0].float()  # (CHECK_TOKENS, vocab)
    exact = _float_logits(calibration.hidden, model.transformer.wte.weight)  # the table stays as loaded
    return float((logits - exact).abs().max() / exact.abs().max())


def keep_the_contract(model: GPT2LMHeadModel, calibration: Calibration, dynamic: dict[tuple[nn.Module, str], nn.Module],
                      kernels: list[Kernel], choice_for: Callable[[Tensor], Choice]) -> None:
    """Where the products that quantize activations (`dynamic`: their places and the modules they replaced)
    take the whole model beyond WHOLE_MODEL_ERROR on the calibration tokens, store those weights int8 with
    bfloat16 activations instead, on the kernels `choice_for` (a weight's ranking) puts first; in place."""
    weight_only = [kernel for kernel in kernels if kernel.form is not INT8_DYNAMIC]
    if not dynamic or not weight_only or whole_model_error(model, calibration) <= WHOLE_MODEL_ERROR:
        return
    for (parent, name), old in dynamic.items():
        dtype = getattr(parent, name).dtype
        setattr(parent, name, projection(old.weight, old.bias, choice_for(old.weight), weight_only, dtype,
                                         calibration.inputs.get(id(old))))


def quantizes_activations(module: Projection) -> bool:
    """Whether the projection's kernel quantizes its activations (FBGEMM's dynamic int8)."""
    return module.decode.form is INT8_DYNAMIC
