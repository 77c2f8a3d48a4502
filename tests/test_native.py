"""The decode kernel compiled on this machine (gpt2.native, gpt2/rows.c): its products against float64 ones on
every tail of its tiling, for each weight dtype, in its AVX-512 and AVX2 builds; where it cannot be built, no
candidate and no error. And a whole decode step in one call of it (gpt2.native_step) against the torch
path."""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import random_hf_model

import gpt2.native
import gpt2.native_step
import gpt2.sample
from gpt2.checkpoint import load_model
from gpt2.config import GPT2Config
from gpt2.kernels import Projection, kernels_for
from gpt2.model import GPT2LMHeadModel
from gpt2.native import FLAGS, FUNCTIONS, NATIVE_RUNS, draw_rows, library, native_run, rows_product, top_k_filter
from gpt2.native_step import NativeStep
from gpt2.quantize import quantize_rows
from gpt2.sample import _prefill, generate, top_k_logits

# -mno-avx512f: the AVX2 build (8-float vectors, its own tile shapes), which this CPU runs too.
BUILDS = {"native": FLAGS, "avx2": (*FLAGS, "-mno-avx512f")}
DTYPES = (torch.float32, torch.bfloat16, torch.int8)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The kernel of each dtype in each build, compiled once for the module into a cache of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPT2_PYTORCH_CACHE", str(tmp_path_factory.mktemp("native")))
        library.cache_clear()
        compiled = {(dtype, build): library(dtype, flags) for dtype in DTYPES for build, flags in BUILDS.items()}
    library.cache_clear()
    return compiled


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A cache of the test's own, and no build of an earlier test in this process."""
    monkeypatch.setenv("GPT2_PYTORCH_CACHE", str(tmp_path / "cache"))
    library.cache_clear()
    yield
    library.cache_clear()


def _compiled(builds, dtype: torch.dtype, build: str = "native"):
    if builds[dtype, build] is None:
        pytest.skip("no C compiler or OpenMP here")
    return builds[dtype, build]


def _operands(rows: int, out_features: int, in_features: int, dtype: torch.dtype, bias: bool):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen).to(FUNCTIONS[dtype][2]) if bias else None
    if dtype == torch.int8:
        quantized, scales = quantize_rows(weight)
        scales = scales.bfloat16()
        exact = x.double() @ (quantized.double() * scales.double()[:, None]).T
        return x, quantized, b, scales, exact + (0 if b is None else b.double())
    weight = weight.to(dtype)
    return x, weight, b, None, x.double() @ weight.double().T + (0 if b is None else b.double())


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize(("out_features", "in_features", "bias"), [(768, 768, True), (13, 77, False), (50, 200, True)])
def test_products_equal_float64_ones(builds, build, dtype, rows, out_features, in_features, bias):
    """Every tile shape and tail (x rows by 8, 4, 2 and 1; weight rows by 4 and one; the inputs past the last
    cache line), with and without bias and scales: float32 sums of exact products."""
    lib = _compiled(builds, dtype, build)
    x, weight, b, scales, exact = _operands(rows, out_features, in_features, dtype, bias)
    y = rows_product(x, weight, b, scales, lib=lib)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    assert (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 768, 768), (1, 13, 77), (1, 50, 200),
                                                                   (1, 7, 3072), (2, 50, 200)])
