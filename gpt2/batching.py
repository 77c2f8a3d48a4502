"""Many samples of many prompts: prompts encoded with their token budgets, the jobs (one per sample), the
continuous run of a stream of prompts (run_jobs), each sample's own seed, a finished job's JSONL record,
and the memory check that refuses a batch before it would swap."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpt2.encoder import Encoder
from gpt2.errors import UsageError

if TYPE_CHECKING:
    from gpt2.model import GPT2LMHeadModel
    from gpt2.scheduler import ContinuousBatcher
    from gpt2.textstream import SampleText


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to generate from: its line index, text (None: unconditional), tokens and budget."""

    index: int
    text: str | None
    context: list[int]
    length: int


@dataclass
class Job:
    """One sample of one prompt."""

    prompt: Prompt
    sample_index: int
    started: float = 0.0
    finished: float = 0.0
    text: SampleText | None = None  # set when generation starts


def resolve_length(requested: int | None, prompt_tokens: int, n_ctx: int) -> int:
    """New tokens for a prompt: as requested if it fits the window, else an error; by default half the
    window, shrunk to fit."""
    if prompt_tokens >= n_ctx:
        raise UsageError(f"the prompt is {prompt_tokens} tokens; the model's window is {n_ctx}: shorten it")
    room = n_ctx - prompt_tokens
    if requested is None:
        return min(n_ctx // 2, room)
    if requested > room:
        tokens = f"{prompt_tokens} token{'s' if prompt_tokens != 1 else ''}"
        raise UsageError(f"--length {requested} does not fit: the prompt is {tokens} and the window {n_ctx}; "
                         f"use --length {room} or less")
    return requested


def encode_prompt(index: int, text: str | None, enc: Encoder, n_ctx: int, length: int | None) -> Prompt:
    """One prompt encoded (None: unconditional, from end-of-text) with its budget; UsageError if it
    cannot fit the window."""
    longest_token = enc.longest_token_bytes
    if text is not None and len(text.encode("utf-8")) > n_ctx * longest_token:
        # Surely too long, and not worth encoding (BPE is slow on huge words).
        raise UsageError(f"the prompt is {len(text.encode('utf-8'))} bytes, more than the model's "
                         f"{n_ctx}-token window can hold: shorten it")
    context = enc.encode(text) if text is not None else [enc.eot_token]
    return Prompt(index, text, context, resolve_length(length, len(context), n_ctx))


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample's own generator: the first 8 bytes (little-endian) of
    sha256("{seed}:{prompt_index}:{sample_index}"), less the top bit. A sample then draws the same tokens
    whatever else runs beside it, at any batch size, in any shard."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def record(job: Job, seed: int) -> dict:
    """A finished job's JSONL record (--format jsonl, scripts/ray_generate.py)."""
    seconds = job.finished - job.started
    return dict(prompt=job.prompt.text, prompt_index=job.prompt.index, sample_index=job.sample_index,
                text=job.text.text, tokens=job.text.tokens, seed=seed, finish_reason=job.text.finish_reason,
                tokens_per_second=round(len(job.text.tokens) / seconds, 2) if seconds > 0 else None)


def iter_batches(prompts: Iterable[Prompt], nsamples: int, batch_size: int) -> Iterator[list[Job]]:
    """Every prompt's samples in order, batch_size at a time (made as needed: nsamples may be huge)."""
    batch: list[Job] = []
    for prompt in prompts:
        for sample_index in range(nsamples):
            batch.append(Job(prompt, sample_index))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def reorder_window(rows: int) -> int:
    """Samples that may be started past the oldest one not yet returned: this bounds what run_jobs holds
    back to keep its output in input order, while a long sample makes later, shorter ones wait."""
    return max(64, 4 * rows)


def run_jobs(batcher: ContinuousBatcher, prompts: Iterable[Prompt], nsamples: int, enc: Encoder,
             stops: Sequence[str], seed: int | None, ready: Callable[[], bool] | None = None,
             on_token: Callable[[Job, str], None] | None = None) -> Iterator[Job]:
    """Every sample of every prompt through the continuous batcher; each finished job is yielded in input
    order (prompt, then sample), as soon as every earlier one has been.

    Prompts are pulled one at a time as rows free up. With `ready` (is the next prompt there already?),
    a prompt is pulled while samples are running only when it is there, and waited for only when every
    row is idle. With `seed`, each sample draws from its own generator seeded with sample_seed; with None,
    from torch's global one. `on_token(job, text)` is called for every token drawn, with the text it made
    final (see SampleText). A UsageError from `prompts` (a prompt that does not fit) is raised once the
    samples started before it are yielded.
    """
    prompts = iter(prompts)
    running: dict[int, Job] = {}
    done: dict[int, Job] = {}
    started = returned = 0
    window = reorder_window(batcher.rows)
    current: Prompt | None = None
    next_sample = nsamples
    error: UsageError | None = None
    exhausted = False
    while True:
        while batcher.free and not exhausted and error is None and started < returned + window:
            if next_sample == nsamples:
                if batcher.busy and ready is not None and not ready():
                    break  # keep decoding; look again after the next step
                try:
                    current, next_sample = next(prompts), 0
                except StopIteration:
                    exhausted = True
                    break
                except UsageError as exc:
                    error = exc
                    break
            running[started] = _start(batcher, started, Job(current, next_sample), enc, stops, seed)
            next_sample += 1
            started += 1
        if not batcher.busy and returned == started:
            break
        for event in batcher.step():
            job = running[event.key]
            piece = job.text.push(event.token)
            if event.last:
                piece += job.text.finish("length")
            elif job.text.done:
                batcher.finish(event.key)
            if on_token is not None:
                on_token(job, piece)
            if job.text.done:
                job.finished = time.perf_counter()
                done[event.key] = running.pop(event.key)
        while returned in done:
            yield done.pop(returned)
            returned += 1
    if error is not None:
        raise error


def _start(batcher: ContinuousBatcher, key: int, job: Job, enc: Encoder, stops: Sequence[str],
           seed: int | None) -> Job:
    """Start `job` in a free row of the batcher under `key`; with `seed`, on its own generator."""
    import torch

    from gpt2.textstream import SampleText

    prompt = job.prompt
    job.text, job.started = SampleText(enc, stops), time.perf_counter()
    if len(prompt.context) + prompt.length > batcher.slots:  # the caches are about to grow
        check_memory(batcher.model, batcher.rows, len(prompt.context) + prompt.length)
    generator = None
    if seed is not None and batcher.temperature > 0:
        generator = torch.Generator(batcher.device).manual_seed(sample_seed(seed, prompt.index, job.sample_index))
    batcher.add(key, prompt.context, prompt.length, generator)
    return job


def check_memory(model: GPT2LMHeadModel, rows: int, slots: int) -> None:
    """Refuse `rows` rows of `slots` KV-cache slots whose caches and per-step logits cannot fit in the
    memory that is free (Linux, CPU): without this a huge --batch_size makes the machine swap or the
    kernel kill the process."""
    if model.transformer.wte.weight.device.type != "cpu":
        return
    cfg = model.config
    cache = 2 * cfg.n_layer * cfg.n_embd * slots * model.activation_dtype.itemsize  # KV caches hold activations
    logits = 4 * cfg.vocab_size * 4  # float32 logits, filtered copy, probabilities, draw
    need = rows * (cache + logits)
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    if need > free:
        raise UsageError(f"--batch_size {rows} needs about {need / 2**30:.1f} GiB for generation but only "
                         f"{free / 2**30:.1f} GiB is free: lower --batch_size")
