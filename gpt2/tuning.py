"""Kernel choice by measuring: each candidate product (gpt2.kernels) timed on the model's own weight shapes
on this machine, once, the ranking remembered in `<cache>/kernels.json`.

The fastest kernel differs between CPUs (among torch's, native bfloat16 and AMX favour oneDNN's bfloat16
products, and without them FBGEMM's float16 weights win; the kernel compiled on the machine, gpt2.native,
leads where it builds, by how much depends on the CPU), so no fixed choice is right everywhere. The file is
keyed by CPU model, thread count, torch version, precision and the weight's shape and layout: any change
measures again. A decode step multiplies 1 to 8 rows, a prompt hundreds: the form a weight is stored in is the
one of the fastest decode kernel (decoding dominates generation), and prefill takes the fastest prefill
candidate that reads that same form (timed for every form: a weight that the winner's form cannot hold takes
the next one). Building a packed form at load is time too, paid on every load: it is spread over LOAD_STEPS
decode steps in the ranking, and a packed form must also win by REBUILT_MARGIN. A plain form (a transposed
copy, a cast) costs nothing there: gpt2.prepared keeps it for later loads.

Modes (load_model's `kernels=`, else the environment variable GPT2_PYTORCH_KERNELS, read only):
"cached" (the default) uses the file and measures what it lacks; "tune" measures everything again;
"default" measures nothing and touches no file (each precision's first candidate that builds; nothing is
compiled).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gpt2.errors import GPT2Error
from gpt2.heap import return_free_memory
from gpt2.kernels import Form, Kernel, Linear, Projection, Stored, aligned, kernels_for, onednn_linear_available
from gpt2.native import NATIVE_RUNS

if TYPE_CHECKING:
    from gpt2.prepared import Prepared

MODES = ("cached", "tune", "default")
MODE_VARIABLE = "GPT2_PYTORCH_KERNELS"
DECODE_TIMING_ROWS = (1, 8)
PREFILL_TIMING_ROWS = 128
# The LM head is timed on its first this-many rows, in copies that add up to its whole table (_copies): one
# slice timed over and over ranked the kernels otherwise, as the table would not come from the caches inside
# a step. A smaller slice saves the time of its random values and of the prefill timing, 0.1-0.3 s at 124M.
HEAD_TIMING_ROWS = 8192
REPEATS = 3  # timed passes per kernel and row count, after one untimed call; the fastest counts
# Each pass calls the kernel on copies of its stored form, this many bytes of weights in all (at most
# MAX_COPIES copies): past the core's caches, as in a decode step, whose ranking this one must match.
ROTATION_BYTES = 16 << 20
MAX_COPIES = 16
COPY_BUILD_SECONDS = 0.02  # per form and shape: forms slow to build (FBGEMM's) get fewer copies
# A candidate's product of random operands may differ from the float64 one by this fraction of its largest
# value: float32 ones compute in float32; 16-bit ones round weights and inputs to 8 or 11 bits; int8 ones
# quantize (see gpt2.quantize). A broken or inexact kernel is never chosen.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2, "int8": 3e-2}
SCREEN = 2.0  # a kernel this many times slower than the fastest (after a pass, or at one row) is not timed further
LOAD_STEPS = 512  # decode steps a load is spread over in the ranking: the CLI's default --length
REBUILT_MARGIN = 0.25  # how much faster a form built on every load (packed) must be: see step_cost
# The products take their native kernels where those cost a decode step at most this many times the fastest ones
# (step_in_one_call): with every block product and the LM head native, a step runs in one call, a fifth faster at
# batch 1.
STEP_NATIVE_MARGIN = 1.2
RANKING = 17  # how rankings are measured, and of which candidates: part of the cache key, so a change measures again

# The instruction sets that decide which kernels win: part of the ranking's key, named in benchmark tables.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
                "amx_int8", "asimd", "sve")
# Environment variables that keep torch's, oneDNN's or MKL's kernels to fewer instruction sets (read only).
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

Clock = Callable[[], float]
Layout = tuple[tuple[int, int], bool]  # a weight's (out, in) and whether it is a transposed view of (in, out)
clock_for_timing: Clock = time.perf_counter  # what timing reads when no clock is passed (a test's fake one)


@dataclass(frozen=True)
class Choice:
    """A product's ranking: decode kernels fastest first, and per form the fastest prefill kernel on it; `cost`:
    what each ranked kernel costs a decode step, in seconds (none without measuring); `fused_gelu`: the forms
    whose prefill kernel ran faster with gelu fused (Kernel.run_gelu) than followed by F.gelu, for a product
    that gelu follows (c_fc)."""

    decode: tuple[str, ...]
    prefill: dict[str, str]
    cost: dict[str, float] = field(default_factory=dict)
    fused_gelu: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"decode": list(self.decode), "prefill": self.prefill, "cost": self.cost,
                "fused_gelu": list(self.fused_gelu)}

    @staticmethod
    def from_json(entry: object) -> Choice | None:
        if not isinstance(entry, dict) or not isinstance(entry.get("decode"), list) \
                or not isinstance(entry.get("prefill"), dict) or not isinstance(entry.get("cost", {}), dict) \
                or not isinstance(entry.get("fused_gelu", []), list):
            return None
        try:
            cost = {str(k): float(v) for k, v in entry.get("cost", {}).items()}
        except (TypeError, ValueError):
            return None
        return Choice(tuple(map(str, entry["decode"])), {str(k): str(v) for k, v in entry["prefill"].items()}, cost,
                      tuple(map(str, entry.get("fused_gelu", []))))

    def native_first(self, kernels: list[Kernel]) -> Choice:
        """This ranking with its fastest native kernel (among `kernels`) first; itself where it has none."""
        native = self._natives(kernels)
        if not native or native[0] == self.decode[0]:
            return self
        return dataclasses.replace(self, decode=(native[0], *(name for name in self.decode if name != native[0])))

    def step_costs(self, kernels: list[Kernel]) -> tuple[float, float]:
        """What this product costs a decode step on its fastest kernel and on its fastest native one (inf where
        there is none, or no cost was measured)."""
        native = self._natives(kernels)
        return self.cost.get(self.decode[0], math.inf), self.cost.get(native[0], math.inf) if native else math.inf

    def _natives(self, kernels: list[Kernel]) -> list[str]:
        return [name for name in self.decode if any(k.name == name and k.run in NATIVE_RUNS for k in kernels)]


def step_in_one_call(products: Iterable[tuple[Choice, list[Kernel]]]) -> bool:
    """Whether a model's products (each one's ranking and candidates, once per product) all take their native
    kernels: where those cost a decode step at most STEP_NATIVE_MARGIN times what each product's fastest costs,
    since a step whose products are all native runs in one call (gpt2.native_step), which saves more than that.
    The whole step is weighed, not each product: one shape a little slower on the native kernel (a timing on a
    noisy machine) would otherwise keep every step off the call."""
    best, native = _step_costs(products)
    return math.isfinite(native) and native <= STEP_NATIVE_MARGIN * best


def _step_costs(products: Iterable[tuple[Choice, list[Kernel]]]) -> tuple[float, float]:
    """A step's products (each once) on their fastest kernels and on their native ones (inf: one has none)."""
    best = native = 0.0
    for choice, kernels in products:
        fastest, on_native = choice.step_costs(kernels)
        best, native = best + fastest, native + on_native
    return best, native


