"""Decode steps on a CUDA GPU replayed from a CUDA graph.

At batch 1 a GPT-2 decode step is a few hundred small kernels, and launching them one by one from
Python takes longer than running them. A step at a tensor slot number (GPT2LMHeadModel.forward with
`start` a tensor) has the same shapes and no host-side numbers at every step, so it is captured once per
model, batch size and KV cache, and each later step copies its inputs into the captured buffers and
replays the whole model as one launch. A continuous batch (gpt2.scheduler) captures the step at per-row
slots, each row at its own. Sampling stays outside the graph: it draws from the global generator, as
transformers' generate() does, or from each row's own.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from gpt2.model import GPT2LMHeadModel

# The last captured step of each model; a capture is replaced, not added to, when it no longer fits.
_captured: weakref.WeakKeyDictionary[GPT2LMHeadModel, DecodeGraph] = weakref.WeakKeyDictionary()


def _fingerprint(model: GPT2LMHeadModel) -> tuple[tuple[int, torch.Size, torch.dtype], ...]:
    """Where every weight and KV cache of the model lives, and its shape: a graph reads exactly that memory
    as that shape (new caches may land at a released one's address, with more slots)."""
    return tuple((t.data_ptr(), t.shape, t.dtype) for t in itertools.chain(model.parameters(), model.buffers()))


class DecodeGraph:
    """One decode step (one token per row) of a model whose KV caches are set up, as a CUDA graph: at one
    slot for every row, or with `per_row` at each row's own slot (B, 1)."""

    def __init__(self, model: GPT2LMHeadModel, batch_size: int, per_row: bool = False) -> None:
        self.fingerprint = _fingerprint(model)
        self.per_row = per_row
        slots = model.kv_caches()[0].slots
        device = model.transformer.wte.weight.device
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        # The capture-time slot is the last one: a generation writes it before it reads it, so the
        # warm-up steps below leave nothing that is ever read.
        shape = (batch_size, 1) if per_row else (1,)
        self.slot = torch.full(shape, slots - 1, dtype=torch.long, device=device)  # (B, 1) or (1,)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.key_valid = torch.ones(batch_size, slots, dtype=torch.bool, device=device)  # (B, slots)
        self.device = device
        with torch.cuda.device(device):  # capture and replay on the model's GPU, whichever is current
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # library handles and workspaces are made here, not during the capture
                    self._step(model)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.inference_mode():
                self.logits = self._step(model)  # (B, vocab), rewritten by every replay

    def _step(self, model: GPT2LMHeadModel) -> Tensor:
        return model(self.token, self.slot, self.position, self.key_valid, last_only=True)[:, -1]

    def __call__(self, token: Tensor, slot: int | Tensor, position: Tensor | None,
                 key_valid: Tensor | None) -> Tensor:
        """Next-token logits (B, vocab) for token (B,) at `slot` (per_row: a (B, 1) tensor); position (B, 1)
        defaults to the slot, key_valid (B, slot + 1 or more) to every slot. The result is overwritten by
        the next call."""
        self.token.copy_(token.view(-1, 1))
        if isinstance(slot, Tensor):
            self.slot.copy_(slot)
        else:
            self.slot.fill_(slot)
        if position is None:
            self.position.copy_(self.slot.expand_as(self.position))
        else:
            self.position.copy_(position)
        if key_valid is None:
            self.key_valid.fill_(True)
        else:
            self.key_valid[:, :key_valid.size(1)].copy_(key_valid)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.logits


def decode_graph(model: GPT2LMHeadModel, batch_size: int, per_row: bool = False) -> DecodeGraph:
    """The model's captured decode step for `batch_size` rows (per_row: each at its own slot) and its
    current KV caches and weights, captured now if there is none yet or they changed (the old capture's
    memory is freed first)."""
    graph = _captured.get(model)
    if graph is None or graph.token.size(0) != batch_size or graph.per_row != per_row \
            or graph.fingerprint != _fingerprint(model):
        _captured.pop(model, None)
        graph = _captured[model] = DecodeGraph(model, batch_size, per_row)
    return graph
