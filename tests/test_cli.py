"""
End-to-end tests of main.py, run as a subprocess on a random-initialised 124M checkpoint in graykode's
legacy torch format (the `legacy_dir` fixture).

The oracle for every generated sample is the library itself, run in-process with the same seed:
gpt2.sample.sample_sequence on the model from gpt2.checkpoint.load_model, with the context cut off and
each row cut at its first <|endoftext|>. With random weights the samples are arbitrary tokens (newlines,
half characters), so outputs are compared as bytes, never by counting lines.

Each CLI run costs a torch import plus a checkpoint load (~3-4 s), so the runs are few and short; the
argument errors that main.py catches before importing torch cost a fraction of a second.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_fails

from gpt2.checkpoint import load_model
from gpt2.encoder import Encoder, get_encoder
from gpt2.model import GPT2LMHeadModel
from gpt2.sample import sample_sequence

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "main.py"
WEIGHTS = "gpt2-pytorch_model.bin"
TIMEOUT = 300  # seconds per CLI run: generous for 2 slow cores, but a hang still fails
# One thread per run, here and in the in-process oracle: the same thread count keeps results bit-equal, and on
# a shared 2-core machine two-thread runs wait on each other's OpenMP barriers (2-10x slower under load).
THREADS = 1
PROMPT = "The café served crème brûlée, and then"  # non-ASCII: stdout must be UTF-8 whatever the locale


def separator(n: int) -> str:
    return f"{'=' * 40} SAMPLE {n} {'=' * 40}\n"


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def weights(legacy_dir: Path) -> Path:
    return legacy_dir / WEIGHTS


@dataclass
class Library:
    """The in-process oracle: the same checkpoint and vocabulary through the library API."""

    model: GPT2LMHeadModel
    enc: Encoder

    def samples(self, seed: int, prompt: str | None, length: int, batch_size: int = 1, batches: int = 1,
                temperature: float = 0.7, top_k: int = 40) -> list[str]:
        """graykode's loop: one manual_seed, then `batches` calls of sample_sequence; each row is cut
        after the context (the start token when unconditional) and at its first end-of-text token."""
        eot = self.enc.eot_token
        if prompt is None:
            where: dict[str, object] = {"start_token": eot}
            skip = 1
        else:
            ids = self.enc.encode(prompt)
            where, skip = {"context": ids}, len(ids)
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)  # as in the CLI runs (cli_env): same kernels, same floating-point sums
        try:
            torch.manual_seed(seed)
            texts = []
            for _ in range(batches):
                out = sample_sequence(self.model, length, batch_size=batch_size, temperature=temperature,
                                      top_k=top_k, eot_token=eot, **where)
                for row in out[:, skip:].tolist():
                    if eot in row:
                        row = row[: row.index(eot)]
                    texts.append(self.enc.decode(row))
        finally:
            torch.set_num_threads(threads)
        return texts


@pytest.fixture(scope="session")
def lib(legacy_dir: Path) -> Library:
    return Library(load_model(legacy_dir / WEIGHTS, kernels="default"), get_encoder(legacy_dir))


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Offline, with every cache in an empty temporary directory: nothing can be downloaded or found. The
    kernels measure nothing (GPT2_PYTORCH_KERNELS=default), as in the library models the output is compared
    with: measured choices could differ between the processes."""
    cache = tmp_path_factory.mktemp("cli-cache")
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", GPT2_PYTORCH_CACHE=str(cache / "gpt2-pytorch"), HF_HOME=str(cache / "hf"),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               GPT2_PYTORCH_KERNELS="default")
    env.pop("HF_HUB_CACHE", None)
    return env


@pytest.fixture(scope="session")
def cli(cli_env: dict[str, str]):
    def run(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(MAIN), *args],
            input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True, env=cli_env, cwd=cwd or REPO, timeout=TIMEOUT,
        )

    return run


@pytest.fixture(scope="session")
def seed1_quiet(cli, weights: Path) -> subprocess.CompletedProcess:
    """`--seed 1 --quiet` on PROMPT, shared by the tests that compare against it."""
    return cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--quiet", "--length", "16")


def ok(proc: subprocess.CompletedProcess) -> bytes:
    """stdout of a run that must have succeeded (with its stderr shown when it did not)."""
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in proc.stderr
    return proc.stdout


def quiet_output(texts: list[str]) -> bytes:
    return "".join(t + "\n" for t in texts).encode("utf-8")