def choices_for_a_step(precision: str, layouts: list[Layout], mode: str, kernels: list[Kernel],
                       gelu: Iterable[Layout] = ()) -> tuple[dict[Layout, Choice], bool]:
    """choices_for a model's products (`layouts`, the LM head's last; `gelu`: those gelu follows) and whether its
    steps run in one call (step_in_one_call). Where they were measured just now and the call lost although every
    product has a native kernel, they are measured once more, and that ranking kept: on a shared machine a burst
    of load once slowed every native kernel's passes in a tuning to 1.7 times the others' (here twice its usual
    cost), and the int8 model decoded at half speed off the call."""
    head = layouts[-1]

    def products(choices: dict[Layout, Choice]) -> list[tuple[Choice, list[Kernel]]]:
        return [*((choices[layout], kernels) for layout in layouts[:-1]),
                (choices[head], head_kernels(precision, kernels))]

    measured: set[Layout] = set()
    gelu = set(gelu)
    choices = choices_for(precision, layouts, mode, head=head, measured=measured, gelu=gelu)
    native = step_in_one_call(products(choices))
    if measured and not native and math.isfinite(_step_costs(products(choices))[1]):
        choices = choices_for(precision, layouts, "tune", head=head, gelu=gelu)
        native = step_in_one_call(products(choices))
    return choices, native


