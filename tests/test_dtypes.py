"""Reduced precision (--dtype bfloat16, float16, int8): documented error against float32, greedy agreement,
and on CPU the 16-bit weights' exact values in FBGEMM's float16 products."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import load_model
from gpt2.kernels import float16_fbgemm_available, onednn_linear_available
from gpt2.quantize import INT8_WEIGHT_ONLY, Int8Linear, int8_kernels
from gpt2.sample import generate

# Documented in the README: max |logit error| relative to the largest |float32 logit|.
TOLERANCE = {"bfloat16": 0.02, "float16": 0.01, "int8": 0.05}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.bfloat16}
needs_fbgemm = pytest.mark.skipif(not float16_fbgemm_available(), reason="this torch build has no FBGEMM")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("dtypes")
    torch.manual_seed(3)
    GPT2LMHeadModel(GPT2Config(n_layer=4)).save_pretrained(directory)  # GPT-2 124M widths, 4 blocks
    return directory


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50257, (2, 96), generator=torch.Generator().manual_seed(0))


@functools.cache  # each dtype's model once: no test changes a model it is given
def _model(directory, dtype_name: str):
    return load_model(directory, dtype=DTYPES[dtype_name], int8=dtype_name == "int8")


@functools.cache
def _logits(directory, dtype_name: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return _model(directory, dtype_name)(ids).float()


@pytest.mark.parametrize("dtype_name", TOLERANCE)
def test_logits_within_documented_tolerance_of_float32(checkpoint, ids, dtype_name):
    exact = _logits(checkpoint, "float32", ids)
    reduced = _logits(checkpoint, dtype_name, ids)
    error = (reduced - exact).abs().max().item()
    assert error <= TOLERANCE[dtype_name] * exact.abs().max().item(), error
    assert error > 0  # really computed in another precision


@pytest.mark.parametrize("dtype_name", TOLERANCE)
def test_greedy_choice_matches_float32_where_the_margin_is_clear(checkpoint, ids, dtype_name):
    exact = _logits(checkpoint, "float32", ids)
    reduced = _logits(checkpoint, dtype_name, ids)
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * TOLERANCE[dtype_name] * exact.abs().max()
    assert clear.sum() >= 10  # enough positions to mean something
    assert torch.equal(reduced.argmax(-1)[clear], exact.argmax(-1)[clear])


def test_int8_weights_are_int8_and_generation_runs(checkpoint):
    model = _model(checkpoint, "int8")
    assert all(decode.startswith("int8") and prefill.startswith("int8")
               for decode, prefill in model.kernel_choices().values())
    steps = list(generate(model, [[464, 3290], [40]], 5, temperature=0))
    assert len(steps) == 5 and all(step.shape == (2,) for step in steps)


def test_int8_widened_weight_gives_the_int8_kernels_product():
    """What a GPU runs (Int8Linear.dequantized in a 16-bit product) against the CPU's int8 kernel."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1, torch.randn(3, 5, 64, dtype=torch.bfloat16)
    layer = Int8Linear(weight, bias, torch.bfloat16)
    widened = layer.dequantized()
    assert widened.dtype == torch.bfloat16 and widened.shape == weight.shape
    exact = layer.weight.float() * layer.scales.float()[:, None]  # int8 values times their row's scale
    assert ((widened.float() - exact).abs() <= exact.abs() * 2**-8).all()  # rounded once, to bfloat16
    kernel = layer(x).float()  # torch._weight_int8pack_mm
    product = F.linear(x, widened, layer.bias).float()  # the GPU branch of Int8Linear.forward
    assert kernel.shape == (3, 5, 96)
    assert (product - kernel).abs().max() <= 0.02 * kernel.abs().max()
    # The CPU's int8 weight-only form, multiplied for a prompt as the GPU does: the same weights, the same product.
    stored = INT8_WEIGHT_ONLY.build(weight, bias, None)
    widened_kernel = {k.name: k for k in int8_kernels()}["int8 weight widened to bfloat16"]
    assert widened_kernel.form is INT8_WEIGHT_ONLY
    assert torch.equal(widened_kernel.run(x.reshape(15, 64).float(), stored), product.reshape(15, 96))
    # Widened to float32 instead (a CPU without native bfloat16): the int8 values times their (bfloat16) scales,
    # in a float32 product.
    float32_kernel = {k.name: k for k in int8_kernels()}["int8 weight widened to float32"]
    rows = torch.randn(15, 64)
    exact32 = layer.weight.float() * layer.scales.float()[:, None]
    assert float32_kernel.form is INT8_WEIGHT_ONLY
    assert torch.allclose(float32_kernel.run(rows, stored), F.linear(rows, exact32, layer.bias.float()), atol=1e-6)


