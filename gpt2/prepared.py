"""Prepared weights: what a CPU load had to build from a checkpoint (casts, transposed copies, the kernels'
plain forms), kept in the cache so that later loads of the same checkpoint map it from disk instead.

One safetensors file per checkpoint and precision, `<cache>/prepared/<hash>.safetensors` (the KEEP_FILES
most recently used are kept). It holds only what differs from the checkpoint's own tensors: a tensor a
load uses as stored is mapped from the checkpoint every time, and a form that is its weight or bias
itself is recorded as such. Its metadata names the checkpoint (resolved path, size, modification time,
inode), this file format and the torch version; when any differs the file is ignored and written again.
A load that uses it skips the checkpoint's finite check, which passed when the file was written. Forms
that are not plain tensors (oneDNN's and FBGEMM's packed weights) cannot be kept: each load builds them
again, which the kernel ranking counts (gpt2.tuning), from their input kept here (the weight as the load
cast it), except those built from a calibration run (int8's), kept as plain tensors they are rebuilt
from in milliseconds.

An int8 load settles each projection's form by calibrating the float model and checking the int8 one
against it (gpt2.quantize), seconds of work. The file keeps that outcome with the kernel rankings and the
limits it was settled under (`outcome`): a later load under the same maps every form and calibrates
nothing; under others it settles again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from gpt2.kernels import Form, Projection, Stored

FORMAT = "3"
KEEP_FILES = 8  # prepared files kept in the cache, the most recently used: each may be a model's size
PRECISIONS = ("float32", "bfloat16", "float16", "int8")


def identity(weight_file: Path) -> str:
    """What the prepared file was built from: the checkpoint as it is on disk, this format, torch."""
    stat = weight_file.stat()
    return json.dumps([str(weight_file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, FORMAT,
                       torch.__version__])


def prepared_file(weight_file: Path, precision: str) -> Path:
    from gpt2.download import cache_root

    digest = hashlib.sha256(f"{weight_file.resolve()}\n{precision}".encode()).hexdigest()[:24]
    return cache_root() / "prepared" / f"{digest}.safetensors"


class Prepared:
    """The prepared tensors of one checkpoint in one precision: those read from the cache file (valid
    when its identity matched), and those this load built, to be saved (`save`)."""

    def __init__(self, weight_file: Path, precision: str) -> None:
        from gpt2.checkpoint import SafetensorsFile

        self.path = prepared_file(weight_file, precision)
        self.identity = identity(weight_file)
        self.valid = False
        self._tensors: dict[str, Tensor] = {}
        self._forms: dict[str, dict] = {}  # projection name -> {"form": name, "parts": [...]}
        self._changed = True  # until a valid file is read: even one with no tensors vouches for the check
        self._not_as_next: set[str] = set()  # weights this load gives otherwise than the next one will
        self._transposed: set[str] = set()  # state tensors kept as their transpose (a Conv1D (in, out))
        self._outcome = ""  # the settings (rankings, limits) the kept forms were settled under, if a load did
        try:
            stored = SafetensorsFile(self.path, integers=True)
            meta = stored.metadata
            if meta.get("identity") == self.identity:
                self._forms = json.loads(meta["forms"])
                self._transposed = set(json.loads(meta["transposed"]))
                self._outcome = meta.get("outcome", "")
                self._tensors = {key: stored[key] for key in stored}
                self.valid, self._changed = True, False
                with contextlib.suppress(OSError):  # recently used: kept the longest (see save)
                    os.utime(self.path)
        except Exception:  # noqa: BLE001 -- missing, unreadable or corrupt: built again and rewritten
            self._tensors, self._forms, self._transposed = {}, {}, set()

    # the converted state dict

    def state_tensor(self, name: str) -> Tensor | None:
        """The converted tensor `name` (cast or laid out as the load needs it), where this file has it."""
        tensor = self._tensors.get("state:" + name)
        return tensor.t() if tensor is not None and name in self._transposed else tensor

    def converted(self, name: str, tensor: Tensor, keep: bool) -> None:
        """A tensor the conversion had to copy: kept with `keep` (a weight whose form is what the load
        keeps is not), else noted as not the checkpoint's own."""
        if keep:
            self._keep(name, tensor)
        else:
            self._not_as_next.add(name)

    def _keep(self, name: str, tensor: Tensor) -> None:
        tensor = tensor.detach()
        if not tensor.is_contiguous() and tensor.t().is_contiguous():  # a Conv1D weight seen as (out, in)
            tensor = tensor.t()
            self._transposed.add(name)
        self._tensors["state:" + name] = tensor
        self._changed = True

    def given_as_stored(self, name: str) -> None:
        """A weight given uncast because this file holds its form (which the ranking may no longer pick)."""
        self._not_as_next.add(name)

    # the projections' forms

    def has_form(self, name: str) -> bool:
        return name in self._forms

    def form(self, name: str, form: Form, weight: Tensor, bias: Tensor | None) -> Stored | None:
        """The stored form of projection `name` if this file has it in `form`, else None. `weight` and `bias`
        are the load's own, which a plain form made of them refers to."""
        entry = self._forms.get(name)
        if entry is None or entry["form"] != form.name:
            return None
        if "kept" in entry:  # rebuilt from the tensors Form.to_kept gave (None: not kept)
            return form.from_kept(tuple(self._tensors.get(f"form:{name}:{index}") for index in range(entry["kept"])))
        parts = []
        for index, (kind, transposed) in enumerate(entry["parts"]):
            if kind == "file":
                part = self._tensors[f"form:{name}:{index}"]
            elif kind == "none":
                part = None
            else:
                part = (weight if kind == "weight" else bias).detach()  # its data, not the module's parameter
                part = part.t() if transposed else part
            parts.append(part)
        return tuple(parts)

    def keep_form(self, name: str, projection: Projection, weight: Tensor, bias: Tensor | None) -> None:
        """Keep projection `name`'s form if it is plain tensors. A part that is the bias's own memory, or the
        weight's where the next load gives the same weight (the checkpoint's own tensor, or a converted one
        this file keeps), is recorded as such (the bias always comes as stored or from this file). A form built
        from a calibration run is kept as the tensors it is rebuilt from (Form.to_kept). Another packed form
        is built again by every load: what is kept then is its input, the weight as this load cast it (where
        it did)."""
        form = projection.decode.form
        same_next_time = name + ".weight" not in self._not_as_next
        if not self._replaces(name, form):
            return
        if form.to_kept is not None:
            self._keep_rebuilt(name, projection)
            return
        if not form.plain:
            if not same_next_time:
                self._keep(name + ".weight", weight.to(projection.dtype))
            return
        parts = []
        for index, part in enumerate(projection.stored):
            if part is None:
                parts.append(("none", False))
                continue
            source = next((kind for kind, tensor, same in (("weight", weight, same_next_time), ("bias", bias, True))
                           if same and tensor is not None and part.data_ptr() == tensor.data_ptr()
                           and part.dtype == tensor.dtype), None)
            if source is not None:
                parts.append((source, part.stride() != (weight if source == "weight" else bias).stride()))
            else:
                parts.append(("file", False))
                self._tensors[f"form:{name}:{index}"] = part
        self._forms[name] = {"form": form.name, "parts": parts}
        self._changed = True

    def _replaces(self, name: str, form: Form) -> bool:
        """Whether `form` is new for projection `name`; an earlier other form is dropped."""
        entry = self._forms.get(name)
        if entry is not None and entry["form"] == form.name:
            return False
        if entry is not None:
            self._drop_form(name)
        return True

    def _drop_form(self, name: str) -> None:
        del self._forms[name]
        for key in [key for key in self._tensors if key.startswith(f"form:{name}:")]:
            del self._tensors[key]
        self._changed = True

    def _keep_rebuilt(self, name: str, projection: Projection) -> None:
        """Keep a form built from a calibration run as the plain tensors it is rebuilt from (Form.to_kept)."""
        form = projection.decode.form
        kept = form.to_kept(projection.stored)
        held = {tensor.data_ptr() for tensor in self._tensors.values()}  # a bias may be the state tensor kept
        for index, part in enumerate(kept):
            if part is not None:
                part = part.detach()
                self._tensors[f"form:{name}:{index}"] = part.clone() if part.data_ptr() in held else part
        self._forms[name] = {"form": form.name, "kept": len(kept)}
        self._changed = True

    def outcome(self, settling: str, names: list[str]) -> dict[str, str] | None:
        """{projection: its form's name} as a load under the same `settling` (kernel rankings and limits)
        settled them, where this file has every one of `names`; else None, and the forms kept under other
        settings are dropped."""
        if self._outcome == settling and all(name in self._forms for name in names):
            return {name: self._forms[name]["form"] for name in names}
        for name in list(self._forms):
            self._drop_form(name)
        self._outcome = ""
        return None

    def settle(self, settling: str, projections: dict[str, Projection]) -> None:
        """Keep the forms these projections (every one of a model, built from a calibration run) settled on,
        as the outcome of a load under `settling`."""
        for name, projection in projections.items():
            if self._replaces(name, projection.decode.form):
                self._keep_rebuilt(name, projection)
        self._outcome, self._changed = settling, True

    def save(self) -> None:
        """Write the file if this load built anything new: atomically (a reader sees the old file or the new
        one); where it cannot be written, later loads build again."""
        if not self._changed:
            return
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        tensors = {key: tensor.contiguous() for key, tensor in self._tensors.items()}
        metadata = {"identity": self.identity, "forms": json.dumps(self._forms),
                    "transposed": json.dumps(sorted(self._transposed)), "outcome": self._outcome}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".prepared-", suffix=".safetensors")
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata=metadata)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            _forget_all_but_recent(self.path.parent)
        except (OSError, SafetensorError):  # a full disk, a read-only cache
            pass
        self._changed = False


def _forget_all_but_recent(folder: Path) -> None:
    """Delete all but the KEEP_FILES most recently used prepared files (a later load of theirs builds again)."""
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # deleted meanwhile by another process
            return 0.0

    for old in sorted(folder.glob("*.safetensors"), key=used, reverse=True)[KEEP_FILES:]:
        old.unlink(missing_ok=True)
