"""Sampling: logit filters, the next-token draw, and the prefill/decode generation loop.

The draw follows graykode (and transformers' `generate`): logits / temperature, top-k, then top-p,
softmax, one `torch.multinomial` over the full vocabulary per step, from the global generator unless one
is given, so that a given `torch.manual_seed` yields the same tokens as `generate(do_sample=True)`. On
CPU that draw is computed by `draw_one`, the same numbers for a fifth of the work.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2.kernels import PIECE_ROWS
from gpt2.model import GPT2LMHeadModel
from gpt2.native import DRAW_LOCK, draw_library, draw_rows, top_k_filter
from gpt2.native_step import Drawn, NativeStep


def top_k_logits(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th included); k = 0 keeps all."""
    if k <= 0:
        return logits
    kth = torch.topk(logits, min(k, logits.size(-1))).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_logits(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the most probable tokens whose probabilities sum to at least p (1.0 keeps all)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1:] = False  # the most probable token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """One token per row (B,) from last-position logits (B, vocab); temperature 0 is greedy. The draw
    comes from `generator`, or torch's global generator when None."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = _scaled_top_k(logits, temperature, top_k)
    if filtered is None:  # a temperature so near 0 that it overflows:
        return logits.argmax(dim=-1)  # the limit of sampling as temperature -> 0 is the greedy choice
    return draw_one(F.softmax(top_p_logits(filtered, top_p), dim=-1), generator)


def _scaled_top_k(logits: Tensor, temperature: float, top_k: int) -> Tensor | None:
    """top_k_logits(logits / temperature, top_k), or None where a row's largest scaled logit is not finite; in
    one pass of the compiled draw (gpt2.native) where it can."""
    lib = _draw_library(logits)
    if lib is not None:
        return top_k_filter(logits, temperature, top_k, lib)
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled.amax(dim=-1)).all()):
        return None
    return top_k_logits(scaled, top_k)


def _draw_library(tensor: Tensor) -> ctypes.CDLL | None:
    """The compiled draw for a tensor it reads (_drawable), or None."""
    return draw_library() if _drawable(tensor) else None