def _assert_stored_as(stored: torch.Tensor, original: torch.Tensor, dtype: torch.dtype) -> None:
    assert stored.shape == original.shape and stored.dtype == torch.float32
    rounded = original.to(dtype).float()
    normal = rounded.abs() >= 2**-14
    count = int(normal.sum())
    assert 0.99 * normal.numel() < count < normal.numel()  # both kinds of value are checked
    assert not (normal & (stored != rounded)).any()  # equal wherever normal (a NaN is unequal)
    assert (stored - rounded).abs().max() <= 2**-25


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_cpu_16_bit_model_keeps_the_dtypes_values_with_float32_activations(checkpoint, dtype_name):
    """Whatever kernels were chosen, every projection and the LM head hold the weights rounded to the dtype:
    exactly from 2**-14 up (bfloat16 values there are float16 ones, for FBGEMM's float16 products), and
    within float16's 2**-25 below, where float16 has fewer digits. Hidden states, KV caches and logits are
    float32."""
    dtype = DTYPES[dtype_name]
    model = _model(checkpoint, dtype_name)
    state = load_file(checkpoint / "model.safetensors")
    block = model.transformer.h[1]
    for name, module in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                         ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
        weight, bias = module.weight_and_bias()
        _assert_stored_as(weight.float(), state[f"transformer.h.1.{name}.weight"].t(), dtype)  # Conv1D (in, out)
        assert torch.equal(bias.float(), state[f"transformer.h.1.{name}.bias"].to(dtype).float()), name
    _assert_stored_as(model.lm_head.weight_and_bias()[0].float(), state["transformer.wte.weight"], dtype)
    assert model.transformer.wte.weight.dtype == dtype  # looked up only
    assert model.activation_dtype == torch.float32 and model.transformer.wpe.weight.dtype == torch.float32
    steps = list(generate(model, [[464, 3290]], 3, temperature=0))
    assert len(steps) == 3 and all(cache.k.dtype == torch.float32 for cache in model.kv_caches())
    copied = copy.deepcopy(model)  # the stored weights are copied, not shared
    assert copied.lm_head.stored[0] is not model.lm_head.stored[0]
    ids = torch.tensor([[464, 3290, 318]])
    with torch.inference_mode():
        assert torch.equal(copied(ids), model(ids))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_a_cpu_bfloat16_models_prompt_computes_in_bfloat16_and_its_decode_steps_in_float32(checkpoint, dtype_name):
    """A prompt (more than DECODE_ROWS rows) runs a bfloat16 model's attention and products in bfloat16, as
    transformers' bfloat16 model does, on its float32 residual stream; decode steps (of any batch), KV caches
    and logits are float32. float16's narrow range keeps its prompts in float32."""
    model = _model(checkpoint, dtype_name)
    block, seen = model.transformer.h[1], []
    hooks = [block.attn.c_attn.register_forward_hook(lambda m, args, out: seen.append(("c_attn out", out.dtype))),
             block.mlp.c_fc.register_forward_pre_hook(lambda m, args: seen.append(("c_fc in", args[0].dtype)))]
    try:
        steps = list(generate(model, [list(range(464, 476))], 2, temperature=0))  # a prefill, a decode step
        seen.append("nine rows, one token each")
        list(generate(model, [[464]] * 9, 2, temperature=0))  # decode-step shapes, more than DECODE_ROWS rows
    finally:
        for hook in hooks:
            hook.remove()
    native = onednn_linear_available(torch.bfloat16)  # else (AVX2 only) test_model's AVX2 test has it float32
    prompt = torch.bfloat16 if dtype_name == "bfloat16" and native else torch.float32
    assert seen == [("c_attn out", prompt), ("c_fc in", prompt),
                    ("c_attn out", torch.float32), ("c_fc in", torch.float32), "nine rows, one token each",
                    *[("c_attn out", torch.float32), ("c_fc in", torch.float32)] * 2]
    assert len(steps) == 2 and all(cache.k.dtype == torch.float32 for cache in model.kv_caches())
    with torch.inference_mode():
        assert model(torch.arange(12).unsqueeze(0)).dtype == torch.float32


@needs_fbgemm
def test_a_weight_beyond_float16_range_takes_a_bfloat16_kernel(checkpoint, tmp_path):
    """A bfloat16 weight of 70000 has no float16 value: FBGEMM's float16 products (the choice without
    measuring) cannot hold that projection, which takes the next kernel, and keeps its value."""
    state = load_file(checkpoint / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = 70000.0
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    model = load_model(tmp_path, dtype=torch.bfloat16, kernels="default")
    choices = model.kernel_choices()
    assert choices["transformer.h.0.mlp.c_fc"][0] != "float16 FBGEMM" == choices["transformer.h.0.mlp.c_proj"][0]
    assert model.state_dict()["transformer.h.0.mlp.c_fc.weight"][0, 0].item() == 70144.0  # 70000 in bfloat16
    with torch.inference_mode():
        assert model(torch.tensor([[464, 3290]])).dtype == torch.float32


@needs_fbgemm
def test_cli_memory_check_counts_float32_kv_caches_of_a_16_bit_cpu_model(checkpoint, monkeypatch):
    """main.py refuses a batch whose KV caches cannot fit: for a bfloat16 CPU model they are float32 (4 bytes
    a value, not 2), so free memory just short of that need is refused."""
    import gpt2.batching
    from gpt2.errors import UsageError

    model = _model(checkpoint, "bfloat16")
    cfg = model.config
    need = 8 * (2 * cfg.n_layer * cfg.n_embd * 1024 * 4 + 4 * cfg.vocab_size * 4)

    def meminfo(free: int):
        return lambda *args, **kwargs: io.StringIO(f"MemTotal: 1 kB\nMemAvailable: {free // 1024} kB\n")

    monkeypatch.setattr(gpt2.batching, "open", meminfo(need - 1024), raising=False)
    with pytest.raises(UsageError, match="--batch_size 8 needs about"):
        gpt2.batching.check_memory(model, 8, 1024)
    monkeypatch.setattr(gpt2.batching, "open", meminfo(need + 1024), raising=False)
    gpt2.batching.check_memory(model, 8, 1024)