def kernels_mode(mode: str | None) -> str:
    """`mode`, else $GPT2_PYTORCH_KERNELS, else "cached"; GPT2Error for anything else."""
    chosen = mode or os.environ.get(MODE_VARIABLE, "").strip().lower() or "cached"
    if chosen not in MODES:
        raise GPT2Error(f"kernel mode {chosen!r} (kernels= or ${MODE_VARIABLE}) is not one of {', '.join(MODES)}")
    return chosen


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_description() -> str:
    """The CPU's model name and which of KERNEL_FLAGS it has: a virtual machine's generic model name ("Intel
    Xeon Processor") may come with or without AVX-512 or AMX."""
    flags = set(_cpuinfo().get("flags", "").split()) | set(_cpuinfo().get("Features", "").split())
    return f"{cpu_name()} ({' '.join(f for f in KERNEL_FLAGS if f in flags) or 'flags unknown'})"


def cache_key(precision: str, layout: Layout, candidates: Iterable[str], gelu: bool = False) -> str:
    """What a measurement depends on: CPU and its instruction sets (as the hardware has them and as torch and
    ISA_VARIABLES let the kernels use them), threads, torch build, precision, the weight's (out, in) and
    whether it is stored (in, out) (a Conv1D weight as loaded), whether gelu follows the product, how it is
    measured, and the candidates (one that was missing, such as a compiled kernel whose build failed, is
    measured once it is there)."""
    (out_features, in_features), transposed = layout
    limits = "".join(f"; {name}={os.environ[name]}" for name in ISA_VARIABLES if os.environ.get(name))
    tried = hashlib.sha256("\n".join(sorted(candidates)).encode()).hexdigest()[:8]
    return (f"{cpu_description()}; ATen {torch.backends.cpu.get_cpu_capability()}{limits} | threads "
            f"{torch.get_num_threads()} | torch {torch.__version__} | {precision} | "
            f"{out_features}x{in_features}{' stored (in, out)' if transposed else ''}{' then gelu' if gelu else ''} | "
            f"ranking {RANKING} | candidates {tried}")


def cache_file() -> Path:
    from gpt2.download import cache_root

    return cache_root() / "kernels.json"


def read_cache(path: Path) -> dict[str, dict]:
    """The remembered rankings; an empty dict for a missing, unreadable or corrupt file (rewritten later)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, data: dict[str, dict]) -> None:
    """Replace the file atomically (a concurrent reader sees the old or the new one); a cache that cannot
    be written only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".kernels-", suffix=".json",
                                         delete=False) as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        try:
            os.unlink(f.name)
        except (OSError, UnboundLocalError):
            pass


# ---------------------------------------------------------------------------------------------------
# measuring


def _fastest_calls(runs: dict[str, tuple[Kernel, list[tuple]]], x: Tensor, clock: Clock) -> dict[str, float]:
    """Per kernel (name: the kernel and its copies, one stored form each), the fastest of REPEATS passes over
    its copies, per call. The kernels take turns pass by pass, so that a burst of load on a shared machine
    slows a pass of each instead of every pass of one; one more than SCREEN times the fastest so far takes
    no more passes (it cannot win)."""
    for kernel, copies in runs.values():
        kernel.run(x, copies[0])  # untimed: oneDNN builds its primitive for the shape on the first call
    best = dict.fromkeys(runs, float("inf"))
    for repeat in range(REPEATS):
        for name, (kernel, copies) in runs.items():
            if repeat and best[name] > SCREEN * min(best.values()):
                continue
            start = clock()
            for stored in copies:
                kernel.run(x, stored)
            best[name] = min(best[name], (clock() - start) / len(copies))
    return best


