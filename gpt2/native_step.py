"""A CPU decode step in one call of the kernel compiled here (`decode_step` in gpt2/rows.c).

Where the tuner gave every block product and the LM head the native kernel (gpt2.native), a decode step of up to
DECODE_ROWS rows runs its blocks' layer norms, products, attention (its keys and values written into the model's
KV caches) and gelu, the final layer norm and the LM head in C, in one parallel region of torch's threads: as
torch ops, with Python between them, the blocks alone are about 200 calls that take as long as a bfloat16 step's
products. Anything else (another kernel, a GPU, autograd, a cache it cannot read, a forward hook on one of the
modules it runs) takes the torch path of gpt2.model, which computes the same.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.modules import module as nn_module

from gpt2.kernels import DECODE_ROWS, Projection
from gpt2.native import NATIVE_RUNS, Product, library

if TYPE_CHECKING:
    from gpt2.model import GPT2LMHeadModel


Parts = list[tuple[dict, str, object]]


class _Kept:
    """A model's table, what it was built from (_parts) and the forward hooks it would skip: checked in a few
    microseconds at every step."""

    def __init__(self, parts: Parts, step: NativeStep | None) -> None:
        self.owners, self.keys, self.values = (list(column) for column in zip(*parts))
        self.step = step
        self.hooks = forward_hooks([value for value in self.values if isinstance(value, torch.nn.Module)])

    def current(self) -> bool:
        return all(map(operator.is_, map(dict.get, self.owners, self.keys), self.values))

    def hooked(self) -> bool:
        return any(self.hooks)


def forward_hooks(modules: list[torch.nn.Module]) -> list[dict]:
    """The hook tables that calling any of `modules` runs, global and their own: any non-empty one means a hook
    would not see a call made around the modules' forward()."""
    return [nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks,
            *(m._forward_hooks for m in modules), *(m._forward_pre_hooks for m in modules)]


_TABLES: weakref.WeakKeyDictionary[GPT2LMHeadModel, _Kept] = weakref.WeakKeyDictionary()


class _Product(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("outliers", ctypes.c_void_p), ("columns", ctypes.c_void_p), ("n_outliers", ctypes.c_int64),
                ("stream", ctypes.c_int64)]


class _Embeddings(ctypes.Structure):
    _fields_ = [("wte", ctypes.c_void_p), ("wte_bf16", ctypes.c_int64), ("n_tokens", ctypes.c_int64),
                ("wpe", ctypes.c_void_p), ("n_positions", ctypes.c_int64)]


class _Sampling(ctypes.Structure):
    _fields_ = [("temperature", ctypes.c_float), ("margin", ctypes.c_float), ("top_k", ctypes.c_int64),
                ("eot", ctypes.c_int64),
                ("finished", ctypes.c_void_p), ("states", ctypes.c_void_p), ("tokens", ctypes.c_void_p),
                ("computed", ctypes.c_int64), ("drawn", ctypes.c_int64)]


@dataclass(frozen=True)
class Drawn:
    """Steps run in one call, drawing their tokens (NativeStep.run_drawing): each computed step's logits (computed,
    B, vocab), the tokens (drawn, B) of the first `drawn` of them (drawn <= computed), and the generator's state
    after each of those draws (drawn, state bytes)."""

    logits: Tensor
    tokens: Tensor
    states: Tensor

    @classmethod
    def room(cls, steps: int, rows: int, vocab: int, state_bytes: int) -> Drawn:
        """Memory for run_drawing's results, kept from one call to the next: states holds the state before the
        first draw too."""
        return cls(torch.empty(steps, rows, vocab), torch.empty(steps, rows, dtype=torch.int64),
                   torch.empty(steps + 1, state_bytes, dtype=torch.uint8))


class _Block(ctypes.Structure):
    _fields_ = [("ln_1_weight", ctypes.c_void_p), ("ln_1_bias", ctypes.c_void_p),
                ("ln_2_weight", ctypes.c_void_p), ("ln_2_bias", ctypes.c_void_p),
                ("c_attn", _Product), ("attn_proj", _Product), ("c_fc", _Product), ("mlp_proj", _Product),
                ("k", ctypes.c_void_p), ("v", ctypes.c_void_p)]


