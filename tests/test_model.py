"""
Tests for gpt2/model.py: logits equal transformers' GPT2LMHeadModel (same weights) within 1e-4.

The oracle is transformers' own GPT-2 run on the same weights: a full forward at the real 124M shape,
the KV-cache path (prefill, then one token per step) against the full forward at each position, every
preset's head geometry at a small depth, and left-padded batches against the same prompt run alone.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import random_hf_model, torch_threads
from transformers import GPT2LMHeadModel as HFModel

from gpt2.checkpoint import load_model
from gpt2.config import PRESETS, GPT2Config
from gpt2.kernels import PACK_ROWS, PIECE_ROWS, linear, onednn_linear_available, pack_weight, row_pieces
from gpt2.model import CACHE_SLOT_STEP, GPT2LMHeadModel

TOL = 1e-4
VOCAB = 50257

# ---------------------------------------------------------------------------------------------------
# helpers and fixtures


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def forward_124m(hf_124m: HFModel) -> tuple[torch.Tensor, torch.Tensor]:
    """1024 random ids over the full vocabulary and transformers' logits for them (1, 1024, vocab)."""
    ids = torch.randint(0, VOCAB, (1, 1024), generator=torch.Generator().manual_seed(1234))
    with torch.inference_mode():
        logits = hf_124m.eval()(ids).logits
    return ids, logits


def check_prefill_decode(model: GPT2LMHeadModel, ids: torch.Tensor, ref: torch.Tensor, prefill: int) -> None:
    """Prefill ids[:, :prefill], then feed the rest one token per step through the KV cache; every
    logit row must match ref (transformers' full forward, (B, T, vocab)) at the same position."""
    B, T = ids.shape
    model.setup_caches(B, T)
    try:
        with torch.inference_mode():
            out = model(ids[:, :prefill])
            assert max_diff(out, ref[:, :prefill]) < TOL
            for pos in range(prefill, T):
                step = model(ids[:, pos : pos + 1], start=pos)
                diff = max_diff(step, ref[:, pos : pos + 1])
                assert diff < TOL, f"decode step at position {pos}: max abs diff {diff}"
    finally:
        model.clear_caches()
    assert all(block.attn.kv_cache is None for block in model.transformer.h)


# ---------------------------------------------------------------------------------------------------
# the real 124M shape


def test_124m_full_context_forward_matches_transformers(ours_124m, forward_124m):
    ids, ref = forward_124m
    assert ours_124m.config == GPT2Config(**PRESETS["gpt2"])
    with torch.inference_mode():
        logits = ours_124m(ids)
    assert logits.dtype == torch.float32
    diff = max_diff(logits, ref)
    assert diff < TOL, f"max abs diff {diff}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("batch", [1, 2])
def test_124m_prefill_then_cached_decode_matches_full_forward(ours_124m, hf_124m, forward_124m, batch):
    ids, ref = forward_124m
    ids, ref = ids[:, :120], ref[:, :120]
    if batch == 2:
        other = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(99))
        with torch.inference_mode():
            other_ref = hf_124m(other).logits
        ids, ref = torch.cat([ids, other]), torch.cat([ref, other_ref])
    check_prefill_decode(ours_124m, ids, ref, prefill=100)


# ---------------------------------------------------------------------------------------------------
# every preset's head geometry, two layers deep


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_head_geometry_matches_transformers(name, tmp_path):
    n_head = PRESETS[name]["n_head"]
    head_dim = PRESETS[name]["n_embd"] // n_head
    hf = random_hf_model(5, n_layer=2, n_head=n_head, n_embd=n_head * head_dim, vocab_size=1000, n_positions=64)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert (ours.config.n_head, ours.config.head_dim, ours.config.n_layer) == (n_head, head_dim, 2)

    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ref = hf(ids).logits
        full = ours(ids)
        last = ours(ids, last_only=True)
    assert max_diff(full, ref) < TOL
    assert max_diff(last, ref[:, -1:]) < TOL
    check_prefill_decode(ours, ids, ref, prefill=56)  # up to the last slot of the window


