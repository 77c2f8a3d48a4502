"""Prepared weights (gpt2.prepared): what a CPU load builds is kept in the cache and mapped by later loads of
the same checkpoint, which then skip the finite check; a changed checkpoint or a corrupt file is built again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_legacy_state
from safetensors.torch import save_file

import gpt2.checkpoint
import gpt2.prepared
import gpt2.quantize
import gpt2.tuning
from gpt2.checkpoint import SafetensorsFile, load_model
from gpt2.errors import GPT2Error
from gpt2.kernels import Projection, int8_dynamic_available, kernels_for
from gpt2.native import available as native_available
from gpt2.prepared import Prepared, identity, prepared_file
from gpt2.quantize import INT8_DYNAMIC, INT8_WEIGHT_ONLY
from gpt2.tuning import Choice, projection

IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262]])


def write_checkpoint(directory: Path, seed: int = 0, poison: bool = False) -> Path:
    """The tiny model as model.safetensors (graykode's key names, Conv1D layout) with its config.json."""
    state = tiny_legacy_state(seed=seed, mask_buffers=False)
    if poison:
        state["h.0.mlp.c_fc.weight"][3, 5] = float("nan")
    directory.mkdir(exist_ok=True)
    save_file(state, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(tiny_config()))
    return directory / "model.safetensors"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def refuse_finite_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(tensor):
        raise AssertionError("the finite check ran")

    monkeypatch.setattr(gpt2.checkpoint, "_all_finite", refused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_second_load_maps_what_the_first_built(tmp_path, monkeypatch, dtype):
    weights = write_checkpoint(tmp_path / "model")
    first = load_model(tmp_path / "model", dtype=dtype)
    precision = str(dtype).removeprefix("torch.")
    path = prepared_file(weights, precision)
    assert SafetensorsFile(path).metadata["identity"] == identity(weights)

    refuse_finite_check(monkeypatch)
    taken: list[str] = []
    form = Prepared.form

    def spy(self, name, *args, **kwargs):
        stored = form(self, name, *args, **kwargs)
        if stored is not None:
            taken.append(name)
        return stored

    monkeypatch.setattr(Prepared, "form", spy)
    second = load_model(tmp_path / "model", dtype=dtype)
    assert torch.equal(logits(second), logits(first))
    assert second.kernel_choices() == first.kernel_choices()
    plain = sorted(name for name, module in second.named_modules()
                   if isinstance(module, Projection) and module.decode.form.plain)
    assert sorted(taken) == plain  # every plain form mapped, none built
    assert second.transformer.wte.weight.dtype == dtype


def test_a_changed_checkpoint_is_checked_and_read_again(tmp_path):
    weights = write_checkpoint(tmp_path / "model")
    load_model(tmp_path / "model")
    before = weights.stat()
    write_checkpoint(tmp_path / "model", poison=True)  # same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    with pytest.raises(GPT2Error, match="NaN or infinite values"):
        load_model(tmp_path / "model")

    write_checkpoint(tmp_path / "model", seed=1)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000))
    reloaded = load_model(tmp_path / "model")
    assert torch.equal(reloaded.transformer.wte.weight, tiny_legacy_state(seed=1)["wte.weight"])
    fresh = logits(load_model(tmp_path / "model", kernels="default"))  # F.linear: float32 sums in another order
    assert (logits(reloaded) - fresh).abs().max() <= 1e-5 * fresh.abs().max()


def test_a_corrupt_prepared_file_is_ignored_and_rewritten(tmp_path, monkeypatch):
    weights = write_checkpoint(tmp_path / "model")
    expected = logits(load_model(tmp_path / "model", dtype=torch.bfloat16))
    path = prepared_file(weights, "bfloat16")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert torch.equal(logits(load_model(tmp_path / "model", dtype=torch.bfloat16)), expected)
    assert SafetensorsFile(path).metadata["identity"] == identity(weights)
    refuse_finite_check(monkeypatch)
    assert torch.equal(logits(load_model(tmp_path / "model", dtype=torch.bfloat16)), expected)


def test_default_kernels_keep_no_prepared_file(tmp_path):
    weights = write_checkpoint(tmp_path / "model")
    load_model(tmp_path / "model", kernels="default")
    load_model(tmp_path / "model", dtype=torch.bfloat16, int8=True, kernels="default")
    assert not any(prepared_file(weights, p).exists() for p in ("float32", "bfloat16", "int8"))


