"""
Tests for gpt2/sample.py: token-identical to transformers' generate() under the same seed and weights.

transformers draws each token as we do (logits / temperature, top-k, top-p, softmax, one multinomial
over the whole vocabulary per step from the global generator), so after the same torch.manual_seed the
two must produce the same ids, token for token, including where end-of-text stops the batch early.
The models have the real vocabulary (50257) so the draws are over the real width; one case runs at the
real 124M shape.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_hf_model
from transformers import GPT2LMHeadModel as HFModel
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import gpt2.sample
from gpt2.checkpoint import load_model
from gpt2.model import GPT2LMHeadModel
from gpt2.native import draw_library, draw_rows, library, top_k_filter
from gpt2.sample import DRAW_MAX_CANDIDATES, draw_one, generate, next_token, sample_sequence, top_k_logits, top_p_logits

EOT = 50256
VOCAB = 50257
NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------------
# helpers and fixtures


# Sampling runs thousands of tiny ops, both sides on one thread; the multi-thread product is tested in test_model.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[HFModel, GPT2LMHeadModel]:
    """Two layers of width 64 over the real vocabulary; ours loaded from transformers' save_pretrained."""
    hf = random_hf_model(7, n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=1024)
    path = tmp_path_factory.mktemp("sample_model")
    hf.save_pretrained(path)
    return hf, load_model(path)