# ---------------------------------------------------------------------------------------------------
# left padding: a padded row continues exactly as the same prompt run alone


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory) -> tuple[HFModel, GPT2LMHeadModel]:
    hf = random_hf_model(11, n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
    path = tmp_path_factory.mktemp("small_model")
    hf.save_pretrained(path)
    return hf, load_model(path)


def run_alone(model: GPT2LMHeadModel, prompt: torch.Tensor, steps: torch.Tensor) -> list[torch.Tensor]:
    """Logits (1, T, vocab) of the prompt, then of each of the given decode tokens, without padding."""
    n = prompt.numel()
    model.setup_caches(1, n + steps.numel())
    try:
        with torch.inference_mode():
            out = [model(prompt.view(1, -1))]
            out += [model(tok.view(1, 1), start=n + i) for i, tok in enumerate(steps)]
    finally:
        model.clear_caches()
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("pad_id", [0, 617])
def test_left_padded_row_matches_the_prompt_run_alone(small_pair, pad_id):
    hf, model = small_pair
    gen = torch.Generator().manual_seed(21)
    lengths = [5, 12, 9]
    prompts = [torch.randint(0, 1000, (n,), generator=gen) for n in lengths]
    n_steps = 20
    decode = torch.randint(0, 1000, (len(prompts), n_steps), generator=gen)  # the tokens fed back per step

    width, B = max(lengths), len(prompts)
    lens = torch.tensor(lengths)
    idx = torch.full((B, width), pad_id)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt) :] = prompt
    key_valid = torch.ones(B, width + n_steps, dtype=torch.bool)
    key_valid[:, :width] = torch.arange(width) >= (width - lens).unsqueeze(1)
    position_ids = (key_valid[:, :width].long().cumsum(1) - 1).clamp(min=0)

    model.setup_caches(B, width + n_steps)
    try:
        with torch.inference_mode():
            batched = [model(idx, 0, position_ids, key_valid)]
            for step in range(n_steps):
                batched.append(model(decode[:, step : step + 1], width + step, (lens + step).unsqueeze(1), key_valid))
    finally:
        model.clear_caches()

    for row, prompt in enumerate(prompts):
        alone = run_alone(model, prompt, decode[row])
        pad = width - lengths[row]
        assert max_diff(batched[0][row : row + 1, pad:], alone[0]) < TOL, f"prefill, row {row}"
        for step in range(n_steps):
            diff = max_diff(batched[step + 1][row : row + 1], alone[step + 1])
            assert diff < TOL, f"row {row}, decode step {step}: max abs diff {diff}"

    assert all(torch.isfinite(out).all() for out in batched)  # padding slots too: nothing NaN to leak

    # and the unpadded run is itself transformers' logits for the same tokens
    row = 0
    full = torch.cat([prompts[row], decode[row]]).view(1, -1)
    with torch.inference_mode():
        ref = hf(full).logits
    alone = torch.cat(run_alone(model, prompts[row], decode[row]), dim=1)
    assert max_diff(alone, ref) < TOL


@pytest.mark.parametrize("start, T", [(0, 9), (9, 1), (5, 4)])
def test_padding_mask_is_causal_hides_padding_and_never_empties_a_row(start, T):
    """Every query row keeps at least one key: an all-masked softmax row is NaN on some SDPA backends
    (on CPU it happens to come out as zeros, so the end-to-end tests above cannot see it)."""
    end = start + T
    pads = torch.tensor([4, 0, 8])  # row 2 is padding up to slot 8
    key_valid = torch.arange(end + 3) >= pads.unsqueeze(1)  # (B, more slots than needed)
    mask = GPT2LMHeadModel._attention_mask(start, T, end, key_valid, torch.device("cpu"))
    assert mask.shape == (3, 1, T, end) and mask.dtype == torch.bool
    assert mask.any(dim=-1).all()
    for b in range(3):
        for i, q in enumerate(range(start, end)):
            row = mask[b, 0, i].tolist()
            assert not any(row[q + 1 :]), (b, q)  # causal
            if q >= pads[b]:  # a real token sees exactly the real tokens up to itself
                assert row == [pads[b] <= k <= q for k in range(end)], (b, q)


def test_a_later_chunk_of_a_prompt_runs_the_fused_attention_kernel(small_pair):
    """A prompt's chunk after the first (start > 0, T > 1) needs an explicit causal mask. It must be
    one SDPA's fused CPU kernel takes (four dimensions), not one that makes it materialise the attention
    weights (softmax of a (T, keys) matrix per head: slower, and a transient the size of the window)."""
    _, model = small_pair
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    model.setup_caches(1, 12)
    try:
        with torch.inference_mode():
            model.hidden_states(ids[:, :5])
            with torch.profiler.profile() as prof:
                model.hidden_states(ids[:, 5:], start=5)
    finally:
        model.clear_caches()
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_softmax" not in ops


