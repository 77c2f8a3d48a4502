"""Many samples of many prompts: prompts encoded with their token budgets, the jobs (one per sample),
and the memory check that refuses a batch before it would swap."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpt2.encoder import Encoder
from gpt2.errors import UsageError

if TYPE_CHECKING:
    from gpt2.model import GPT2LMHeadModel
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
        raise UsageError(f"--length {requested} does not fit: the prompt is {prompt_tokens} tokens and the "
                         f"window {n_ctx}; use --length {room} or less")
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


def encode_prompts(texts: Sequence[str | None], enc: Encoder, n_ctx: int, length: int | None) -> list[Prompt]:
    """encode_prompt for each text; an error names the prompt's number when there are several."""
    prompts = []
    for index, text in enumerate(texts):
        try:
            prompts.append(encode_prompt(index, text, enc, n_ctx, length))
        except UsageError as exc:
            raise UsageError(f"prompt {index + 1}: {exc}" if len(texts) > 1 else str(exc)) from None
    return prompts


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
