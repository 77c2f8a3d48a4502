"""
End-to-end tests of main.py's command line on the tiny random checkpoint in graykode's legacy torch format
(conftest's `tiny_dir`: 1 layer, 32 wide, a 64-token window, the real vocabulary).

The oracle for every generated sample is the library itself, run in-process with the same seed:
gpt2.sample.sample_sequence on the model from gpt2.checkpoint.load_model, with the context cut off and
each row cut at its first <|endoftext|>. With random weights the samples are arbitrary tokens (newlines,
half characters), so outputs are compared as bytes, never by counting lines.

The command line runs in-process (conftest.run_cli: main.main(argv) offline, on one thread, with its own
stdin, stdout and stderr). Real processes run only where the process is the point: `python main.py` itself
(its stdout and stderr as bytes, its exit status), `python -m gpt2` and the installed `gpt2-generate`.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LEGACY_WEIGHTS as WEIGHTS
from conftest import REPO, TIMEOUT, Library, assert_fails, library, main_py, ok

import gpt2

PROMPT = "The café served crème brûlée, and then"  # non-ASCII: stdout must be UTF-8 whatever the locale


def separator(n: int) -> str:
    return f"{'=' * 40} SAMPLE {n} {'=' * 40}\n"


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def weights(tiny_dir: Path) -> Path:
    return tiny_dir / WEIGHTS


@pytest.fixture(scope="session")
def lib(tiny_lib: Library) -> Library:
    return tiny_lib


@pytest.fixture(scope="session")
def cli(run_cli):
    return run_cli


@pytest.fixture(scope="session")
def seed1_quiet(cli, weights: Path) -> subprocess.CompletedProcess:
    """`--seed 1 --quiet` on PROMPT, shared by the tests that compare against it."""
    return cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--quiet", "--length", "16")


def quiet_output(texts: list[str]) -> bytes:
    return "".join(t + "\n" for t in texts).encode("utf-8")


def split_header(stdout: bytes) -> tuple[str, bytes]:
    """(settings line, the rest) of a non-quiet run."""
    header, newline, rest = stdout.partition(b"\n")
    assert newline, stdout[:200]
    return header.decode("utf-8"), rest


# ---------------------------------------------------------------------------------------------------
# the entry points as real processes


def test_main_py_prints_the_library_samples_and_nothing_on_stderr(cli_env: dict[str, str], weights: Path,
                                                                   seed1_quiet, lib: Library) -> None:
    """`python main.py ... --quiet` on a local model, in the C locale: the samples as UTF-8 bytes on stdout,
    equal to the in-process run and the library's; not a byte on stderr (no warning either); status 0."""
    env = {**cli_env, "LC_ALL": "C", "LANG": "C"}
    env.pop("PYTHONIOENCODING", None)
    proc = main_py(env, "--model", weights, "--text", PROMPT, "--seed", "1", "--quiet", "--length", "16")
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr.decode("utf-8", "replace")
    assert proc.stdout == ok(seed1_quiet) == quiet_output(lib.samples(1, PROMPT, 16))


def test_main_py_bad_argument_exits_2_with_one_line(cli_env: dict[str, str], weights: Path) -> None:
    """End to end, the contract test_bad_inputs.py checks in-process for every case: status 2, one line on
    stderr, nothing on stdout."""
    proc = main_py(cli_env, "--model", weights, "--seed", "0", "--text", "Hello", "--top_p", "1.5")
    line = assert_fails(proc, 2, "--top_p must be in (0, 1]")
    assert line.startswith("main.py: error: ")


def test_python_m_gpt2_version(cli_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "gpt2", "--version"], stdin=subprocess.DEVNULL,
                          capture_output=True, env=cli_env, cwd=REPO, timeout=TIMEOUT)
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr.decode("utf-8", "replace")
    assert proc.stdout == f"python -m gpt2 {gpt2.__version__}\n".encode()