# ---------------------------------------------------------------------------------------------------
# the oneDNN products used on CPU, and construction

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16, 127, 300, 600])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_linear_matches_f_linear(rows, with_bias, packed):
    """`linear` through oneDNN, with a dense or a packed weight, in one piece or several (rows > PACK_ROWS)."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 96, generator=gen)
    weight = torch.randn(2305, 96, generator=gen)
    bias = torch.randn(2305, generator=gen) if with_bias else None
    out = linear(x, pack_weight(weight) if packed else weight, bias)
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.shape == (1, rows, 2305) and out.dtype == torch.float32
    assert max_diff(out, ref) < 1e-4


AVX2_ONLY_SCRIPT = """
import sys
import torch
from gpt2.checkpoint import load_model
from gpt2.config import GPT2Config
from gpt2.kernels import kernels_for, onednn_linear_available
from gpt2.model import GPT2LMHeadModel

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=4)).bfloat16()
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
with torch.inference_mode():
    logits = model(ids).float()  # the projections' and the tied head's contiguous bfloat16 weights, via `linear`
    for module in model.modules():  # the same products by F.linear
        if isinstance(module, torch.nn.Linear):
            module.forward = lambda x, m=module: torch.nn.functional.linear(x, m.weight, m.bias)
    model.lm_head = torch.nn.Linear(64, 300, bias=False).bfloat16()
    model.lm_head.weight = model.transformer.wte.weight
    reference = model(ids).float()
loaded = load_model(sys.argv[1], dtype=torch.bfloat16, kernels="default")
print(onednn_linear_available(torch.bfloat16), torch.equal(logits, reference),
      sorted(k.name for k in kernels_for("bfloat16") if "oneDNN" in k.name), loaded.prompt_dtype)
"""


def test_without_onednn_16_bit_products_a_bfloat16_model_uses_f_linear_and_float32_prompts(tmp_path, tiny_dir):
    """An AVX2-only CPU's oneDNN has no bfloat16 product (ONEDNN_MAX_CPU_ISA=AVX2 makes this one such a CPU): a
    plain bfloat16 model's products fall back to F.linear instead of raising, the tuner offers no oneDNN
    bfloat16 kernel, and a loaded bfloat16 model's prompts compute in float32 (bfloat16 products and attention
    there are several times slower)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", AVX2_ONLY_SCRIPT, str(tiny_dir)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.startswith("True"):
        pytest.skip("this oneDNN build does not take ONEDNN_MAX_CPU_ISA")
    assert proc.stdout.split() == ["False", "True", "[]", "None"]


def test_row_pieces_add_up_to_few_shapes():
    """Products of any row count reach oneDNN in a bounded set of shapes (its caches hold them all), at
    most two per product, with less than a piece of padding."""
    shapes = set()
    for rows in range(1, 2100):
        pieces = row_pieces(rows)
        assert rows <= sum(pieces) < max(2 * rows, rows + 1)
        assert sum(pieces) - rows < PIECE_ROWS // 2
        assert pieces == [rows] if rows <= PACK_ROWS else all(p <= PIECE_ROWS for p in pieces)
        assert len(set(pieces)) <= 2
        shapes.update(pieces)
    powers = {1 << bit for bit in range(PIECE_ROWS.bit_length())}
    assert shapes == set(range(1, PACK_ROWS + 1)) | {p for p in powers if p > PACK_ROWS}


def test_load_model_gives_every_cpu_product_a_chosen_kernel(small_pair):
    """Block projections and the LM head run on kernels gpt2.tuning chose; the token table stays a plain
    tensor for lookups."""
    _, model = small_pair
    choices = model.kernel_choices()
    assert len(choices) == 4 * 2 + 1 and "lm_head" in choices
    assert all(decode.startswith("float32") and prefill.startswith("float32") for decode, prefill in choices.values())
    assert not model.transformer.wte.weight.is_mkldnn


@pytest.mark.parametrize("threads", [2, 3])
def test_cached_decode_with_threads_matches_transformers(small_pair, threads):
    """The decode path as it runs on a multi-core machine (oneDNN splits the products across threads)."""
    hf, model = small_pair
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(threads))
    with torch.inference_mode():
        ref = hf(ids).logits
    with torch_threads(threads):
        check_prefill_decode(model, ids, ref, prefill=40)


