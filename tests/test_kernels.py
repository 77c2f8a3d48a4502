"""CPU kernel choice (gpt2.tuning) with a fake clock, its cache file, and a loaded model as a module:
state_dict, moving, copying; int8's contract with activation outliers; missing int8 kernels."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_hf_model

import gpt2.kernels
import gpt2.quantize
import gpt2.tuning
from gpt2.checkpoint import load_model
from gpt2.errors import GPT2Error
from gpt2.kernels import Kernel, Projection, _dense_form, _transposed_form, int8_dynamic_available
from gpt2.model import GPT2LMHeadModel
from gpt2.native import available as native_available
from gpt2.native import native_run
from gpt2.tuning import (
    DECODE_TIMING_ROWS,
    LOAD_STEPS,
    PREFILL_TIMING_ROWS,
    REBUILT_MARGIN,
    REPEATS,
    STEP_NATIVE_MARGIN,
    Choice,
    choices_for,
    choices_for_a_step,
    default_choice,
    kernels_mode,
    measure,
    step_in_one_call,
)

SHAPE = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
W = (48, 32)  # a weight's (out, in) for the tuner
DENSE, TRANSPOSED = _dense_form(torch.float32), _transposed_form(torch.float32)


class FakeClock:
    """A clock that only the fake kernels advance: each call costs what its kernel says for its rows."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, int]] = []

    def __call__(self) -> float:
        return self.now


def fake_kernel(clock: FakeClock, name: str, seconds_per_rows: dict[int, float], form=DENSE, exact=True,
                gelu_seconds: float | None = None) -> Kernel:
    """A correct product (or, not `exact`, a wrong one) that takes `seconds_per_rows[rows]` on `clock`; with
    `gelu_seconds`, also with gelu fused, taking that long at any row count."""
    def run(x, stored):
        clock.now += seconds_per_rows.get(x.size(0), 0.0)
        clock.calls.append((name, x.size(0)))
        weight, bias = form.unpack(stored)
        return F.linear(x, weight, bias) * (1 if exact else 1.5)

    def run_gelu(x, stored):
        clock.now += gelu_seconds
        clock.calls.append((f"{name} with gelu", x.size(0)))
        weight, bias = form.unpack(stored)
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    return Kernel(name, form, run, run_gelu=None if gelu_seconds is None else run_gelu)


def costs(one: float, eight: float, prefill: float) -> dict[int, float]:
    return {DECODE_TIMING_ROWS[0]: one, DECODE_TIMING_ROWS[1]: eight, PREFILL_TIMING_ROWS: prefill}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------------------------------------------
# measuring


def test_measure_ranks_by_decode_time_and_picks_prefill_on_each_form(clock):
    """Decode ranks every kernel; prefill takes each form's fastest kernel at PREFILL_TIMING_ROWS, also on a
    form other than the winner's (where the winner's cannot hold a weight, its product falls back there)."""
    THIRD = dataclasses.replace(DENSE, name="third form")
    kernels = [fake_kernel(clock, "slow decode, fast prefill", costs(3, 3, 1)),
               fake_kernel(clock, "fast decode", costs(1, 2, 9)),
               fake_kernel(clock, "other form", costs(2, 2, 5), form=TRANSPOSED),
               fake_kernel(clock, "other form, fast prefill", costs(5, 5, 0.1), form=TRANSPOSED),
               fake_kernel(clock, "alone on its form", costs(2.5, 2.5, 1), form=THIRD)]
    choice = measure(kernels, W, 1e-5, clock)
    assert choice.decode == ("fast decode", "other form", "alone on its form", "slow decode, fast prefill",
                             "other form, fast prefill")
    assert choice.prefill == {DENSE.name: "slow decode, fast prefill", TRANSPOSED.name: "other form, fast prefill",
                              THIRD.name: "alone on its form"}
    assert ("alone on its form", PREFILL_TIMING_ROWS) not in clock.calls  # nothing to choose from