def boost_eot(model, alpha: float):
    """Raise the end-of-text logit by alpha: ln_f's bias gains a component along the (tied) eot row.
    Module paths are the same in transformers' model and ours."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        w = model.transformer.wte.weight[EOT]
        model.transformer.ln_f.bias += alpha * w / w.dot(w)
    return model


@pytest.fixture(scope="module")
def eot_pair(pair) -> tuple[HFModel, GPT2LMHeadModel]:
    """End-of-text drawn every few dozen steps (top-k 40, temperature 0.7): rows end at different steps."""
    hf, ours = pair
    return boost_eot(hf, 7.0), boost_eot(ours, 7.0)


CTX = torch.randint(0, 50000, (10,), generator=torch.Generator().manual_seed(2)).tolist()


def ours_sample(model, seed: int, length: int, batch_size: int, context=CTX, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return sample_sequence(model, length, context=context, batch_size=batch_size, **kwargs)


def hf_sample(hf, seed: int, length: int, batch_size: int, context=CTX, **kwargs) -> torch.Tensor:
    ids = torch.tensor([list(context)] * batch_size)
    torch.manual_seed(seed)
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, pad_token_id=EOT,
                       eos_token_id=EOT, **kwargs)


def assert_same_tokens(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype == torch.long
    assert ours.shape == theirs.shape
    if not torch.equal(ours, theirs):
        row, col = (ours != theirs).nonzero()[0].tolist()
        pytest.fail(f"first difference at row {row}, column {col}: {ours[row, col]} != {theirs[row, col]}")


# ---------------------------------------------------------------------------------------------------
# token-identical to transformers' generate()


@pytest.mark.parametrize("batch, length, kwargs, eot", [
    (1, 64, dict(top_k=40, temperature=0.7), None),
    (4, 64, dict(top_k=40, temperature=0.7), EOT),
    (2, 48, dict(top_k=0, top_p=0.9, temperature=1.0), EOT),  # top-p sorts the vocabulary: fewer steps
    (2, 48, dict(top_k=40, top_p=0.95, temperature=0.7), None),
], ids=["b1-topk40-t0.7", "b4-topk40-t0.7-eot", "b2-topp0.9", "b2-topk40-topp0.95"])
def test_sampling_matches_transformers_generate(pair, batch, length, kwargs, eot):
    hf, ours = pair
    mine = ours_sample(ours, 1234, length, batch, eot_token=eot, **kwargs)
    theirs = hf_sample(hf, 1234, length, batch, do_sample=True, **kwargs)
    assert mine.shape == (batch, len(CTX) + length)
    assert (mine[:, : len(CTX)] == torch.tensor(CTX)).all()
    if eot is None:  # transformers stops at eos; without eot_token we never do, so none may be drawn
        assert not (mine == EOT).any()
    assert len(set(mine[:, len(CTX) :].flatten().tolist())) > 20  # really sampled, not a fixed point
    assert_same_tokens(mine, theirs)


def test_end_of_text_stops_like_transformers(eot_pair):
    hf, ours = eot_pair
    mine = ours_sample(ours, 1, 256, 4, top_k=40, temperature=0.7, eot_token=EOT)
    theirs = hf_sample(hf, 1, 256, 4, do_sample=True, top_k=40, temperature=0.7)
    new = mine[:, len(CTX) :]
    first = [int((row == EOT).nonzero()[0]) for row in new]  # every row ended...
    assert new.shape[1] == max(first) + 1 < 256  # ...the batch stopped when the last one did...
    assert min(first) < max(first)  # ...and rows that ended earlier were padded with eot
    for row, f in zip(new, first):
        assert (row[f:] == EOT).all()
    assert_same_tokens(mine, theirs)


@pytest.mark.parametrize("sample_flag", [True, False])
def test_greedy_matches_transformers(pair, sample_flag):
    hf, ours = pair
    if sample_flag:
        mine = ours_sample(ours, 0, 128, 2, temperature=0.0, eot_token=EOT)
    else:  # graykode's switch: sample=False is greedy whatever the temperature
        mine = ours_sample(ours, 0, 128, 2, temperature=0.7, top_k=40, sample=False, eot_token=EOT)
    theirs = hf_sample(hf, 0, 128, 2, do_sample=False)
    assert_same_tokens(mine, theirs)


def test_unconditional_start_token_matches_transformers(pair):
    hf, ours = pair
    torch.manual_seed(5)
    mine = sample_sequence(ours, 32, start_token=EOT, batch_size=3, top_k=40, temperature=0.7)
    assert mine.shape == (3, 33)
    assert (mine[:, 0] == EOT).all()
    assert not torch.equal(mine[0], mine[1])  # each row is its own draw
    theirs = hf_sample(hf, 5, 32, 3, context=[EOT], do_sample=True, top_k=40, temperature=0.7)
    assert_same_tokens(mine, theirs)


def test_start_token_and_context_are_exclusive(pair):
    _, ours = pair
    with pytest.raises(ValueError):
        sample_sequence(ours, 4, start_token=EOT, context=[1, 2])
    with pytest.raises(ValueError):
        sample_sequence(ours, 4)


def test_124m_shape_matches_transformers(hf_124m, ours_124m):
    ctx = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    length = 24
    mine = ours_sample(ours_124m, 42, length, 1, context=ctx, top_k=40, temperature=0.7, eot_token=EOT)
    theirs = hf_sample(hf_124m.eval(), 42, length, 1, context=ctx, do_sample=True, top_k=40, temperature=0.7)
    assert_same_tokens(mine, theirs)
    assert mine.shape == (1, 20 + length)


# ---------------------------------------------------------------------------------------------------
# generate(): prompts of different lengths, end-of-text, the context window


def greedy(model, prompts, steps, **kwargs) -> torch.Tensor:
    return torch.stack(list(generate(model, prompts, steps, temperature=0.0, **kwargs)), dim=1)  # (B, steps)


def test_mixed_length_prompts_continue_as_if_alone(pair):
    hf, ours = pair
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 50000, (n,), generator=gen).tolist() for n in (3, 7, 12)]
    batched = greedy(ours, prompts, 30)
    assert batched.shape == (3, 30)
    for row, prompt in enumerate(prompts):
        alone = greedy(ours, [prompt], 30)
        assert torch.equal(batched[row], alone[0]), f"row {row} (prompt length {len(prompt)})"
        theirs = hf_sample(hf, 0, 30, 1, context=prompt, do_sample=False)
        if row == 0:  # and alone is transformers' greedy continuation
            assert_same_tokens(torch.cat([torch.tensor([prompt]), alone], dim=1), theirs)
    assert len({tuple(r) for r in batched.tolist()}) == 3


def test_batch_may_run_past_the_window_of_its_longest_prompt(pair):
    """Slots are not positions: a 4-token prompt beside a 1020-token one still gets its 12 tokens, and
    the long row, with a budget of its own that fills the 1024-token window, is right within it."""
    _, ours = pair
    gen = torch.Generator().manual_seed(9)
    long, short = (torch.randint(0, 50000, (n,), generator=gen).tolist() for n in (1020, 4))
    batched = greedy(ours, [long, short], [4, 12])
    assert torch.equal(batched[1], greedy(ours, [short], 12)[0])
    assert torch.equal(batched[0, :4], greedy(ours, [long], 4)[0])  # fed back at positions 1020..1022


@pytest.fixture(scope="module")
def forced_eot(pair) -> GPT2LMHeadModel:
    """Every next-token distribution peaks at end-of-text: ln_f's output is a constant along its row."""
    _, ours = pair
    model = copy.deepcopy(ours)
    with torch.no_grad():
        model.transformer.wte.weight[EOT] *= 2  # longest row: its own dot product is the largest
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(3 * model.transformer.wte.weight[EOT])
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_stops_once_every_row_has_ended(forced_eot, temperature):
    steps = list(generate(forced_eot, [[1, 2, 3], [4], [5, 6]], 10, temperature=temperature, eot_token=EOT))
    assert len(steps) == 1
    assert steps[0].tolist() == [EOT] * 3
    out = sample_sequence(forced_eot, 10, context=[1, 2, 3], batch_size=2, temperature=temperature, eot_token=EOT)
    assert out.tolist() == [[1, 2, 3, EOT]] * 2