def refuse_calibration(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an entry for every calibration run from now on."""
    runs: list[int] = []
    calibrate = gpt2.quantize.calibrate

    def counted(model):
        runs.append(1)
        return calibrate(model)

    monkeypatch.setattr(gpt2.quantize, "calibrate", counted)
    return runs


@pytest.mark.parametrize("dynamic_first", [False, True])
def test_a_second_int8_load_maps_the_forms_the_first_settled_on(tmp_path, monkeypatch, dynamic_first):
    """An int8 load calibrates the float model and checks the int8 one against it (seconds at 124M); a later
    load under the same kernel rankings maps the forms it settled on, calibrates nothing and checks nothing:
    the same kernels, the same logits. FBGEMM's packed int8 weights are rebuilt from the int8 values kept."""
    kernel_cache = tmp_path / "cache"  # rankings of its own, not the session's
    monkeypatch.setenv("GPT2_PYTORCH_CACHE", str(kernel_cache))
    write_checkpoint(tmp_path / "model")
    if dynamic_first:
        if not int8_dynamic_available():
            pytest.skip("this torch build has no FBGEMM")
        for limit, value in (("DYNAMIC_ERROR", 1.0), ("WEIGHT_ONLY_RATIO", float("inf")), ("WHOLE_MODEL_ERROR", 1.0)):
            monkeypatch.setattr(gpt2.quantize, limit, value)  # every block projection takes the dynamic kernel
        load_model(tmp_path / "model", dtype=torch.bfloat16, int8=True)
        cache = json.loads((kernel_cache / "kernels.json").read_text())
        for entry in cache.values():
            entry["decode"].sort(key=lambda name: "dynamic" not in name)
            entry.pop("cost")  # without its costs the ranking's first stays first (step_in_one_call)
        (kernel_cache / "kernels.json").write_text(json.dumps(cache))
    first = load_model(tmp_path / "model", dtype=torch.bfloat16, int8=True)
    dynamic = {name for name, (decode, _) in first.kernel_choices().items() if "dynamic" in decode}
    assert dynamic == ({name for name in first.kernel_choices() if name != "lm_head"} if dynamic_first else set())

    runs = refuse_calibration(monkeypatch)
    refuse_finite_check(monkeypatch)
    second = load_model(tmp_path / "model", dtype=torch.bfloat16, int8=True)
    assert not runs
    assert second.kernel_choices() == first.kernel_choices()
    assert torch.equal(logits(second), logits(first))
    with torch.no_grad():
        assert torch.equal(second(IDS[:, :1]), first(IDS[:, :1]))  # a decode-sized product too


def test_int8_forms_are_settled_again_under_other_rankings(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_PYTORCH_CACHE", str(tmp_path / "cache"))
    write_checkpoint(tmp_path / "model")
    runs = refuse_calibration(monkeypatch)
    monkeypatch.setattr(gpt2.tuning, "clock_for_timing", lambda: 0.0)  # every kernel ties: the same ranking twice
    first = load_model(tmp_path / "model", dtype=torch.bfloat16, int8=True)
    monkeypatch.setattr(gpt2.tuning, "RANKING", gpt2.tuning.RANKING + 1)  # measured again: other rankings
    again = load_model(tmp_path / "model", dtype=torch.bfloat16, int8=True)
    assert len(runs) == 2
    load_model(tmp_path / "model", dtype=torch.bfloat16, int8=True)
    assert len(runs) == 2
    assert torch.equal(logits(again), logits(first))  # the same forms (the same kernels rank first)


def test_int8_forms_come_back_from_their_kept_tensors():
    """What gpt2.prepared keeps of each int8 form rebuilds it: the same products. A weight-only int8 weight
    mapped from a file at an address _weight_int8pack_mm cannot read (not 16-byte aligned) is copied where that
    kernel reads it, and read where it lies by the kernel compiled here."""
    torch.manual_seed(0)
    weight, bias, inputs = torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1, torch.randn(32, 64)
    inputs[:, 3] *= 60  # an outlier dimension
    x = torch.randn(4, 64)
    forms = [INT8_WEIGHT_ONLY] + ([INT8_DYNAMIC] if int8_dynamic_available() else [])
    for form, run in zip(forms, (gpt2.quantize._weight_only_run, gpt2.quantize._dynamic_run)):
        stored = form.build(weight, bias, inputs)
        kept = tuple(None if part is None else part.clone() for part in form.to_kept(stored))
        assert torch.equal(run(x, form.from_kept(kept)), run(x, stored)), form.name
    quantized, *rest = INT8_WEIGHT_ONLY.to_kept(INT8_WEIGHT_ONLY.build(weight, bias, None))
    memory = torch.empty(quantized.numel() + 64, dtype=torch.int8)
    start = (-memory.data_ptr()) % 64 + 8  # 8 bytes past a 64-byte boundary
    mapped = memory[start:start + quantized.numel()].view_as(quantized).copy_(quantized)
    kept = INT8_WEIGHT_ONLY.from_kept((mapped, *rest))
    kernels = {k.name: k for k in gpt2.quantize.int8_kernels(native_available(torch.int8))}
    for name, copied in (("int8 weight x bfloat16 (_weight_int8pack_mm)", True), ("int8 native", False)):
        if name in kernels:
            choice = Choice((name,), {INT8_WEIGHT_ONLY.name: name})
            given = projection(weight, bias, choice, [kernels[name]], torch.bfloat16, prepared=lambda form: kept)
            assert (given.stored[0].data_ptr() != mapped.data_ptr()) == copied, name
            assert torch.equal(given.stored[0], quantized) and (given.stored[0].data_ptr() % 64 == 0) == copied
            assert torch.equal(given(x), kernels[name].run(x, (quantized, *rest)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_form_the_ranking_no_longer_picks_is_built_from_the_checkpoint(tmp_path, monkeypatch, dtype):
    """After the kernel ranking changes (measured again), a projection whose kept form is no longer the
    chosen one builds the new form from the checkpoint's tensor as stored: its weights are still the
    checkpoint's, and the file keeps the new form."""
    kernel_cache = tmp_path / "cache"  # a ranking of its own, not the session's
    monkeypatch.setenv("GPT2_PYTORCH_CACHE", str(kernel_cache))
    write_checkpoint(tmp_path / "model")
    load_model(tmp_path / "model", dtype=dtype)
    precision = str(dtype).removeprefix("torch.")
    cache = json.loads((kernel_cache / "kernels.json").read_text())
    forced = f"{precision} F.linear"
    for key, entry in cache.items():
        if f"| {precision} |" in key:
            entry["decode"] = [forced] + [name for name in entry["decode"] if name != forced]
            entry.pop("cost")  # without its costs the ranking's first stays first (step_in_one_call)
    (kernel_cache / "kernels.json").write_text(json.dumps(cache))

    model = load_model(tmp_path / "model", dtype=dtype)
    assert {decode for decode, _ in model.kernel_choices().values()} == {forced}
    state = tiny_legacy_state(mask_buffers=False)
    ours = model.state_dict()
    assert torch.equal(ours["transformer.h.0.mlp.c_fc.weight"], state["h.0.mlp.c_fc.weight"].t().to(dtype))
    assert torch.equal(ours["transformer.h.0.attn.c_proj.weight"], state["h.0.attn.c_proj.weight"].t().to(dtype))
    again = load_model(tmp_path / "model", dtype=dtype)
    assert torch.equal(logits(again), logits(model))


def test_a_packed_form_is_built_again_from_the_cast_weight_kept(tmp_path, monkeypatch):
    """A form that cannot be kept (packed) is built by every load, from the bfloat16 weight the first load
    cast and kept: later loads cast nothing and compute the same logits."""
    kernel_cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2_PYTORCH_CACHE", str(kernel_cache))
    packed = next((k.name for k in kernels_for("bfloat16") if not k.form.plain), None)
    if packed is None:
        pytest.skip("no packed bfloat16 kernel on this build")
    weights = write_checkpoint(tmp_path / "model")
    load_model(tmp_path / "model", dtype=torch.bfloat16)
    cache = json.loads((kernel_cache / "kernels.json").read_text())
    for entry in cache.values():
        entry["decode"] = [packed] + [name for name in entry["decode"] if name != packed]
        entry.pop("cost")  # without its costs the ranking's first stays first (step_in_one_call)
    (kernel_cache / "kernels.json").write_text(json.dumps(cache))

    first = load_model(tmp_path / "model", dtype=torch.bfloat16)
    assert {decode for decode, _ in first.kernel_choices().values()} == {packed}
    kept = SafetensorsFile(prepared_file(weights, "bfloat16"))
    assert kept["state:transformer.h.0.mlp.c_fc.weight"].dtype == torch.bfloat16
    refuse_finite_check(monkeypatch)
    casts = []
    dense = gpt2.checkpoint._dense
    monkeypatch.setattr(gpt2.checkpoint, "_dense", lambda t, dtype: casts.append(t.dtype) or dense(t, dtype))
    second = load_model(tmp_path / "model", dtype=torch.bfloat16)
    assert torch.float32 not in casts  # every bfloat16 tensor came from the prepared file
    assert torch.equal(logits(second), logits(first))


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    weights = write_checkpoint(tmp_path / "model")
    expected = logits(load_model(tmp_path / "model", kernels="default"))
    assert torch.allclose(logits(load_model(tmp_path / "model")), expected, atol=1e-5)
    folder = prepared_file(weights, "float32").parent
    assert not prepared_file(weights, "float32").exists()
    assert not any(folder.glob(".prepared-*"))  # no temporary file left behind


def test_only_the_most_recently_used_prepared_files_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt2.prepared, "KEEP_FILES", 2)
    files = [write_checkpoint(tmp_path / f"model{i}") for i in range(3)]
    load_model(tmp_path / "model0")
    load_model(tmp_path / "model1")
    os.utime(prepared_file(files[1], "float32"), (1, 1))  # long unused
    load_model(tmp_path / "model0")  # used again
    load_model(tmp_path / "model2")
    assert [prepared_file(f, "float32").exists() for f in files] == [True, False, True]