@pytest.mark.parametrize("gelu_seconds", [0.5, 1.5])
def test_gelu_is_fused_into_the_prefill_product_where_measured_faster(clock, gelu_seconds):
    """For a product that gelu follows, each form's prefill kernel with gelu fused is timed against itself then
    F.gelu (1 fake second and no more: F.gelu costs nothing on the fake clock): kept only where it wins, and the
    Projection built from the choice runs it only then; no other product is timed with gelu."""
    kernels = [fake_kernel(clock, "decode", costs(1, 1, 9)), fake_kernel(clock, "prefill", costs(5, 5, 1),
                                                                           gelu_seconds=gelu_seconds)]
    choice = measure(kernels, W, 1e-5, clock, gelu=True)
    assert choice.prefill == {DENSE.name: "prefill"} and ("prefill with gelu", PREFILL_TIMING_ROWS) in clock.calls
    assert choice.fused_gelu == ((DENSE.name,) if gelu_seconds < 1 else ())
    assert Choice.from_json(json.loads(json.dumps(choice.to_json()))) == choice
    weight, bias = torch.randn(*W), torch.randn(W[0])
    module = gpt2.tuning.projection(weight, bias, choice, kernels, torch.float32)
    assert module.decode.name == "decode" and (module.prefill.run_gelu is not None) == (gelu_seconds < 1)
    clock.calls.clear()
    x = torch.randn(PREFILL_TIMING_ROWS, W[1])
    assert (module.forward_gelu(x) - F.gelu(F.linear(x, weight, bias), approximate="tanh")).abs().max() < 1e-5
    assert clock.calls == [("prefill with gelu" if gelu_seconds < 1 else "prefill", PREFILL_TIMING_ROWS)]
    clock.calls.clear()
    assert measure(kernels, W, 1e-5, clock).fused_gelu == () and not any("gelu" in name for name, _ in clock.calls)


