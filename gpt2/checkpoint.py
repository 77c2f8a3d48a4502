"""Checkpoint loading: every GPT-2 weight format in circulation, strictly, without running pickled code.

Accepted: graykode's legacy `gpt2-pytorch_model.bin` (no key prefix, `h.N.attn.bias` mask buffers,
old TensorFlow-port `.g`/`.b`/`.w` names), Hugging Face `pytorch_model.bin` and `model.safetensors`
(with or without the `transformer.` prefix, `lm_head.weight`, `attn.bias` / `attn.masked_bias`).
The format is read from the file's first bytes, never guessed from its name.
"""

from __future__ import annotations

import json
import mmap
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gpt2.config import GPT2Config, n_head_for
from gpt2.errors import GPT2Error
from gpt2.model import GPT2LMHeadModel

if TYPE_CHECKING:
    from gpt2.prepared import Prepared

# Looked for, in this order, when a directory is given.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "gpt2-pytorch_model.bin")

# GPT-2 was written in TensorFlow, where these projections are "Conv1D" with weights stored as
# (in_features, out_features); nn.Linear wants (out_features, in_features), hence one transpose at load.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Causal-mask buffers that old checkpoints carry (the model builds its mask itself), and the LM head,
# which GPT-2 ties to the token embedding.
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")
_OLD_SUFFIXES = {".g": ".weight", ".w": ".weight", ".b": ".bias"}


