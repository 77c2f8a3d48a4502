"""
Tests for gpt2/checkpoint.py: every weight format the loader accepts, strictness, and safety.

Every accepted file is written here from one small random transformers GPT-2 and must load into a model
whose logits equal transformers' (within 1e-5). Anything else must raise GPT2Error naming the problem,
and a pickle that would run code must be refused without running it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import random_hf_model
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel as HFModel

from gpt2.checkpoint import infer_config, load_model, load_weight, read_state_dict
from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.model import GPT2LMHeadModel

TOL = 1e-5
# n_embd 128 = two 64-wide heads: the shapes infer_config can read a config from without config.json.
SHAPE = dict(n_layer=2, n_embd=128, n_head=2, vocab_size=1000, n_positions=64)
CONFIG = GPT2Config(**SHAPE)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# ---------------------------------------------------------------------------------------------------
# helpers and fixtures


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def hf() -> HFModel:
    return random_hf_model(3, **SHAPE)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def ref(hf, ids) -> torch.Tensor:
    with torch.inference_mode():
        return hf(ids).logits


@pytest.fixture
def hf_state(hf) -> dict[str, torch.Tensor]:
    """transformers' state dict: `transformer.` prefix, Conv1D (in, out) weights, lm_head.weight."""
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in state and "transformer.h.1.attn.c_attn.weight" in state
    return state


def logits_of(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids)


# --- the variants of the file layout ---


def strip_prefix(state):
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def drop_lm_head(state):
    return {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}