def _copies(form: Form, first: tuple, build_seconds: float, weight: Tensor, bias: Tensor, rows: int) -> list[tuple]:
    """`first` and more of `form` built from copies of the weight: ROTATION_BYTES in all, or as many as
    COPY_BUILD_SECONDS allows, and at least as many as add up to the `rows` the weight stands for (the LM
    head's whole table, timed on a slice). A decode step reads each weight once, from farther than the core's
    own caches; a slice of the head timed over and over would come from a large last-level cache, where the
    kernels rank otherwise (on a 300 MB one, torch.mv tied with a kernel twice as fast on the whole table)."""
    weight_bytes = weight.numel() * form.value_bytes
    whole = -(-rows // weight.size(0))
    count = min(MAX_COPIES, max(whole, min(-(-ROTATION_BYTES // weight_bytes),
                                           1 + int(COPY_BUILD_SECONDS / max(build_seconds, 1e-9)))))
    if all(part is None or isinstance(part, Tensor) for part in first):  # tensors: copied, not built again
        return [first, *(tuple(None if part is None else part.clone() for part in first) for _ in range(count - 1))]
    more = [form.build(torch.empty_like(weight).copy_(weight), bias, None) for _ in range(count - 1)]
    return [first, *(stored for stored in more if stored is not None)]


def _random_operands(shape: tuple[int, int], transposed: bool) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """A weight (out, in) laid out as load_model gives it (`transposed`: a view of (in, out)), bias (out,)
    and inputs (rows, in) for every timed row count, from a local generator."""
    gen = torch.Generator().manual_seed(0)
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5  # (out, in)
    if transposed:
        weight = weight.t().contiguous().t()
    bias = torch.randn(out_features, generator=gen) * 0.1
    inputs = {rows: torch.randn(rows, in_features, generator=gen)  # (rows, in)
              for rows in (*DECODE_TIMING_ROWS, PREFILL_TIMING_ROWS)}
    return weight, bias, inputs


def _close(result: Tensor, exact: Tensor, tolerance: float) -> bool:
    return bool((result - exact).abs().max() <= tolerance * exact.abs().max())


def measure(kernels: list[Kernel], shape: tuple[int, int], tolerance: float,
            clock: Clock = time.perf_counter, transposed: bool = False, rows: int = 0, gelu: bool = False) -> Choice:
    """Rank `kernels` for a weight of `shape` (out, in) (`transposed`: stored (in, out)) by the time of a
    decode step plus their packed form's build time over LOAD_STEPS, on fixed random tensors (the weight in
    copies, ROTATION_BYTES of them and at least `rows` rows, each call reading the next): all at one row,
    those within SCREEN times the fastest also at the other DECODE_TIMING_ROWS (their mean is the step).
    Prefill (PREFILL_TIMING_ROWS rows) picks, for each form, among the prefill candidates that read it. A
    kernel whose form cannot hold the random weight, that fails, or whose result is off the float64 product by
    more than `tolerance` of its largest value, is left out. `gelu`: the product is followed by gelu, and each
    form's prefill kernel that has it fused is also timed so, against itself followed by F.gelu (oneDNN's
    fused gelu runs faster with AVX-512, slower with AVX2 only)."""
    weight, bias, inputs = _random_operands(shape, transposed)
    x = inputs[DECODE_TIMING_ROWS[-1]]
    exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())  # (rows, out)
    stored: dict[str, list[tuple] | None] = {}
    build_time: dict[str, float] = {}
    working: dict[str, tuple[Kernel, list[tuple]]] = {}
    one_row = inputs[DECODE_TIMING_ROWS[0]]
    for kernel in kernels:
        form = kernel.form.name
        try:
            if form not in stored:
                start = clock()
                first = kernel.form.build(weight, bias, None)
                build_time[form] = clock() - start
                stored[form] = None if first is None else \
                    _copies(kernel.form, first, build_time[form], weight, bias, rows)
            if stored[form] is None or not _close(kernel.run(x, stored[form][0]), exact, tolerance):
                continue
            kernel.run(one_row, stored[form][0])
            working[kernel.name] = kernel, stored[form]
        except (RuntimeError, NotImplementedError, TypeError, ValueError):  # a kernel this CPU or build lacks
            continue
    decode_time = _fastest_calls(working, one_row, clock)
    best = min(decode_time.values(), default=0.0)
    close = {name: run for name, run in working.items() if decode_time[name] <= SCREEN * best}
    for rows in DECODE_TIMING_ROWS[1:]:
        for name, seconds in _fastest_calls(close, inputs[rows], clock).items():
            decode_time[name] += seconds
    for name in working.keys() - close.keys():
        decode_time[name] *= len(DECODE_TIMING_ROWS)  # after every kernel timed at all row counts
    by_name = {k.name: k for k in kernels}
    cost = {name: step_cost(by_name[name].form, seconds / len(DECODE_TIMING_ROWS), build_time)
            for name, seconds in decode_time.items()}
    ranking = tuple(sorted(cost, key=cost.get))
    prefill = _prefill_candidates([by_name[name] for name in ranking])
    for form, names in prefill.items():  # every form: a weight the winner's cannot hold takes the next one
        if len(names) > 1:  # on one copy: hundreds of rows reuse each weight from the core's caches
            times = _fastest_calls({name: (by_name[name], stored[form][:1]) for name in names},
                                   inputs[PREFILL_TIMING_ROWS], clock)
            names[:] = [min(times, key=times.get)]
    fused = tuple(form for form, names in prefill.items() if gelu and by_name[names[0]].run_gelu is not None
                  and _gelu_pays(by_name[names[0]], stored[form][0], inputs[PREFILL_TIMING_ROWS], clock))
    return Choice(ranking, {form: names[0] for form, names in prefill.items()}, {name: cost[name] for name in ranking},
                  fused)


def _gelu_pays(kernel: Kernel, stored: Stored, x: Tensor, clock: Clock) -> bool:
    """Whether `kernel` with gelu fused runs faster than itself followed by F.gelu (fastest of REPEATS each, in
    turns, after an untimed call of each)."""
    fused = dataclasses.replace(kernel, run=kernel.run_gelu)
    then = dataclasses.replace(kernel, run=lambda rows, s: torch.nn.functional.gelu(kernel.run(rows, s),
                                                                                    approximate="tanh"))
    times = _fastest_calls({"fused": (fused, [stored]), "then": (then, [stored])}, x, clock)
    return times["fused"] < times["then"]


def _prefill_candidates(kernels: list[Kernel]) -> dict[str, list[str]]:
    """Per form, in `kernels`' order, the kernels on it that are prefill candidates (else its first kernel)."""
    candidates: dict[str, list[str]] = {}
    for kernel in kernels:
        candidates.setdefault(kernel.form.name, [])
        if kernel.prefills:
            candidates[kernel.form.name].append(kernel.name)
    for kernel in kernels:
        if not candidates[kernel.form.name]:
            candidates[kernel.form.name].append(kernel.name)
    return candidates


def step_cost(form: Form, seconds: float, build_time: dict[str, float]) -> float:
    """What a kernel on `form` costs a decode step that takes it `seconds`. A packed form is built again on
    every load: its build time is spread over LOAD_STEPS steps, and it must win by more than REBUILT_MARGIN,
    timing's noise on a shared machine, since one weight timed alone flatters packed layouts. A plain form
    costs its time only: gpt2.prepared keeps it for later loads."""
    if form.plain:
        return seconds
    return seconds * (1 + REBUILT_MARGIN) + build_time[form.name] / LOAD_STEPS


def default_choice(kernels: list[Kernel]) -> Choice:
    """The ranking without measuring: the candidates' own order, each form's first prefill candidate for prefill."""
    prefill = {form: names[0] for form, names in _prefill_candidates(kernels).items()}
    return Choice(tuple(k.name for k in kernels), prefill)


def choices_for(precision: str, layouts: Iterable[Layout], mode: str, clock: Clock | None = None,
                head: Layout | None = None, measured: set[Layout] | None = None,
                gelu: set[Layout] | frozenset[Layout] = frozenset()) -> dict[Layout, Choice]:
    """A ranking for every weight layout (`head`: the LM head's; `gelu`: those gelu follows): from the cache
    file, or measured (and written there; added to `measured`), or the defaults."""
    kernels = kernels_for(precision, mode != "default")
    if not kernels:
        raise GPT2Error(f"this torch build ({torch.__version__}) has no CPU kernel for {precision} products "
                        "(int8 needs torch._weight_int8pack_mm or FBGEMM): use --dtype bfloat16 or float32, "
                        "or a newer torch")
    if mode == "default":
        return {layout: default_choice(kernels) for layout in layouts}
    path = cache_file()
    cached = read_cache(path) if mode == "cached" else {}
    stored = read_cache(path) if mode == "tune" else cached
    names = {k.name for k in kernels}
    choices, changed = {}, False
    for layout in dict.fromkeys(layouts):
        candidates = kernels
        if layout == head:
            # The LM head is timed only on forms that later loads do not build and that keep the table's
            # layout: a packed head would be built again on every load, for longer than the rest of the load
            # takes, and a transposed one would be a second copy of the table.
            candidates = head_kernels(precision, kernels)
            candidates = [k for k in candidates if k.form.kept and not k.form.transposed] or candidates
        key = cache_key(precision, layout, [k.name for k in candidates], layout in gelu)
        choice = Choice.from_json(cached.get(key))
        if choice is None or not set(choice.decode) <= names:
            (out_features, in_features), transposed = layout
            timed = (min(out_features, HEAD_TIMING_ROWS), in_features)
            choice = measure(candidates, timed, TOLERANCE[precision], clock or clock_for_timing, transposed,
                             out_features, layout in gelu)
            if measured is not None:
                measured.add(layout)
            stored[key], changed = choice.to_json(), True
        choices[layout] = choice
    if changed:
        write_cache(path, stored)
    return choices


# ---------------------------------------------------------------------------------------------------
# giving a model its kernels


def projection(weight: Tensor, bias: Tensor | None, choice: Choice, kernels: list[Kernel], dtype: torch.dtype,
               inputs: Tensor | None = None, tied: bool = False,
               prepared: Callable[[Form], Stored | None] | None = None) -> Projection:
    """The Projection of the first kernel in `choice`'s decode ranking whose form holds this weight, with
    its form's prefill kernel; kernels missing from the ranking (never measured) come after it. A form
    `prepared` gives (gpt2.prepared, kept from an earlier load) is taken instead of built."""
    by_name = {k.name: k for k in kernels}
    ranked = [by_name[name] for name in choice.decode if name in by_name]
    ranked += [k for k in kernels if k not in ranked]
    cast = None
    for kernel in ranked:
        stored = prepared(kernel.form) if prepared else None
        if stored is None:
            if cast is None:  # given as stored where gpt2.prepared holds a form the ranking no longer picks
                cast = weight.to(dtype)
            stored = kernel.form.build(cast, bias, inputs)
        if stored is not None:
            prefill = by_name.get(choice.prefill.get(kernel.form.name, kernel.name), kernel)
            if prefill.form.name != kernel.form.name:
                prefill = kernel
            if prefill.run_gelu is not None and prefill.form.name not in choice.fused_gelu:
                prefill = dataclasses.replace(prefill, run_gelu=None)  # not measured faster here, or no gelu follows
            if kernel.aligned or prefill.aligned:
                stored = aligned(stored)
            return Projection(stored, kernel, prefill, dtype, tuple(weight.shape), tied)
    names = ", ".join(k.name for k in kernels)
    raise GPT2Error(f"none of the CPU kernels here ({names}) keeps its precision's contract for a weight of shape "
                    f"{tuple(weight.shape)}: use another --dtype")


def head_kernels(precision: str, kernels: list[Kernel]) -> list[Kernel]:
    """The LM head's candidates among `kernels` (int8: gpt2.quantize.for_the_head's)."""
    if precision != "int8":
        return kernels
    from gpt2.quantize import for_the_head

    return for_the_head(kernels)


def layout_of(weight: Tensor) -> Layout:
    return tuple(weight.shape), not weight.is_contiguous()


def projection_places(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every block projection: no reference that would keep a weight alive
    once the projection is replaced."""
    return [(module, name) for module in model.modules() for name, child in module.named_children()
            if isinstance(child, Linear)]


def use_cpu_kernels(model: nn.Module, precision: str, mode: str | None = None,
                    prepared: Prepared | None = None) -> None:
    """Give a CPU model's block projections and LM head their chosen kernels (Projection), in place; its
    other weights (layer norms, position table) become float32, the activations' dtype. The token table
    stays as loaded, for lookups; the head reads its own copy where its form is not the table itself.

    `precision` is the loaded dtype's name or "int8" (int8 weights, after a calibration run: see
    gpt2.quantize). In mode "cached" the first load on a machine measures for at most a few seconds.
    `prepared` (gpt2.prepared) gives the forms an earlier load kept, and keeps those built now; for int8,
    every form an earlier load settled on under the same rankings and limits, and nothing is calibrated."""
    mode = kernels_mode(mode)
    places = projection_places(model)
    wte = model.transformer.wte.weight
    dtype = wte.dtype
    weights = [getattr(parent, name).weight for parent, name in places] + [wte]
    kernels = kernels_for(precision, mode != "default")
    gelu = [layout_of(getattr(parent, name).weight) for parent, name in places if name == "c_fc"]  # the MLP's
    choices, native = choices_for_a_step(precision, [layout_of(weight) for weight in weights], mode, kernels, gelu)
    names = {id(module): name for name, module in model.named_modules()}
    calibration, dynamic, settled = None, {}, None
    if precision == "int8":
        from gpt2.quantize import calibrate, keep_the_contract, quantizes_activations, settling_limits

        settling = json.dumps([settling_limits(), sorted(f"{cache_key(precision, layout, choice.decode)}: "
                                                         f"{', '.join(choice.decode)}"
                                                         for layout, choice in choices.items())])
        wanted = [names[id(getattr(parent, name))] for parent, name in places] + ["lm_head"]
        settled = prepared.outcome(settling, wanted) if prepared else None
        if settled is None:
            calibration = calibrate(model)
    inputs = calibration.inputs if calibration else {}

    def give(name: str, weight: Tensor, bias: Tensor | None, kernels: list[Kernel], inputs: Tensor | None,
             tied: bool = False) -> Projection:
        if settled is not None:  # an earlier load's int8 outcome under the same settings
            kernels = [kernel for kernel in kernels if kernel.form.name == settled[name]]
        kept = functools.partial(prepared.form, name, weight=weight, bias=bias) if prepared else None
        choice = choices[layout_of(weight)]
        new = projection(weight, bias, choice.native_first(kernels) if native else choice, kernels, dtype, inputs,
                         tied, kept)
        if prepared:
            prepared.keep_form(name, new, weight, bias)
        return new

    def replace(place: tuple[nn.Module, str]) -> None:  # the original weight goes once its form is built
        parent, attribute = place
        old = getattr(parent, attribute)
        new = give(names[id(old)], old.weight, old.bias, kernels, inputs.get(id(old)))
        if calibration and quantizes_activations(new):
            dynamic[place] = old  # kept until the whole model is checked
        setattr(parent, attribute, new)

    # Packing runs on one thread per weight (FBGEMM's) and lets go of the GIL: one packer per thread.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(replace, places))
    model.lm_head = give("lm_head", wte, None, head_kernels(precision, kernels), inputs.get(id(model.transformer.ln_f)),
                         tied=True)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or module is model.transformer.wpe:
            module.float()
    # float16's range is too narrow for activations; a CPU without oneDNN's bfloat16 product (AVX2 only) computes
    # bfloat16 several times slower than float32.
    if precision == "bfloat16" and onednn_linear_available(torch.bfloat16):
        model.prompt_dtype = torch.bfloat16
    if calibration:
        keep_the_contract(model, calibration, dynamic, kernels, lambda weight: choices[layout_of(weight)])
        if prepared:
            prepared.settle(settling, {name: module for name, module in model.named_modules()
                                       if isinstance(module, Projection)})
    dynamic.clear()  # the replaced weights go before the memory is returned
    return_free_memory()


def describe(choices: dict[str, tuple[str, str]]) -> str:
    """kernel_choices() in one line, blocks' products by role: "attn.c_attn: A / B; ...; lm_head: C / C"."""
    roles: dict[str, list[str]] = {}
    for name, (decode, prefill) in choices.items():
        role = re.sub(r"^transformer\.h\.\d+\.", "", name)
        kernels = f"{decode} / {prefill}"
        if kernels not in roles.setdefault(role, []):
            roles[role].append(kernels)
    return "; ".join(f"{role}: {', '.join(kernels)}" for role, kernels in roles.items())