def split_header(stdout: bytes) -> tuple[str, bytes]:
    """(settings line, the rest) of a non-quiet run."""
    header, newline, rest = stdout.partition(b"\n")
    assert newline, stdout[:200]
    return header.decode("utf-8"), rest


# ---------------------------------------------------------------------------------------------------
# samples: reproducible, equal to the library's, laid out like graykode's


def test_seed_quiet_is_reproducible_and_equals_library(cli, weights: Path, lib: Library, seed1_quiet) -> None:
    first = ok(seed1_quiet)
    again = ok(cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--quiet", "--length", "16"))
    assert first == again
    assert first == quiet_output(lib.samples(1, PROMPT, 16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_dtypes_print_what_the_library_generates(cli, weights: Path, legacy_dir: Path, lib: Library,
                                                        dtype: str) -> None:
    """`--dtype bfloat16|float16` on CPU (FBGEMM's float16 products without measuring) prints exactly the
    samples of the same model loaded through the library; bfloat16's coarser weights change this sample
    (float16's do not), which shows the flag took effect."""
    out = ok(cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--quiet", "--length", "32",
                 "--dtype", dtype, "--device", "cpu"))
    model = Library(load_model(weights, dtype=getattr(torch, dtype), kernels="default"), get_encoder(legacy_dir))
    assert out == quiet_output(model.samples(1, PROMPT, 32))
    if dtype == "bfloat16":
        assert out != quiet_output(lib.samples(1, PROMPT, 32))


def test_non_quiet_layout(cli, weights: Path, lib: Library) -> None:
    out = ok(cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--length", "16"))
    header, rest = split_header(out)
    assert header.startswith("Namespace(") and header.endswith(")")
    assert re.search(r"\bseed=1\b", header) and re.search(r"\blength=16\b", header)
    [text] = lib.samples(1, PROMPT, 16)
    assert rest == f"{PROMPT}\n{separator(1)}{text}\n".encode()


def test_batches(cli, weights: Path, lib: Library) -> None:
    args = ("--model", str(weights), "--text", PROMPT, "--batch_size", "4", "--nsamples", "8", "--seed", "2",
            "--length", "8")
    texts = lib.samples(2, PROMPT, 8, batch_size=4, batches=2)
    assert len(texts) == 8
    assert ok(cli(*args, "--quiet")) == quiet_output(texts)

    header, rest = split_header(ok(cli(*args)))
    assert re.search(r"\bseed=2\b", header)
    assert rest == (PROMPT + "\n" + "".join(separator(i + 1) + t + "\n" for i, t in enumerate(texts))).encode()


def test_unconditional(cli, weights: Path, lib: Library) -> None:
    out = ok(cli("--model", str(weights), "--unconditional", "--seed", "3", "--quiet", "--length", "10"))
    # only the start token is cut, not len(prompt) tokens as in graykode
    assert out == quiet_output(lib.samples(3, None, 10))


def test_prompt_from_stdin(cli, weights: Path, lib: Library) -> None:
    # `echo "Hello world" | main.py ...`: the trailing newline is not part of the prompt
    out = ok(cli("--model", str(weights), "--quiet", "--seed", "4", "--length", "8", stdin=b"Hello world\n"))
    assert out == quiet_output(lib.samples(4, "Hello world", 8))  # = `--text "Hello world"`, see the tests above


def test_greedy_ignores_seed(cli, weights: Path, lib: Library) -> None:
    args = ("--model", str(weights), "--text", PROMPT, "--temperature", "0", "--quiet", "--length", "8")
    first = ok(cli(*args, "--seed", "5"))
    assert ok(cli(*args, "--seed", "6")) == first
    assert first == quiet_output(lib.samples(123, PROMPT, 8, temperature=0))


def test_graykode_layout_in_working_directory(cli, legacy_dir: Path, seed1_quiet) -> None:
    # no --model: ./gpt2-pytorch_model.bin and the vocabulary beside it, as `python main.py` in graykode's repo
    out = ok(cli("--text", PROMPT, "--seed", "1", "--quiet", "--length", "16", cwd=legacy_dir))
    assert out == ok(seed1_quiet)


# ---------------------------------------------------------------------------------------------------
# default --length: half the window, shrunk to fit the prompt


def test_default_length_is_half_the_window(cli_env: dict[str, str], weights: Path) -> None:
    # generating 512 tokens is slow: read the settings line (printed before sampling), then stop the run
    proc = subprocess.Popen([sys.executable, str(MAIN), "--model", str(weights), "--text", "Hello", "--seed", "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env,
                            cwd=REPO)
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    try:
        header = proc.stdout.readline().decode("utf-8")
        second = proc.stdout.readline()
    finally:
        timer.cancel()
        proc.kill()
        _, err = proc.communicate()
    assert header.startswith("Namespace("), err.decode("utf-8", "replace")
    assert re.search(r"\blength=512\b", header), header
    assert second == b"Hello\n"


def test_default_length_shrinks_to_fit_a_long_prompt(cli, weights: Path, lib: Library) -> None:
    prompt = "hello" + " hello" * 899
    n = len(lib.enc.encode(prompt))
    expected = min(512, 1024 - n)
    assert 0 < expected < 512
    out = ok(cli("--model", str(weights), "--text", prompt, "--temperature", "0", "--seed", "0"))
    header, rest = split_header(out)
    assert re.search(rf"\blength={expected}\b", header), header[-300:]
    # the sample fills the window to its last position; recomputing it in-process would double the cost
    head = f"{prompt}\n{separator(1)}".encode()
    assert rest.startswith(head) and rest.endswith(b"\n") and len(rest) > len(head) + 1


# ---------------------------------------------------------------------------------------------------
# bad input: one line on stderr naming the problem, no traceback, nothing on stdout


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--nsamples", "3", "--batch_size", "2"], "not a multiple of --batch_size"),
        (["--length", "0"], "--length must be at least 1"),
        (["--top_k", "-1"], "--top_k"),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature"),
        (["--text", ""], "empty prompt"),
        (["--quiet", "False"], "unrecognized arguments: False"),  # --quiet is a plain flag
    ],
    ids=["nsamples-batch", "length-0", "top_k", "top_p-0", "top_p-1.5", "temperature", "empty-prompt",
         "quiet-value"],
)
def test_bad_arguments(cli, weights: Path, args: list[str], phrase: str) -> None:
    if "--text" not in args:
        args = ["--text", "Hello", *args]
    assert_fails(cli("--model", str(weights), "--seed", "0", *args), 2, phrase)


def test_length_that_does_not_fit_the_window(cli, weights: Path) -> None:
    proc = cli("--model", str(weights), "--text", "Hello world", "--length", "1024", "--quiet")
    line = assert_fails(proc, 2, "--length 1024")
    assert "does not fit" in line and "--length 1022" in line  # the prompt is 2 tokens


def test_unknown_model_name(cli) -> None:
    assert_fails(cli("--model", "gpt5", "--text", "Hello"), 2, "unknown model 'gpt5'")


def test_missing_checkpoint(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / WEIGHTS
    assert_fails(cli("--model", str(missing), "--text", "Hello"), 1, str(missing), "no such checkpoint")


def _model_dir(tmp_path: Path, legacy_dir: Path, *, weights: bytes | None = None, vocab: tuple[str, ...] = (),
               encoder_json: bytes | None = None) -> Path:
    """A model directory: the real weights (linked) or `weights`, the named vocabulary files (linked),
    and optionally a replacement encoder.json."""
    directory = tmp_path / "model"
    directory.mkdir()
    if weights is None:
        os.symlink(legacy_dir / WEIGHTS, directory / WEIGHTS)
    else:
        (directory / WEIGHTS).write_bytes(weights)
    for name in vocab:
        os.symlink(legacy_dir / name, directory / name)
    if encoder_json is not None:
        (directory / "encoder.json").write_bytes(encoder_json)
    return directory


def test_corrupt_checkpoint(cli, legacy_dir: Path, tmp_path: Path) -> None:
    junk = random.Random(0).randbytes(1 << 16)
    directory = _model_dir(tmp_path, legacy_dir, weights=junk, vocab=("encoder.json", "vocab.bpe"))
    line = assert_fails(cli("--model", str(directory / WEIGHTS), "--text", "Hello"), 1, str(directory / WEIGHTS))
    assert "corrupt" in line


def test_checkpoint_without_vocabulary(cli, legacy_dir: Path, tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, legacy_dir)
    line = assert_fails(cli("--model", str(directory / WEIGHTS), "--text", "Hello"), 1, str(directory))
    assert "vocabulary" in line


def test_corrupt_encoder_json(cli, legacy_dir: Path, tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, legacy_dir, vocab=("vocab.bpe",), encoder_json=b'{"not": "the vocabulary"')
    line = assert_fails(cli("--model", str(directory / WEIGHTS), "--text", "Hello"), 1,
                        str(directory / "encoder.json"))
    assert "vocabulary" in line