def test_without_eot_token_generation_runs_its_length(forced_eot):
    steps = greedy(forced_eot, [[1, 2, 3], [4]], 10)
    assert steps.tolist() == [[EOT] * 10] * 2


def test_finished_rows_keep_yielding_eot(eot_pair):
    _, ours = eot_pair
    torch.manual_seed(11)
    steps = torch.stack(list(generate(ours, [CTX[:4], CTX, CTX[:7]], 256, 0.7, 40, 1.0, EOT)), dim=1)
    ended = [int((row == EOT).nonzero()[0]) for row in steps]
    assert steps.shape[1] == max(ended) + 1 < 256
    assert min(ended) < max(ended)
    for row, first in zip(steps, ended):
        assert (row[first:] == EOT).all()


def test_generate_rejects_empty_prompts_and_yields_nothing_for_zero_tokens(pair):
    _, ours = pair
    with pytest.raises(ValueError):
        list(generate(ours, [[1, 2], []], 4))
    with pytest.raises(ValueError):
        list(generate(ours, [], 4))
    assert list(generate(ours, [[1, 2]], 0)) == []
    assert all(block.attn.kv_cache is None for block in ours.transformer.h)


@pytest.mark.parametrize("top_k", [40, 0])
def test_a_given_generator_draws_what_the_global_one_would_and_leaves_it_alone(pair, top_k):
    """generate(generator=g) gives the tokens a global seed gives (transformers' too), and changes neither
    the global generator nor anything but g."""
    hf, ours = pair
    expected = hf_sample(hf, 11, 6, 2, do_sample=True, temperature=0.9, top_k=top_k)
    torch.manual_seed(5)
    before = torch.default_generator.get_state()
    got = sample_sequence(ours, 6, context=CTX, batch_size=2, temperature=0.9, top_k=top_k,
                          generator=torch.Generator().manual_seed(11))
    assert_same_tokens(got, expected)
    assert torch.equal(before, torch.default_generator.get_state())


