"""
Shell pipelines and interactive use of main.py: prompt files and stdin, mixed-length batches, streaming,
--format jsonl, --stop, the interactive loop, --stats, SIGPIPE / SIGINT, and a real shell client
(tests/shell_client.sh).

main.py runs on conftest's `tiny_1024_dir` (a random one-layer, 32-wide GPT-2 with a 1024-token window, in
graykode's legacy layout): in-process (conftest.run_cli) where only its output matters, as a real subprocess
where the process is the point: streaming through a pipe, a terminal (pty), SIGPIPE, SIGINT, a shell client.
Its samples are arbitrary tokens, so expected text is never written down: every sample is compared with the
library run in-process (gpt2.sample.generate, gpt2.encoder), or with another run of main.py.
The in-process SampleText property test covers what random weights rarely produce: characters split over
several tokens, and stop strings split over tokens.
"""

from __future__ import annotations

import codecs
import os
import pty
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LEGACY_WEIGHTS as WEIGHTS
from conftest import MAIN, REPO, TIMEOUT, Library, assert_fails, ok, records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2.batching import sample_seed
from gpt2.encoder import Encoder
from gpt2.textstream import SampleText

SHELL_CLIENT = REPO / "tests" / "shell_client.sh"
SEPARATOR = "=" * 40

# Mixed token lengths (1 to ~40 tokens), CJK and emoji; used as a prompt file with blank, whitespace-only and
# CRLF-terminated lines mixed in.
PROMPTS = [
    "Hello world",
    "日本語のテキストを書く",
    "x",
    "The quick brown fox 🦊 jumps over the lazy dog while the moon 🌙 rises over the hills, and then",
    "Ünïcödé ✓ naïve café 🎉👩‍👩‍👧",
]
PROMPT_FILE_TEXT = "Hello world\n\n日本語のテキストを書く\r\n   \nx\n\t\n" + "\n".join(PROMPTS[3:]) + "\n\n"
GREEDY_LENGTH = 12
STREAM_PROMPT = "東京の天気は🌸晴れ、そして"
STREAM_SEED, STREAM_LENGTH = 5, 300  # long enough on the tiny model that streaming takes visible time


# ---------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def weights(tiny_1024_dir: Path) -> Path:
    return tiny_1024_dir / WEIGHTS


@pytest.fixture(scope="session")
def lib(tiny_1024_lib: Library) -> Library:
    return tiny_1024_lib


@pytest.fixture(scope="session")
def cli(run_cli, weights: Path):
    """main.py --model <the checkpoint> ARGS in-process, stdin from `stdin` (bytes) or empty."""

    def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return run_cli("--model", str(weights), *args, stdin=stdin)

    return run


def check_record_types(record: dict, seed: int, nprompts: int, nsamples: int, length: int) -> None:
    assert list(record) == ["prompt", "prompt_index", "sample_index", "text", "tokens", "seed", "finish_reason",
                            "tokens_per_second"]
    assert isinstance(record["prompt"], str)
    assert type(record["prompt_index"]) is int and 0 <= record["prompt_index"] < nprompts
    assert type(record["sample_index"]) is int and 0 <= record["sample_index"] < nsamples
    assert isinstance(record["text"], str)
    assert isinstance(record["tokens"], list) and all(type(t) is int for t in record["tokens"])
    assert len(record["tokens"]) <= length
    assert record["seed"] == seed
    assert record["finish_reason"] in ("eot", "length", "stop")
    if record["finish_reason"] == "length":
        assert len(record["tokens"]) == length
    rate = record["tokens_per_second"]
    assert rate is None or (type(rate) in (int, float) and rate >= 0)


