"""GPT-2 in plain PyTorch, with a preallocated KV cache for incremental decoding.

Module names equal the checkpoint keys (`transformer.h.0.attn.c_attn`, ...) so loading is a rename
loop. Projections are `nn.Linear`: the checkpoints' Conv1D weights are transposed once at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.config import GPT2Config
from gpt2.kernels import DECODE_ROWS, Linear, Projection, check_movable, linear
from gpt2.native_step import NativeStep, forward_hooks

CACHE_SLOT_STEP = 64  # KV caches are allocated in multiples of this many slots (see setup_caches)


class KVCache(nn.Module):
    """Keys and values of one block for every position so far, written in place (no cat per step)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        """Over the tensors k and v (B, n_head, S_max, head_dim), which may be views of another cache's."""
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def zeros(cls, batch_size: int, n_head: int, max_len: int, head_dim: int,
              dtype: torch.dtype, device: torch.device) -> KVCache:
        # Zeros: a step at a tensor slot reads every slot (masked), and a masked NaN would still poison
        # the product with the values.
        shape = (batch_size, n_head, max_len, head_dim)  # (B, n_head, S_max, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def slots(self) -> int:
        return self.k.size(2)

    def row(self, index: int) -> KVCache:
        """A batch-1 cache over row `index` of this one: what a prompt run alone writes lands in that row."""
        return KVCache(self.k[index:index + 1], self.v[index:index + 1])

    def update(self, start: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_head, T, head_dim) at slots start..start+T; return all slots up to there, or
        every slot when `start` is a tensor of slot numbers (the same shapes at every step): (T,) for
        every row alike, or (B, T) for each row its own."""
        if isinstance(start, Tensor):
            if start.dim() == 2:
                rows = torch.arange(k.size(0), device=k.device).unsqueeze(1)  # (B, 1)
                self.k[rows, :, start] = k.transpose(1, 2)  # (B, T, n_head, head_dim) into (B, n_head, S_max, ...)
                self.v[rows, :, start] = v.transpose(1, 2)
            else:
                self.k.index_copy_(2, start, k)
                self.v.index_copy_(2, start, v)
            return self.k, self.v
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, start: int | Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, head_dim)
        if self.kv_cache is not None:
            cached = self.kv_cache.update(start, k, v)  # (B, n_head, start + T, head_dim)
            # From slot 0 the cache holds just k and v, exactly where its dtype is theirs or float32.
            if not (isinstance(start, int) and start == 0 and cached[0].dtype in (k.dtype, torch.float32)):
                k, v = cached
                if k.dtype != q.dtype:  # a prompt computed in bfloat16 on a float32 cache
                    k, v = k.to(q.dtype), v.to(q.dtype)
            elif k.dtype != cached[0].dtype:  # a bfloat16 prompt's own: SDPA reads them 3% faster contiguous
                k, v = k.contiguous(), v.contiguous()  # (B, n_head, T, head_dim)
        # With no explicit mask: causal for a prompt from slot 0, nothing to hide for one new token.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, n_embd)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.c_fc, Projection) and not any(forward_hooks([self.c_fc])):  # a hook sees c_fc's output
            return self.c_proj(self.c_fc.forward_gelu(x))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). The attention and the MLP
    compute in `dtype` (GPT2LMHeadModel.prompt_dtype), the residual stream x stays in its own."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, start: int | Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        x = x + self.attn(self.ln_1(x).to(dtype), start, mask)
        return x + self.mlp(self.ln_2(x).to(dtype))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        # The embeddings are passed their (empty) weights and initialised below, off the meta device
        # only: there normal_ would import torch._dynamo, 1.5 s of start-up before loading a checkpoint.
        wte = nn.Embedding(config.vocab_size, config.n_embd,
                           _weight=torch.empty(config.vocab_size, config.n_embd))
        wpe = nn.Embedding(config.n_positions, config.n_embd,
                           _weight=torch.empty(config.n_positions, config.n_embd))
        if not wte.weight.is_meta:
            nn.init.normal_(wte.weight)
            nn.init.normal_(wpe.weight)
        self.transformer = nn.ModuleDict(dict(
            wte=wte,
            wpe=wpe,
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        # None: the LM head is the token embedding (tied). On CPU load_model puts a Projection reading it (or
        # a copy in its kernel's form) here, off the CPU gpt2.quantize an int8 copy.
        self.lm_head: nn.Module | None = None
        self._register_state_dict_hook(_in_loaded_dtype)
        # A CPU bfloat16 model's (tuning.use_cpu_kernels, where the CPU multiplies bfloat16 natively) prompt, of more
        # than one token and more than DECODE_ROWS rows, runs its attention and products in bfloat16;
        # decode steps (of any batch), the residual stream, layer norms, KV caches and logits stay float32.
        self.prompt_dtype: torch.dtype | None = None
        self._kv_caches: list[KVCache] = []  # storage for setup_caches, kept between generations

    def kernel_choices(self) -> dict[str, tuple[str, str]]:
        """The (decode, prefill) kernel of every product by module name ("lm_head" for the head), where
        load_model chose them (CPU); empty where the products are plain F.linear (GPU, or a model built
        here)."""
        return {name: (module.decode.name, module.prefill.name) for name, module in self.named_modules()
                if isinstance(module, Projection)}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 -- nn.Module's own signature
        """.to(), .half(), .cuda() ...: refused before anything moves where CPU-packed products cannot follow."""
        for module in self.modules():
            if isinstance(module, Projection):
                check_movable(fn, module.dtype)
        return super()._apply(fn, recurse)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of hidden states, KV caches and logits: the weights' dtype, or float32 where
        gpt2.quantize gave a bfloat16 or float16 model float16-weight products with float32 activations."""
        return self.transformer.ln_f.weight.dtype

    def setup_caches(self, batch_size: int, max_len: int, keep: bool = False) -> None:
        """Give every block a KV cache of at least `max_len` slots for `batch_size` rows.

        The previous caches are reused when they are large enough for the same batch size: sizes are
        rounded up to CACHE_SLOT_STEP slots, so a long run of prompts of similar length allocates them
        once instead of leaving the allocator a differently sized hole per prompt. Slots are not
        positions: with left-padded prompts a row's positions start after its padding, so a batch may
        hold more slots than the context window. With `keep`, caches that must grow keep what they hold
        (a continuous batch, gpt2.scheduler, growing mid-run).
        """
        weight = self.transformer.wte.weight
        dtype = self.activation_dtype
        kept = self._kv_caches[0].k if self._kv_caches else None
        if kept is None or kept.size(0) != batch_size or kept.size(2) < max_len or kept.dtype != dtype \
                or kept.device != weight.device:
            old = self._kv_caches if keep and kept is not None and kept.size(0) == batch_size else []
            self._kv_caches = []  # without `keep`, freed before the new ones are allocated
            slots = -(-max_len // CACHE_SLOT_STEP) * CACHE_SLOT_STEP
            self._kv_caches = [KVCache.zeros(batch_size, self.config.n_head, slots, self.config.head_dim,
                                             dtype, weight.device) for _ in self.transformer.h]
            for before, after in zip(old, self._kv_caches):
                after.k[:, :, :before.slots] = before.k
                after.v[:, :, :before.slots] = before.v
        self.use_caches(self._kv_caches)

    def use_caches(self, caches: list[KVCache]) -> None:
        """Have the blocks read and write these caches, one per block: those of setup_caches, or views
        of one row of them (KVCache.row) while a prompt is run into that row alone."""
        for block, cache in zip(self.transformer.h, caches, strict=True):
            block.attn.kv_cache = cache

    def kv_caches(self) -> list[KVCache]:
        """The caches of the last setup_caches (kept for the next one), block by block."""
        return list(self._kv_caches)

    def clear_caches(self, release: bool = False) -> None:
        """Detach the KV caches from the blocks (forward() then runs without one). Their memory is kept
        for the next setup_caches unless `release`."""
        for block in self.transformer.h:
            block.attn.kv_cache = None
        if release:
            self._kv_caches = []

    def forward(self, idx: Tensor, start: int | Tensor = 0, position_ids: Tensor | None = None,
                key_valid: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab) for tokens idx (B, T) sitting at cache slots start..start+T.

        position_ids (B, T) default to the slot numbers; key_valid (B, start+T or more) marks the slots
        that hold real tokens (False for left padding). last_only computes the logits of the last slot only.

        `start` may also be a tensor, with T = 1 and caches set up: (1,), one slot for every row, or (B, 1),
        each row's own slot (position_ids then default to it; gpt2.scheduler). Attention then reads every
        cache slot, masked, so that every step has the same shapes and no host-side numbers (what a CUDA
        graph replays, gpt2.cuda_graph).
        """
        if idx.size(1) == 1 and idx.device.type == "cpu" and not torch.is_grad_enabled():
            step = NativeStep.of(self)  # a decode step in one call, where it can run so
            logits = None if step is None else step.run(idx, start, position_ids, key_valid)
            if logits is not None:
                return logits  # (B, 1, vocab)
        x = self.hidden_states(idx, start, position_ids, key_valid)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)  # (B, T, vocab)
        return linear(x, self.transformer.wte.weight)  # tied LM head: (B, T, vocab)

    def hidden_states(self, idx: Tensor, start: int | Tensor = 0, position_ids: Tensor | None = None,
                      key_valid: Tensor | None = None) -> Tensor:
        """The last block's output (B, T, n_embd), before ln_f, with forward()'s arguments. With caches set
        up, this is how a part of a prompt that needs no logits fills them."""
        B, T = idx.shape
        device = idx.device
        if position_ids is None and isinstance(start, Tensor) and start.dim() == 2:
            position_ids = start  # (B, T): each row's own slots
        elif position_ids is None:
            position_ids = (start + torch.arange(T, device=device)).unsqueeze(0)  # (1, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # (B, T, n_embd)
        keys = self._kv_caches[0].slots if isinstance(start, Tensor) else start + T
        mask = self._attention_mask(start, T, keys, key_valid, device)
        dtype = self.prompt_dtype if self.prompt_dtype and T > 1 and B * T > DECODE_ROWS else x.dtype
        for block in self.transformer.h:
            x = block(x, start, mask, dtype)
        return x

    @staticmethod
    def _attention_mask(start: int | Tensor, T: int, keys: int, key_valid: Tensor | None,
                        device: torch.device) -> Tensor | None:
        """None where SDPA's own causal flag is exact; else a (B, 1, T, keys) bool mask over key slots 0..keys."""
        if key_valid is None and isinstance(start, int) and (start == 0 or T == 1):
            return None
        if isinstance(start, Tensor) and start.dim() == 2:
            query_slot = start.unsqueeze(2)  # (B, T, 1): each row's own slots
        else:
            query_slot = (start + torch.arange(T, device=device)).view(1, T, 1)  # (1, T, 1)
        key_slot = torch.arange(keys, device=device).view(1, 1, keys)  # (1, 1, keys)
        mask = key_slot <= query_slot  # (B or 1, T, keys)
        if key_valid is not None:
            # A padding slot still sees itself, so that no row of the softmax is empty (NaN).
            mask = mask & (key_valid[:, None, :keys] | (key_slot == query_slot))  # (B, T, keys)
        # Four dimensions: SDPA's fused CPU kernel takes no three-dimensional mask (it falls back to a
        # slower path that materialises the attention weights).
        return mask.unsqueeze(1)  # (B or 1, 1, T, keys)


def _in_loaded_dtype(model: GPT2LMHeadModel, state: dict[str, Tensor], prefix: str, metadata: object) -> None:
    """state_dict in the dtype the model was loaded in (its token table's): a CPU model keeps its layer
    norms and position table in float32, the activations' dtype."""
    dtype = model.transformer.wte.weight.dtype
    for key, value in state.items():
        if key.startswith(prefix) and value.is_floating_point() and value.dtype != dtype:
            state[key] = value.to(dtype)