def find_weight_file(path: Path) -> Path:
    """The weight file itself, or the first of WEIGHT_FILES inside a model directory."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise GPT2Error(f"{path}: no {', '.join(WEIGHT_FILES)} in this directory; "
                        "download one with scripts/download_weights.sh")
    if not path.is_file():
        raise GPT2Error(f"{path}: no such checkpoint file; check the path or run scripts/download_weights.sh")
    return path


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_SAFETENSORS_INTEGERS = {"I8": torch.int8, "I64": torch.int64}  # gpt2.prepared's int8 forms


def _private_map(path: Path, offset: int, length: int) -> tuple[mmap.mmap | bytearray, int]:
    """`length` bytes of the file from `offset`, mapped copy-on-write, and where they start in the map (maps
    start on an allocation boundary). The pages are the page cache's own, so nothing is copied or
    zero-filled; a write through the map goes to a private copy, never to the file. Where the file system
    cannot map files, the bytes are read into memory instead. ValueError where the file ends before
    offset + length."""
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    with path.open("rb") as f:
        try:  # ACCESS_COPY: MAP_PRIVATE, faulted in as read (MAP_POPULATE would copy every page)
            return mmap.mmap(f.fileno(), offset + length - aligned, access=mmap.ACCESS_COPY, offset=aligned), \
                offset - aligned
        except OSError:
            f.seek(offset)
            data = bytearray(length)
            if f.readinto(data) != length:
                raise ValueError(f"{path} ends before byte {offset + length}") from None
            return data, 0


class SafetensorsFile(Mapping[str, Tensor]):
    """The tensors of a .safetensors file, each mapped from disk when it is asked for.

    safetensors validates the header (dtypes, shapes, offsets inside the file) when the file is opened.
    Each tensor is then a copy-on-write map of its own bytes in the file (_private_map), as transformers
    and llama.cpp map theirs: loading reads nothing twice, a tensor that is converted (transposed, cast)
    lets go of its map once the converted copy is made, and one kept as it is stays in the page cache,
    shared with any other process that reads the file. Replacing the file (a new download, a rename over
    it) leaves the loaded weights alone; writing into it in place, or cutting it short, while a model
    from it runs, is not supported, as with any mapped file.
    """

    def __init__(self, path: Path, integers: bool = False) -> None:
        """Refuses tensors other than floats (GPT-2 weights) unless `integers`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):  # validation only: raises SafetensorError
            pass
        self._path = path
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + size
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        dtypes = {**_SAFETENSORS_DTYPES, **_SAFETENSORS_INTEGERS} if integers else _SAFETENSORS_DTYPES
        for key, entry in header.items():
            if entry["dtype"] not in dtypes:
                raise GPT2Error(f"{path}: tensor {key} has dtype {entry['dtype']}, not a float: not GPT-2 weights")
            start, end = entry["data_offsets"]
            self._entries[key] = (dtypes[entry["dtype"]], tuple(entry["shape"]), start, end)

    def __getitem__(self, key: str) -> Tensor:
        dtype, shape, start, end = self._entries[key]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        try:
            view, at = _private_map(self._path, self._data_start + start, end - start)
        except ValueError as exc:  # the file ends before the tensor does
            raise GPT2Error(f"{self._path}: tensor {key} is cut short (file changed while loading?); "
                            "download it again") from exc
        # little-endian, as safetensors specifies
        return torch.frombuffer(view, dtype=dtype, offset=at, count=(end - start) // dtype.itemsize).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: entry[1] for key, entry in self._entries.items()}


def read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """Tensors of a .bin (zip or legacy torch format) or .safetensors file; never unpickles code."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(9)
        if len(head) >= 9 and head[8:9] == b"{" and head[:4] != b"PK\x03\x04":
            return SafetensorsFile(path)
        with warnings.catch_warnings():  # torch warns about some refused pickles: the error says it all
            warnings.simplefilter("ignore")
            state = _torch_load(path, zipped=head[:4] == b"PK\x03\x04")
    except pickle.UnpicklingError as exc:
        raise GPT2Error(f"{path}: refused to load: it holds more than plain tensors, or is corrupt "
                        f"({_first_line(exc)}); use a checkpoint from a trusted source") from exc
    except SafetensorError as exc:
        raise GPT2Error(f"{path}: corrupt safetensors file ({_first_line(exc)}); download it again") from exc
    except Exception as exc:  # noqa: BLE001 -- a corrupt file can make the parsers raise almost anything
        raise GPT2Error(f"{path}: unreadable checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
                        "the file is truncated or corrupt: download it again") from exc
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                 for k, v in state.items()):
        raise GPT2Error(f"{path}: not a state dict of named tensors; this is not a GPT-2 checkpoint")
    return dict(state)


def _torch_load(path: Path, zipped: bool) -> object:
    if path.suffix == ".safetensors":
        # torch.load hands paths named *.safetensors to safetensors; this file's bytes say torch format.
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    # mmap avoids a second in-memory copy; only the zip format (torch >= 1.6) supports it.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)


def _all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity: either would show in the minimum or the maximum (NaN propagates through both).
    One pass and no temporary the size of the tensor, unlike isfinite(tensor).all()."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _dense(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """The tensor contiguous and in `dtype`: as is where it already is, else in one copy that transposes
    and casts in the same pass."""
    if tensor.is_contiguous() and tensor.dtype == dtype:
        return tensor
    return torch.empty(tensor.shape, dtype=dtype).copy_(tensor)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal escape codes, at most 200 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def canonical_key(key: str) -> str | None:
    """The model's parameter name for a checkpoint key, or None for keys that carry nothing needed."""
    key = key.removeprefix("transformer.")
    if _IGNORED.search(key):
        return None
    for old, new in _OLD_SUFFIXES.items():
        if key.endswith(old):
            key = key[: -len(old)] + new
            break
    return "transformer." + key


def shape_sizes(state: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, int]:
    """vocab_size, n_positions, n_embd and n_layer read off tensor shapes."""
    shapes = state.shapes() if isinstance(state, SafetensorsFile) else {k: tuple(v.shape) for k, v in state.items()}
    shapes = {canonical_key(k): shape for k, shape in shapes.items()}
    wte, wpe = shapes.get("transformer.wte.weight"), shapes.get("transformer.wpe.weight")
    if wte is None or wpe is None or len(wte) != 2 or len(wpe) != 2:
        raise GPT2Error(f"{source}: has no 2-D wte/wpe embeddings: this is not a GPT-2 checkpoint")
    layers = {int(m.group(1)) for k in shapes if k and (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if not layers:
        raise GPT2Error(f"{source}: has no transformer blocks (h.N.*): this is not a GPT-2 checkpoint")
    if layers != set(range(len(layers))):
        missing = next(i for i in range(len(layers) + 1) if i not in layers)
        raise GPT2Error(f"{source}: blocks are not numbered 0..{len(layers) - 1} (h.{max(layers)} present, "
                        f"h.{missing} missing): the file is damaged or not GPT-2")
    return dict(vocab_size=wte[0], n_positions=wpe[0], n_embd=wte[1], n_layer=len(layers))


def infer_config(state: Mapping[str, Tensor], source: str = "checkpoint") -> GPT2Config:
    """Hyper-parameters read off tensor shapes, for checkpoints that come without a config.json."""
    sizes = shape_sizes(state, source)
    return GPT2Config(**sizes, n_head=n_head_for(sizes["n_embd"]))


def _checked_against(declared: GPT2Config, sizes: dict[str, int], config_file: Path) -> GPT2Config:
    """config.json's config, once its sizes agree with the tensors (before anything is built from it)."""
    for name, size in sizes.items():
        if getattr(declared, name) != size:
            raise GPT2Error(f"{config_file}: {name} is {getattr(declared, name)} but the weights beside it have "
                            f"{size}: fix or delete config.json")
    return declared


def convert_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, torch.Size],
                       dtype: torch.dtype | None = None, source: str = "checkpoint",
                       transpose: bool = True, prepared: Prepared | None = None) -> dict[str, Tensor]:
    """Rename, transpose Conv1D weights and cast; raise naming any missing, unexpected or mis-shaped key.

    With `transpose=False` a Conv1D weight keeps its stored (in, out) layout and is given as its transposed
    view (out, in): the CPU kernels' forms (gpt2.kernels) lay each weight out as their kernel reads it, and
    for some that is the stored layout, which then is never copied.

    With `prepared` (gpt2.prepared) the copies a cast or layout needs come from there where it has them,
    and those made here are handed to it. Where its file is valid (made from this very checkpoint, which
    was checked then), nothing is checked for NaN, and a Conv1D weight whose projection's form it holds
    is given as stored: its form is built from it only if the kernel ranking changed since."""
    out: dict[str, Tensor] = {}
    unexpected, misshaped, seen = [], [], set()
    checked = prepared is not None and prepared.valid
    for key in state:
        name = canonical_key(key)
        if name is None:
            continue
        stored = state[key]
        if name not in expected or not stored.is_floating_point():
            unexpected.append(key)
            continue
        conv1d = name.endswith(CONV1D_WEIGHTS) and stored.dim() == 2
        tensor = stored.t() if conv1d else stored
        seen.add(name)
        if tensor.shape != expected[name]:
            misshaped.append(f"{key} {tuple(tensor.shape)} (expected {tuple(expected[name])})")
            continue
        if prepared is not None and (kept := prepared.state_tensor(name)) is not None:
            out[name] = kept
            continue
        if checked and conv1d and not transpose and prepared.has_form(name.removesuffix(".weight")):
            out[name] = tensor
            prepared.given_as_stored(name)
            continue
        if not checked and not _all_finite(stored):  # as stored: a reduction over a transposed view is slower
            raise GPT2Error(f"{source}: tensor {key} holds NaN or infinite values; the checkpoint is damaged")
        if conv1d and not transpose:  # cast as stored (in, out), seen as (out, in)
            out[name] = _dense(stored, dtype or stored.dtype).t()
        else:
            out[name] = _dense(tensor, dtype or tensor.dtype)
        if prepared is not None and out[name].data_ptr() != stored.data_ptr():
            prepared.converted(name, out[name], keep=not conv1d)
    missing = sorted(set(expected) - seen)
    problems = [f"{label}: {_listing(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if items]
    if problems:
        raise GPT2Error(f"{source}: does not match GPT-2 ({'; '.join(problems)}); "
                        "use a GPT-2 checkpoint or a config.json that matches it")
    return out


def _listing(items: list[str], most: int = 4) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def load_weight(model: GPT2LMHeadModel, state_dict: Mapping[str, Tensor]) -> GPT2LMHeadModel:
    """graykode's entry point: copy a raw checkpoint state dict into an existing model."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(convert_state_dict(state_dict, expected), strict=True)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               int8: bool = False, kernels: str | None = None) -> GPT2LMHeadModel:
    """A ready (eval-mode) model from a weight file or model directory.

    `int8` stores the projection and LM-head weights as int8 (gpt2.quantize), `dtype` the rest. On CPU the
    products run on kernels chosen by timing them on this machine (gpt2.tuning; `kernels` is its mode,
    "cached", "tune" or "default"): 16-bit models keep their weights' values (with float32 activations but
    for a bfloat16 model's prompts), int8 ones keep the int8 contract. model.kernel_choices() names them.
    Elsewhere they are F.linear in `dtype` (int8: weights widened per product).

    The config comes from a config.json beside the weights when there is one, else from tensor shapes.
    The model is built on the meta device and takes the loaded tensors as they are (assign=True), so
    no time or memory goes into a random initialisation that would be overwritten.
    """
    weight_file = find_weight_file(Path(path).expanduser())
    state = read_state_dict(weight_file)
    config_file = weight_file.parent / "config.json"
    if config_file.is_file():
        config = _checked_against(GPT2Config.from_json(config_file), shape_sizes(state, str(weight_file)),
                                  config_file)
    else:
        config = infer_config(state, str(weight_file))
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    on_cpu = torch.device(device).type == "cpu"
    precision = "int8" if int8 else str(dtype).removeprefix("torch.")
    prepared = None
    if on_cpu:
        from gpt2.prepared import PRECISIONS, Prepared
        from gpt2.tuning import kernels_mode

        kernels = kernels_mode(kernels)
        if precision in PRECISIONS and kernels != "default":
            prepared = Prepared(weight_file, precision)
    weights = convert_state_dict(state, expected, dtype, source=str(weight_file), transpose=not on_cpu,
                                 prepared=prepared)
    del state
    model.load_state_dict(weights, strict=True, assign=True)
    del weights
    model.eval()
    if on_cpu:
        from gpt2.tuning import use_cpu_kernels

        use_cpu_kernels(model, precision, kernels, prepared)
        if prepared is not None:
            prepared.save()
        return model
    if int8:
        from gpt2.quantize import quantize_int8

        quantize_int8(model)
    return model.to(device)