GREEDY_ARGS = ("--format", "jsonl", "--temperature", "0", "--length", str(GREEDY_LENGTH), "--seed", "0")


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_bytes(PROMPT_FILE_TEXT.encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def greedy_alone(cli, prompt_file: Path) -> list[dict]:
    """Greedy jsonl over PROMPTS from a file, --batch_size 1: every prompt runs alone."""
    return records(ok(cli("--prompt_file", str(prompt_file), *GREEDY_ARGS, "--batch_size", "1")))


# ---------------------------------------------------------------------------------------------------
# --prompt_file, mixed-length batches, --format jsonl


def test_prompt_file_greedy_records(greedy_alone: list[dict], enc: Encoder) -> None:
    # blank and whitespace-only lines skipped, CRLF stripped, prompts in file order, one sample each
    assert [r["prompt"] for r in greedy_alone] == PROMPTS
    assert [(r["prompt_index"], r["sample_index"]) for r in greedy_alone] == [(i, 0) for i in range(len(PROMPTS))]
    for r in greedy_alone:
        check_record_types(r, 0, len(PROMPTS), 1, GREEDY_LENGTH)
        assert r["finish_reason"] in ("eot", "length")
        assert enc.decode(r["tokens"]) == r["text"]


def test_mixed_length_batch_in_the_library_equals_each_prompt_alone(greedy_alone: list[dict], lib: Library) -> None:
    # The left-padded batch of gpt2.sample.generate (what main.py runs for a batch of several prompts) gives,
    # greedily, the tokens main.py gives for each prompt alone.
    lengths = {len(lib.enc.encode(p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS) and min(lengths) == 1, lengths  # really mixed lengths
    batched = lib.generate(PROMPTS, GREEDY_LENGTH, temperature=0)
    assert batched == [r["tokens"] for r in greedy_alone]


def test_mixed_length_batch_equals_each_prompt_alone(cli, prompt_file: Path, greedy_alone: list[dict]) -> None:
    # Acceptance: --batch_size 4 over prompts of different token lengths (CJK, emoji), greedy, is
    # token-identical to each prompt run alone. 5 prompts, 1 sample each: batches of 4 and 1.
    batched = records(ok(cli("--prompt_file", str(prompt_file), *GREEDY_ARGS, "--batch_size", "4")))
    assert [(r["prompt_index"], r["sample_index"], r["prompt"]) for r in batched] == \
        [(r["prompt_index"], r["sample_index"], r["prompt"]) for r in greedy_alone]
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in greedy_alone]
    assert [r["text"] for r in batched] == [r["text"] for r in greedy_alone]


def test_prompt_file_from_stdin_nsamples(cli, lib: Library) -> None:
    # --prompt_file - : one prompt per line from stdin; each prompt gets --nsamples samples, in order,
    # each drawn alone from its own generator, seeded with gpt2.batching.sample_seed(7, prompt, sample).
    prompts = ["Once upon a time", "東京 🗼", "x y"]
    stdin = ("\n" + prompts[0] + "\r\n  \n" + prompts[1] + "\n\n" + prompts[2]).encode()  # no final newline
    out = records(ok(cli("--prompt_file", "-", "--format", "jsonl", "--nsamples", "2", "--batch_size", "2",
                         "--seed", "7", "--length", "10", stdin=stdin)))
    assert [(r["prompt_index"], r["sample_index"]) for r in out] == [(p, s) for p in range(3) for s in range(2)]
    assert [r["prompt"] for r in out] == [p for p in prompts for _ in range(2)]
    expected: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        for sample in range(2):
            expected += lib.generate([prompt], 10, seed=sample_seed(7, i, sample))
    assert [r["tokens"] for r in out] == expected
    for r in out:
        check_record_types(r, 7, 3, 2, 10)
        assert r["finish_reason"] == ("length" if len(r["tokens"]) == 10 else "eot")
        assert r["text"] == lib.enc.decode(r["tokens"])


# ---------------------------------------------------------------------------------------------------
# streaming, --stats


@dataclass
class Streamed:
    chunks: list[tuple[float, bytes]]  # (seconds since start, bytes of one os.read)
    running_at_first_chunk: bool
    exited_at: float
    returncode: int
    stderr: bytes

    @property
    def stdout(self) -> bytes:
        return b"".join(c for _, c in self.chunks)


STREAM_ARGS = ("--text", STREAM_PROMPT, "--quiet", "--seed", str(STREAM_SEED), "--length", str(STREAM_LENGTH))


@pytest.fixture(scope="session")
def streamed(cli_env: dict[str, str], weights: Path) -> Streamed:
    """A batch-1 text run read from the pipe as it comes: each os.read is one chunk."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(MAIN), "--model", str(weights), *STREAM_ARGS],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env,
                            cwd=REPO)
    chunks = []
    running = False
    try:
        while True:
            # A read returns whatever the pipe holds: one or more whole writes (each under PIPE_BUF), never a
            # part of one, so every chunk can be checked for whole characters on its own.
            data = os.read(proc.stdout.fileno(), 1 << 16)
            if not data:
                break
            if not chunks:
                running = proc.poll() is None
            chunks.append((time.monotonic() - start, data))
            assert time.monotonic() - start < TIMEOUT
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Streamed(chunks, running, time.monotonic() - start, proc.returncode, err)


@pytest.fixture(scope="session")
def stream_record(cli) -> dict:
    [record] = records(ok(cli(*STREAM_ARGS, "--format", "jsonl")))
    return record


def test_streamed_text_equals_jsonl_text(streamed: Streamed, stream_record: dict, enc: Encoder) -> None:
    assert streamed.returncode == 0, streamed.stderr.decode("utf-8", "replace")
    assert streamed.stderr == b""  # --quiet
    assert streamed.stdout == (stream_record["text"] + "\n").encode("utf-8")
    # and both are the tokens decoded at once, so no character was cut or replaced while streaming
    assert stream_record["text"] == enc.decode(stream_record["tokens"])
    check_record_types(stream_record, STREAM_SEED, 1, 1, STREAM_LENGTH)


def test_streaming_is_incremental_and_whole_characters(streamed: Streamed) -> None:
    assert streamed.returncode == 0, streamed.stderr.decode("utf-8", "replace")
    chunks = [c for _, c in streamed.chunks]
    assert len(chunks) > 5, chunks
    assert streamed.running_at_first_chunk
    assert len(chunks[0]) < len(streamed.stdout) / 2  # not everything at once
    first, last = streamed.chunks[0][0], streamed.chunks[-1][0]
    assert last - first > 0.1 and first < streamed.exited_at - 0.1, (first, last, streamed.exited_at)
    for chunk in chunks:
        chunk.decode("utf-8")  # strict: no chunk ends inside a character


def test_stats(cli, streamed: Streamed, stream_record: dict) -> None:
    proc = cli(*STREAM_ARGS, "--stats")
    assert ok(proc) == streamed.stdout  # --stats leaves stdout alone
    lines = proc.stderr.decode("utf-8").splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(r"stats: model loaded in \d+\.\d\d s", lines[0]), lines[0]
    # each product of the one-block model (4 projections and the LM head): "role: decode kernel / prefill kernel"
    roles = re.fullmatch(r"stats: kernels \(decode / prefill\): (.+)", lines[1])[1].split("; ")
    assert [role.split(": ")[0] for role in roles] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj",
                                                       "lm_head"], lines[1]
    assert all(re.fullmatch(r"[\w.]+: float32 .+ / float32 .+", role) for role in roles), lines[1]
    m = re.fullmatch(r"stats: first token after (\d+\.\d{3}) s, (\d+) tokens, (\d+\.\d) tokens/s", lines[2])
    assert m, lines[2]
    steps = len(stream_record["tokens"]) + (stream_record["finish_reason"] == "eot")
    assert int(m[2]) == steps
    assert float(m[3]) > 0


# ---------------------------------------------------------------------------------------------------
# --stop


def _stop_string(text: str) -> str:
    """3 characters from about the middle of `text` whose first occurrence is not at the start."""
    order = sorted(range(len(text) - 2), key=lambda i: abs(i - len(text) // 2))
    for i in order:
        candidate = text[i:i + 3]
        if "\ufffd" not in candidate and candidate.strip() and text.find(candidate) > 0:
            return candidate
    pytest.fail(f"no usable stop string in {text!r}")


def test_an_option_value_of_two_dashes_is_kept(cli) -> None:
    """`--stop=--` and `--text=--`: argparse alone drops a value of exactly "--" (the CLI said "--stop needs a
    non-empty string"); the text is the prompt, and the stop string ends a sample that would print it."""
    [out] = records(ok(cli("--text=--", "--temperature", "0", "--length", "8", "--format", "jsonl", "--stop=--")))
    assert out["prompt"] == "--" and "--" not in out["text"]


@pytest.fixture(scope="session")
def stop_case(greedy_alone: list[dict]) -> tuple[dict, str, str]:
    """(the greedy record of the prompt, a stop string in its text, the text before the stop string)"""
    record = max(greedy_alone, key=lambda r: len(set(r["text"])))  # the most varied text
    stop = _stop_string(record["text"])
    prefix = record["text"][: record["text"].find(stop)]
    assert 0 < len(prefix) < len(record["text"]) - len(stop)
    return record, stop, prefix


def test_stop_jsonl(cli, stop_case: tuple[dict, str, str]) -> None:
    record, stop, prefix = stop_case
    args = ("--text", record["prompt"], "--temperature", "0", "--length", str(GREEDY_LENGTH))
    [out] = records(ok(cli(*args, "--format", "jsonl", f"--stop={stop}", "--stop=§never-seen§")))
    assert out["text"] == prefix
    assert out["finish_reason"] == "stop"
    n = len(out["tokens"])
    assert out["tokens"] == record["tokens"][:n]  # the same greedy tokens, up to the one completing the stop


def test_stop_streamed(cli, stop_case: tuple[dict, str, str]) -> None:
    record, stop, prefix = stop_case
    args = ("--text", record["prompt"], "--temperature", "0", "--length", str(GREEDY_LENGTH))
    assert ok(cli(*args, "--quiet", "--stop=§never-seen§", f"--stop={stop}")) == (prefix + "\n").encode()


@pytest.fixture(scope="session")
def token_pool(enc: Encoder) -> list[int]:
    """Tokens of CJK / emoji / ASCII text, and the 256 single-byte tokens (many are half a character)."""
    texts = ["東京の天気は🌸晴れ", "👩‍👩‍👧 🎉 é ü", " the cat, sat\n\n"]
    pool = {t for text in texts for t in enc.encode(text)} | {enc.encoder[c] for c in enc.byte_encoder.values()}
    return sorted(pool)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sample_text_streams_whole_characters_and_cuts_at_stops(enc: Encoder, token_pool: list[int],
                                                                 data: st.DataObject) -> None:
    # What streaming prints is the pieces SampleText.push/finish return. What random weights rarely produce is
    # a character spread over tokens, or a stop string spread over tokens: drawn here, with stop strings taken
    # from the text itself. The pieces must add up to the tokens decoded at once, cut at the first stop.
    tokens = data.draw(st.lists(st.sampled_from([*token_pool, enc.eot_token]), max_size=25), label="tokens")
    body = tokens[: tokens.index(enc.eot_token)] if enc.eot_token in tokens else tokens
    full = enc.decode(body)
    substring = st.nothing() if not full else st.tuples(st.integers(0, len(full) - 1), st.integers(1, 4)).map(
        lambda t: full[t[0]:t[0] + t[1]])
    stops = data.draw(st.lists(st.one_of(st.text(alphabet="東京🌸 ,\nthe\ufffd", min_size=1, max_size=3), substring),
                               max_size=3), label="stops")
    text = SampleText(enc, stops)
    pieces = [text.push(t) for t in tokens]
    pieces.append(text.finish("length"))
    # The oracle: after k tokens the text known is their bytes decoded, an incomplete last character left
    # out (final=False); the sample ends after the first k whose text holds a stop string, cut at the
    # earliest one. (A longer stop string that started earlier but would complete later never completes.)
    expected, reason = None, "eot" if enc.eot_token in tokens else "length"
    for k in range(1, len(body) + 2):
        known = codecs.utf_8_decode(enc.decode_bytes(body[:k]), "replace", k > len(body))[0]
        cuts = [known.find(s) for s in stops if s in known]
        if cuts:
            expected, reason = known[: min(cuts)], "stop"
            break
    if expected is None:
        expected = full
    assert "".join(pieces) == expected == text.text
    assert text.finish_reason == reason
    assert text.tokens == body[: len(text.tokens)]


# ---------------------------------------------------------------------------------------------------
# interactive mode


def test_interactive_loop(cli_env: dict[str, str], weights: Path, lib: Library) -> None:
    # stdin a terminal (a pty), no --text or --prompt_file: the `Model prompt >>> ` loop. An empty line is
    # refused on stderr and asked again; "Hello" is sampled; Ctrl-D ends it with status 0.
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, str(MAIN), "--model", str(weights), "--seed", "9", "--length", "6"],
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env, cwd=REPO)
        os.close(slave)
        slave = -1
        # the terminal's line discipline hands these over one line per read: "", "Hello", then end of file
        os.write(master, b"\nHello\n\x04")
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, err.decode("utf-8", "replace")
    assert err == b"Prompt should not be empty!\n\n", err
    header, newline, rest = out.partition(b"\n")
    assert newline and header.startswith(b"Namespace(") and re.search(rb"\bseed=9\b", header), header
    [tokens] = lib.generate(["Hello"], 6, seed=9)
    ask = "Model prompt >>> "
    assert rest.decode("utf-8") == (f"{ask}{ask}Hello\n{SEPARATOR} SAMPLE 1 {SEPARATOR}\n"
                                    f"{lib.enc.decode(tokens)}\n{ask}")


# ---------------------------------------------------------------------------------------------------
# signals: the reader goes away, Ctrl-C


def test_broken_pipe_exits_quietly(cli_env: dict[str, str], weights: Path) -> None:
    # `main.py ... | head -n 1` (no pipefail): head exits after the settings line; the next write fails.
    command = (f"{shlex.quote(sys.executable)} {shlex.quote(str(MAIN))} --model {shlex.quote(str(weights))} "
               f"--text Hello --seed 1 --length 200 | head -n 1; echo \"${{PIPESTATUS[0]}}\" >&2")
    proc = subprocess.run(["bash", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, env=cli_env,
                          cwd=REPO, timeout=TIMEOUT)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err  # head's status
    assert proc.stdout.startswith(b"Namespace(") and proc.stdout.count(b"\n") == 1, proc.stdout
    for bad in ("Traceback", "Exception ignored", "BrokenPipeError"):
        assert bad not in err, err
    assert err == "141\n", err  # nothing from main.py, and its status is 128 + SIGPIPE


def test_ctrl_c_exits_130_with_one_line(cli_env: dict[str, str], weights: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(MAIN), "--model", str(weights), "--text", "Hello", "--quiet",
                             "--seed", "1", "--length", "1000"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env,
                            cwd=REPO,
                            # as from an interactive shell, whatever this test process inherited
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = os.read(proc.stdout.fileno(), 1 << 16)  # generation has started
        assert first, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err == b"interrupted\n", err


# ---------------------------------------------------------------------------------------------------
# a real shell client


def _shell_client(cli_env: dict[str, str], weights: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SHELL_CLIENT), sys.executable, str(MAIN), str(weights), *extra],
                          stdin=subprocess.DEVNULL, capture_output=True, env=cli_env, cwd=REPO, timeout=2 * TIMEOUT)


def test_shell_client(cli_env: dict[str, str], weights: Path) -> None:
    proc = _shell_client(cli_env, weights)  # --batch_size 4 --nsamples 2: batches mix prompts
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert b"shell_client: ok" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# bad input (in-process; the whole table is test_bad_inputs.py)


@pytest.mark.parametrize(
    "content, stdin",
    [(b"", None), (b"  \n\t\n\r\n\n", None), (None, b""), (None, b"\n \n")],
    ids=["empty-file", "whitespace-file", "empty-stdin", "whitespace-stdin"],
)
def test_no_prompts(cli, tmp_path: Path, content: bytes | None, stdin: bytes | None) -> None:
    if content is None:
        where = "-"
    else:
        (tmp_path / "p.txt").write_bytes(content)
        where = str(tmp_path / "p.txt")
    assert_fails(cli("--prompt_file", where, stdin=stdin), 2, "no prompts")


def test_missing_prompt_file(cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    assert_fails(cli("--prompt_file", str(missing)), 2, str(missing))


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--prompt_file", "x", "--text", "y"], "--prompt_file"),
        (["--prompt_file", "x", "--unconditional"], "--prompt_file"),
        (["--text", "Hello", "--stop", ""], "--stop"),
        (["--text", "Hello", "--stop", "a", "--stop="], "--stop"),
    ],
    ids=["file-and-text", "file-and-unconditional", "empty-stop", "second-stop-empty"],
)
def test_bad_flag_combinations(cli, args: list[str], phrase: str) -> None:
    assert_fails(cli(*args), 2, phrase)