def _drawable(tensor: Tensor) -> bool:
    """Whether the draw's own code reads `tensor`: contiguous float32 (B, V) on CPU (else torch's ops)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.dim() == 2 \
        and tensor.is_contiguous()


def next_tokens(logits: Tensor, temperature: float, top_k: int, top_p: float,
                generators: Sequence[torch.Generator | None]) -> Tensor:
    """One token per row (B,), each row drawn from its own generator (None: torch's global one): every row
    gets the token next_token gives it alone, whatever the other rows are (gpt2.scheduler)."""
    if temperature == 0:
        return logits.float().argmax(dim=-1)
    if len(generators) != logits.size(0):
        raise ValueError(f"{len(generators)} generators for {logits.size(0)} rows: give one per row")
    return torch.cat([next_token(logits[row:row + 1], temperature, top_k, top_p, generator)
                      for row, generator in enumerate(generators)])


_LOW_53_BITS = (1 << 53) - 1
# Above this many nonzero probabilities in a batch, the Python side of draw_one costs more than it saves.
DRAW_MAX_CANDIDATES = 4096


def draw_one(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """torch.multinomial(probs, 1, generator=generator).squeeze(1): the same token per row (B,), the
    generator left in the same state, in a fraction of the time on CPU when few probabilities are nonzero
    (top-k or top-p sampling).

    For one sample torch takes argmax(probs / q) with q ~ Exp(1) for *every* entry: exponential_ turns two
    32-bit draws of the generator per entry into u = (their low 53 bits) / 2**53 and q = -log1p(-u), in
    double, one entry after another. Only entries with a probability above 0 can win, so this computes q
    only there, with the C library's log1p, as torch does. The compiled draw (gpt2.native.draw_rows) runs
    torch's mt19937 on a copy of the generator's state and sets the state after; without it, random_ draws
    the same 64-bit numbers (a fifth of the time). Torch versions that draw otherwise (before 2.7 its CPU
    sampler used MKL) are caught by a check, once per process, that falls back to torch.multinomial
    (draw_one_matches_torch). Anything else (another device or dtype, a u that could be 0, probabilities
    torch would refuse; without the compiled draw, many candidates) is left to torch.multinomial itself,
    from the same generator state.
    """
    drawn = None
    if _drawable(probs):
        lib = draw_library()
        if draw_one_matches_torch(lib is not None):
            drawn = _draw(probs, generator, lib)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1) if drawn is None else drawn


def _draw(probs: Tensor, generator: torch.Generator | None, lib: ctypes.CDLL | None) -> Tensor | None:
    """draw_one's own draw, or None (the generator untouched) where torch.multinomial must draw instead: the
    compiled one (gpt2.native.draw_rows, in one pass) with a build, else _draw_at_nonzero_entries."""
    if lib is None:
        return _draw_at_nonzero_entries(probs, generator)
    return draw_rows(probs, torch.default_generator if generator is None else generator, lib)


@functools.cache
def draw_one_matches_torch(compiled: bool = False) -> bool:
    """Whether _draw (`compiled`: with a build of gpt2.native) draws what this torch's multinomial draws: a few
    top-k draws on a generator of its own (no global state is touched), once per process."""
    lib = draw_library() if compiled else None
    if compiled and lib is None:
        return False
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    probs = F.softmax(top_k_logits(logits, 40), dim=-1)
    ours, theirs = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(4):
        drawn = _draw(probs, ours, lib)
        if drawn is None or not torch.equal(drawn, torch.multinomial(probs, 1, generator=theirs).squeeze(1)):
            return False
    return torch.equal(ours.get_state(), theirs.get_state())


def _draw_at_nonzero_entries(probs: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
    """draw_one's own draw, or None (the generator untouched) where torch.multinomial must draw instead."""
    candidates = probs.nonzero()  # (n, 2): row and column of each nonzero entry, in memory order
    if candidates.size(0) > DRAW_MAX_CANDIDATES:
        return None
    source = torch.default_generator if generator is None else generator
    state = source.get_state()
    low_bits = torch.empty(probs.shape, dtype=torch.int64).random_(generator=source)  # (B, vocab)
    low_bits.bitwise_and_(_LOW_53_BITS)
    rows, columns = candidates.unbind(1)
    p = probs[rows, columns]  # (n,)
    batch, n = probs.size(0), p.numel()
    valid = (p > 0).all() & p.isfinite().all()
    if batch > 1:  # every row has a candidate
        valid &= torch.zeros(batch, dtype=torch.bool).index_fill_(0, rows, True).all()
    if n == 0 or int(low_bits.min()) == 0 or not bool(valid):
        source.set_state(state)  # u = 0 (q = 0: NaN or inf ratios), or input torch refuses
        return None
    q = torch.tensor([-math.log1p(-(bits / 2**53)) for bits in low_bits[rows, columns].tolist()],
                     dtype=torch.float64).float()  # (n,) rounded to float as exponential_ rounds its double
    ratio = p / q  # (n,)
    if batch == 1:  # argmax's tie rule, as torch's: the first maximum, the first column in memory order
        return columns[ratio.argmax()].unsqueeze(0)
    best = torch.full((batch,), -math.inf).scatter_reduce(0, rows, ratio, "amax")  # (B,)
    # argmax's tie rule: the first column (in memory order) that reaches the row's best ratio
    position = torch.arange(n).masked_fill(ratio != best[rows], n)  # (n,)
    first = torch.full((batch,), n, dtype=torch.long).scatter_reduce(0, rows, position, "amin")  # (B,)
    return columns[first]


# One decode step: (token (B,), slot, position (B, 1) or None, key_valid or None) -> next logits (B, vocab).
DecodeStep = Callable[[Tensor, int, Tensor | None, Tensor | None], Tensor]


def generate(model: GPT2LMHeadModel, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eot_token: int | None = None, cuda_graph: bool = True,
             generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Yield each step's new tokens (B,) for a batch of prompts, which may differ in length.

    `max_new_tokens` is one budget for every row or one per row; each prompt plus its budget must fit the
    model's window (ValueError). A row past its own budget runs on while others have steps left, and the
    caller ignores what it yields. Shorter prompts are left-padded and masked, with positions counted from
    their first real token, so every row continues as if it ran alone. With `eot_token`, a row that has
    produced it keeps producing it, and generation stops once every row has. On a CUDA GPU the decode
    steps are replayed from a CUDA graph (gpt2.cuda_graph) unless `cuda_graph` is False.

    Tokens are drawn from `generator`, or from torch's global generator when None (the same tokens as
    transformers' generate() after the same torch.manual_seed). Nothing else outside the model changes.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (use the end-of-text token to start)")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(budgets)} budgets for {len(prompts)} prompts: give one per prompt")
    window = model.config.n_positions
    for prompt, budget in zip(prompts, budgets):
        if len(prompt) + budget > window:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {budget} new tokens exceeds the model's "
                             f"window of {window} positions: shorten the prompt or ask for fewer tokens")
    steps = max(budgets)
    if steps < 1:
        return
    device = model.transformer.wte.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    idx = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
    total = width + steps
    key_valid = position_ids = next_position = None
    if bool((lengths != width).any()):
        key_valid = torch.ones(len(prompts), total, dtype=torch.bool, device=device)
        key_valid[:, :width] = torch.arange(width, device=device) >= (width - lengths).unsqueeze(1)
        position_ids = (key_valid[:, :width].long().cumsum(1) - 1).clamp(min=0)  # (B, width)
        next_position = lengths.unsqueeze(1)  # (B, 1)
    model.setup_caches(len(prompts), total)
    decode_step: DecodeStep = functools.partial(_decode_step, model)
    ahead = _Ahead.of(model, temperature, top_k, top_p, generator)
    try:
        logits = _prefill(model, idx, position_ids, key_valid)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(steps):
            token = None if ahead is None else ahead.token()
            if token is None:
                if ahead is not None and ahead.logits is not None:
                    logits = ahead.logits
                token = next_token(logits, temperature, top_k, top_p, generator)
            if eot_token is not None:
                token = token.masked_fill(finished, eot_token)
                finished |= token == eot_token
            yield token
            if step + 1 == steps or (eot_token is not None and bool(finished.all())):
                return
            # A row past its own budget runs on with its position held at the window's last.
            position = None if next_position is None else next_position.clamp(max=window - 1)
            if step == 0 and cuda_graph and device.type == "cuda":
                from gpt2.cuda_graph import decode_graph

                decode_step = decode_graph(model, len(prompts))
            if ahead is None or not (ahead.waiting() or ahead.run(token, width + step, position, key_valid,
                                                                   steps - step - 1, eot_token, finished)):
                logits = decode_step(token, width + step, position, key_valid)
            if next_position is not None:
                next_position = next_position + 1
    finally:
        model.clear_caches()


# Decode steps run in one call of the compiled step by _Ahead, each drawing its token: 2 in a generation's first
# call, twice as many in each next one up to AHEAD_STEPS. A caller that stops early (a stop string) leaves the
# steps run past its last token unused, so a short sample wastes few.
AHEAD_STEPS = 8
# How far apart torch's probabilities and the weights C draws from (rows.c weights_row) may be, relative, beyond
# a factor common to a row: C's exp (2 ulp) and torch's (checked: softmax_within_margin), torch's product by
# 1 / sum, each side's ratio; a few times what they add up to.
DRAW_MARGIN = 64 * 2.0**-23


@functools.cache
def softmax_within_margin() -> bool:
    """Whether this torch's softmax, beyond a factor common to a row, is within a quarter of DRAW_MARGIN of the
    exact one at every entry of a few filtered rows (its exp is a few ulp off; one far less exact would make
    _Ahead's margin unsound): once per process, on a generator of its own."""
    logits = top_k_logits(torch.randn(2, 50257, generator=torch.Generator().manual_seed(4)) * 4, 4000)
    probs = F.softmax(logits, dim=-1).double()
    exact = (logits - logits.amax(dim=-1, keepdim=True)).double().exp()  # of the float differences both take
    for ours, truth in zip(probs, exact):
        kept = ours > 1e-30  # far from float's subnormals, where relative error grows
        ratio = ours[kept] / truth[kept]
        if not bool(ratio.max() / ratio.min() - 1 <= DRAW_MARGIN / 4):
            return False
    return True


class _Ahead:
    """Decode steps run up to AHEAD_STEPS to a call of the compiled step (gpt2.native_step), each drawing its tokens in
    C (or taking the greedy choice, temperature 0), so that no Python runs between them (in a bfloat16 step, that
    Python took as long as the attention).

    The caller sees the tokens and generator states of steps drawn one by one: C draws what next_token draws
    wherever each row's best ratio (draw_one) beats its runner-up by more than the difference between torch's
    softmax and the weights C draws from could move them, and leaves the step to next_token otherwise. Each
    token drawn ahead is handed out with the generator set to its state after that draw; where the generator
    has moved since (the caller drew from it between two tokens), the tokens drawn ahead are dropped and the
    step's logits drawn from by next_token; where the model has changed (a replaced parameter, a hook), they are
    dropped and the step run again by the model."""

    def __init__(self, model: GPT2LMHeadModel, source: torch.Generator, temperature: float, top_k: int) -> None:
        self.model: GPT2LMHeadModel | None = model  # None once a call could not run
        self.source, self.temperature, self.top_k = source, temperature, top_k
        self.drawn: Drawn | None = None
        self.used = 0  # steps of `drawn` handed out
        self.expected: Tensor | None = None  # the generator's state as the last token handed out left it
        self.logits: Tensor | None = None  # the logits of a step run here whose token next_token draws
        self.room: Drawn | None = None  # the memory run_drawing writes, kept for the next call
        self.step: NativeStep | None = None  # the table `drawn` was run on, and where its first step ran
        self.slot, self.position, self.key_valid = 0, None, None
        self.size = 2  # steps in the next call

    @classmethod
    def of(cls, model: GPT2LMHeadModel, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> _Ahead | None:
        """Where this model and sampling can draw ahead (the compiled step decides at each call), else None."""
        source = torch.default_generator if generator is None else generator
        if temperature < 0 or top_p < 1 or source.device.type != "cpu" \
                or model.transformer.wte.weight.device.type != "cpu" or draw_library() is None \
                or (temperature > 0 and not (draw_one_matches_torch(True) and softmax_within_margin())):
            return None
        return cls(model, source, temperature, top_k)

    def run(self, token: Tensor, slot: int, position: Tensor | None, key_valid: Tensor | None, left: int,
            eot_token: int | None, finished: Tensor) -> bool:
        """Run the steps after `token` at `slot` (up to `left` of them); False where they cannot run here (nor,
        then, later in this generation: the model's own step runs each one)."""
        step = None if self.model is None else NativeStep.of(self.model)
        if step is None:
            self.model = None
            return False
        state = self.source.get_state()
        if self.room is None:
            self.room = Drawn.room(AHEAD_STEPS, token.size(0), step.n_vocab, state.numel())
        drawn = step.run_drawing(token.unsqueeze(1), slot, position, key_valid, min(self.size, left),
                                 self.temperature, self.top_k, eot_token, finished, state, DRAW_MARGIN, self.room)
        if drawn is None:
            self.model = None
            return False
        self.size = min(2 * self.size, AHEAD_STEPS)
        self.drawn, self.used, self.expected = drawn, 0, state
        self.step, self.slot, self.position, self.key_valid = step, slot, position, key_valid
        return True

    def waiting(self) -> bool:
        """Whether a step run here waits to be handed out."""
        return self.drawn is not None and self.used < self.drawn.logits.size(0)

    def token(self) -> Tensor | None:
        """The next step's tokens (B,) where they were drawn here, the generator set as their draw left it; else
        None, with the step's logits in `logits` where it was run here (None: the caller's own step)."""
        self.logits = None
        if not self.waiting():
            return None
        drawn, j = self.drawn, self.used
        self.used += 1
        if j and NativeStep.of(self.model) is not self.step:  # the caller changed the model or hooked it
            self.logits, self.drawn = self._again(drawn.tokens[j - 1], j), None
            return None
        if j < drawn.tokens.size(0) and self.temperature == 0:  # greedy: the generator plays no part
            return drawn.tokens[j].clone()
        if j < drawn.tokens.size(0):
            with DRAW_LOCK:  # as draw_rows: against compiled draws from the same generator in other threads
                if torch.equal(self.source.get_state(), self.expected):
                    self.expected = drawn.states[j].clone()  # set_state crashes on a view (torch 2.13)
                    self.source.set_state(self.expected)
                    return drawn.tokens[j].clone()  # its own: the next call writes the same memory
        self.logits, self.drawn = drawn.logits[j], None  # the steps after this one followed the token drawn here
        return None

    def _again(self, token: Tensor, j: int) -> Tensor:
        """The logits of the call's step j (fed `token`), run again by the model itself, as the caller's step
        after a change to the model would have run it."""
        position = None if self.position is None else (self.position + j).clamp(max=self.model.config.n_positions - 1)
        return _decode_step(self.model, token, self.slot + j, position, self.key_valid)


@torch.inference_mode()
def _prefill(model: GPT2LMHeadModel, idx: Tensor, position_ids: Tensor | None,
             key_valid: Tensor | None) -> Tensor:
    """Next-token logits (B, vocab) after the prompts idx (B, T), filling the KV caches on the way.

    On CPU the prompts go through the model PIECE_ROWS rows (batch x tokens) at a time: their products
    run in pieces of that many rows anyway (gpt2.model.row_pieces), so it costs next to nothing, and the
    transient buffers of a long prompt or a large batch stay those of one chunk. The caches carry the
    rest from one chunk to the next. A GPU runs the whole prompt at once, which uses it better.
    """
    B, T = idx.shape
    chunk = T if idx.device.type != "cpu" else max(1, PIECE_ROWS // B)
    for start in range(0, T - chunk, chunk):  # every chunk but the last: keys and values only
        positions = None if position_ids is None else position_ids[:, start:start + chunk]
        model.hidden_states(idx[:, start:start + chunk], start, positions, key_valid)
    start = (T - 1) // chunk * chunk
    positions = None if position_ids is None else position_ids[:, start:]
    return model(idx[:, start:], start, positions, key_valid, last_only=True)[:, -1]  # (B, vocab)


@torch.inference_mode()
def _decode_step(model: GPT2LMHeadModel, token: Tensor, slot: int, position: Tensor | None,
                 key_valid: Tensor | None) -> Tensor:
    return model(token.unsqueeze(1), slot, position, key_valid, last_only=True)[:, -1]  # (B, vocab)


def sample_sequence(model: GPT2LMHeadModel, length: int, start_token: int | None = None,
                    batch_size: int = 1, context: Sequence[int] | None = None, temperature: float = 1.0,
                    top_k: int = 0, device: str | torch.device | None = None, sample: bool = True,
                    top_p: float = 1.0, eot_token: int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """graykode's signature: (batch_size, len(context) + generated) token ids, the context included.

    Give either `context` (a token list) or `start_token`. `sample=False` is greedy. `device` is
    accepted for compatibility; the model's own device is used. With `eot_token`, rows that end early
    are padded with it and the result may be shorter than `length` new tokens. The prompt plus `length`
    must fit the model's window (ValueError).
    """
    if (context is None) == (start_token is None):
        raise ValueError("specify exactly one of start_token and context")
    prompt = list(context) if context is not None else [start_token]
    steps = list(generate(model, [prompt] * batch_size, length, temperature if sample else 0.0,
                          top_k, top_p, eot_token, generator=generator))
    head = torch.tensor([prompt] * batch_size, dtype=torch.long, device=model.transformer.wte.weight.device)
    return torch.cat([head, *(t.unsqueeze(1) for t in steps)], dim=1)
