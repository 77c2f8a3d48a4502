"""Continuous batching: a fixed number of rows decoding together, each refilled with the next prompt as
soon as its sample ends, in one KV cache.

Every row keeps its own sample at slots 0..n-1 of its own cache row. A decode step feeds one token per
row at that row's own slot and position, masked to that row's slots, so a row computes what it would
compute alone; rows that are idle or just filled ride along harmlessly. A new prompt is run alone (batch 1)
into a view of its row's cache: the other rows are neither touched nor recomputed. Every step has the same
shapes (all slots read, masked), so on a CUDA GPU it is replayed from a CUDA graph (gpt2.cuda_graph).

The caller drives it: `add` prompts while rows are free, `step` for one token per busy row, `finish` a
sample early (a stop string):

    with ContinuousBatcher(model, rows=8, temperature=0.7, top_k=40, eot_token=eot) as batcher:
        batcher.add("a", prompt_a, 64, torch.Generator().manual_seed(1))
        while batcher.busy:
            for event in batcher.step():
                ...  # event.last: the batcher ended the sample (end-of-text or its budget)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2.model import GPT2LMHeadModel
from gpt2.sample import _prefill, next_tokens


@dataclass(frozen=True)
class Event:
    """A token drawn for the sample `key`; `last` when the batcher has ended that sample (end-of-text or
    its budget) and freed its row."""

    key: Hashable
    token: int
    last: bool


@dataclass
class _Row:
    key: Hashable
    budget: int  # new tokens the sample may have
    generator: torch.Generator | None
    length: int  # tokens in the cache row
    logits: Tensor | None  # (1, vocab) after the prompt, until the first draw
    pending: int | None = None  # the last token drawn, not yet in the cache
    drawn: int = 0


class ContinuousBatcher:
    """`rows` samples decoding together in the model's KV caches (set up here, detached by close())."""

    def __init__(self, model: GPT2LMHeadModel, rows: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eot_token: int | None = None, cuda_graph: bool = True) -> None:
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        self.model, self.rows = model, rows
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.eot_token = eot_token
        self.device = model.transformer.wte.weight.device
        self._rows: list[_Row | None] = [None] * rows
        # At rows == 1 the cache has a spare, idle row: a one-row product can round differently from a
        # many-row one (the CPU's float32 LM head), and a sample's tokens must not depend on the batch size.
        self._cache_rows = max(rows, 2)
        self._where: dict[Hashable, int] = {}
        self._graph = cuda_graph and self.device.type == "cuda"
        self._step = None  # the decode step, made (or captured) at the first one after the caches change
        model.setup_caches(self._cache_rows, 1)

    def __enter__(self) -> ContinuousBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach the KV caches from the model (their memory is kept for its next generation)."""
        self.model.clear_caches()

    @property
    def free(self) -> int:
        """Rows that can take a prompt now."""
        return self._rows.count(None)

    @property
    def busy(self) -> int:
        return len(self._where)

    @property
    def slots(self) -> int:
        """Cache slots per row now: prompt plus budget up to this fits without growing the caches."""
        return self.model.kv_caches()[0].slots

    def add(self, key: Hashable, prompt: Sequence[int], max_new_tokens: int,
            generator: torch.Generator | None = None) -> None:
        """Start the sample `key` in a free row: its prompt is run into that row now (batch 1), and its
        tokens are drawn from `generator` (None: torch's global one), on the model's device."""
        if key in self._where:
            raise ValueError(f"sample {key!r} is already running")
        if not prompt or max_new_tokens < 1:
            raise ValueError("a sample needs a prompt of at least one token and at least one new token")
        if len(prompt) + max_new_tokens > self.model.config.n_positions:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens exceeds the "
                             f"model's window of {self.model.config.n_positions} positions")
        if not self.free:
            raise RuntimeError("no free row: step() or finish() a sample first")
        if len(prompt) + max_new_tokens > self.slots:  # rows keep what they hold; a CUDA graph is captured anew
            self.model.setup_caches(self._cache_rows, len(prompt) + max_new_tokens, keep=True)
            self._step = None
        index = self._rows.index(None)
        caches = self.model.kv_caches()
        self.model.use_caches([cache.row(index) for cache in caches])
        try:
            logits = _prefill(self.model, torch.tensor([list(prompt)], device=self.device), None, None)
        finally:
            self.model.use_caches(caches)
        self._rows[index] = _Row(key, max_new_tokens, generator, len(prompt), logits)
        self._where[key] = index

    def finish(self, key: Hashable) -> None:
        """End the sample `key` now (a stop string, say) and free its row."""
        self._rows[self._where.pop(key)] = None

    def step(self) -> list[Event]:
        """One new token for every busy row, in row order: a decode step for the rows that have a token
        to feed, then each row's draw from its own generator."""
        fed = any(row is not None and row.pending is not None for row in self._rows)
        logits = self._decode() if fed else None  # (B, vocab)
        rows = [(index, row) for index, row in enumerate(self._rows) if row is not None]
        if not rows:
            return []
        stacked = torch.cat([logits[index:index + 1] if row.logits is None else row.logits  # (busy, vocab)
                             for index, row in rows])
        tokens = next_tokens(stacked, self.temperature, self.top_k, self.top_p,
                             [row.generator for _, row in rows]).tolist()
        events = []
        for (_, row), token in zip(rows, tokens):
            row.logits, row.pending = None, token
            row.drawn += 1
            last = token == self.eot_token or row.drawn == row.budget
            if last:
                self.finish(row.key)
            events.append(Event(row.key, token, last))
        return events

    @torch.inference_mode()
    def _decode(self) -> Tensor:
        """Feed every pending token at its row's next slot; logits (rows, vocab). A row without one (idle
        or just filled) writes a dummy at its next slot, which its own next token overwrites first."""
        rows = self._rows + [None] * (self._cache_rows - self.rows)
        token = torch.tensor([0 if r is None or r.pending is None else r.pending for r in rows], device=self.device)
        slot = torch.tensor([0 if r is None else r.length for r in rows], device=self.device).unsqueeze(1)  # (B, 1)
        key_valid = torch.arange(self.slots, device=self.device) <= slot  # (B, slots)
        if self._step is None:
            self._step = self._make_step()
        logits = self._step(token, slot, slot, key_valid)  # (B, vocab)
        for row in rows:
            if row is not None and row.pending is not None:
                row.length += 1
                row.pending = None
        return logits

    def _make_step(self):
        if self._graph:
            from gpt2.cuda_graph import decode_graph

            return decode_graph(self.model, self._cache_rows, per_row=True)

        def step(token: Tensor, slot: Tensor, position: Tensor, key_valid: Tensor) -> Tensor:
            return self.model(token.unsqueeze(1), slot, position, key_valid, last_only=True)[:, -1]

        return step