@pytest.mark.parametrize("lengths, budget", [((1020,), 5), ((1020, 1020), 5), ((3, 1020), 5), ((1, 1), 1024)])
def test_prompt_plus_new_tokens_beyond_the_window_is_a_value_error(pair, lengths, budget):
    """For any batch shape, equal or mixed lengths: a ValueError naming the window, not an IndexError."""
    _, ours = pair
    prompts = [[EOT] * n for n in lengths]
    with pytest.raises(ValueError, match="window of 1024 positions"):
        list(generate(ours, prompts, budget))
    with pytest.raises(ValueError, match="window of 1024 positions"):
        sample_sequence(ours, budget, context=prompts[-1], batch_size=len(lengths))


def compiled_draw():
    """The build the draw uses, once one is loaded (as load_model loads one)."""
    return (library(torch.float32) and draw_library()) or pytest.skip("no C compiler or OpenMP here")


@pytest.fixture(params=["compiled", "python"])
def draw_path(request, monkeypatch) -> str:
    """The draw of the C build (gpt2.native) and the one without it (random_ and Python)."""
    if request.param == "compiled":
        compiled_draw()
    else:
        monkeypatch.setattr(gpt2.sample, "draw_library", lambda: None)
    gpt2.sample.draw_one_matches_torch.cache_clear()
    yield request.param
    gpt2.sample.draw_one_matches_torch.cache_clear()


def test_draw_one_falls_back_to_torch_where_they_differ(monkeypatch, draw_path):
    """Where this torch's multinomial draws otherwise (as before 2.7), the once-per-process check finds it
    and draw_one draws with torch.multinomial itself."""
    multinomial = torch.multinomial

    def other_sampler(probs, num_samples, generator=None):  # a torch whose sampler draws other numbers
        torch.rand(1, generator=generator)
        return multinomial(probs, num_samples, generator=generator)

    monkeypatch.setattr(torch, "multinomial", other_sampler)
    assert not gpt2.sample.draw_one_matches_torch(draw_path == "compiled")
    probs = F.softmax(top_k_logits(torch.randn(4, 5000, generator=torch.Generator().manual_seed(3)), 40), -1)
    for seed in range(5):
        ours = draw_one(probs, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, other_sampler(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0])
    monkeypatch.setattr(torch, "multinomial", multinomial)  # this torch's sampler again: the check agrees
    gpt2.sample.draw_one_matches_torch.cache_clear()
    assert gpt2.sample.draw_one_matches_torch(draw_path == "compiled")


def test_the_compiled_filter_equals_top_k_logits_of_the_scaled_logits():
    """top_k_filter is top_k_logits(logits / t, k) bit for bit: ties at the k-th value, -inf entries, k of 0,
    1, V and beyond, a row of one entry, rows of a batch cut apart; None where a row's largest is not finite."""
    lib = compiled_draw()
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        rows, width = 1 + seed % 3, (VOCAB, 1000, 17, 1, 64)[seed % 5]
        logits = torch.randn(rows, width, generator=gen) * (0.3 + seed % 7)
        if seed % 4 == 0:
            logits = logits.round()  # many ties, at the k-th value too
        if seed % 6 == 0:
            logits[:, ::3] = NEG_INF
        k = (0, 1, 2, 40, width, width + 5)[seed % 6]
        temperature = (0.7, 1.0, 0.3, 1.7, 1e-3)[seed % 5]
        scaled = logits / temperature
        got = top_k_filter(logits, temperature, k, lib)
        if bool(torch.isfinite(scaled.amax(dim=-1)).all()):
            assert torch.equal(got, top_k_logits(scaled, k)), seed
        else:  # a row of -inf only
            assert got is None and width == 1, seed
    for bad in (float("nan"), float("inf")):
        logits = torch.randn(3, 100)
        logits[2, 50] = bad
        assert top_k_filter(logits, 0.7, 40, lib) is None
    assert top_k_filter(torch.full((1, 9), NEG_INF), 0.7, 4, lib) is None
    assert top_k_filter(torch.full((1, 9), 1e38), 1e-3, 4, lib) is None  # overflows to inf