def _parts(model: GPT2LMHeadModel) -> Parts:
    """(dict, key, value) for every object a step's table is built from (the blocks, their modules, the layer
    norms' parameters, the products' stored forms and kernels, ln_f, the LM head): where any is replaced, it is
    built again. Dict lookups, not module attributes, so that checking them costs a decode step next to nothing."""
    transformer = model.transformer
    # The head is a module, or None as a plain attribute (a model built here, a GPU one): both places are watched.
    parts: Parts = [(transformer._modules, "h", transformer.h),
                    (model.__dict__, "lm_head", model.__dict__.get("lm_head"))]
    owners = [(transformer, ("wte", "wpe", "ln_f")), (model, ("lm_head",))]
    for index, block in enumerate(transformer.h):
        parts.append((transformer.h._modules, str(index), block))
        owners += [(block, ("ln_1", "attn", "ln_2", "mlp")), (block.attn, ("c_attn", "c_proj")),
                   (block.mlp, ("c_fc", "c_proj"))]
    for owner, names in owners:
        for name in names:
            module = owner._modules.get(name)
            parts.append((owner._modules, name, module))
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.Embedding)):
                keys = ("weight", "bias") if isinstance(module, torch.nn.LayerNorm) else ("weight",)
                parts += [(module._parameters, key, module._parameters.get(key)) for key in keys]
            elif isinstance(module, Projection):
                parts += [(module.__dict__, key, module.__dict__[key]) for key in ("stored", "decode")]
    return parts


def _native(module: object) -> bool:
    return isinstance(module, Projection) and module.decode.run in NATIVE_RUNS


def _product(module: Projection) -> Product:
    return Product.of_form(module.stored, NATIVE_RUNS[module.decode.run])


def _layer_norm_fits(layer_norm: torch.nn.LayerNorm) -> bool:
    return all(parameter is not None and parameter.dtype == torch.float32 and parameter.is_contiguous()
               for parameter in (layer_norm.weight, layer_norm.bias))


def _embedding_fits(embedding: object, dtypes: tuple[torch.dtype, ...], width: int) -> bool:
    """A plain lookup table (no max_norm, which renormalises rows in place) of `width` columns in one of `dtypes`."""
    return isinstance(embedding, torch.nn.Embedding) and embedding.max_norm is None \
        and embedding.weight.dtype in dtypes and embedding.weight.is_contiguous() and embedding.weight.dim() == 2 \
        and embedding.weight.size(1) == width


