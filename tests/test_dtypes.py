"""Reduced precision (--dtype bfloat16, --dtype int8): documented error against float32, greedy agreement."""

from __future__ import annotations

import pytest
import torch

from gpt2.checkpoint import load_model
from gpt2.sample import generate

# Documented in the README: max |logit error| relative to the largest |float32 logit|.
TOLERANCE = {"bfloat16": 0.02, "int8": 0.05}


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


def _logits(directory, dtype_name: str, ids: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
    model = load_model(directory, dtype=dtype, int8=dtype_name == "int8")
    with torch.inference_mode():
        return model(ids).float()


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
    model = load_model(checkpoint, dtype=torch.bfloat16, int8=True)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.int8
    assert model.lm_head.weight.dtype == torch.int8
    steps = list(generate(model, [[464, 3290], [40]], 5, temperature=0))
    assert len(steps) == 5 and all(step.shape == (2,) for step in steps)
