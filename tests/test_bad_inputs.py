"""Bad inputs to main.py, as a table: each case is an argv, stdin and files, and the one line it must give.

The contract (README): a bad argument exits 2 (argparse or UsageError), a bad file or anything else exits 1
(GPT2Error); either way stderr is exactly one line naming the problem and the fix, there is no traceback and
nothing is written to stdout. Bad *bytes* in a prompt are not errors: invalid UTF-8 becomes U+FFFD.

Everything runs in-process (`main.main(argv)`) against conftest's tiny random GPT-2 (`tiny_dir`: 1 layer,
32 wide, window 64, the real 50257-token vocabulary) so that the whole table costs seconds. Warnings count as
stderr lines, as they would in a real run. Two guards turn hangs into failures: no case may build more than 64
transformer blocks (a hostile config or checkpoint asking for a billion layers) or create more than 10,000 sample
jobs. One case runs through a real `python main.py` process; test_cli.py runs one bad argument that way.

Cases marked `xfail` are product bugs found here; their reason names the file and the fix.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import pickle
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import LEGACY_WEIGHTS as LEGACY
from conftest import MAIN, offline, run_main, tiny_config, tiny_legacy_state

import gpt2.batching
import gpt2.cli

MARKER = "PWNED"  # what a hostile pickle would create next to itself
N_EMBD, N_CTX, VOCAB = 32, 64, 50257
CONFIG = tiny_config(N_CTX)
SEP = "=" * 40


# ---------------------------------------------------------------------------------------------------
# the tiny model


def torch_bytes(obj: object, zip_format: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({"transformer." + k: v.contiguous() for k, v in state.items() if not k.endswith("attn.bias")})


@dataclasses.dataclass
class Tiny:
    dir: Path  # gpt2-pytorch_model.bin (legacy torch format), config.json, encoder.json, vocab.bpe
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Tiny:
    return Tiny(tiny_dir, tiny_legacy_state(VOCAB, N_EMBD, N_CTX))  # the state dict written there


pytestmark = pytest.mark.usefixtures("one_thread")  # the machine is shared; a 32-wide model needs no more


# ---------------------------------------------------------------------------------------------------
# guards for running main.main in-process (conftest.run_main)


class GuardTripped(Exception):
    """A run did something that, unguarded, would hang or exhaust memory."""


def install_guards(monkeypatch: pytest.MonkeyPatch, max_blocks: int = 64, max_jobs: int = 10_000) -> None:
    import gpt2.model

    real_block, real_job = gpt2.model.Block, gpt2.batching.Job
    counts = {"blocks": 0, "jobs": 0}

    class GuardedBlock(real_block):
        def __init__(self, config) -> None:
            counts["blocks"] += 1
            if counts["blocks"] > max_blocks:
                raise GuardTripped(f"building block {counts['blocks']} of n_layer={config.n_layer}")
            super().__init__(config)

    def guarded_job(*args, **kwargs):
        counts["jobs"] += 1
        if counts["jobs"] > max_jobs:
            raise GuardTripped(f"created {counts['jobs']} jobs before generating")
        return real_job(*args, **kwargs)

    monkeypatch.setattr(gpt2.model, "Block", GuardedBlock)
    monkeypatch.setattr(gpt2.batching, "Job", guarded_job)


@pytest.fixture
def sandbox(tmp_path: Path):
    """No downloads, no caches of this machine, no weights in the working directory (conftest.offline)."""
    with offline(tmp_path) as mp:
        install_guards(mp)
        yield tmp_path


# ---------------------------------------------------------------------------------------------------
# building the files of a case: `setup(d, tiny)` fills the case's directory d (`{dir}` in argv)

Bytes = Callable[[Tiny, Path], bytes]
LINK = "link"  # the tiny model's own file, linked


def model_dir(*, weights: bytes | Bytes | str | None = LINK, name: str = LEGACY,
              config: bytes | Bytes | str | None = LINK, encoder: bytes | Bytes | str | None = LINK,
              bpe: bytes | Bytes | str | None = LINK) -> Callable[[Path, Tiny], None]:
    """A model directory like the tiny one, with files replaced (bytes, or a function of (tiny, d) giving
    them) or left out (None)."""
    def setup(d: Path, tiny: Tiny) -> None:
        for fname, spec in ((name, weights), ("config.json", config), ("encoder.json", encoder), ("vocab.bpe", bpe)):
            if spec is None:
                continue
            if spec == LINK:
                os.symlink(tiny.dir / (LEGACY if fname == name else fname), d / fname)
            else:
                (d / fname).write_bytes(spec(tiny, d) if callable(spec) else spec)
    return setup


def files(**contents: bytes) -> Callable[[Path, Tiny], None]:
    def setup(d: Path, tiny: Tiny) -> None:
        for fname, data in contents.items():
            (d / fname.replace("_", ".")).write_bytes(data)
    return setup


def state_with(changes: dict[str, Callable[[Tiny], torch.Tensor]]) -> Bytes:
    """The tiny state dict with some tensors replaced or added."""
    return lambda tiny, d: torch_bytes({**tiny.state, **{key: fn(tiny) for key, fn in changes.items()}})


def state_of(fn: Callable[[Tiny], object], zip_format: bool = False) -> Bytes:
    return lambda tiny, d: torch_bytes(fn(tiny), zip_format)


def half_of(fn: Callable[[Tiny], bytes]) -> Bytes:
    def make(tiny: Tiny, d: Path) -> bytes:
        data = fn(tiny)
        return data[: len(data) // 2]
    return make


def random_bytes(n: int, seed: int = 0, byte8: bytes | None = None) -> bytes:
    data = bytearray(random.Random(seed).randbytes(n))
    if byte8 is not None:
        data[8:9] = byte8
    elif data[8:9] == b"{":  # keep it from looking like a safetensors header
        data[8] = ord("x")
    return bytes(data)


def safetensors_raw(header_len: int, header: bytes, data: bytes = b"\0" * 64) -> bytes:
    return struct.pack("<Q", header_len) + header + data


LYING_HEADER = json.dumps({"wte.weight": {"dtype": "F32", "shape": [VOCAB, N_EMBD],
                                          "data_offsets": [0, VOCAB * N_EMBD * 4]}}).encode()


class Hostile:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint does with real code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def hostile(how: str) -> Bytes:
    def make(tiny: Tiny, d: Path) -> bytes:
        payload = {"wte.weight": Hostile(d / MARKER), "wpe.weight": torch.zeros(2, 2)}
        if how == "torch-zip":
            return torch_bytes(payload, zip_format=True)
        if how == "torch-legacy":
            return torch_bytes(payload)
        return pickle.dumps(payload, protocol=2 if how == "pickle-2" else pickle.DEFAULT_PROTOCOL)
    return make


def vocab_file(name: str, edit: Callable[[bytes], bytes]) -> Bytes:
    return lambda tiny, d: edit((tiny.dir / name).read_bytes())


def change_one_id(data: bytes) -> bytes:
    """Valid JSON, same size, but two tokens swap ids."""
    table = json.loads(data)
    table["!"], table['"'] = table['"'], table["!"]
    return json.dumps(table).encode()


def config(**overrides: object) -> bytes:
    return json.dumps({**CONFIG, **overrides}).encode()


ONE_MB_LINE = ("The quick brown fox jumps over the lazy dog. " * 23302)[: 1 << 20].encode()


# ---------------------------------------------------------------------------------------------------
# the table


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {model}: the tiny model directory; {dir}: this case's own directory
    stdin: bytes | None
    setup: Callable[[Path, Tiny], None] | None
    code: int
    fragment: str  # in stderr (case-insensitive); for code 0, in stdout
    xfail: str | None = None
    seconds: float | None = None  # a time budget, where speed is part of the contract


def C(id: str, argv: list[str], code: int, fragment: str, *, stdin: bytes | None = None,
      setup: Callable[[Path, Tiny], None] | None = None, xfail: str | None = None,
      seconds: float | None = None) -> Case:
    return Case(id, tuple(argv), stdin, setup, code, fragment, xfail, seconds)


M = ["--model", "{model}", "--seed", "1"]  # the good tiny model
P = [*M, "--text", "Hello"]  # ... with a prompt
D = ["--model", "{dir}", "--seed", "1", "--text", "Hello", "--length", "2"]  # this case's model directory

CASES = [
    # -- arguments: exit 2, before or after the model is loaded
    C("nsamples-not-multiple", [*P, "--nsamples", "3", "--batch_size", "2"], 2, "not a multiple of --batch_size"),
    C("nsamples-0", [*P, "--nsamples", "0"], 2, "--nsamples and --batch_size must be at least 1"),
    C("batch_size-0", [*P, "--batch_size", "0"], 2, "--nsamples and --batch_size must be at least 1"),
    C("nsamples-not-int", [*P, "--nsamples", "two"], 2, "invalid int value: 'two'"),
    C("length-0", [*P, "--length", "0"], 2, "--length must be at least 1, got 0"),
    C("length-negative", [*P, "--length", "-5"], 2, "--length must be at least 1, got -5"),
    C("length-past-window", [*M, "--text", "Hello world", "--length", "63"], 2, "use --length 62 or less"),
    C("length-float", [*P, "--length", "2.5"], 2, "invalid int value: '2.5'"),
    C("top_k-negative", [*P, "--top_k", "-1"], 2, "--top_k must be 0 (off) or more"),
    C("top_p-0", [*P, "--top_p", "0"], 2, "--top_p must be in (0, 1]"),
    C("top_p-1.5", [*P, "--top_p", "1.5"], 2, "--top_p must be in (0, 1]"),
    C("top_p-nan", [*P, "--top_p", "nan"], 2, "--top_p must be in (0, 1], got nan"),
    C("temperature-negative", [*P, "--temperature", "-1"], 2, "--temperature must be 0 (greedy) or more"),
    C("temperature-nan", [*P, "--temperature", "nan"], 2, "--temperature must be 0 (greedy) or more, got nan"),
    C("temperature-tiny", [*P, "--temperature", "1e-300", "--length", "2"], 0, "SAMPLE 1"),
    C("seed-negative", [*P, "--seed", "-1"], 2, "--seed must be in [0, 2**63)"),
    C("seed-2**64", [*P, "--seed", str(2**64)], 2, "--seed must be in [0, 2**63)"),
    C("text-empty", [*M, "--text", ""], 2, "empty prompt"),
    C("stdin-empty", M, 2, "empty prompt", stdin=b""),
    C("stdin-newline-only", M, 2, "empty prompt", stdin=b"\r\n"),
    C("model-unknown-name", ["--model", "gpt5", "--text", "Hello"], 2, "unknown model 'gpt5'"),
    C("model-preset-not-downloaded", ["--model", "gpt2-medium", "--text", "Hello"], 1,
      "run scripts/download_weights.sh gpt2-medium"),
    C("format-unknown", [*P, "--format", "xml"], 2, "invalid choice: 'xml'"),
    C("dtype-bogus", [*P, "--dtype", "bogus"], 2, "invalid choice: 'bogus'"),
    C("device-bogus", [*P, "--device", "bogus"], 2, "unknown --device 'bogus'"),
    C("device-mps", [*P, "--device", "mps"], 2, "--device 'mps' is not supported"),
    C("device-cuda-without-gpu", [*P, "--device", "cuda"], 2, "no CUDA GPU is available"),
    C("quiet-with-other-value", [*P, "--quiet", "maybe"], 2, "--quiet: expected True or False, got 'maybe'"),
    C("unknown-flag", [*P, "--top-k", "3"], 2, "unrecognized arguments: --top-k"),
    C("text-without-value", [*M, "--text"], 2, "expected one argument"),
    C("prompt_file-missing", [*M, "--prompt_file", "{dir}/nope.txt"], 2, "cannot read --prompt_file"),
    C("prompt_file-directory", [*M, "--prompt_file", "{dir}"], 2, "is a directory"),
    C("prompt_file-and-text", [*P, "--prompt_file", "{dir}/p.txt"], 2, "cannot be combined with --text",
      setup=files(p_txt=b"Hi\n")),
    C("prompt_file-and-unconditional", [*M, "--unconditional", "--prompt_file", "{dir}/p.txt"], 2,
      "cannot be combined with --text or --unconditional", setup=files(p_txt=b"Hi\n")),
    C("prompt_file-empty", [*M, "--prompt_file", "{dir}/p.txt"], 2, "no prompts in", setup=files(p_txt=b"")),
    C("prompt_file-whitespace", [*M, "--prompt_file", "{dir}/p.txt"], 2, "give one prompt per line",
      setup=files(p_txt=b" \n\t\r\n\n   \n")),
    C("prompt_file-stdin-empty", [*M, "--prompt_file", "-"], 2, "no prompts in -", stdin=b"\n\n"),
    C("stop-empty", [*P, "--stop", "x", "--stop", ""], 2, "--stop needs a non-empty string"),
    C("prompt-1MB-line", [*M, "--length", "1"], 2, "64-token window can hold: shorten it", stdin=ONE_MB_LINE,
      seconds=30),
    # (a later one ends the run after the records before it: tests/test_batching.py)
    C("prompt_file-first-too-long", [*M, "--prompt_file", "{dir}/p.txt"], 2, "prompt 1: the prompt is",
      setup=files(p_txt=b"word " * 100 + b"\nHi\n")),
    C("text-lone-surrogates-from-argv", [*M, "--text", os.fsdecode(b"\xff\xfeHello"), "--length", "2"], 0,
      "\ufffd\ufffdHello"),
    # -- files: exit 1
    C("checkpoint-missing", ["--model", "{dir}/nowhere/model.bin", "--text", "Hello"], 1,
      "no such checkpoint file or directory"),
    C("directory-without-weights", D, 1, "no model.safetensors, pytorch_model.bin, gpt2-pytorch_model.bin",
      setup=model_dir(weights=None)),
    C("directory-without-vocabulary", D, 1, "has no vocabulary", setup=model_dir(encoder=None, bpe=None)),
    C("bin-empty", D, 1, "truncated or corrupt", setup=model_dir(weights=b"")),
    C("bin-truncated-legacy", D, 1, "truncated or corrupt",
      setup=model_dir(weights=half_of(lambda t: (t.dir / LEGACY).read_bytes()))),
    C("bin-truncated-zip", D, 1, "truncated or corrupt",
      setup=model_dir(weights=half_of(lambda t: torch_bytes(t.state, zip_format=True)))),
    C("bin-random-bytes", D, 1, "corrupt", setup=model_dir(weights=random_bytes(1 << 16))),
    C("bin-git-lfs-pointer", D, 1, "corrupt",
      setup=model_dir(weights=b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64
                      + b"\nsize 548105171\n")),
    C("safetensors-truncated", D, 1, "corrupt safetensors file",
      setup=model_dir(name="model.safetensors", weights=half_of(lambda t: safetensors_bytes(t.state)))),
    C("safetensors-offsets-past-end", D, 1, "corrupt safetensors file",
      setup=model_dir(name="model.safetensors", weights=safetensors_raw(len(LYING_HEADER), LYING_HEADER))),
    C("safetensors-huge-header-length", D, 1, "corrupt safetensors file",
      setup=model_dir(name="model.safetensors", weights=safetensors_raw(2**62, b'{"a": 1}'))),
    C("safetensors-random-bytes", D, 1, "corrupt",
      setup=model_dir(name="model.safetensors", weights=random_bytes(1 << 16))),
    C("safetensors-git-lfs-pointer", D, 1, "corrupt",
      setup=model_dir(name="model.safetensors",
                      weights=b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64
                      + b"\nsize 548105171\n")),
    C("state-dict-is-a-list", D, 1, "not a state dict of named tensors",
      setup=model_dir(weights=state_of(lambda t: list(t.state.values())))),
    C("state-dict-int-key", D, 1, "not a state dict",
      setup=model_dir(weights=state_of(lambda t: {**t.state, 7: torch.zeros(1)}))),
    C("bert-without-config", D, 1, "this is not a GPT-2 checkpoint",
      setup=model_dir(config=None, weights=state_of(lambda t: {
          "embeddings.word_embeddings.weight": torch.zeros(100, N_EMBD),
          "embeddings.position_embeddings.weight": torch.zeros(N_CTX, N_EMBD),
          "encoder.layer.0.attention.self.query.weight": torch.zeros(N_EMBD, N_EMBD)}))),
    C("bert-with-config", D, 1, "has no 2-D wte/wpe embeddings",
      setup=model_dir(weights=state_of(lambda t: {
          "embeddings.word_embeddings.weight": torch.zeros(VOCAB, N_EMBD),
          "encoder.layer.0.attention.self.query.weight": torch.zeros(N_EMBD, N_EMBD)}))),
    C("wte-wrong-width", D, 1, "n_embd is 32 but the weights beside it have 48",
      setup=model_dir(weights=state_with({"wte.weight": lambda t: torch.zeros(VOCAB, 48)}))),
    C("layer-missing", D, 1, "missing: transformer.h.0.ln_1.weight",
      setup=model_dir(weights=state_of(lambda t: {k: v for k, v in t.state.items() if k != "h.0.ln_1.weight"}))),
    C("weights-nan", [*D, "--top_k", "0"], 1, "nan",
      setup=model_dir(weights=state_with({"ln_f.weight": lambda t: torch.full((N_EMBD,), float("nan"))}))),
    C("vocab_size-smaller-than-encoder", D, 1, "vocab",
      setup=model_dir(config=config(vocab_size=1000),
                      weights=state_with({"wte.weight": lambda t: t.state["wte.weight"][:1000].clone()}))),
    C("config-not-json", D, 1, "not a readable JSON config", setup=model_dir(config=b"{n_layer: 1")),
    C("config-not-utf8", D, 1, "not a readable JSON config", setup=model_dir(config=b'{"n_layer": "\xff"}')),
    C("config-json-list", D, 1, "config must be a JSON object", setup=model_dir(config=b"[1, 2]")),
    C("config-n_head-not-dividing", D, 1, "n_embd 32 is not divisible by n_head 5",
      setup=model_dir(config=config(n_head=5))),
    C("config-n_layer-negative", D, 1, "n_layer must be a positive number, got -1",
      setup=model_dir(config=config(n_layer=-1))),
    C("config-n_layer-string", D, 1, "n_layer must be a positive number, got '1'",
      setup=model_dir(config=config(n_layer="1"))),
    C("config-n_layer-infinity", D, 1, "n_layer",
      setup=model_dir(config=b'{"n_layer": Infinity, "n_embd": 32, "n_head": 2, "n_positions": 64}')),
    C("config-n_layer-billion", D, 1, "n_layer",
      setup=model_dir(config=config(n_layer=10**9))),
    C("checkpoint-key-h.999999999", D, 1, "h.999999999",
      setup=model_dir(config=None, weights=state_of(lambda t: {  # 64 wide: n_head is inferred without a config
          **tiny_legacy_state(VOCAB, 64, N_CTX), "h.999999999.ln_1.weight": torch.ones(64)}))),
    C("encoder.json-missing", D, 1, "has no vocabulary", setup=model_dir(encoder=None)),
    C("encoder.json-bad-json", D, 1, "is not GPT-2's vocabulary", setup=model_dir(encoder=b'{"!": 0,')),
    C("encoder.json-one-id-changed", D, 1, "encoder.json is not GPT-2's vocabulary",
      setup=model_dir(encoder=vocab_file("encoder.json", change_one_id))),
    C("vocab.bpe-truncated", D, 1, "vocab.bpe is not GPT-2's vocabulary",
      setup=model_dir(bpe=vocab_file("vocab.bpe", lambda b: b[: len(b) // 2]))),
    C("hostile-pickle-torch-zip", D, 1, "refused", setup=model_dir(weights=hostile("torch-zip"))),
    C("hostile-pickle-torch-legacy", D, 1, "refused", setup=model_dir(weights=hostile("torch-legacy"))),
    C("hostile-pickle-protocol-2", D, 1, "refused", setup=model_dir(weights=hostile("pickle-2"))),
    C("hostile-pickle-default-protocol", D, 1, "refused",
      setup=model_dir(weights=hostile("pickle-default"))),
    # -- bad bytes in prompts: not errors
    C("stdin-invalid-utf8", [*M, "--length", "2"], 0, "\ufffd\ufffdHello\ufffd\n" + SEP,
      stdin=b"\xff\xfeHello\x80"),
    C("prompt_file-invalid-utf8", [*M, "--length", "2", "--prompt_file", "{dir}/p.txt"], 0,
      "\ufffd\ufffdHello\ufffd\n" + SEP, setup=files(p_txt=b"\xff\xfeHello\x80\n")),
    C("stdin-nul-bytes", [*M, "--length", "2"], 0, "a\x00b\x00\n" + SEP, stdin=b"a\x00b\x00"),
    C("text-nul-bytes", [*M, "--length", "2", "--text", "\x00x"], 0, "\x00x\n" + SEP),
    C("prompt_file-crlf", [*M, "--length", "1", "--prompt_file", "{dir}/p.txt"], 0, "second\n" + SEP,
      setup=files(p_txt=b"first\r\n\r\nsecond\r\n")),
    C("stdin-crlf", [*M, "--length", "1"], 0, "Hello\n" + SEP, stdin=b"Hello\r\n"),
]


def _param(case: Case):
    marks = []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    if case.id == "device-cuda-without-gpu" and torch.cuda.is_available():
        marks.append(pytest.mark.skip(reason="a CUDA GPU is available here"))
    return pytest.param(case, id=case.id, marks=marks)


def test_table_is_big_and_ids_unique() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tiny: Tiny, sandbox: Path) -> None:
    d = sandbox / "case"
    d.mkdir()
    if case.setup is not None:
        case.setup(d, tiny)
    argv = [a.replace("{model}", str(tiny.dir)).replace("{dir}", str(d)) for a in case.argv]

    result = run_main(argv, case.stdin if case.stdin is not None else b"")

    assert "Traceback" not in result.stderr, result.stderr
    assert not (d / MARKER).exists(), "the hostile pickle ran"
    if case.seconds is not None:
        assert result.seconds < case.seconds
    if case.code == 0:
        assert result.code == 0, result.stderr
        assert result.stderr == ""
        assert case.fragment in result.stdout.decode("utf-8"), result.stdout[:300]
        return
    lines = result.stderr.strip().splitlines()
    assert (result.code, len(lines)) == (case.code, 1), result.stderr
    assert case.fragment.lower() in lines[0].lower(), lines[0]
    assert result.stdout == b""


# ---------------------------------------------------------------------------------------------------
# bugs that need more than one run of the table to show


def test_huge_nsamples_starts_at_once_or_is_refused(tiny: Tiny, sandbox: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    printed = []
    real_end = gpt2.cli.Output.sample_end

    def sample_end(self, job) -> None:  # the user presses ^C after three samples
        real_end(self, job)
        printed.append(job)
        if len(printed) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(gpt2.cli.Output, "sample_end", sample_end)

    result = run_main(["--model", str(tiny.dir), "--text", "Hi", "--length", "1", "--quiet",
                       "--nsamples", str(10**12), "--batch_size", "1"])
    assert result.code in (2, 130) and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_one_long_word_is_refused_without_quadratic_work(tiny: Tiny, sandbox: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt2.encoder

    word = "".join(random.Random(0).choices("abcdefghijklmnopqrstuvwxyz", k=20_000))
    budget = {"symbols": 20 * len(word)}  # symbols the BPE merge loop may scan; each loop scans the word
    real = gpt2.encoder.get_pairs

    def get_pairs(w):
        budget["symbols"] -= len(w)
        if budget["symbols"] < 0:
            raise GuardTripped("BPE scanned the prompt more than 20 times")
        return real(w)
    monkeypatch.setattr(gpt2.encoder, "get_pairs", get_pairs)

    result = run_main(["--model", str(tiny.dir), "--length", "1"], stdin=word.encode())
    assert result.code == 2 and "window" in result.stderr, result.stderr


def test_hostile_checkpoint_through_the_real_entry_point(tiny: Tiny, tmp_path: Path) -> None:
    """One real process: `python main.py` on a pickle that would run code prints one line and exits 1."""
    d = tmp_path / "evil"
    d.mkdir()
    model_dir(weights=hostile("torch-zip"))(d, tiny)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2_PYTORCH_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    proc = subprocess.run([sys.executable, str(MAIN), "--model", str(d / LEGACY), "--text", "Hi"],
                          capture_output=True, env=env, cwd=tmp_path, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1, err
    assert proc.stdout == b""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "refused" in err and str(d / LEGACY) in err
    assert not (d / MARKER).exists()
