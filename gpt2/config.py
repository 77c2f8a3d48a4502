"""Model hyper-parameters: a dataclass plus an exact-name preset table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from gpt2.errors import GPT2Error


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise GPT2Error(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def n_ctx(self) -> int:
        """graykode's name for the context window."""
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_json(cls, path: Path) -> GPT2Config:
        """Read a Hugging Face `config.json`; keys this model does not use are ignored."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GPT2Error(f"{path}: not a readable JSON config ({exc}); fix or delete it") from exc
        if not isinstance(raw, dict):
            raise GPT2Error(f"{path}: config must be a JSON object; fix or delete it")
        aliases = {"n_ctx": "n_positions"}
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            key = aliases.get(key, key)
            if key not in known:
                continue
            want = float if key == "layer_norm_epsilon" else int
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise GPT2Error(f"{path}: {key} must be a positive number, got {value!r}")
            if want is int and value != int(value):
                raise GPT2Error(f"{path}: {key} must be a whole number, got {value!r}")
            values[key] = want(value)
        return cls(**values)


# Exact names only: the sizes OpenAI released plus Hugging Face's distilled model.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12),
}


def n_head_for(n_embd: int) -> int:
    """Heads for a checkpoint without config.json: the preset with this width, else 64-wide heads."""
    for preset in PRESETS.values():
        if preset["n_embd"] == n_embd:
            return preset["n_head"]
    if n_embd % 64 == 0:
        return n_embd // 64
    raise GPT2Error(f"cannot infer n_head for n_embd={n_embd}: put a config.json beside the weights")