def test_a_compiled_draw_whose_generator_moves_meanwhile_gives_way():
    """Another thread's torch op on the same generator while the compiled draw runs: the draw gives way and
    leaves the generator as that op left it (its numbers are never drawn twice)."""
    lib = compiled_draw()
    probs = F.softmax(top_k_logits(torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(8)), 40), -1)
    generator = torch.Generator().manual_seed(6)

    class Meanwhile:  # the build, with a torch op on the generator while it draws
        def draw_rows(self, *args):
            torch.rand(1, generator=generator)
            return lib.draw_rows(*args)

    moved = torch.Generator().manual_seed(6)
    torch.rand(1, generator=moved)
    assert draw_rows(probs, generator, Meanwhile()) is None
    assert torch.equal(generator.get_state(), moved.get_state())


def test_the_compiled_draw_leaves_a_state_with_a_zero_word_to_torch():
    """A zero word of the generator (u could be 0) makes the compiled draw give way, the state untouched;
    draw_one then draws torch's token from it."""
    lib = compiled_draw()
    probs = F.softmax(top_k_logits(torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4)), 40), -1)
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)
    state = generator.get_state()
    state[24 + 8 * 300:24 + 8 * 301] = 0  # a word the draw reads before its first twist
    generator.set_state(state)
    assert draw_rows(probs, generator, lib) is None
    assert torch.equal(generator.get_state(), state)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().set_state(state)).squeeze(1)
    assert torch.equal(draw_one(probs, generator), expected)


# ---------------------------------------------------------------------------------------------------
# a prompt in chunks (gpt2.sample._prefill on CPU)


@pytest.mark.parametrize("rows, chunks", [(1, [1] * 12), (6, [2] * 6), (16, [5, 5, 2]), (35, [11, 1])])
def test_prompt_in_chunks_equals_the_prompt_at_once(pair, monkeypatch, rows, chunks):
    """However few rows a chunk holds (1: one token of one row at a time), the first logits and every
    cached key and value equal those of one pass, for left-padded prompts of mixed lengths."""
    _, ours = pair
    gen = torch.Generator().manual_seed(31)
    lengths = (7, 12, 3)
    idx = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    key_valid = torch.zeros(len(lengths), max(lengths) + 1, dtype=torch.bool)
    for row, n in enumerate(lengths):
        idx[row, -n:] = torch.randint(0, 50000, (n,), generator=gen)
        key_valid[row, -n - 1:] = True
    position_ids = (key_valid[:, :-1].long().cumsum(1) - 1).clamp(min=0)

    chunk_lengths = []
    hidden_states, forward = ours.hidden_states, ours.forward
    in_forward = []

    def spy(ids, *args, **kwargs):  # every chunk but the last
        if not in_forward:
            chunk_lengths.append(ids.size(1))
        return hidden_states(ids, *args, **kwargs)

    def spy_forward(ids, *args, **kwargs):  # the last chunk: through the blocks, or a step in one call (T = 1)
        chunk_lengths.append(ids.size(1))
        in_forward.append(True)
        try:
            return forward(ids, *args, **kwargs)
        finally:
            in_forward.pop()

    def first_logits_and_cache(prefill_rows: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(gpt2.sample, "PIECE_ROWS", prefill_rows)
        monkeypatch.setattr(ours, "hidden_states", spy)
        monkeypatch.setattr(ours, "forward", spy_forward)
        chunk_lengths.clear()
        ours.setup_caches(len(lengths), max(lengths) + 1)
        try:
            logits = gpt2.sample._prefill(ours, idx, position_ids, key_valid)
            return logits, [torch.stack([cache.k, cache.v])[..., : max(lengths), :].clone()
                            for cache in ours.kv_caches()]
        finally:
            ours.clear_caches()
            monkeypatch.undo()

    at_once, cached_at_once = first_logits_and_cache(10**6)
    assert chunk_lengths == [12]
    chunked, cached_chunked = first_logits_and_cache(rows)
    assert chunk_lengths == chunks  # tokens of each of the 3 rows per chunk: about `rows` rows in all
    assert (at_once - chunked).abs().max().item() < 1e-5
    for block, (a, b) in enumerate(zip(cached_at_once, cached_chunked)):
        assert (a - b).abs().max().item() < 1e-5, f"block {block}"


def test_sampling_with_the_prompt_in_chunks_matches_transformers_generate(pair, monkeypatch):
    hf, ours = pair
    monkeypatch.setattr(gpt2.sample, "PIECE_ROWS", 8)  # the 10-token prompt in chunks of 4, 4 and 2 per row
    mine = ours_sample(ours, 99, 64, 2, top_k=40, temperature=0.7)
    theirs = hf_sample(hf, 99, 64, 2, do_sample=True, top_k=40, temperature=0.7)
    assert_same_tokens(mine, theirs)


# ---------------------------------------------------------------------------------------------------
# the filters and the draw


def test_top_k_zero_or_wider_than_the_vocabulary_keeps_all():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_k_logits(logits, 0), logits)
    assert torch.equal(top_k_logits(logits, 50), logits)
    assert torch.equal(top_k_logits(logits, 1000), logits)