def test_measure_screens_out_slow_failing_and_inexact_kernels(clock):
    def broken(x, stored):
        raise RuntimeError("no kernel for this CPU")

    kernels = [fake_kernel(clock, "fast", costs(1, 1, 1)), fake_kernel(clock, "ten times slower", costs(10, 10, 10)),
               fake_kernel(clock, "wrong", costs(0.1, 0.1, 0.1), exact=False), Kernel("broken", DENSE, broken)]
    choice = measure(kernels, W, 1e-5, clock)
    assert choice.decode == ("fast", "ten times slower")
    one, eight = DECODE_TIMING_ROWS
    assert clock.calls.count(("ten times slower", eight)) == 1 < clock.calls.count(("fast", eight))  # not timed
    # At one row its first pass shows it cannot win: it takes no more passes.
    assert clock.calls.count(("ten times slower", one)) < clock.calls.count(("fast", one))


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_16_bit_dense_weight_has_a_float32_prefill_kernel(precision):
    """For prompts on a CPU without fast 16-bit products (AVX2 only): the dense 16-bit weight widened to float32
    per product, a prefill candidate on the form the compiled decode kernel reads, exact up to float32 sums."""
    dtype = getattr(torch, precision)
    kernel = next(k for k in gpt2.kernels.kernels_for(precision) if k.name == f"{precision} widened to float32")
    assert kernel.prefills and kernel.form.name == f"{precision} dense"
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(128, 64, generator=gen)
    stored = kernel.form.build(weight.to(dtype), bias.to(dtype), None)
    exact = x.double() @ weight.to(dtype).double().T + bias.to(dtype).double()
    y = kernel.run(x, stored)
    assert y.dtype == torch.float32 and (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_kernels_for_a_few_rows_are_no_prefill_candidates(clock):
    """A kernel made for a few rows (prefills=False) is never timed or chosen for prefill, but is its form's
    prefill kernel where the form has no other."""
    ONLY = dataclasses.replace(DENSE, name="only few-row kernels")
    kernels = [dataclasses.replace(fake_kernel(clock, "few rows", costs(1, 1, 0.1)), prefills=False),
               fake_kernel(clock, "prompts", costs(2, 2, 1)),
               dataclasses.replace(fake_kernel(clock, "few rows, alone", costs(3, 3, 1), form=ONLY), prefills=False)]
    choice = measure(kernels, W, 1e-5, clock)
    assert choice.decode[0] == "few rows"
    assert choice.prefill == {DENSE.name: "prompts", ONLY.name: "few rows, alone"}
    assert ("few rows", PREFILL_TIMING_ROWS) not in clock.calls
    assert default_choice(kernels).prefill == choice.prefill


def test_measure_times_the_kernels_in_turns(clock):
    """Each timed pass of a kernel comes between passes of the others, so that a burst of load on a shared
    machine slows one pass of each rather than every pass of one (whose ranking it would decide)."""
    kernels = [fake_kernel(clock, "a", costs(1, 1, 1)), fake_kernel(clock, "b", costs(1, 1, 1))]
    measure(kernels, W, 1e-5, clock)
    for rows in DECODE_TIMING_ROWS:
        turns = [name for name, _ in itertools.groupby(name for name, at in clock.calls if at == rows)]
        assert turns == ["a", "b"] * (len(turns) // 2) and len(turns) >= 2 * REPEATS, (rows, turns)


def test_measure_counts_a_packed_forms_build_spread_over_the_steps_of_a_load(clock):
    """A kernel a little faster per step loses to one whose form is free to build, where its own packed
    form's build at load costs more than it saves over LOAD_STEPS steps; the form is built from the weight
    laid out as the loader gives it. A plain form's build is free (gpt2.prepared keeps it)."""
    seen: list[bool] = []

    def slow_build(weight, bias, inputs):
        seen.append(weight.is_contiguous())
        clock.now += 0.5 * LOAD_STEPS  # half a second a step, spread over a load
        return DENSE.build(weight, bias, inputs)

    slow = dataclasses.replace(DENSE, name="slow to build", build=slow_build, plain=False)
    kernels = [fake_kernel(clock, "fast, slow to build", costs(1, 1, 1), form=slow),
               fake_kernel(clock, "a little slower", costs(1.2, 1.2, 1), form=TRANSPOSED)]
    assert measure(kernels, W, 1e-5, clock).decode == ("a little slower", "fast, slow to build")
    assert seen and all(seen)  # (out, in), and so are the copies timed in turn
    seen.clear()
    assert measure(kernels, W, 1e-5, clock, transposed=True).decode[0] == "a little slower"
    assert seen and not any(seen)
    clock.now = 0.0
    kernels[0] = fake_kernel(clock, "much faster", costs(0.1, 0.1, 1), form=slow)
    assert measure(kernels, W, 1e-5, clock).decode[0] == "much faster"
    kernels[0] = fake_kernel(clock, "fast, kept", costs(1, 1, 1), form=dataclasses.replace(slow, plain=True))
    assert measure(kernels, W, 1e-5, clock).decode[0] == "fast, kept"


def test_a_packed_form_must_win_by_more_than_the_noise(clock):
    """A form built again on every load (not plain) must be faster by more than REBUILT_MARGIN, even where
    its build is free."""
    packed = dataclasses.replace(DENSE, name="packed", plain=False)
    plain = fake_kernel(clock, "plain", costs(1, 1, 1), form=TRANSPOSED)
    close = fake_kernel(clock, "a little faster, packed", costs(*(1 - REBUILT_MARGIN / 2,) * 3), form=packed)
    assert measure([close, plain], W, 1e-5, clock).decode == ("plain", "a little faster, packed")
    clear = fake_kernel(clock, "much faster, packed", costs(*(1 - 2 * REBUILT_MARGIN,) * 3), form=packed)
    assert measure([clear, plain], W, 1e-5, clock).decode == ("much faster, packed", "plain")


@pytest.fixture
def fake_kernels(clock, monkeypatch):
    kernels = [fake_kernel(clock, "a", costs(2, 2, 2)), fake_kernel(clock, "b", costs(1, 1, 1))]
    monkeypatch.setattr(gpt2.tuning, "kernels_for", lambda precision, native: kernels)
    return kernels


def _cache(kernel_cache):
    return json.loads((kernel_cache / "kernels.json").read_text())


@pytest.fixture
def empty_cache(kernel_cache):
    (kernel_cache / "kernels.json").unlink(missing_ok=True)
    return kernel_cache


def test_choices_are_written_then_read_then_measured_again_for_a_new_key(fake_kernels, clock, empty_cache,
                                                                        monkeypatch):
    shapes = [(W, False), ((32, 48), False), (W, False), (W, True)]  # the last one stored (in, out)
    first = choices_for("float32", shapes, "cached", clock)
    assert first[W, False].decode == ("b", "a") and len(clock.calls) > 0
    keys = set(_cache(empty_cache))
    assert len(keys) == 3 and all("float32" in key and f"torch {torch.__version__}" in key for key in keys)
    then_gelu = choices_for("float32", shapes[:1], "cached", clock, gelu={shapes[0]})  # another key: measured
    assert then_gelu == {shapes[0]: first[shapes[0]]} and len(_cache(empty_cache)) == 4
    keys = set(_cache(empty_cache))
    assert sum(" then gelu | " in key for key in keys) == 1

    def no_clock() -> float:
        raise AssertionError("measured although cached")

    assert choices_for("float32", shapes, "cached", no_clock) == first  # read from the file
    monkeypatch.setattr(gpt2.tuning, "cpu_name", lambda: "another CPU")
    calls = len(clock.calls)
    choices_for("float32", shapes[:1], "cached", clock)
    assert len(clock.calls) > calls  # a new key: measured again, and added
    assert len(_cache(empty_cache)) == 5
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    choices_for("float32", shapes[:1], "cached", clock)
    assert len(_cache(empty_cache)) == 6 and any("threads 97" in key for key in _cache(empty_cache))
    # A generic model name with other instruction sets, or kernels kept to fewer of them, is another machine.
    monkeypatch.setattr(gpt2.tuning, "_cpuinfo", lambda: {"flags": "fpu avx2 fma amx_tile"})
    choices_for("float32", shapes[:1], "cached", clock)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # (read into the key only: oneDNN has started)
    choices_for("float32", shapes[:1], "cached", clock)
    new = set(_cache(empty_cache)) - keys
    assert len(new) == 4 and any(key.startswith("another CPU (avx2 fma amx_tile); ATen ") for key in new)
    assert any("; ONEDNN_MAX_CPU_ISA=SSE41" in key for key in new)
    # A candidate missing when the file was written (a compiled kernel whose build failed) is measured once there.
    fake_kernels.append(fake_kernel(clock, "c", costs(0.5, 0.5, 0.5)))
    assert choices_for("float32", shapes[:1], "cached", clock)[W, False].decode == ("c", "b", "a")
    assert len(_cache(empty_cache)) == 9


def test_the_head_is_timed_on_kept_forms_over_its_whole_tables_bytes(clock, empty_cache, monkeypatch):
    """The LM head, of more rows than HEAD_TIMING_ROWS, is timed on a slice of them, in copies that add up to
    the whole table however slow its form is to build, and only on forms that later loads keep in the table's
    layout: a packed head would be built on every load, a transposed one is a second table. Another weight
    takes those where they are faster."""
    def slow_build(weight, bias, inputs):
        clock.now += 1.0  # past COPY_BUILD_SECONDS: a block's weight would be timed on one copy
        return DENSE.build(weight, bias, inputs)

    packed = dataclasses.replace(DENSE, name="packed", plain=False)
    kept = dataclasses.replace(DENSE, name="kept", build=slow_build)
    kernels = [fake_kernel(clock, "packed, fast", costs(0.1, 0.1, 0.1), form=packed),
               fake_kernel(clock, "transposed, fast", costs(0.2, 0.2, 0.2), form=TRANSPOSED),
               fake_kernel(clock, "kept", costs(1, 1, 1), form=kept)]
    monkeypatch.setattr(gpt2.tuning, "kernels_for", lambda precision, native: kernels)
    monkeypatch.setattr(gpt2.tuning, "HEAD_TIMING_ROWS", 64)
    head, block = ((256, 8), False), ((64, 8), False)
    assert choices_for("float32", [head], "cached", clock, head=head)[head].decode == ("kept",)
    # the correctness check, the untimed call, then REPEATS passes over 4 copies of the 64-row slice
    assert clock.calls.count(("kept", DECODE_TIMING_ROWS[0])) == 2 + REPEATS * 4
    assert set(choices_for("float32", [block], "cached", clock)[block].decode[:2]) == {"packed, fast",
                                                                                       "transposed, fast"}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1}', '{"cost": "x"}', "\x00\xff"])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(fake_kernels, clock, empty_cache, content):
    (empty_cache / "kernels.json").write_text(content, errors="surrogateescape")
    key = gpt2.tuning.cache_key("float32", (W, False), [k.name for k in fake_kernels])
    if content.startswith('{"x"'):
        (empty_cache / "kernels.json").write_text(json.dumps({key: {"decode": 3}}))  # an entry of the wrong type
    if content.startswith('{"cost"'):  # a cost that is no number
        entry = {"decode": ["a"], "prefill": {}, "cost": {"a": "x"}}
        (empty_cache / "kernels.json").write_text(json.dumps({key: entry}))
    assert choices_for("float32", [(W, False)], "cached", clock)[W, False].decode == ("b", "a")
    assert _cache(empty_cache)[key]["decode"] == ["b", "a"]
    assert not [p for p in empty_cache.iterdir() if p.name.startswith(".kernels-")]  # no temporary left


def test_the_products_take_the_native_kernels_where_the_whole_step_is_within_the_margin(clock):
    """Every product's ranking puts its native kernel first where, over the whole step (each product once), the
    native kernels cost at most STEP_NATIVE_MARGIN times the fastest ones: one shape beyond the margin alone does
    not keep the others off. Beyond it over the step, without costs, or with a product that has no native kernel:
    the measured rankings."""
    native = Kernel("native", DENSE, native_run, prefills=False)
    kernels = [fake_kernel(clock, "a", costs(1, 1, 1)), native]
    near = Choice(("a", "native"), {DENSE.name: "a"}, {"a": 1.0, "native": STEP_NATIVE_MARGIN - 0.1})
    far = dataclasses.replace(near, cost={"a": 1.0, "native": STEP_NATIVE_MARGIN + 0.2})
    assert near.native_first(kernels).decode == ("native", "a") and far.native_first(kernels).decode == ("native", "a")
    assert step_in_one_call([(near, kernels)] * 3 + [(far, kernels)])  # 4 margin - 0.1 against 4
    assert not step_in_one_call([(near, kernels)] + [(far, kernels)] * 3)  # 4 margin + 0.5 against 4
    assert not step_in_one_call([(near, kernels), (dataclasses.replace(near, cost={}), kernels)])
    assert not step_in_one_call([(near, kernels), (near, kernels[:1])])
    assert near.native_first(kernels[:1]) == near
    assert Choice.from_json(json.loads(json.dumps(near.to_json()))) == near


def test_a_step_that_lost_the_call_just_now_is_measured_once_more(clock, empty_cache, monkeypatch):
    """Products measured just now whose native kernels lose the step's call (a burst of load slowed them) are
    measured once more, and the second ranking kept; rankings read from the file are not measured again, and
    a call lost twice stays lost."""
    timing = costs(3, 3, 3)
    native = fake_kernel(clock, "native", timing)
    kernels = [fake_kernel(clock, "a", costs(2, 2, 2)), native]
    monkeypatch.setitem(gpt2.tuning.NATIVE_RUNS, native.run, False)
    monkeypatch.setattr(gpt2.tuning, "kernels_for", lambda precision, native: kernels)
    monkeypatch.setattr(gpt2.tuning, "clock_for_timing", clock)
    layouts = [(W, False), ((32, 48), False)]
    modes = []
    choices_for = gpt2.tuning.choices_for

    def calming(*args, **kwargs):  # the load is gone after the first measurement
        modes.append(args[2])
        chosen = choices_for(*args, **kwargs)
        timing.update(costs(1, 1, 1))
        return chosen

    monkeypatch.setattr(gpt2.tuning, "choices_for", calming)
    choices, one_call = choices_for_a_step("float32", layouts, "cached", kernels)
    assert one_call and modes == ["cached", "tune"] and choices[W, False].decode[0] == "native"
    modes.clear()
    timing.update(costs(3, 3, 3))
    assert choices_for_a_step("float32", layouts, "cached", kernels)[1] and modes == ["cached"]
    (empty_cache / "kernels.json").unlink()
    modes.clear()
    monkeypatch.setattr(gpt2.tuning, "choices_for", lambda *args, **kwargs: modes.append(args[2]) or
                        choices_for(*args, **kwargs))
    timing.update(costs(3, 3, 3))
    choices, one_call = choices_for_a_step("float32", layouts, "cached", kernels)
    assert not one_call and modes == ["cached", "tune"] and choices[W, False].decode[0] == "a"


def test_modes_tune_measures_again_and_default_measures_nothing(fake_kernels, clock, empty_cache):
    choices_for("float32", [(W, False)], "cached", clock)
    calls = len(clock.calls)
    choices_for("float32", [(W, False)], "tune", clock)
    assert len(clock.calls) > calls
    (empty_cache / "kernels.json").unlink()
    assert choices_for("float32", [(W, False)], "default", clock)[W, False].decode == ("a", "b")  # list order
    assert not (empty_cache / "kernels.json").exists()


def test_mode_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("GPT2_PYTORCH_KERNELS", "default")
    assert kernels_mode(None) == "default" and kernels_mode("tune") == "tune"
    monkeypatch.setenv("GPT2_PYTORCH_KERNELS", "fastest")
    with pytest.raises(GPT2Error, match="not one of cached, tune, default"):
        kernels_mode(None)


# ---------------------------------------------------------------------------------------------------
# a loaded model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    hf = random_hf_model(5, **SHAPE)
    path = tmp_path_factory.mktemp("kernels_model")
    hf.save_pretrained(path)
    return hf, path


def test_load_model_uses_the_fastest_candidate(small, fake_kernels, clock, empty_cache, monkeypatch):
    monkeypatch.setattr(gpt2.tuning, "clock_for_timing", clock)
    model = load_model(small[1], kernels="tune")
    assert set(model.kernel_choices().values()) == {("b", "b")}
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (model(ids) - small[0](ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
def test_state_dict_is_the_checkpoints_plain_tensors(small, dtype):
    """Names and shapes of a plain model's state_dict, plain tensors in the loaded dtype (int8: dequantized):
    a plain GPT2LMHeadModel takes it and computes the same logits (int8: within its tolerance)."""
    int8 = dtype == "int8"
    loaded_dtype = torch.bfloat16 if int8 else dtype
    model = load_model(small[1], dtype=loaded_dtype, int8=int8)
    state = model.state_dict()
    with torch.device("meta"):
        plain = GPT2LMHeadModel(model.config)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(type(v) is torch.Tensor and not v.is_mkldnn and v.dtype == loaded_dtype for v in state.values())
    hf_weight = small[0].transformer.h[0].attn.c_attn.weight.t().to(loaded_dtype)  # Conv1D (in, out) -> (out, in)
    weight = state["transformer.h.0.attn.c_attn.weight"]
    assert (weight.float() - hf_weight.float()).abs().max() <= (0.01 if int8 else 0) * hf_weight.abs().max().float()
    plain.load_state_dict(state, assign=True)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours, theirs = model(ids).float(), plain(ids).float()
    tolerance = 0.05 if int8 else (0.02 if loaded_dtype == torch.bfloat16 else 1e-5)
    assert (ours - theirs).abs().max() <= tolerance * theirs.abs().max()


@pytest.mark.parametrize("move", [lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: m.to("meta"),
                                  lambda m: m.to("cuda"), lambda m: m.cuda(), lambda m: m.bfloat16()])
def test_moving_a_cpu_model_elsewhere_says_to_load_it_again(small, move):
    model = load_model(small[1])
    with pytest.raises(GPT2Error) as caught:
        move(model)
    message = str(caught.value)
    assert "\n" not in message and "load_model(..., device=..., dtype=...)" in message
    assert model.transformer.wte.weight.dtype == torch.float32 and not model.transformer.wte.weight.is_meta  # unmoved
    assert model.to("cpu").float() is model  # no move: fine
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(copy.deepcopy(model)(ids), model(ids))


@pytest.mark.parametrize("name", ["float32 F.linear", "float32 oneDNN packed", "bfloat16 oneDNN",
                                  "bfloat16 oneDNN packed"])
def test_a_prompts_mlp_fuses_gelu_into_c_fc_unless_a_hook_watches_it(small, name):
    """A prompt's c_fc on a kernel with gelu fused (oneDNN's) runs gelu in the product's call, within the
    precision's tolerance of the product then gelu in float64; a decode step's rows keep the product, then
    F.gelu; a forward hook on c_fc sees the product alone, and the MLP goes on from what the hook saw."""
    dtype = torch.float32 if name.startswith("float32") else torch.bfloat16
    kernel = next((k for k in gpt2.kernels.kernels_for(str(dtype)[6:], native=False) if k.name == name), None)
    if kernel is None or kernel.run_gelu is None:
        pytest.skip(f"no oneDNN {dtype} product on this CPU")
    model = load_model(small[1], dtype=dtype, kernels="default")
    mlp = model.transformer.h[0].mlp
    weight, bias = mlp.c_fc.weight_and_bias()
    stored = kernel.form.build(weight, bias, None)
    mlp.c_fc = Projection(stored, kernel, kernel, dtype, tuple(weight.shape))
    x = torch.randn(1, 16, weight.size(1), generator=torch.Generator().manual_seed(3)).to(dtype)  # 16 rows: a prompt
    exact = F.gelu(F.linear(x[0].double(), weight.double(), bias.double()), approximate="tanh")  # (16, 4 * n_embd)
    fused = kernel.run_gelu(x[0], stored)
    assert (fused.double() - exact).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2) * exact.abs().max()
    with torch.inference_mode():
        assert torch.equal(mlp(x), mlp.c_proj(fused.unsqueeze(0)))
        step = x[:, :8]  # a decode step's rows
        assert torch.equal(mlp(step), mlp.c_proj(F.gelu(kernel.run(step[0], stored), approximate="tanh").unsqueeze(0)))
        seen = []
        hook = mlp.c_fc.register_forward_hook(lambda module, args, out: seen.append(out))
        hooked = mlp(x)
        hook.remove()
    assert len(seen) == 1 and seen[0].min() < -0.2  # below gelu's least value: the product alone
    assert torch.equal(hooked, mlp.c_proj(F.gelu(seen[0], approximate="tanh")))


# ---------------------------------------------------------------------------------------------------
# int8


def test_int8_without_any_int8_kernel_is_a_one_line_error(small, monkeypatch):
    monkeypatch.setattr(gpt2.quantize, "int8_weight_only_available", lambda: False)
    monkeypatch.setattr(gpt2.quantize, "int8_dynamic_available", lambda: False)
    with pytest.raises(GPT2Error) as caught:
        load_model(small[1], dtype=torch.bfloat16, int8=True)
    assert "\n" not in str(caught.value) and "int8" in str(caught.value)


@pytest.mark.skipif(not int8_dynamic_available(), reason="this torch build has no FBGEMM")
def test_int8_without_the_weight_only_kernel_takes_the_dynamic_one_where_it_keeps_the_contract(small, monkeypatch):
    monkeypatch.setattr(gpt2.quantize, "int8_weight_only_available", lambda: False)
    monkeypatch.setattr(gpt2.quantize, "DYNAMIC_ERROR", 1.0)
    model = load_model(small[1], dtype=torch.bfloat16, int8=True)
    assert {decode for decode, _ in model.kernel_choices().values()} == {"int8 dynamic (FBGEMM)"}
    monkeypatch.setattr(gpt2.quantize, "DYNAMIC_ERROR", 0.0)  # calibration refuses every projection
    with pytest.raises(GPT2Error, match="int8") as caught:
        load_model(small[1], dtype=torch.bfloat16, int8=True)
    assert "\n" not in str(caught.value)


def save_outlier_model(path, **config):
    """A random GPT-2 (transformers' init, seed 7) whose ln_1 and ln_2 gains are 60 times larger in three hidden
    dimensions, saved to `path`."""
    from transformers import GPT2Config
    from transformers import GPT2LMHeadModel as HFModel

    torch.manual_seed(7)
    hf = HFModel(GPT2Config(**config)).eval()
    with torch.no_grad():
        for block in hf.transformer.h:
            for norm in (block.ln_1, block.ln_2):
                norm.weight[[5, 100, 300]] *= 60
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    """A random GPT-2 at transformers' init whose ln_1 and ln_2 gains are 60 times larger in three hidden
    dimensions: the activation outliers reported for real GPT-2 checkpoints."""
    return save_outlier_model(tmp_path_factory.mktemp("outliers"), n_layer=2, n_embd=384, n_head=6,
                              vocab_size=5000, n_positions=64)


@pytest.mark.parametrize("first", ["weight-only", "dynamic", "native", "native streaming"])
def test_int8_keeps_its_contract_with_activation_outliers(outliers, first, monkeypatch):
    """int8 weights with bfloat16 activations alone, with the dynamic kernel preferred wherever its
    per-projection calibration allows it (the whole-model check off: on this model it would take it back), and
    with the kernels compiled here (float32 activations), on batches of one-token prompts as in decoding: logits
    within 5% of the largest float32 logit, and float32's greedy choice where its margin is clear. (Over a whole
    sequence, gains of 60 make attention so sharp that bfloat16 weights alone move the logits by several
    percent.)"""
    kernels = gpt2.quantize.int8_kernels(native_available(torch.int8))
    if first == "dynamic" and not int8_dynamic_available():
        pytest.skip("this torch build has no FBGEMM")
    if first.startswith("native") and not native_available(torch.int8):
        pytest.skip("no C compiler here")
    chosen = {"weight-only": kernels[:1], "dynamic": kernels[1::-1], "native": kernels[-2:-1],
              "native streaming": kernels[-1:]}[first]
    monkeypatch.setattr(gpt2.quantize, "int8_kernels", lambda native=False: chosen)
    monkeypatch.setattr(gpt2.quantize, "WHOLE_MODEL_ERROR", 1.0)
    exact_model = load_model(outliers)
    model = load_model(outliers, dtype=torch.bfloat16, int8=True, kernels="default")
    decodes = {name: decode for name, (decode, _) in model.kernel_choices().items()}
    dynamic = [name for name, decode in decodes.items() if "dynamic" in decode]
    assert bool(dynamic) == (first == "dynamic") and "lm_head" not in dynamic
    assert (set(decodes.values()) == {f"int8 {first}"}) == first.startswith("native")
    ids = torch.randint(0, 5000, (48, 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # batches of 1 and 7 one-token prompts: decode steps
        exact = torch.cat([exact_model(batch) for batch in ids.split([1, 7] * 6)])
        reduced = torch.cat([model(batch) for batch in ids.split([1, 7] * 6)]).float()
    assert (reduced - exact).abs().max() <= 0.05 * exact.abs().max()
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1 * exact.abs().max()
    assert clear.sum() >= 5 and torch.equal(reduced.argmax(-1)[clear], exact.argmax(-1)[clear])


@pytest.fixture(scope="module")
def wide_outliers(tmp_path_factory):
    """The outlier model at four blocks of GPT-2 124M's widths, where every projection's dynamic product passes
    its own gate but together they take the logits beyond the contract (weight-only int8 alone keeps it)."""
    return save_outlier_model(tmp_path_factory.mktemp("wide_outliers"), n_layer=4, n_positions=64)


@pytest.mark.skipif(not int8_dynamic_available(), reason="this torch build has no FBGEMM")
def test_int8_with_dynamic_products_keeps_the_contract_on_the_whole_model(wide_outliers, monkeypatch):
    """The dynamic kernel preferred wherever its per-projection gate allows it: the whole-model check at load
    takes it back, and on prompts other than the calibration ones (decode steps of one-token prompts) the
    logits stay within 5% of the largest float32 logit, with float32's greedy choice where its margin is clear."""
    kernels = gpt2.quantize.int8_kernels()
    monkeypatch.setattr(gpt2.quantize, "int8_kernels", lambda native=False: kernels[1::-1])  # dynamic, weight-only
    exact_model = load_model(wide_outliers, kernels="default")
    model = load_model(wide_outliers, dtype=torch.bfloat16, int8=True, kernels="default")
    ids = torch.randint(0, 50257, (96, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact = torch.cat([exact_model(ids[i:i + 8]) for i in range(0, 96, 8)])
        reduced = torch.cat([model(ids[i:i + 8]) for i in range(0, 96, 8)]).float()
    error = ((reduced - exact).abs().max() / exact.abs().max()).item()
    assert error <= 0.05, error
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * error * exact.abs().max()
    assert clear.sum() >= 5 and torch.equal(reduced.argmax(-1)[clear], exact.argmax(-1)[clear])


def test_without_smoothing_and_outlier_columns_dynamic_int8_would_break_the_contract(outliers):
    """What the remedies are for: FBGEMM's dynamic int8 as torch's quantize_dynamic runs it (7-bit
    activations, no smoothing, no float columns), one projection fed the outlier activations."""
    if not int8_dynamic_available():
        pytest.skip("this torch build has no FBGEMM")
    model = load_model(outliers, kernels="default")
    c_fc, seen = model.transformer.h[0].mlp.c_fc, []
    c_fc.register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    with torch.inference_mode():
        model(torch.randint(0, 5000, (1, 64), generator=torch.Generator().manual_seed(1)))
    x = seen[0].clone()  # (64, in)
    weight, bias = c_fc.weight_and_bias()
    exact = F.linear(x, weight, bias)
    quantized, scales = gpt2.quantize.quantize_rows(weight)
    naive = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(
        torch._make_per_channel_quantized_tensor(quantized, scales.double(), torch.zeros(len(scales), dtype=torch.long),
                                                 0), bias), True)
    remedied = gpt2.quantize.INT8_DYNAMIC.build(weight, bias, x)
    assert remedied is not None
    smoothed = torch.cat([gpt2.quantize._dynamic_run(rows, remedied) for rows in x.split(8)])
    error = {name: ((y - exact).abs().max() / exact.abs().max()).item() for name, y in
             (("naive", naive), ("remedied", smoothed))}
    assert error["remedied"] <= gpt2.quantize.DYNAMIC_ERROR < 3 * gpt2.quantize.DYNAMIC_ERROR < error["naive"], error