def test_model_built_off_meta_device_has_initialised_embeddings():
    config = GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=1, n_head=4)
    model = GPT2LMHeadModel(config)
    for emb in (model.transformer.wte.weight, model.transformer.wpe.weight):
        assert not emb.is_meta
        assert torch.isfinite(emb).all()
        assert emb.std() > 0.1  # drawn, not left as whatever torch.empty held (often zeros)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    with torch.inference_mode():
        logits = model(torch.arange(10).view(1, 10))
    assert logits.shape == (1, 10, 1000)
    assert torch.isfinite(logits).all()

    with torch.device("meta"):
        meta = GPT2LMHeadModel(config)
    assert meta.transformer.wte.weight.is_meta


def test_kv_caches_are_reused_and_stale_slots_never_read(small_pair):
    """setup_caches keeps the last caches when they are large enough for the batch (sizes round up to
    CACHE_SLOT_STEP slots); a short prompt after a long one sees none of the long one's keys."""
    hf, model = small_pair
    gen = torch.Generator().manual_seed(5)
    long_ids, short_ids = torch.randint(0, 1000, (1, 60), generator=gen), torch.randint(0, 1000, (1, 20), generator=gen)
    blocks = model.transformer.h
    model.clear_caches(release=True)
    try:
        model.setup_caches(1, 60)
        first = [b.attn.kv_cache for b in blocks]
        assert first[0].k.shape[2] == CACHE_SLOT_STEP
        with torch.inference_mode():
            model(long_ids)
        model.clear_caches()
        assert all(b.attn.kv_cache is None for b in blocks)
        model.setup_caches(1, 20)
        assert [b.attn.kv_cache for b in blocks] == first  # the same storage, holding the long prompt's keys
        with torch.inference_mode():
            ours, ref = model(short_ids), hf(short_ids).logits
        assert max_diff(ours, ref) < TOL
        model.setup_caches(2, 20)  # another batch size: new caches
        second = blocks[0].attn.kv_cache
        assert second is not first[0] and second.k.shape[:3] == (2, 4, 64)
        model.clear_caches(release=True)  # released: the next setup allocates again, even for the same size
        model.setup_caches(2, 20)
        assert blocks[0].attn.kv_cache is not second
    finally:
        model.clear_caches(release=True)


def test_decode_at_a_tensor_slot_equals_decode_at_an_int_slot(small_pair):
    """The static-shape step that CUDA graphs replay (start a tensor: every cache slot read, masked) gives
    the logits of the ordinary step, with left padding and with stale keys of a longer earlier prompt in
    the slots it must not see."""
    _, model = small_pair
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 1000, (2, 12), generator=gen)
    pads = torch.tensor([0, 3])
    steps = torch.randint(0, 1000, (2, 6), generator=gen)
    total = 12 + 6
    key_valid = torch.ones(2, total, dtype=torch.bool)
    key_valid[:, :12] = torch.arange(12) >= pads.unsqueeze(1)
    positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)  # (B, total)
    model.clear_caches(release=True)
    try:
        with torch.inference_mode():
            model.setup_caches(2, 50)
            model(torch.randint(0, 1000, (2, 50), generator=gen))  # stale keys in every slot below 50
            model.setup_caches(2, total)
            slots = model.kv_caches()[0].slots
            assert slots == CACHE_SLOT_STEP > total
            model(ids, 0, positions[:, :12], key_valid)
            all_slots = torch.ones(2, slots, dtype=torch.bool)
            all_slots[:, :total] = key_valid
            for step in range(6):
                slot = 12 + step
                args = (steps[:, step:step + 1], slot, positions[:, slot:slot + 1])
                ordinary = model(*args, key_valid[:, :slot + 1])
                static = model(args[0], torch.tensor([slot]), args[2], all_slots)
                assert max_diff(static, ordinary) < 1e-5, step
    finally:
        model.clear_caches(release=True)


def test_deepcopy_of_a_loaded_model_computes_the_same_logits(small_pair):
    hf, model = small_pair
    clone = copy.deepcopy(model)
    original, copied = model.transformer.h[0].attn.c_attn, clone.transformer.h[0].attn.c_attn
    assert copied is not original and copied.decode == original.decode
    assert torch.equal(copied.weight_and_bias()[0], original.weight_and_bias()[0])
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        assert max_diff(clone(ids), hf(ids).logits) < TOL
