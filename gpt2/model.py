"""GPT-2 in plain PyTorch, with a preallocated KV cache for incremental decoding.

Module names equal the checkpoint keys (`transformer.h.0.attn.c_attn`, ...) so loading is a rename
loop. Projections are `nn.Linear`: the checkpoints' Conv1D weights are transposed once at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.config import GPT2Config

# Matrix-vector products (decoding: a few rows against a large weight) are bound by memory bandwidth,
# and MKL runs each on a single thread. Cutting the weight into one slice per thread and multiplying
# the slices as a batch (bmm) streams them in parallel. Up to this many rows; beyond, F.linear is a
# compute-bound GEMM that MKL already parallelises.
SPLIT_MAX_ROWS = 8


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), with small float32 CPU products split across threads (see above)."""
    rows, parts = x.numel() // x.size(-1), torch.get_num_threads()
    if rows > SPLIT_MAX_ROWS or parts < 2 or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    out_features = weight.size(0)
    even = out_features - out_features % parts
    x2 = x.reshape(rows, -1)  # (rows, in)
    w = weight[:even].view(parts, even // parts, -1)  # (parts, out/parts, in)
    xt = x2.t().expand(parts, -1, -1)  # (parts, in, rows)
    if bias is None:
        y = torch.bmm(w, xt)
    else:
        y = torch.baddbmm(bias[:even].view(parts, -1, 1), w, xt)  # (parts, out/parts, rows)
    y = y.permute(2, 0, 1).reshape(rows, even)  # (rows, even)
    if even < out_features:
        rest = F.linear(x2, weight[even:], None if bias is None else bias[even:])  # (rows, out - even)
        y = torch.cat([y, rest], dim=1)
    return y.view(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class KVCache(nn.Module):
    """Keys and values of one block for every position so far, written in place (no cat per step)."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)  # (B, n_head, S_max, head_dim)
        # Only slots [0, end) are ever read and every one of them is written first, so no zeroing.
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_head, T, head_dim) at slots start..start+T; return all slots up to there."""
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

    def forward(self, x: Tensor, start: int, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, n_head, T, head_dim)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)  # (B, n_head, start + T, head_dim)
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
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, start: int, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), start, mask)
        return x + self.mlp(self.ln_2(x))


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
        # None: the LM head is the token embedding (tied). gpt2.quantize puts an int8 copy here.
        self.lm_head: nn.Module | None = None

    def setup_caches(self, batch_size: int, max_len: int) -> None:
        """Give every block a fresh KV cache of `max_len` slots for `batch_size` rows.

        Slots are not positions: with left-padded prompts a row's positions start after its padding,
        so a batch may hold more slots than the context window.
        """
        weight = self.transformer.wte.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, self.config.head_dim,
                                          weight.dtype, weight.device)

    def clear_caches(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(self, idx: Tensor, start: int = 0, position_ids: Tensor | None = None,
                key_valid: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab) for tokens idx (B, T) sitting at cache slots start..start+T.

        position_ids (B, T) default to the slot numbers; key_valid (B, start+T) marks the slots that
        hold real tokens (False for left padding). last_only computes the logits of the last slot only.
        """
        B, T = idx.shape
        device = idx.device
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=device).unsqueeze(0)  # (1, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # (B, T, n_embd)
        mask = self._attention_mask(start, T, key_valid, device)
        for block in self.transformer.h:
            x = block(x, start, mask)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)  # (B, T, vocab)
        return linear(x, self.transformer.wte.weight)  # tied LM head: (B, T, vocab)

    @staticmethod
    def _attention_mask(start: int, T: int, key_valid: Tensor | None, device: torch.device) -> Tensor | None:
        """None where SDPA's own causal flag is exact; else a (B, 1, T, start+T) bool mask."""
        if key_valid is None and (start == 0 or T == 1):
            return None
        end = start + T
        query_slot = torch.arange(start, end, device=device).unsqueeze(1)  # (T, 1)
        key_slot = torch.arange(end, device=device).unsqueeze(0)  # (1, end)
        mask = key_slot <= query_slot  # (T, end)
        if key_valid is not None:
            # A padding slot still sees itself, so that no row of the softmax is empty (NaN).
            mask = mask & (key_valid[:, None, :end] | (key_slot == query_slot))  # (B, T, end)
        return mask.unsqueeze(-3)  # (B or 1, 1, T, end)