def test_top_k_keeps_ties_and_cuts_each_row_at_its_own_kth():
    logits = torch.tensor([
        [1.0, 3.0, 3.0, 2.0],
        [40.0, 30.0, 20.0, 10.0],
        [0.0, 0.0, 5.0, 0.0],
    ])
    inf = NEG_INF
    assert top_k_logits(logits[:1], 1).tolist() == [[inf, 3.0, 3.0, inf]]
    assert top_k_logits(logits, 2).tolist() == [
        [inf, 3.0, 3.0, inf],
        [40.0, 30.0, inf, inf],
        [0.0, 0.0, 5.0, 0.0],  # the 2nd largest is 0: every 0 ties with it
    ]
    assert top_k_logits(logits, 3).tolist() == [
        [inf, 3.0, 3.0, 2.0],
        [40.0, 30.0, 20.0, inf],
        [0.0, 0.0, 5.0, 0.0],
    ]


@pytest.mark.parametrize("k", [1, 7, 40])
def test_top_k_equals_transformers_warper(k):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(k))
    expected = TopKLogitsWarper(top_k=k)(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    assert torch.equal(top_k_logits(logits, k), expected)
    assert (top_k_logits(logits, k) > NEG_INF).sum(dim=1).tolist() == [k] * 4


def test_top_p_hand_computed():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    kept = lambda p: (top_p_logits(logits, p) > NEG_INF).tolist()[0]  # noqa: E731
    assert kept(0.8) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, True, False, True]
    assert kept(0.45) == [False, True, False, False]
    assert kept(0.96) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-9) == [False, True, False, False]  # the top token always stays
    out = top_p_logits(logits, 0.8)
    assert torch.equal(out[out > NEG_INF], logits[out > NEG_INF])  # kept logits are untouched


def test_top_p_cuts_each_row_on_its_own():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log()
    assert (top_p_logits(logits, 0.6) > NEG_INF).tolist() == [[True, True, False, False], [False, False, True, True]]
    flat = torch.zeros(1, 10)  # uniform: 0.85 needs 9 of the 10
    assert int((top_p_logits(flat, 0.85) > NEG_INF).sum()) == 9