def with_mask_buffers(state):
    """What transformers < 4.31 saved: a bool causal mask and a scalar masked_bias in every block."""
    out = dict(state)
    n = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        out[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def legacy(state):
    """graykode's gpt2-pytorch_model.bin: no prefix, no lm_head, float (1, 1, n_pos, n_pos) mask buffers."""
    out = strip_prefix(drop_lm_head(state))
    n = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    return out


def tf_names(state):
    """The TensorFlow port's names that graykode's load_weight renamed: LayerNorm .g / .b, Conv1D .w / .b."""
    out = {}
    for key, value in legacy(state).items():
        if key.startswith("h.") and key.endswith(".weight"):
            key = key[: -len(".weight")] + (".w" if key.endswith(CONV1D) else ".g")
        elif key.startswith("h.") and key.endswith(".bias") and not key.endswith("attn.bias"):
            key = key[: -len(".bias")] + ".b"
        elif key.startswith("ln_f."):
            key = key.replace(".weight", ".g").replace(".bias", ".b")
        out[key] = value
    return out


def half(state):
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def as_is(state):
    return state


# --- the ways to write them ---


def save_torch_zip(state, path):
    torch.save(state, path)


def save_torch_old(state, path):
    torch.save(state, path, _use_new_zipfile_serialization=False)


def save_safetensors(state, path):
    # safetensors refuses shared or non-contiguous tensors (the tied lm_head shares wte's storage)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))


def prefix_and_head_variants(fmt: str, save: Callable, name: str) -> dict[str, tuple[Callable, Callable, str]]:
    """transformers' state dict written by `save` to `name`: as is, and without the `transformer.` prefix, the
    lm_head, or both."""
    return {
        fmt: (as_is, save, name),
        f"{fmt}-no-prefix": (strip_prefix, save, name),
        f"{fmt}-no-lm-head": (drop_lm_head, save, name),
        f"{fmt}-no-prefix-no-lm-head": (lambda s: strip_prefix(drop_lm_head(s)), save, name),
    }


FORMATS: dict[str, tuple[Callable, Callable, str]] = {
    "legacy-old-torch-format": (legacy, save_torch_old, "gpt2-pytorch_model.bin"),
    "legacy-zip": (legacy, save_torch_zip, "gpt2-pytorch_model.bin"),
    **prefix_and_head_variants("hf-bin", save_torch_zip, "pytorch_model.bin"),
    "hf-bin-mask-buffers": (with_mask_buffers, save_torch_zip, "pytorch_model.bin"),
    "hf-bin-mask-buffers-no-prefix": (lambda s: strip_prefix(with_mask_buffers(s)), save_torch_zip,
                                      "pytorch_model.bin"),
    "hf-bin-old-torch-format": (as_is, save_torch_old, "pytorch_model.bin"),
    **prefix_and_head_variants("safetensors", save_safetensors, "model.safetensors"),
    "tf-port-names": (tf_names, save_torch_zip, "gpt2-pytorch_model.bin"),
    "tf-port-names-old-torch-format": (tf_names, save_torch_old, "gpt2-pytorch_model.bin"),
    # the format is read from the content, not the name
    "weights.dat-torch-zip": (as_is, save_torch_zip, "weights.dat"),
    "weights.dat-torch-old": (legacy, save_torch_old, "weights.dat"),
    "weights.dat-safetensors": (strip_prefix, save_safetensors, "weights.dat"),
    "torch-zip-named-safetensors": (as_is, save_torch_zip, "model.safetensors"),
    "safetensors-named-bin": (as_is, save_safetensors, "pytorch_model.bin"),
}


# ---------------------------------------------------------------------------------------------------
# every accepted format


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_loads_to_transformers_logits(fmt, hf_state, ids, ref, tmp_path):
    transform, save, name = FORMATS[fmt]
    path = tmp_path / name
    save(transform(hf_state), path)

    model = load_model(path)
    assert model.config == CONFIG  # read off the tensor shapes: there is no config.json
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    diff = max_diff(logits_of(model, ids), ref)
    assert diff < TOL, f"{fmt}: max abs diff {diff}"

    if name != "weights.dat":  # a directory is searched for the known names
        assert max_diff(logits_of(load_model(tmp_path), ids), ref) < TOL
    else:
        with pytest.raises(GPT2Error, match=re.escape(str(tmp_path))):
            load_model(tmp_path)


@pytest.mark.parametrize("save", [save_torch_zip, save_safetensors], ids=["torch", "safetensors"])
def test_fp16_tensors_are_cast_to_float32(save, hf, hf_state, ids, tmp_path):
    path = tmp_path / "weights.bin"
    save(half(hf_state), path)
    model = load_model(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the reference: transformers with the same fp16-rounded weights, computed in float32
    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    with torch.inference_mode():
        ref = rounded(ids).logits
    assert max_diff(logits_of(model, ids), ref) < TOL


def test_model_directory_with_config_json(ids, tmp_path):
    """save_pretrained's directory: model.safetensors + config.json, here with n_head 4 for n_embd 64,
    which shapes alone cannot tell (infer_config would take one 64-wide head)."""
    hf = random_hf_model(8, n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    hf.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    with torch.inference_mode():
        ref = hf(ids).logits

    model = load_model(tmp_path)
    assert model.config == GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    assert max_diff(logits_of(model, ids), ref) < TOL
    assert max_diff(logits_of(load_model(tmp_path / "model.safetensors"), ids), ref) < TOL  # beside the file

    # config.json wins: without it the shapes say one head, and the logits are not transformers'
    (tmp_path / "config.json").unlink()
    guessed = load_model(tmp_path)
    assert guessed.config.n_head == 1
    assert max_diff(logits_of(guessed, ids), ref) > 1e-3


def test_load_weight_into_a_built_model(hf_state, ids, ref):
    """graykode's entry: load_weight(model, torch.load(...)) on a model built the ordinary way."""
    for state in (legacy(hf_state), hf_state, tf_names(hf_state)):
        model = GPT2LMHeadModel(CONFIG)
        assert load_weight(model, state) is model
        assert max_diff(logits_of(model.eval(), ids), ref) < TOL
    model = GPT2LMHeadModel(CONFIG)
    state = legacy(hf_state)
    del state["h.1.mlp.c_fc.weight"]
    with pytest.raises(GPT2Error, match=r"h\.1\.mlp\.c_fc\.weight"):
        load_weight(model, state)


def test_bfloat16_load(hf_state, ids, ref, tmp_path):
    save_safetensors(hf_state, tmp_path / "model.safetensors")
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    logits = logits_of(model, ids)
    assert logits.dtype == model.activation_dtype  # float32 where FBGEMM runs the products (test_dtypes)
    # bfloat16 weights keep ~3 significant digits: close to the float32 logits (std ~2), not equal
    assert 0 < (logits.float() - ref).abs().mean() < 0.1


# ---------------------------------------------------------------------------------------------------
# infer_config and config.json


@pytest.mark.parametrize("transform", [as_is, legacy, tf_names, strip_prefix], ids=lambda f: f.__name__)
def test_infer_config_reads_shapes(transform, hf_state):
    assert infer_config(transform(hf_state)) == CONFIG


@pytest.mark.parametrize("n_embd, n_head", [(768, 12), (1024, 16), (1280, 20), (1600, 25), (192, 3)])
def test_infer_config_at_other_widths(n_embd, n_head):
    """Meta tensors: only shapes are read. Five blocks, numbered out of order."""
    state = {
        "wte.weight": torch.empty(50257, n_embd, device="meta"),
        "wpe.weight": torch.empty(1024, n_embd, device="meta"),
    }
    for i in (3, 0, 4, 1, 2):
        state[f"h.{i}.ln_1.weight"] = torch.empty(n_embd, device="meta")
    assert infer_config(state) == GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=5,
                                             n_head=n_head)


def test_width_without_a_head_count_needs_config_json(tmp_path):
    hf = random_hf_model(9, n_layer=1, n_embd=96, n_head=3, vocab_size=100, n_positions=16)
    save_safetensors(hf.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(GPT2Error, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(n_layer=1, n_embd=96, n_head=3, vocab_size=100,
                                                          n_ctx=16)))  # n_ctx: graykode's name
    ids = torch.arange(16).view(1, 16)
    with torch.inference_mode():
        ref = hf(ids).logits
    assert max_diff(logits_of(load_model(tmp_path), ids), ref) < TOL


def test_config_json_that_disagrees_with_the_weights(hf_state, tmp_path):
    save_torch_zip(legacy(hf_state), tmp_path / "gpt2-pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(dict(SHAPE, n_layer=3)))
    with pytest.raises(GPT2Error) as info:
        load_model(tmp_path)
    assert "n_layer" in str(info.value) or "h.2." in str(info.value)  # the count, or the block it lacks


# ---------------------------------------------------------------------------------------------------
# strictness: anything that is not exactly GPT-2 is refused, naming the key


def test_missing_tensor(hf_state, tmp_path):
    state = legacy(hf_state)
    del state["h.1.mlp.c_fc.weight"]
    save_torch_zip(state, tmp_path / "w.bin")
    with pytest.raises(GPT2Error, match=r"h\.1\.mlp\.c_fc\.weight") as info:
        load_model(tmp_path / "w.bin")
    assert "missing" in str(info.value) and str(tmp_path / "w.bin") in str(info.value)


def test_unexpected_tensor(hf_state, tmp_path):
    state = legacy(hf_state)
    state["h.0.attn.foo"] = torch.zeros(3)
    save_torch_zip(state, tmp_path / "w.bin")
    with pytest.raises(GPT2Error, match=r"h\.0\.attn\.foo") as info:
        load_model(tmp_path / "w.bin")
    assert "unexpected" in str(info.value)


@pytest.mark.parametrize("key, shape", [
    ("h.1.attn.c_proj.bias", (129,)),
    ("h.0.mlp.c_fc.weight", (512, 128)),  # nn.Linear's (out, in) where the file holds Conv1D's (in, out)
    ("ln_f.weight", (128, 1)),
])
def test_misshaped_tensor(hf_state, tmp_path, key, shape):
    state = legacy(hf_state)
    state[key] = torch.zeros(shape)
    save_torch_zip(state, tmp_path / "w.bin")
    with pytest.raises(GPT2Error, match=key.replace(".", r"\.")) as info:
        load_model(tmp_path / "w.bin")
    assert "shape" in str(info.value)


def test_integer_tensor_in_place_of_a_weight(hf_state, tmp_path):
    state = legacy(hf_state)
    state["h.0.ln_1.weight"] = torch.ones(128, dtype=torch.long)
    save_torch_zip(state, tmp_path / "w.bin")
    with pytest.raises(GPT2Error, match=r"h\.0\.ln_1\.weight"):
        load_model(tmp_path / "w.bin")


def bert_state() -> dict[str, torch.Tensor]:
    return {
        "embeddings.word_embeddings.weight": torch.zeros(1000, 64),
        "embeddings.position_embeddings.weight": torch.zeros(64, 64),
        "embeddings.LayerNorm.weight": torch.ones(64),
        "encoder.layer.0.attention.self.query.weight": torch.zeros(64, 64),
        "encoder.layer.0.attention.self.query.bias": torch.zeros(64),
        "encoder.layer.0.output.dense.weight": torch.zeros(64, 256),
    }


@pytest.mark.parametrize("with_config", [False, True])
def test_not_a_gpt2_state_dict(tmp_path, with_config):
    save_torch_zip(bert_state(), tmp_path / "pytorch_model.bin")
    if with_config:  # a GPT-2 config.json beside it does not make it one
        (tmp_path / "config.json").write_text(json.dumps(dict(n_layer=1, n_embd=64, n_head=4, vocab_size=1000,
                                                              n_positions=64)))
    with pytest.raises(GPT2Error, match="GPT-2") as info:
        load_model(tmp_path)
    assert "wte" in str(info.value)  # the token embedding it lacks


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SHAPE))
    (tmp_path / "weights.dat").write_bytes(b"")
    with pytest.raises(GPT2Error, match=re.escape(str(tmp_path))):
        load_model(tmp_path)


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope" / "gpt2-pytorch_model.bin"
    with pytest.raises(GPT2Error, match=re.escape(str(missing))):
        load_model(missing)


# ---------------------------------------------------------------------------------------------------
# safety: no pickled code runs; broken files are named


class WritesMarker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


def test_the_malicious_payload_does_run_code_when_unpickled(tmp_path):
    """Control: plain pickle does create the marker, so its absence below means the loader refused."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps({"wte.weight": WritesMarker(marker)}))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "torch.save-old-format", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(writer, hf_state, tmp_path):
    marker = tmp_path / "pwned"
    state = dict(legacy(hf_state), **{"h.0.attn.evil": WritesMarker(marker)})
    path = tmp_path / "gpt2-pytorch_model.bin"
    if writer == "torch.save":
        torch.save(state, path)
    elif writer == "torch.save-old-format":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        with path.open("wb") as f:
            pickle.dump(state, f)
    with pytest.raises(GPT2Error, match="refused") as info:
        load_model(tmp_path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("save", [save_torch_zip, save_torch_old, save_safetensors],
                         ids=["torch-zip", "torch-old", "safetensors"])
def test_truncated_file(save, hf_state, tmp_path):
    path = tmp_path / "weights.bin"
    save(legacy(hf_state), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GPT2Error, match=re.escape(str(path))):
        load_model(path)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_safetensors(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def test_safetensors_offsets_past_the_end(hf_state, tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(hf_state, path)
    header, body = safetensors_parts(path)
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[key]["data_offsets"][1] += 4096  # the last tensor claims bytes the file does not have
    write_safetensors(path, header, body)
    with pytest.raises(GPT2Error, match=re.escape(str(path))):
        load_model(path)


def test_safetensors_huge_header_length(hf_state, tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(hf_state, path)
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")  # byte 8 is still the header's "{"
    path.write_bytes(bytes(data))
    with pytest.raises(GPT2Error, match=re.escape(str(path))):
        load_model(path)


def test_empty_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"")
    with pytest.raises(GPT2Error, match=re.escape(str(path))):
        load_model(tmp_path)


@pytest.mark.parametrize("payload", [
    [torch.zeros(3), torch.ones(2)],
    torch.zeros(3),
    {"state_dict": {"wte.weight": torch.zeros(3)}, "epoch": 3},
], ids=["tensor-list", "tensor", "training-checkpoint"])
def test_not_a_dict_of_tensors(payload, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(payload, path)
    with pytest.raises(GPT2Error, match=re.escape(str(path))):
        load_model(path)


# Hand-made old-format torch files whose pickle only uses what the weights-only unpickler allows, but
# wrongly: torch raises TypeError / AssertionError for them, which the loader lets through as a traceback.
_OLD_FORMAT_HEAD = (
    pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # torch's legacy magic number
    + pickle.dumps(1001, protocol=2)  # protocol version
    + pickle.dumps(dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4)),
                   protocol=2)
)


def _storage_key_mismatch(tmp_path: Path) -> bytes:
    """A real old-format file whose trailing list of storage keys names a storage that is not there."""
    buf = io.BytesIO()
    torch.save({"wte.weight": torch.randn(3, 4)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    f = io.BytesIO(data)
    for _ in range(3):
        pickle.load(f)

    class SkipTensors(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

        def find_class(self, module, name):
            return lambda *args, **kwargs: None

    SkipTensors(f).load()
    start = f.tell()
    keys = pickle.load(f)
    end = f.tell()
    tail = data[start:end].replace(keys[0].encode(), b"x" * len(keys[0]))
    return data[:start] + tail + data[end:]


@pytest.mark.parametrize("content", [
    lambda tmp: _OLD_FORMAT_HEAD + b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R." + pickle.dumps([], protocol=2),
    _storage_key_mismatch,
], ids=["rebuild-without-arguments", "storage-key-mismatch"])
def test_corrupt_old_format_file_is_a_gpt2_error(content, tmp_path):
    path = tmp_path / "gpt2-pytorch_model.bin"
    path.write_bytes(content(tmp_path))
    with pytest.raises(GPT2Error, match=re.escape(str(path))):
        read_state_dict(path)


def test_safetensors_tensors_read_exactly_and_a_file_cut_after_opening_is_refused(tmp_path: Path) -> None:
    """Tensors are maps of their bytes in the file, so a file that ends before a tensor does must be an
    error, never a tensor that faults when read."""
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "empty": torch.zeros(0, 4)}
    save_file(tensors, path)
    state = read_state_dict(path)
    for key, tensor in tensors.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor)
    _cut_the_last_tensor_short(path)
    with pytest.raises(GPT2Error, match="cut short"):
        state[_last_tensor(path)]


def _last_tensor(path: Path) -> str:
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    header.pop("__metadata__", None)
    return max(header, key=lambda key: (header[key]["data_offsets"][1], -header[key]["data_offsets"][0]))  # not empty


def _cut_the_last_tensor_short(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)  # the last tensor in the file loses its last bytes


def test_safetensors_tensors_are_private_copies_of_the_file(tmp_path: Path) -> None:
    """A write into a loaded tensor never reaches the file, and replacing the file (a new download renamed
    over it) leaves the loaded tensors as they were."""
    path = tmp_path / "model.safetensors"
    original = {"a": torch.arange(4096.0).view(64, 64), "b": torch.ones(3)}
    save_file(original, path)
    before = path.read_bytes()
    state = read_state_dict(path)
    loaded = state["a"]
    loaded[0, 0] = -1.0
    assert path.read_bytes() == before
    assert torch.equal(state["a"], original["a"])  # read again: the file's value
    save_file({"a": torch.zeros(64, 64), "b": torch.zeros(3)}, tmp_path / "new.safetensors")
    os.replace(tmp_path / "new.safetensors", path)
    assert loaded[0, 1] == 1.0 and torch.equal(loaded[1:], original["a"][1:])


def test_safetensors_on_a_file_system_that_cannot_map_files_are_read(tmp_path: Path, monkeypatch) -> None:
    import gpt2.checkpoint

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # ENODEV: what mmap gives on a file system without it

    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16)}
    save_file(tensors, path)
    monkeypatch.setattr(gpt2.checkpoint.mmap, "mmap", refuse)
    state = read_state_dict(path)
    assert all(torch.equal(state[key], tensor) for key, tensor in tensors.items())
    _cut_the_last_tensor_short(path)
    with pytest.raises(GPT2Error, match="cut short"):
        state[_last_tensor(path)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["transformer.h.1.mlp.c_fc.weight", "transformer.wte.weight",
                                 "transformer.h.0.ln_1.bias"])
def test_a_non_finite_value_anywhere_is_refused(hf_state, tmp_path: Path, key: str, bad: float) -> None:
    """One NaN or infinity, in a transposed Conv1D weight, the embedding or a bias, names the tensor."""
    hf_state[key].view(-1)[hf_state[key].numel() // 3] = bad
    save_file(hf_state, tmp_path / "model.safetensors")
    with pytest.raises(GPT2Error, match=re.escape(f"tensor {key} holds NaN or infinite values")):
        load_model(tmp_path)
