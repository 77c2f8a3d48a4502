"""Continuous batching (gpt2.scheduler, gpt2.batching.run_jobs) and prompt files read as they come.

The contracts: a sample's tokens are those of its prompt run alone, whichever row it lands in and whatever
runs beside it (greedy, and seeded from its own generator); a prompt file's records depend only on each
prompt, its indices, --seed and the settings (not on --batch_size, completion order or other prompts), so
shards merge to the single run; records come out in input order as soon as they can, so a coprocess that
waits for each answer gets it; transformers' greedy generate() of each prompt alone gives the same tokens.

Small random models throughout: a 2-layer one over a 1000-token vocabulary for the library, the tiny
1-layer one of test_bad_inputs (real vocabulary) for the command line, run in-process (conftest.run_main)
except for the coprocess, and a 2-layer transformers model for parity.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, random_hf_model, run_main, tiny_legacy_state, torch_threads

import gpt2.batching
from gpt2.batching import Prompt, run_jobs, sample_seed
from gpt2.checkpoint import load_model
from gpt2.encoder import get_encoder
from gpt2.sample import generate, next_token, next_tokens
from gpt2.scheduler import ContinuousBatcher

LEGACY = "gpt2-pytorch_model.bin"
TIMEOUT = 120  # seconds a coprocess may take to answer one prompt
PROMPTS = ["Hello world", "日本語のテキスト", "x", "The quick brown fox jumps over the lazy dog and then",
           "Ünïcödé ✓ café 🎉", "one two", "A much longer prompt, with commas, and words, and more words here", "z"]
SAMPLED = ["--format", "jsonl", "--seed", "11", "--length", "12", "--nsamples", "2", "--stop", "e"]


@pytest.fixture(scope="module", autouse=True)
def module_on_one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random model over 1000 tokens, window 128, saved by transformers."""
    directory = tmp_path_factory.mktemp("small")
    random_hf_model(3, n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def small(small_dir: Path):
    return load_model(small_dir)


def random_prompts(seed: int, n: int, longest: int, most_new: int) -> tuple[list[list[int]], list[int]]:
    """n prompts of 1..longest-1 tokens below 1000, and budgets of 1..most_new-1 new tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (n,), generator=gen).tolist()
    prompts = [torch.randint(0, 1000, (k,), generator=gen).tolist() for k in lengths]
    return prompts, torch.randint(1, most_new, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> Path:
    """test_bad_inputs' tiny model (1 layer, 32 wide, window 64, the real vocabulary) as a model directory."""
    directory = tmp_path_factory.mktemp("tiny")
    torch.save(tiny_legacy_state(50257, 32, 64), directory / LEGACY, _use_new_zipfile_serialization=False)
    (directory / "config.json").write_text(json.dumps(
        {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 50257}))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(vocab_dir / name, directory / name)
    return directory


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("GPT2_PYTORCH_CACHE", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cli(model: Path, *args: str, stdin: bytes = b"") -> bytes:
    result = run_main(["--model", str(model), *args], stdin)
    assert result.code == 0 and result.stderr == "", result.stderr
    return result.stdout


def records(stdout: bytes) -> list[dict]:
    """The records of a jsonl run without their one measured field, tokens_per_second."""
    out = [json.loads(line) for line in stdout.decode("utf-8").splitlines()]
    for record in out:
        del record["tokens_per_second"]
    return out


def prompt_file(tmp_path: Path, prompts: list[str] = PROMPTS) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(path)


def alone(model, prompt: list[int], budget: int, temperature: float, seed: int) -> list[int]:
    """The sample of one prompt run alone through generate(), from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [int(t) for t in generate(model, [prompt], budget, temperature, 20, 1.0, generator=generator)]


# ---------------------------------------------------------------------------------------------------
# the library: rows refilled mid-run


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "seeded"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_refilled_rows_sample_what_each_prompt_alone_samples(small, rows: int, temperature: float) -> None:
    n = 14
    prompts, budgets = random_prompts(0, n, 40, 50)
    budgets[0] = 128 - len(prompts[0])  # one sample to the last position of the window: the caches grow mid-run
    cut = {3: 2, 7: 5}  # samples the caller ends early (as a stop string would), after this many tokens
    got: dict[int, list[int]] = {i: [] for i in range(n)}
    todo = list(range(n))
    with ContinuousBatcher(small, rows, temperature, 20) as batcher:
        while todo or batcher.busy:
            while todo and batcher.free:
                i = todo.pop(0)
                batcher.add(i, prompts[i], budgets[i], torch.Generator().manual_seed(100 + i))
            for event in batcher.step():
                got[event.key].append(event.token)
                assert event.last == (len(got[event.key]) == budgets[event.key])
                if not event.last and len(got[event.key]) == cut.get(event.key):
                    batcher.finish(event.key)
    assert all(block.attn.kv_cache is None for block in small.transformer.h)
    for i in range(n):
        expected = alone(small, prompts[i], budgets[i], temperature, 100 + i)
        assert got[i] == expected[:cut.get(i, budgets[i])], i


def test_end_of_text_ends_a_row(small) -> None:
    prompt = [5, 6, 7]
    [first, *_] = alone(small, prompt, 4, 0.0, 0)
    with ContinuousBatcher(small, 2, 0.0, eot_token=first) as batcher:
        batcher.add("a", prompt, 4)
        [event] = batcher.step()
        assert (event.key, event.token, event.last, batcher.busy, batcher.free) == ("a", first, True, 0, 2)


def test_next_tokens_draws_each_row_as_alone() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    seeds = [5, 6, 7, 8]
    together = next_tokens(logits, 0.7, 20, 0.9, [torch.Generator().manual_seed(s) for s in seeds])
    apart = [int(next_token(logits[i:i + 1], 0.7, 20, 0.9, torch.Generator().manual_seed(s)))
             for i, s in enumerate(seeds)]
    assert together.tolist() == apart


def test_sample_seed_is_the_documented_hash() -> None:
    import hashlib

    digest = hashlib.sha256(b"11:3:1").digest()
    assert sample_seed(11, 3, 1) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert len({sample_seed(11, p, s) for p in range(50) for s in range(4)}) == 200


def test_output_waits_in_order_within_the_reorder_window(small, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first sample is long and the others end after one token: later samples finish first and wait,
    # but no more than the window's worth are started past the oldest one not yet returned.
    monkeypatch.setattr(gpt2.batching, "reorder_window", lambda rows: 5)
    enc = get_encoder_stub()
    prompts = [Prompt(0, "a", [1, 2], 60)] + [Prompt(i, "b", [3, i], 1) for i in range(1, 20)]
    started: list[int] = []
    returned: list[int] = []

    def on_token(job, piece: str) -> None:
        if job.prompt.index not in started:
            started.append(job.prompt.index)
            assert len(started) - len(returned) <= 5

    with ContinuousBatcher(small, 3, 0.0) as batcher:
        for job in run_jobs(batcher, prompts, 1, enc, [], None, on_token=on_token):
            returned.append(job.prompt.index)
            assert job.text.done
    assert returned == list(range(20))


def get_encoder_stub():
    """An encoder for token ids below 1000: decode_bytes is all SampleText needs."""

    class Stub:
        eot_token = 999

        @staticmethod
        def decode_bytes(tokens: list[int]) -> bytes:
            return b"".join(b"t%d " % t for t in tokens)

    return Stub()


# ---------------------------------------------------------------------------------------------------
# the command line: records independent of batching, shards, order, streaming


@pytest.fixture(scope="module")
def single_run(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    path = prompt_file(tmp_path_factory.mktemp("single"))
    return records(cli(tiny, "--prompt_file", path, *SAMPLED, "--batch_size", "3"))


def test_records_are_in_input_order_with_stops(single_run: list[dict]) -> None:
    assert [(r["prompt_index"], r["sample_index"]) for r in single_run] == \
        [(p, s) for p in range(len(PROMPTS)) for s in range(2)]
    assert [r["prompt"] for r in single_run] == [p for p in PROMPTS for _ in range(2)]
    reasons = {r["finish_reason"] for r in single_run}
    assert "stop" in reasons and len({len(r["tokens"]) for r in single_run}) > 3, single_run  # rows end apart
    assert all("e" not in r["text"] for r in single_run)


@pytest.mark.parametrize("batch_size", ["1", "8"])
def test_batch_size_does_not_change_records(tiny: Path, tmp_path: Path, single_run: list[dict],
                                            batch_size: str) -> None:
    assert records(cli(tiny, "--prompt_file", prompt_file(tmp_path), *SAMPLED, "--batch_size", batch_size)) \
        == single_run


def test_other_prompts_do_not_change_records(tiny: Path, single_run: list[dict]) -> None:
    # prompt 1 after another prompt 0 and before none, from stdin: the same records as in the whole file
    stdin = f"another first prompt\n\n{PROMPTS[1]}".encode()
    out = records(cli(tiny, "--prompt_file", "-", *SAMPLED, "--batch_size", "2", stdin=stdin))
    assert out[2:] == single_run[2:4]
    assert out[:2] != single_run[:2]


def test_three_shards_merge_to_the_single_run(tiny: Path, tmp_path: Path, single_run: list[dict]) -> None:
    path = prompt_file(tmp_path)
    merged = []
    for k in range(3):
        shard = records(cli(tiny, "--prompt_file", path, *SAMPLED, "--batch_size", "2", "--shard", f"{k}/3"))
        assert {r["prompt_index"] % 3 for r in shard} == {k}
        merged += shard
    assert sorted(merged, key=lambda r: (r["prompt_index"], r["sample_index"])) == single_run


@pytest.mark.parametrize("value", ["3/3", "x", "1/0", "-1/2", "1/", "1/2/3"])
def test_bad_shard_values_are_one_line_errors(tiny: Path, tmp_path: Path, value: str) -> None:
    result = run_main(["--model", str(tiny), "--prompt_file", prompt_file(tmp_path), f"--shard={value}"])
    lines = result.stderr.strip().splitlines()
    assert (result.code, len(lines), result.stdout) == (2, 1, b""), result.stderr
    assert "--shard" in lines[0] and "K/N" in lines[0]


def test_shard_needs_a_prompt_file(tiny: Path) -> None:
    result = run_main(["--model", str(tiny), "--text", "Hi", "--shard", "0/2"])
    lines = result.stderr.strip().splitlines()
    assert (result.code, len(lines), result.stdout) == (2, 1, b""), result.stderr
    assert "--shard needs --prompt_file" in lines[0]


def test_text_layout_streams_at_batch_1_and_equals_batched(tiny: Path, tmp_path: Path) -> None:
    path = prompt_file(tmp_path, PROMPTS[:4])
    args = ["--prompt_file", path, "--seed", "3", "--nsamples", "2"]  # default length: half the window
    streamed = cli(tiny, *args, "--batch_size", "1")
    batched = cli(tiny, *args, "--batch_size", "4")
    header, rest = streamed.split(b"\n", 1)
    assert header == batched.split(b"\n", 1)[0].replace(b"batch_size=4", b"batch_size=1")
    assert b"length=None" in header and b"seed=3" in header  # the length as given: prompts stream
    assert rest == batched.split(b"\n", 1)[1]
    assert rest.startswith(f"{PROMPTS[0]}\n{'=' * 40} SAMPLE 1 {'=' * 40}\n".encode())


def test_a_prompt_that_does_not_fit_ends_the_run_after_the_records_before_it(tiny: Path, tmp_path: Path) -> None:
    path = prompt_file(tmp_path, ["Hi", "there", "word " * 100, "never"])
    result = run_main(["--model", str(tiny), "--prompt_file", path, "--format", "jsonl", "--length", "4",
                       "--batch_size", "4", "--seed", "1"])
    lines = result.stderr.strip().splitlines()
    assert (result.code, len(lines)) == (2, 1), result.stderr
    assert "prompt 3: the prompt is" in lines[0]
    assert [r["prompt"] for r in records(result.stdout)] == ["Hi", "there"]


def test_coprocess_gets_each_record_before_sending_the_next(tiny: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--model", str(tiny), "--prompt_file", "-",
                             "--format", "jsonl", "--seed", "4", "--length", "6", "--batch_size", "4"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        for index, prompt in enumerate(["first prompt", "второй", "third 🎉"]):
            proc.stdin.write(prompt.encode() + b"\n")
            proc.stdin.flush()
            assert selector.select(TIMEOUT), f"no record for prompt {index} within {TIMEOUT} s"
            record = json.loads(proc.stdout.readline())
            assert (record["prompt"], record["prompt_index"]) == (prompt, index)
        proc.stdin.close()
        assert proc.stdout.read() == b""
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------
# transformers: greedy records equal each prompt run alone


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path):
    hf = random_hf_model(5, n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=128)
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(vocab_dir / name, directory / name)
    return directory, hf


def test_greedy_records_equal_transformers_on_each_prompt_alone(hf_dir, tmp_path: Path) -> None:
    directory, hf = hf_dir
    out = records(cli(directory, "--prompt_file", prompt_file(tmp_path), "--format", "jsonl", "--temperature", "0",
                      "--length", "16", "--batch_size", "3"))
    enc = get_encoder(directory)
    assert [r["prompt"] for r in out] == PROMPTS
    for record in out:
        ids = torch.tensor([enc.encode(record["prompt"])])
        with torch.inference_mode():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                 eos_token_id=enc.eot_token, pad_token_id=enc.eot_token)[0, ids.size(1):].tolist()
        if enc.eot_token in theirs:
            theirs = theirs[:theirs.index(enc.eot_token)]
        assert record["tokens"] == theirs, record["prompt"]


# ---------------------------------------------------------------------------------------------------
# a CUDA GPU (skipped without one): the captured per-row step samples what eager steps sample


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_rows_sample_what_eager_rows_sample(small_dir: Path) -> None:
    model = load_model(small_dir, device=torch.device("cuda"))
    prompts, budgets = random_prompts(2, 10, 40, 60)
    runs = []
    for graph in (False, True):
        got: dict[int, list[int]] = {i: [] for i in range(10)}
        todo = list(range(10))
        with ContinuousBatcher(model, 3, 0.8, 20, cuda_graph=graph) as batcher:
            while todo or batcher.busy:
                while todo and batcher.free:
                    i = todo.pop(0)
                    batcher.add(i, prompts[i], budgets[i], torch.Generator("cuda").manual_seed(i))
                for event in batcher.step():
                    got[event.key].append(event.token)
        runs.append(got)
    assert runs[0] == runs[1]


def test_the_bpe_memo_is_bounded(vocab_dir: Path) -> None:
    # a stream of prompts with ever new words (numbers, names) must not grow the encoder's memory for ever
    import gpt2.encoder

    enc = get_encoder(vocab_dir)
    words = gpt2.encoder.BPE_CACHE_WORDS + 10
    tokens = enc.encode(" ".join(f"w{i}" for i in range(words)))
    assert len(enc.cache) <= gpt2.encoder.BPE_CACHE_WORDS
    assert enc.decode(tokens) == " ".join(f"w{i}" for i in range(words))