class NativeStep:
    """The table of one model: every block's layer norms and products, ln_f and the LM head as decode_step
    reads them."""

    def __init__(self, model: GPT2LMHeadModel, lib: ctypes.CDLL, products: list[list[Product]],
                 head: Product) -> None:
        self.lib, self.config = lib, model.config
        self.inner, self.n_vocab = products[0][2].weight.size(0), head.weight.size(0)
        self.table = (_Block * len(products))()
        # The memory the table points into, held by tensors of its own: a parameter given other data (`.data =`)
        # leaves them alive.
        self._products = [[p.detached() for p in block] for block in products]
        self._head = head.detached()
        self._head_struct = _Product(*self._head.pointers())
        self._norms = [[getattr(block, norm).weight.detach(), getattr(block, norm).bias.detach()]
                       for block in model.transformer.h for norm in ("ln_1", "ln_2")]
        self._ln_f = [model.transformer.ln_f.weight.detach(), model.transformer.ln_f.bias.detach()]
        wte, wpe = model.transformer.wte.weight.detach(), model.transformer.wpe.weight.detach()
        self._tables = [wte, wpe]
        self._embeddings = _Embeddings(wte.data_ptr(), wte.dtype == torch.bfloat16, wte.size(0), wpe.data_ptr(),
                                       wpe.size(0))
        for index, (entry, block) in enumerate(zip(self.table, self._products)):
            (entry.ln_1_weight, entry.ln_1_bias), (entry.ln_2_weight, entry.ln_2_bias) = (
                [tensor.data_ptr() for tensor in norm] for norm in self._norms[2 * index:2 * index + 2])
            entry.c_attn, entry.attn_proj, entry.c_fc, entry.mlp_proj = (_Product(*p.pointers()) for p in block)
        # The KV caches the table points at (_use_caches): each block's attention module's children hold its own.
        self._attention = [block.attn._modules for block in model.transformer.h]
        self._caches: list = []
        self._cache_memory: list | None = None
        self._rows = self._slots = 0

    @classmethod
    def of(cls, model: GPT2LMHeadModel) -> NativeStep | None:
        """The model's table (built again where its parameters were replaced), or None where a product runs on
        another kernel."""
        kept = _TABLES.get(model)
        if kept is None or not kept.current():
            kept = _TABLES[model] = _Kept(_parts(model), cls._build(model))
        return None if kept.hooked() else kept.step  # a hook would not see the call it is there for

    @classmethod
    def _build(cls, model: GPT2LMHeadModel) -> NativeStep | None:
        config, products = model.config, []
        transformer, C = model.transformer, config.n_embd
        if not transformer.h or not _native(model.lm_head) or not _layer_norm_fits(transformer.ln_f) \
                or not _embedding_fits(transformer.wte, (torch.float32, torch.bfloat16), C) \
                or not _embedding_fits(transformer.wpe, (torch.float32,), C):
            return None
        for block in model.transformer.h:
            modules = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
            if not all(map(_native, modules)) or not (_layer_norm_fits(block.ln_1) and _layer_norm_fits(block.ln_2)):
                return None
            products.append([_product(m) for m in modules])
        head = _product(model.lm_head)
        inner = products[0][2].weight.size(0)
        shapes = [(3 * C, C), (C, C), (inner, C), (C, inner)]
        dtype = head.weight.dtype
        if C % config.n_head or head.weight.size(1) != C or any(
                product.weight.dtype != dtype or tuple(product.weight.shape) != shape
                for block in products for product, shape in zip(block, shapes)):
            return None
        try:
            for product in (head, *(product for block in products for product in block)):
                product.check()
        except ValueError:
            return None
        lib = library(dtype)
        return None if lib is None else cls(model, lib, products, head)

    def _use_caches(self, rows: int) -> bool:
        """Point the table at the blocks' KV caches, where each is (rows, n_head, slots, head_dim) float32, the
        same slots in all: checked again only where a cache or its memory is not the last step's."""
        caches = [attn.get("kv_cache") for attn in self._attention]
        tensors = [(cache._buffers.get("k"), cache._buffers.get("v")) if cache is not None else (None, None)
                   for cache in caches]
        memory = [None if k is None or v is None else (k.data_ptr(), v.data_ptr()) for k, v in tensors]
        if memory == self._cache_memory and all(map(operator.is_, caches, self._caches)) \
                and self._rows == rows:
            return True
        config = self.config
        shape = (rows, config.n_head, tensors[0][0].size(2) if tensors[0][0] is not None else -1, config.head_dim)
        if shape[2] < 1 or any(k is None or v is None or not _cache_fits(k, shape) or not _cache_fits(v, shape)
                               for k, v in tensors):
            self._caches, self._cache_memory = [], None
            return False
        for entry, (k, v) in zip(self.table, tensors):
            entry.k, entry.v = k.data_ptr(), v.data_ptr()
        self._caches, self._cache_memory, self._rows, self._slots = caches, memory, rows, shape[2]
        return True

    def run(self, idx: Tensor, start: int | Tensor, position_ids: Tensor | None,
            key_valid: Tensor | None) -> Tensor | None:
        """The logits (B, 1, vocab) of the tokens idx (B, 1), with forward()'s other arguments (a token per row at
        its slot); None, with nothing changed, where this step cannot run here (the torch path then runs it, and
        raises where a token, position or slot is out of range)."""
        logits = torch.empty(idx.size(0), 1, self.n_vocab)
        return logits if self._call(idx, start, position_ids, key_valid, logits, 1, None) else None

    def run_drawing(self, idx: Tensor, slot: int, position_ids: Tensor | None, key_valid: Tensor | None,
                    steps: int, temperature: float, top_k: int, eot_token: int | None, finished: Tensor,
                    state: Tensor, margin: float, room: Drawn | None = None) -> Drawn | None:
        """Up to `steps` decode steps from the tokens idx (B, 1) at `slot` (the next ones at the next slots and
        positions, the last position held), each step's tokens drawn in the call as gpt2.sample.next_token draws
        them (no top-p; temperature 0 is greedy) from a generator in `state` (its get_state()), a row that has
        drawn `eot_token` (finished (B,) bool: already) drawing it again, and fed to the next step. It stops early where
        a row's best ratio does not beat its runner-up by more than `margin` can move them (gpt2.sample._Ahead:
        that step's logits come back undrawn, for the caller to draw), every row has drawn eot_token, or a step
        would pass the caches' slots. The results are views of `room` (Drawn.room) where it holds them. None,
        with nothing changed, where it cannot run here."""
        B, V = idx.size(0), self.n_vocab
        if room is None or room.logits.size(0) < steps or room.logits.shape[1:] != (B, V) \
                or room.states.size(1) != state.numel():
            room = Drawn.room(steps, B, V, state.numel())
        logits, tokens, states = room.logits, room.tokens, room.states
        states[0] = state
        done = finished.to(torch.uint8)
        sampling = _Sampling(temperature, margin, top_k, -1 if eot_token is None else eot_token, done.data_ptr(),
                             states.data_ptr(), tokens.data_ptr(), 0, 0)
        if not self._call(idx, slot, position_ids, key_valid, logits, steps, sampling):
            return None
        return Drawn(logits[:sampling.computed], tokens[:sampling.drawn], states[1:sampling.drawn + 1])

    def _call(self, idx: Tensor, start: int | Tensor, position_ids: Tensor | None, key_valid: Tensor | None,
              logits: Tensor, steps: int, sampling: _Sampling | None) -> bool:
        """decode_step into logits (steps, B, vocab); False, with nothing changed, where it cannot run here."""
        B = idx.size(0)
        if B > DECODE_ROWS or idx.dtype != torch.int64 or not self._use_caches(B):
            return False
        slot, first = None, start
        if isinstance(start, Tensor):
            if start.dtype != torch.int64 or start.numel() not in (1, B):
                return False
            slot, first = start.reshape(-1).expand(B).contiguous(), 0
        elif not 0 <= start < self._slots:
            return False
        if position_ids is not None:
            if position_ids.dtype != torch.int64 or position_ids.numel() != B:
                return False
            position_ids = position_ids.reshape(-1).contiguous()
        if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.dim() != 2
                                      or key_valid.size(0) != B or key_valid.stride(1) != 1):
            return False
        idx, config = idx.contiguous(), self.config
        failed = self.lib.decode_step(
            self.table, len(self.table), ctypes.byref(self._embeddings), self._ln_f[0].data_ptr(),
            self._ln_f[1].data_ptr(), ctypes.byref(self._head_struct), self.n_vocab, idx.data_ptr(),
            None if slot is None else slot.data_ptr(), first,
            None if position_ids is None else position_ids.data_ptr(), logits.data_ptr(), B, config.n_embd,
            self.inner, config.n_head, self._slots, None if key_valid is None else key_valid.data_ptr(),
            0 if key_valid is None else key_valid.stride(0), 0 if key_valid is None else key_valid.size(1),
            config.layer_norm_epsilon, torch.get_num_threads(), steps,
            None if sampling is None else ctypes.byref(sampling))
        return not failed


def _cache_fits(tensor: Tensor, shape: tuple[int, ...]) -> bool:
    return tensor.dtype == torch.float32 and tensor.is_contiguous() and tuple(tensor.shape) == shape