@pytest.mark.parametrize("p", [0.3, 0.9, 0.95])
def test_top_p_equals_transformers_warper(p):
    logits = 2 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(int(p * 100)))
    expected = TopPLogitsWarper(top_p=p)(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    assert torch.equal(top_p_logits(logits, p), expected)


def test_next_token_greedy_and_degenerate_draws(draw_path):
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(dim=-1)
    token = next_token(logits, temperature=0.0)
    assert token.shape == (5,) and token.dtype == torch.long
    assert torch.equal(token, argmax)
    assert torch.equal(next_token(logits.to(torch.bfloat16), temperature=0.0), logits.to(torch.bfloat16).argmax(-1))
    torch.manual_seed(0)
    for _ in range(5):  # top-k 1 and a tiny top-p leave one token to draw
        assert torch.equal(next_token(logits, temperature=1.3, top_k=1), argmax)
        assert torch.equal(next_token(logits, temperature=0.7, top_p=1e-6), argmax)


def test_next_token_draws_from_the_filtered_distribution(draw_path):
    """The draw is the multinomial of softmax(top_p(top_k(logits / t))), from the global generator."""
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(2))
    scores = TopPLogitsWarper(top_p=0.9)(None, TopKLogitsWarper(top_k=40)(None, logits / 0.7))
    torch.manual_seed(3)
    expected = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
    torch.manual_seed(3)
    assert torch.equal(next_token(logits, temperature=0.7, top_k=40, top_p=0.9), expected)
    allowed = top_k_logits(logits, 40) > NEG_INF
    torch.manual_seed(4)
    for _ in range(20):
        token = next_token(logits, temperature=0.7, top_k=40)
        assert allowed.gather(1, token.unsqueeze(1)).all()


def _multinomial_and_state(probs: torch.Tensor, seed: int, draw) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    token = draw(probs)
    return token, torch.default_generator.get_state()


def _torch_multinomial(probs: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(probs, 1).squeeze(1)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("k", [1, 2, 40, 300])
def test_draw_one_equals_torch_multinomial_and_leaves_the_generator_alike(batch, k, draw_path):
    """Same token per row and the same generator state after, over many seeds, scales and cut-offs (fewer for the
    fallback without a build)."""
    for seed in range(40 if draw_path == "compiled" else 10):
        logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * (0.3 + seed % 5 * 3)
        probs = F.softmax(top_k_logits(logits / 0.7, k), dim=-1)
        expected, expected_state = _multinomial_and_state(probs, seed, _torch_multinomial)
        token, state = _multinomial_and_state(probs, seed, draw_one)
        assert torch.equal(token, expected), (seed, token, expected)
        assert torch.equal(state, expected_state)


def test_draw_one_breaks_ties_like_torch_and_takes_every_path(draw_path):
    """Exact ties (equal probabilities, in a batch and in a row alone), rows of one candidate, more candidates
    than DRAW_MAX_CANDIDATES (torch's own draw), non-contiguous and double input: always torch.multinomial's
    token and state."""
    ties = torch.zeros(4, VOCAB)
    ties[0, [5, 17, 900, 50000]] = 0.25
    ties[1, 123] = 1.0
    ties[2, :DRAW_MAX_CANDIDATES] = 1.0 / DRAW_MAX_CANDIDATES
    ties[3, 7:9] = 0.5
    wide = torch.full((2, VOCAB), 1.0 / VOCAB)  # every entry a candidate
    for probs in (ties, ties[:1], ties[1:2], ties[3:], ties[:2], ties[[0, 1, 3]], wide, wide[:1],
                  ties.t().contiguous().t(), ties.double()):
        for seed in range(30):
            expected = _multinomial_and_state(probs, seed, _torch_multinomial)
            got = _multinomial_and_state(probs, seed, draw_one)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("bad", ["nan", "inf", "negative", "all zero row"])
def test_draw_one_refuses_what_torch_refuses(bad, draw_path):
    probs = F.softmax(top_k_logits(torch.randn(2, VOCAB), 40), dim=-1)
    value = {"nan": float("nan"), "inf": float("inf"), "negative": -0.5, "all zero row": 0.0}[bad]
    if bad == "all zero row":
        probs[1] = 0.0
    else:
        probs[1, 10] = value
    with pytest.raises(RuntimeError) as expected:
        torch.multinomial(probs, 1)
    with pytest.raises(RuntimeError) as got:
        draw_one(probs)
    assert str(got.value) == str(expected.value)