def test_streamed_products_equal_float64_ones(builds, build, dtype, rows, out_features, in_features):
    """The streaming kernel (one row of x: weight rows in turn; more rows: the tiles), inputs that are and are
    not a multiple of its four vectors, int8 with outlier columns: float32 sums of exact products."""
    lib = _compiled(builds, dtype, build)
    x, weight, b, scales, exact = _operands(rows, out_features, in_features, dtype, True)
    outliers = columns = None
    if dtype == torch.int8:
        outliers = torch.tensor([3, in_features - 1])
        columns = torch.randn(out_features, 2, generator=torch.Generator().manual_seed(5))
        exact = exact + x[:, outliers].double() @ columns.double().T
    y = rows_product(x, weight, b, scales, outliers, columns, stream=True, lib=lib)
    assert (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("build", BUILDS)
def test_the_draw_of_each_build_is_torchs(builds, build):
    """The draw's two functions in the AVX-512 and the AVX2 build (vectors of 16 and 8 floats): the filter equals
    top_k_logits of the scaled logits, the token and the generator's state torch.multinomial's."""
    lib = _compiled(builds, torch.float32, build)
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(1 + seed % 3, (50257, 1003, 7)[seed % 3], generator=gen) * (1 + seed % 4)
        k = (40, 1, 0, 300)[seed % 4]
        filtered = top_k_filter(logits, 0.7, k, lib)
        assert torch.equal(filtered, top_k_logits(logits / 0.7, k))
        probs = torch.softmax(filtered, dim=-1)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.rand(seed * 97, generator=ours), torch.rand(seed * 97, generator=theirs)
        assert torch.equal(draw_rows(probs, ours, lib), torch.multinomial(probs, 1, generator=theirs).squeeze(1))
        assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_product_is_the_same_bits_in_a_step_of_any_rows(builds, build, dtype):
    """Each row's result is the same bits alone (through the tiles or streaming) as in a step of 2 to 8 rows, on
    every tail: a --prompt_file record does not depend on which rows decode beside it."""
    lib = _compiled(builds, dtype, build)
    for out_features, in_features in [(768, 768), (13, 77), (7, 3072)]:
        x, weight, b, scales, _ = _operands(8, out_features, in_features, dtype, True)
        alone = {stream: torch.cat([rows_product(x[r:r + 1], weight, b, scales, stream=stream, lib=lib)
                                    for r in range(8)]) for stream in (False, True)}
        assert torch.equal(alone[False], alone[True])
        for rows in range(2, 9):
            assert torch.equal(rows_product(x[:rows], weight, b, scales, lib=lib), alone[False][:rows]), rows


def test_products_do_not_depend_on_the_thread_count(builds):
    """Each output is one thread's sum, so one thread or two give the same bits."""
    lib = _compiled(builds, torch.bfloat16)
    x, weight, b, _, _ = _operands(8, 1001, 768, torch.bfloat16, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rows_product(x, weight, b, None, lib=lib)
        torch.set_num_threads(2)
        two = rows_product(x, weight, b, None, lib=lib)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_operands_that_do_not_fit_are_refused(builds):
    lib = _compiled(builds, torch.int8)
    x, weight, b, scales, _ = _operands(2, 16, 32, torch.int8, True)
    with pytest.raises(ValueError, match="do not fit"):
        rows_product(x[:, :31], weight, b, scales, lib=lib)
    with pytest.raises(ValueError, match="do not fit"):
        rows_product(x, weight, b, None, lib=lib)  # int8 needs its scales
    with pytest.raises(ValueError, match="do not fit"):
        rows_product(x, weight, b.float(), scales, lib=lib)


def test_a_build_is_kept_and_loaded_again_without_compiling(fresh, tmp_path, monkeypatch):
    assert library(torch.bfloat16) is not None or pytest.skip("no C compiler or OpenMP here")
    built = list((tmp_path / "cache" / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no partial file left beside it
    library.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert library(torch.bfloat16) is not None


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_there_is_no_native_candidate(fresh, tmp_path, monkeypatch, compiler):
    """No compiler, or one that fails: no candidate, nothing half-written in the cache, and a model loads."""
    monkeypatch.setenv("CC", compiler)
    assert library(torch.bfloat16) is None
    assert not any("native" in k.name for k in kernels_for("bfloat16"))
    assert not any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


def test_kernel_mode_default_builds_nothing(fresh, tmp_path, tiny_dir, monkeypatch):
    """Mode "default" touches no file: it neither builds nor offers the compiled kernel, and sampling (whose draw
    uses a build only where one is loaded already) builds none either."""
    called = []
    monkeypatch.setattr(gpt2.native, "library", lambda *args: called.append(args))
    model = load_model(tiny_dir, dtype=torch.bfloat16, kernels="default")
    list(generate(model, [[1, 2, 3]], 4, top_k=40))
    assert not called and not any("native" in decode for decode, _ in model.kernel_choices().values())
    assert not (tmp_path / "cache").exists()


def test_int8_outlier_columns_are_added_in_float32(builds):
    """int8's outlier input dimensions (gpt2.quantize) are multiplied by their float32 columns in the kernel."""
    for build in BUILDS:
        lib = _compiled(builds, torch.int8, build)
        x, weight, b, scales, exact = _operands(3, 50, 200, torch.int8, True)
        outliers = torch.tensor([3, 17, 199])
        columns = torch.randn(50, 3, generator=torch.Generator().manual_seed(5))
        y = rows_product(x, weight, b, scales, outliers, columns, lib=lib)
        exact = exact + x.double()[:, outliers] @ columns.double().T
        assert (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
        with pytest.raises(ValueError, match="do not fit"):
            rows_product(x, weight, b, scales, torch.tensor([3, 200]), columns[:, :2], lib=lib)


# ---------------------------------------------------------------------------------------------------
# a decode step in one call (gpt2.native_step)

PRODUCTS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.bfloat16}


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("blocks")
    random_hf_model(11, n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128).save_pretrained(directory)
    return directory


def on_native(model, precision: str, lib, stream: bool = False):
    """The model with every block product and the LM head on the native kernel (`stream`: the streaming one),
    whatever this machine's timing picked; int8's with two outlier input dimensions, whose weight columns stay
    float32."""
    native = next((k for k in kernels_for(precision) if NATIVE_RUNS.get(k.run, None) is stream), None)
    if native is None or lib is None:
        pytest.skip("no C compiler or OpenMP here")
    places = [(getattr(block, owner), name) for block in model.transformer.h for owner, name in PRODUCTS]
    for parent, name in [*places, (model, "lm_head")]:
        old = getattr(parent, name)
        weight, bias = old.weight_and_bias() if name != "lm_head" else (model.transformer.wte.weight, None)
        inputs = torch.ones(4, weight.size(1))
        inputs[:, [3, 17]] = 100.0
        stored = native.form.build(weight.float(), bias, inputs if precision == "int8" else None)
        setattr(parent, name, Projection(stored, native, native, old.dtype, tuple(weight.shape), old.tied))
    return model


def torch_path(monkeypatch):
    monkeypatch.setattr(NativeStep, "run", lambda *args: None)
    one_by_one(monkeypatch)


def one_by_one(monkeypatch):
    """generate's decode steps one to a call, each token drawn by next_token (no steps run ahead)."""
    monkeypatch.setattr(NativeStep, "run_drawing", lambda *args: None)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_step_in_one_call_equals_the_torch_path(builds, blocks_dir, monkeypatch, build, precision, stream):
    """The logits and the KV caches of one step at a common slot and at each row's own slot with a padding hole
    in key_valid (the scheduler's step), from the same caches: within 1e-5 of the torch path's. The streaming
    kernel differs from the other at one row only: a step of one row."""
    dtype = torch.int8 if precision == "int8" else LOAD_DTYPES[precision]
    lib = _compiled(builds, dtype, build)
    monkeypatch.setattr(gpt2.native_step, "library", lambda _: lib)
    model = on_native(load_model(blocks_dir, dtype=LOAD_DTYPES[precision], int8=precision == "int8"), precision, lib,
                      stream)
    rows = 1 if stream else 3
    assert NativeStep.of(model) is not None
    if precision == "int8":
        assert all(part.numel() == 2 for block in model.transformer.h
                   for part in (block.attn.c_attn.stored[3], block.mlp.c_proj.stored[3]))
    token = torch.tensor([5, 900, 42])[:rows]
    key_valid = torch.ones(3, 64, dtype=torch.bool)
    key_valid[1, :2] = False  # row 1's first two slots are padding
    key_valid[0, 3] = False  # and row 0's slot 3 (a row of a finished prompt, gpt2.scheduler)
    key_valid = key_valid[:rows]
    slots = torch.tensor([[9], [7], [8]])[:rows]
    ran = []
    run = NativeStep.run
    monkeypatch.setattr(NativeStep, "run", lambda *args: ran.append(run(*args)) or ran[-1])
    with torch.inference_mode():
        model.setup_caches(rows, 64)
        _prefill(model, torch.randint(0, 1000, (rows, 10), generator=torch.Generator().manual_seed(1)), None, None)
        before = [(cache.k.clone(), cache.v.clone()) for cache in model.kv_caches()]
        fused = [model(token.unsqueeze(1), 10), model(token.unsqueeze(1), slots, slots, key_valid)]
        fused_caches = [(cache.k.clone(), cache.v.clone()) for cache in model.kv_caches()]
        for cache, (k, v) in zip(model.kv_caches(), before):
            cache.k.copy_(k), cache.v.copy_(v)
        torch_path(monkeypatch)
        reference = [model(token.unsqueeze(1), 10), model(token.unsqueeze(1), slots, slots, key_valid)]
    assert len(ran) == 2 and all(logits is not None for logits in ran)
    for ours, theirs in zip(fused, reference):
        assert ours.shape == theirs.shape == (rows, 1, 1000)
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    for (k, v), cache in zip(fused_caches, model.kv_caches()):
        assert torch.allclose(k, cache.k, atol=1e-5) and torch.allclose(v, cache.v, atol=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_the_step_reads_each_weight_as_its_chosen_kernel_does(builds, blocks_dir, monkeypatch, stream):
    """The table decode_step reads says, for every product, whether one row streams its weight: as the kernel
    the tuner chose for it does. (It once said "tiles" for all, so the streaming kernel the tuner timed as the
    fastest never ran in a step.)"""
    lib = _compiled(builds, torch.bfloat16)
    monkeypatch.setattr(gpt2.native_step, "library", lambda _: lib)
    model = on_native(load_model(blocks_dir, dtype=torch.bfloat16), "bfloat16", lib, stream)
    step = NativeStep.of(model)
    flags = [getattr(entry, name).stream for entry in step.table
             for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj")] + [step._head_struct.stream]
    assert flags == [int(stream)] * (4 * len(model.transformer.h) + 1)


@pytest.mark.parametrize("stream, ahead", [(False, True), (True, True), (False, False)])
def test_seeded_tokens_are_those_of_the_torch_path(builds, blocks_dir, monkeypatch, stream, ahead):
    """Prompts of different lengths (left padding, masked), sampled, in batches of 3, 1 and 6 rows, a run whose
    caches grow past their first 64 slots (the table follows the caches) and one past the window, whose first row
    holds its last position: the same tokens either way, with steps run several to a call drawing their own tokens
    (`ahead`) or one to a call."""
    lib = _compiled(builds, torch.bfloat16)
    model = on_native(load_model(blocks_dir, dtype=torch.bfloat16), "bfloat16", lib, stream)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    runs = [(prompts, 12), (prompts[:1], 12), (prompts * 2, 12), (prompts[:1], 90), ([[3] * 100, [4]], [20, 120])]

    def tokens() -> list[torch.Tensor]:
        return [torch.stack(list(generate(model, batch, steps, temperature=0.9, top_k=40,
                                          generator=torch.Generator().manual_seed(3)))) for batch, steps in runs]

    calls = []
    spied = "run_drawing" if ahead else "run"
    if not ahead:
        one_by_one(monkeypatch)
    run = getattr(NativeStep, spied)
    monkeypatch.setattr(NativeStep, spied, lambda *args: calls.append(run(*args)) or calls[-1])
    fused = tokens()
    steps = [len(drawn.tokens) for drawn in calls] if ahead else [1] * len(calls)
    assert sum(steps) == sum(max([budget] if isinstance(budget, int) else budget) - 1 for _, budget in runs)
    assert all(result is not None for result in calls)
    torch_path(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(fused, tokens()))


def _ahead_model(builds, blocks_dir, precision: str = "bfloat16"):
    lib = _compiled(builds, LOAD_DTYPES[precision])
    return on_native(load_model(blocks_dir, dtype=LOAD_DTYPES[precision]), precision, lib)


def _sampled(model, prompts, steps, seed: int = 3, between=None, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """generate's tokens and its generator's state after; `between(step, generator)` runs after each token."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for token in generate(model, prompts, steps, generator=generator, **kwargs):
        out.append(token.clone())
        if between:
            between(len(out), generator)
    return out, generator.get_state()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("top_k", [0, 1, 40])
def test_tokens_drawn_ahead_are_those_drawn_one_by_one(builds, blocks_dir, monkeypatch, precision, top_k):
    """Steps run AHEAD_STEPS to a call, each drawing its tokens in C, against next_token's draws one step at a
    time: the same tokens and generator state, for every top-k (0: the whole vocabulary a candidate), rows
    that draw the end-of-text token at different steps (each keeps drawing it; the run stops when all have), and
    a caller that draws from the generator between tokens (the tokens drawn ahead are dropped)."""
    model = _ahead_model(builds, blocks_dir, precision)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    first, _ = _sampled(model, prompts, 30, temperature=0.8, top_k=top_k)
    eot = int(first[5][0])  # row 0 ends at step 5 at the latest

    def meddle(step: int, generator: torch.Generator) -> None:
        if step % 7 == 3:
            torch.rand(2, generator=generator)

    cases = [(prompts, dict()), (prompts, dict(eot_token=eot)), (prompts[:1], dict(eot_token=eot)),
             (prompts, dict(between=meddle))]
    drawn = []
    run = NativeStep.run_drawing
    monkeypatch.setattr(NativeStep, "run_drawing", lambda *args: drawn.append(run(*args)) or drawn[-1])
    ahead = [_sampled(model, batch, 30, temperature=0.8, top_k=top_k, **case) for batch, case in cases]
    assert sum(len(d.tokens) for d in drawn) >= 60
    one_by_one(monkeypatch)
    for (batch, case), (tokens, state) in zip(cases, ahead):
        expected, expected_state = _sampled(model, batch, 30, temperature=0.8, top_k=top_k, **case)
        assert torch.equal(torch.stack(tokens), torch.stack(expected)) and torch.equal(state, expected_state)
    assert all(int(token[0]) == eot for token in ahead[1][0][6:])
    assert len(ahead[2][0]) <= 6 and int(ahead[2][0][-1][0]) == eot


def test_greedy_steps_run_ahead_take_the_tokens_taken_one_by_one(builds, blocks_dir, monkeypatch):
    """Temperature 0: the first largest logit, taken in C, the generator untouched; a NaN in the logits leaves the
    step to torch's argmax."""
    model = _ahead_model(builds, blocks_dir)
    prompts = [[1, 2, 3], [4]]
    drawn = []
    run = NativeStep.run_drawing
    monkeypatch.setattr(NativeStep, "run_drawing", lambda *args: drawn.append(run(*args)) or drawn[-1])
    ahead = [_sampled(model, prompts, 20, temperature=0.0)]
    assert sum(len(d.tokens) for d in drawn) == 19
    bias = float(model.transformer.ln_f.bias[5])
    with torch.no_grad():
        model.transformer.ln_f.bias[5] = float("nan")
    drawn.clear()
    ahead.append(_sampled(model, prompts, 4, temperature=0.0))
    assert [len(d.tokens) for d in drawn] == [0, 0, 0]
    one_by_one(monkeypatch)
    expected = [_sampled(model, prompts, 4, temperature=0.0)]
    with torch.no_grad():
        model.transformer.ln_f.bias[5] = bias
    expected.insert(0, _sampled(model, prompts, 20, temperature=0.0))
    untouched = torch.Generator().manual_seed(3).get_state()
    for (tokens, state), (theirs, their_state) in zip(ahead, expected):
        assert torch.equal(torch.stack(tokens), torch.stack(theirs)) and torch.equal(state, untouched)
        assert torch.equal(their_state, untouched)


@pytest.mark.parametrize("change", ["parameter", "hook"])
def test_a_model_changed_between_tokens_drawn_ahead_decodes_as_changed(builds, blocks_dir, monkeypatch, change):
    """A caller that replaces a layer norm's weight after the fourth token (or hooks a block's MLP), while
    tokens drawn ahead wait: the steps after it run on the changed model, as when drawn one by one, and the hook
    sees each of them."""
    model = _ahead_model(builds, blocks_dir)
    original = model.transformer.h[1].ln_2.weight
    seen = []

    def meddle(step: int, generator: torch.Generator) -> None:
        if step != 4:
            return
        if change == "parameter":
            model.transformer.h[1].ln_2.weight = torch.nn.Parameter(torch.linspace(-2, 2, 64), requires_grad=False)
        else:
            meddle.hook = model.transformer.h[1].mlp.register_forward_hook(lambda *args: seen.append(args[2].shape))

    def sampled() -> tuple[list[torch.Tensor], torch.Tensor]:
        model.transformer.h[1].ln_2.weight = original
        try:
            return _sampled(model, [[1, 2, 3], [4]], 16, between=meddle, temperature=0.9, top_k=40)
        finally:
            if change == "hook":
                meddle.hook.remove()

    ahead = sampled()
    hooked_ahead, seen[:] = list(seen), []
    one_by_one(monkeypatch)
    expected = sampled()
    assert torch.equal(torch.stack(ahead[0]), torch.stack(expected[0])) and torch.equal(ahead[1], expected[1])
    if change == "hook":
        assert hooked_ahead == seen == [(2, 1, 64)] * 12


def test_a_draw_too_near_a_tie_is_left_to_next_token(builds, blocks_dir, monkeypatch):
    """With a margin no ratio beats (all of every weight), C draws nothing: each call computes one step, whose
    logits next_token draws from, and the tokens are those drawn one by one. A temperature so small that the
    scaled logits overflow takes the greedy choice the same way."""
    model = _ahead_model(builds, blocks_dir)
    prompts = [[1, 2, 3], [4]]
    monkeypatch.setattr(gpt2.sample, "DRAW_MARGIN", 1.0)
    drawn = []
    run = NativeStep.run_drawing
    monkeypatch.setattr(NativeStep, "run_drawing", lambda *args: drawn.append(run(*args)) or drawn[-1])
    left = [_sampled(model, prompts, 12, temperature=0.9, top_k=40), _sampled(model, prompts, 6, temperature=1e-38)]
    assert len(drawn) == 11 + 5 and all(len(d.tokens) == 0 and len(d.logits) == 1 for d in drawn)
    one_by_one(monkeypatch)
    expected = [_sampled(model, prompts, 12, temperature=0.9, top_k=40), _sampled(model, prompts, 6, temperature=1e-38)]
    for (tokens, state), (theirs, their_state) in zip(left, expected):
        assert torch.equal(torch.stack(tokens), torch.stack(theirs)) and torch.equal(state, their_state)


def test_a_softmax_less_exact_than_the_margin_allows_keeps_the_draws_one_by_one(builds, blocks_dir, monkeypatch):
    """A torch whose softmax is 1e-4 off at some entries (the margin assumes a few ulp): the once-per-process check
    finds it, and generate draws every token with next_token."""
    softmax = torch.nn.functional.softmax

    def rough(x, dim=None, **kwargs):
        probs = softmax(x, dim=dim, **kwargs)
        return probs * (1 + 1e-4 * torch.rand(probs.shape, generator=torch.Generator().manual_seed(0)))

    model = _ahead_model(builds, blocks_dir)
    monkeypatch.setattr(torch.nn.functional, "softmax", rough)
    called = []
    monkeypatch.setattr(NativeStep, "run_drawing", lambda *args: called.append(args))
    gpt2.sample.softmax_within_margin.cache_clear()
    try:
        assert not gpt2.sample.softmax_within_margin()
        assert len(list(generate(model, [[1, 2]], 4, temperature=1.0, top_k=40))) == 4 and not called
    finally:
        gpt2.sample.softmax_within_margin.cache_clear()
    monkeypatch.undo()
    assert gpt2.sample.softmax_within_margin()


def test_a_generation_closed_early_leaves_the_generator_as_its_last_token_did(builds, blocks_dir, monkeypatch):
    """A caller that stops after 3 tokens, while 8 were drawn ahead: the generator is where 3 tokens drawn one by
    one leave it, and the global generator untouched."""
    model = _ahead_model(builds, blocks_dir)
    before = torch.default_generator.get_state()
    states = []
    for ahead in (True, False):
        if not ahead:
            one_by_one(monkeypatch)
        generator = torch.Generator().manual_seed(5)
        tokens = generate(model, [[1, 2]], 20, temperature=1.0, top_k=40, generator=generator)
        states.append([next(tokens) for _ in range(3)] + [generator.get_state()])
        tokens.close()
        assert torch.equal(generator.get_state(), states[-1][-1])
    assert all(torch.equal(a, b) for a, b in zip(*states))
    assert torch.equal(before, torch.default_generator.get_state())


@pytest.mark.parametrize("product", ["block", "head"])
def test_a_product_on_another_kernel_takes_the_torch_path(builds, blocks_dir, monkeypatch, product):
    lib = _compiled(builds, torch.float32)
    model = on_native(load_model(blocks_dir), "float32", lib)
    assert NativeStep.of(model) is not None
    other = next(k for k in kernels_for("float32") if k.run is not native_run and k.form.name == "float32 dense")
    parent, name = (model.transformer.h[1].mlp, "c_proj") if product == "block" else (model, "lm_head")
    proj = getattr(parent, name)
    setattr(parent, name, Projection(proj.stored, other, other, proj.dtype, (proj.out_features, proj.in_features),
                                     proj.tied))
    assert NativeStep.of(model) is None
    called = []
    monkeypatch.setattr(NativeStep, "run", lambda *args: called.append(args))
    list(generate(model, [[1, 2, 3]], 4))
    assert not called


@pytest.mark.parametrize("replaced", ["ln_2.weight", "wpe.weight", "wte"])
def test_a_replaced_parameter_is_read_at_the_next_step(builds, blocks_dir, monkeypatch, replaced):
    """The table is built again when a layer norm's parameter, the position table or the token embedding module
    is replaced: the step reads the new one."""
    lib = _compiled(builds, torch.float32)
    model = on_native(load_model(blocks_dir), "float32", lib)
    first = NativeStep.of(model)
    gen = torch.Generator().manual_seed(2)
    if replaced == "ln_2.weight":
        model.transformer.h[0].ln_2.weight = torch.nn.Parameter(torch.linspace(-2, 2, 64), requires_grad=False)
    elif replaced == "wpe.weight":
        model.transformer.wpe.weight = torch.nn.Parameter(torch.randn(128, 64, generator=gen), requires_grad=False)
    else:  # the lookups' table only: the head keeps its own form
        model.transformer.wte = torch.nn.Embedding(1000, 64, _weight=torch.randn(1000, 64, generator=gen))
    assert NativeStep.of(model) is not first

    def step() -> torch.Tensor:
        with torch.inference_mode():
            model.setup_caches(1, 16)
            _prefill(model, torch.tensor([[4, 5, 6]]), None, None)
            return model(torch.tensor([[7]]), 3, last_only=True)[:, -1]

    fused = step()
    torch_path(monkeypatch)
    reference = step()
    assert (fused - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("hooked", ["mlp", "wte"])
def test_a_forward_hook_on_a_block_sees_its_call(builds, blocks_dir, hooked):
    """Where a block's module or an embedding the step looks up has a forward hook, the step takes the torch
    path, so the hook runs."""
    lib = _compiled(builds, torch.float32)
    model = on_native(load_model(blocks_dir), "float32", lib)
    seen = []
    module = model.transformer.h[1].mlp if hooked == "mlp" else model.transformer.wte
    hook = module.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        list(generate(model, [[1, 2, 3]], 3))
    finally:
        hook.remove()
    assert seen == [(1, 3, 64), (1, 1, 64), (1, 1, 64)]
    assert NativeStep.of(model) is not None


@pytest.mark.parametrize("wrong", ["token", "position", "slot"])
def test_an_index_out_of_range_raises_as_on_the_torch_path(builds, blocks_dir, monkeypatch, wrong):
    """A token id past the vocabulary, a position past the window or a slot past the caches: the step declines
    (nothing written) and the torch path raises its own error."""
    lib = _compiled(builds, torch.float32)
    model = on_native(load_model(blocks_dir), "float32", lib)
    ran = []
    run = NativeStep.run
    monkeypatch.setattr(NativeStep, "run", lambda *args: ran.append(run(*args)) or ran[-1])
    with torch.inference_mode():
        model.setup_caches(1, 16)
        token = torch.tensor([[1000 if wrong == "token" else 7]])
        slot = torch.tensor([[model.kv_caches()[0].slots if wrong == "slot" else 3]])
        position = torch.tensor([[128 if wrong == "position" else 3]])
        before = [(cache.k.clone(), cache.v.clone()) for cache in model.kv_caches()]
        with pytest.raises((IndexError, RuntimeError)) as fused:
            model(token, slot, position)
        assert ran == [None]
        assert all(torch.equal(k, cache.k) and torch.equal(v, cache.v)
                   for (k, v), cache in zip(before, model.kv_caches()))
        torch_path(monkeypatch)
        with pytest.raises(type(fused.value)) as reference:
            model(token, slot, position)
    assert str(fused.value) == str(reference.value)


def test_a_model_built_here_steps_on_the_torch_path():
    """A model built in Python (nn.Linear products, no head module) takes a decode step as before: the cached
    step's logits equal the full forward's."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=4))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        full = model(ids)[:, -1]
        model.setup_caches(1, 8)
        _prefill(model, ids[:, :3], None, None)
        step = model(ids[:, 3:], 3)[:, -1]
    assert NativeStep.of(model) is None
    assert (step - full).abs().max() <= 1e-5 * full.abs().max()