# ---------------------------------------------------------------------------------------------------
# samples: reproducible, equal to the library's, laid out like graykode's


def test_seed_quiet_is_reproducible_and_equals_library(cli, weights: Path, lib: Library, seed1_quiet) -> None:
    first = ok(seed1_quiet)
    again = ok(cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--quiet", "--length", "16"))
    assert first == again
    assert first == quiet_output(lib.samples(1, PROMPT, 16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_dtypes_print_what_the_library_generates(cli, weights: Path, enc, dtype: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--dtype bfloat16|float16` on CPU (FBGEMM's float16 products, float32 activations) prints exactly the
    samples of the same model loaded through the library, and the model the run loaded holds its embeddings
    in that dtype, which shows the flag took effect (on the one-layer model the rounding rarely changes a
    sample; test_dtypes.py measures what it does to the logits at GPT-2 widths)."""
    import gpt2.checkpoint

    loaded = []
    real_load = gpt2.checkpoint.load_model

    def load_model(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(gpt2.checkpoint, "load_model", load_model)
    out = ok(cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--quiet", "--length", "32",
                 "--dtype", dtype, "--device", "cpu"))
    [model] = loaded
    assert model.transformer.wte.weight.dtype == getattr(torch, dtype)
    assert model.activation_dtype == torch.float32
    assert out == quiet_output(library(weights, enc, dtype=getattr(torch, dtype)).samples(1, PROMPT, 32))


def test_non_quiet_layout(cli, weights: Path, lib: Library) -> None:
    out = ok(cli("--model", str(weights), "--text", PROMPT, "--seed", "1", "--length", "16"))
    header, rest = split_header(out)
    assert header.startswith("Namespace(") and header.endswith(")")
    assert re.search(r"\bseed=1\b", header) and re.search(r"\blength=16\b", header)
    assert re.search(r"\bquiet=False\b", header)
    [text] = lib.samples(1, PROMPT, 16)
    assert rest == f"{PROMPT}\n{separator(1)}{text}\n".encode()


@pytest.mark.parametrize("spelling", [["--quiet"], ["--quiet", "True"], ["--quiet=True"], ["--quiet", "False"],
                                      ["--quiet=False"]],
                         ids=["bare", "True", "=True", "False", "=False"])
def test_quiet_true_and_false_as_graykode_spelled_them(cli, weights: Path, seed1_quiet, spelling: list[str]) -> None:
    """graykode's `--quiet True` / `--quiet False` (a type=bool flag) beside a bare `--quiet`: True and bare are
    quiet, byte for byte; False is not quiet: header and separators, byte for byte the run without --quiet."""
    args = ("--model", str(weights), "--text", PROMPT, "--seed", "1", "--length", "16")
    out = ok(cli(*args, *spelling))
    if "False" in spelling[-1]:
        assert out == ok(cli(*args))
        header, rest = split_header(out)
        assert re.search(r"\bquiet=False\b", header), header
        assert rest.startswith(f"{PROMPT}\n{separator(1)}".encode())
    else:
        assert out == ok(seed1_quiet)


def test_version(cli) -> None:
    proc = cli("--version")
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr
    assert proc.stdout == f"main.py {gpt2.__version__}\n".encode() == b"main.py 1.0.0\n"


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


def test_graykode_layout_in_working_directory(cli, tiny_dir: Path, seed1_quiet) -> None:
    # no --model: ./gpt2-pytorch_model.bin and the vocabulary beside it, as `python main.py` in graykode's repo
    out = ok(cli("--text", PROMPT, "--seed", "1", "--quiet", "--length", "16", cwd=tiny_dir))
    assert out == ok(seed1_quiet)


# ---------------------------------------------------------------------------------------------------
# default --length: half the window, shrunk to fit the prompt


def test_default_length_is_half_the_window(cli, weights: Path, lib: Library) -> None:
    out = ok(cli("--model", str(weights), "--text", "Hello", "--seed", "0"))
    header, rest = split_header(out)
    assert re.search(r"\blength=32\b", header), header  # the tiny model's window is 64
    [text] = lib.samples(0, "Hello", 32)
    assert rest == f"Hello\n{separator(1)}{text}\n".encode()


def test_default_length_shrinks_to_fit_a_long_prompt(cli, weights: Path, lib: Library) -> None:
    prompt = "hello" + " hello" * 39
    n = len(lib.enc.encode(prompt))
    expected = min(32, 64 - n)
    assert 0 < expected < 32
    out = ok(cli("--model", str(weights), "--text", prompt, "--temperature", "0", "--seed", "0"))
    header, rest = split_header(out)
    assert re.search(rf"\blength={expected}\b", header), header[-300:]
    [text] = lib.samples(0, prompt, expected, temperature=0)  # the sample fills the window to its last position
    assert rest == f"{prompt}\n{separator(1)}{text}\n".encode()


# ---------------------------------------------------------------------------------------------------
# bad input: one line on stderr naming the problem, no traceback, nothing on stdout (the whole table of bad
# arguments and files is test_bad_inputs.py; these check the paths and numbers named in the line)


def test_length_that_does_not_fit_the_window(cli, weights: Path) -> None:
    proc = cli("--model", str(weights), "--text", "Hello world", "--length", "64", "--quiet")
    line = assert_fails(proc, 2, "--length 64")
    assert "does not fit: the prompt is 2 tokens" in line and "--length 62" in line
    line = assert_fails(cli("--model", str(weights), "--text", "Hello", "--length", "64", "--quiet"), 2, "--length 64")
    assert "the prompt is 1 token and" in line and "--length 63" in line


def test_unknown_model_name(cli) -> None:
    assert_fails(cli("--model", "gpt5", "--text", "Hello"), 2, "unknown model 'gpt5'")


def test_missing_checkpoint(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / WEIGHTS
    assert_fails(cli("--model", str(missing), "--text", "Hello"), 1, str(missing), "no such checkpoint")


def _model_dir(tmp_path: Path, tiny_dir: Path, *, weights: bytes | None = None, vocab: tuple[str, ...] = (),
               encoder_json: bytes | None = None) -> Path:
    """A model directory: the real weights and config.json (linked) or `weights`, the named vocabulary files
    (linked), and optionally a replacement encoder.json."""
    directory = tmp_path / "model"
    directory.mkdir()
    if weights is None:
        os.symlink(tiny_dir / WEIGHTS, directory / WEIGHTS)
    else:
        (directory / WEIGHTS).write_bytes(weights)
    for name in ("config.json", *vocab):
        os.symlink(tiny_dir / name, directory / name)
    if encoder_json is not None:
        (directory / "encoder.json").write_bytes(encoder_json)
    return directory


def test_corrupt_checkpoint(cli, tiny_dir: Path, tmp_path: Path) -> None:
    junk = random.Random(0).randbytes(1 << 16)
    directory = _model_dir(tmp_path, tiny_dir, weights=junk, vocab=("encoder.json", "vocab.bpe"))
    line = assert_fails(cli("--model", str(directory / WEIGHTS), "--text", "Hello"), 1, str(directory / WEIGHTS))
    assert "corrupt" in line


def test_checkpoint_without_vocabulary(cli, tiny_dir: Path, tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, tiny_dir)
    line = assert_fails(cli("--model", str(directory / WEIGHTS), "--text", "Hello"), 1, str(directory))
    assert "vocabulary" in line


def test_corrupt_encoder_json(cli, tiny_dir: Path, tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, tiny_dir, vocab=("vocab.bpe",), encoder_json=b'{"not": "the vocabulary"')
    line = assert_fails(cli("--model", str(directory / WEIGHTS), "--text", "Hello"), 1,
                        str(directory / "encoder.json"))
    assert "vocabulary" in line
