"""Where a --model value points: a preset name (graykode's file in the working directory, else the
verified download cache) or a path to a checkpoint file or model directory."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2.config import PRESETS
from gpt2.download import ensure_model, model_dir
from gpt2.errors import GPT2Error, UsageError

LEGACY_WEIGHTS = "gpt2-pytorch_model.bin"  # graykode's file name, looked for in the working directory


def has_vocab(directory: Path) -> bool:
    """Whether the directory holds a GPT-2 vocabulary (OpenAI's or Hugging Face's file names)."""
    return any(all((directory / n).is_file() for n in pair)
               for pair in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")))


def locate_model(spec: str, offline: bool = False, quiet: bool = False) -> tuple[Path, Path]:
    """(weights file or model directory, vocabulary directory) for a --model value; downloads a preset
    that is not cached yet unless `offline`."""
    if spec in PRESETS:
        legacy = Path.cwd() / LEGACY_WEIGHTS
        if spec == "gpt2" and legacy.is_file():  # graykode's layout: the weights in the working directory
            vocab = legacy.parent if has_vocab(legacy.parent) else model_dir("gpt2")
            if not has_vocab(vocab):
                raise GPT2Error(f"no encoder.json and vocab.bpe beside {legacy}: copy them there or run "
                                "scripts/download_weights.sh gpt2")
            return legacy, vocab
        directory = ensure_model(spec, offline=offline, quiet=quiet)
        return directory, directory
    path = Path(spec).expanduser()
    if not path.exists():
        if os.sep not in spec and not path.suffix:
            raise UsageError(f"unknown model {spec!r}: use one of {', '.join(PRESETS)} or a path")
        raise GPT2Error(f"{path}: no such checkpoint file or directory; check the path")
    vocab = path if path.is_dir() else path.parent
    return path, vocab
