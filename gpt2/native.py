"""Decode-step products compiled on this machine from `rows.c`, a candidate kernel like torch's own.

torch's one-row products read 16-bit and int8 weights at about half the bytes per second of float32 ones on
the CPUs measured (a weight widened to float32 in registers costs no more than reading it, but torch's
kernels convert it in slower steps), so a small C kernel compiled with `-march=native` reads every precision
at close to the memory's speed. It is built once per machine with the C compiler (`$CC`, else `cc`) into
`<cache>/native/`, loaded with ctypes, and runs on torch's OpenMP threads. Where there is no compiler, no
OpenMP, or the build fails, it is simply not a candidate. The same build holds `decode_step`, a whole decode
step in one call (gpt2.native_step).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("rows.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_SECONDS = 120
# For each weight dtype: the macro that builds its function, the function, and the dtype its bias takes.
FUNCTIONS = {torch.float32: ("ROWS_F32", "rows_f32", torch.float32),
             torch.bfloat16: ("ROWS_BF16", "rows_bf16", torch.bfloat16),
             torch.int8: ("ROWS_I8", "rows_i8", torch.bfloat16)}


def _compiler() -> list[str] | None:
    command = shlex.split(os.environ.get("CC") or "cc")
    found = shutil.which(command[0]) if command else None
    return [found, *command[1:]] if found else None


def library_path(compiler: list[str], flags: tuple[str, ...]) -> Path:
    """Where the build for this source, compiler, flags and CPU is kept (`-march=native` is per CPU)."""
    from gpt2.download import cache_root
    from gpt2.tuning import cpu_description

    digest = hashlib.sha256("\n".join([SOURCE.read_text(), *compiler, *flags, cpu_description(),
                                       platform.machine()]).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"rows-{digest}.so"


@functools.cache
def library(dtype: torch.dtype, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """The compiled kernel for `dtype` weights, built on first use (about 0.5 s); None where it cannot be (no
    compiler, no OpenMP in torch, a failed build, an unwritable cache)."""
    compiler = _compiler()
    if compiler is None or dtype not in FUNCTIONS or not SOURCE.is_file() \
            or "OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1]:
        return None
    macro, name, _ = FUNCTIONS[dtype]
    flags = (*flags, f"-D{macro}")
    path = library_path(compiler, flags)
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=".rows-", suffix=".so")
            os.close(descriptor)
            try:
                subprocess.run([*compiler, *flags, str(SOURCE), "-o", partial], check=True, capture_output=True,
                               timeout=BUILD_SECONDS)
                os.replace(partial, path)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    getattr(lib, name).argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] \
        + [ctypes.c_int64] * 3 + [ctypes.c_int]
    getattr(lib, name).restype = None
    lib.decode_step.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] \
        + [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 \
        + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int64,
           ctypes.c_void_p]
    lib.decode_step.restype = ctypes.c_int
    lib.top_k_filter.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int64,
                                 ctypes.c_void_p]
    lib.draw_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_void_p]
    lib.top_k_filter.restype = lib.draw_rows.restype = ctypes.c_int
    _LOADED.append(lib)
    return lib


_LOADED: list[ctypes.CDLL] = []  # the builds library() loaded in this process, for draw_library


def available(dtype: torch.dtype) -> bool:
    """Whether the kernel for `dtype` weights builds here (building it the first time)."""
    return library(dtype) is not None


def draw_library() -> ctypes.CDLL | None:
    """A build this process has loaded (every build holds the draw's `top_k_filter` and `draw_rows`), or None.
    The draw never compiles one itself: a model whose kernels were chosen (load_model) has loaded one where it
    builds, and `kernels="default"` compiles nothing."""
    return _LOADED[0] if _LOADED else None


def top_k_filter(logits: Tensor, temperature: float, k: int, lib: ctypes.CDLL) -> Tensor | None:
    """gpt2.sample.top_k_logits(logits / temperature, k), bit for bit, for contiguous float32 logits (B, V) in
    one pass; None where a row's largest scaled logit is not finite (NaN or inf)."""
    filtered = torch.empty_like(logits)
    status = lib.top_k_filter(logits.data_ptr(), logits.size(0), logits.size(1), temperature, k,
                              filtered.data_ptr())
    if status < 0:
        raise MemoryError("top_k_filter: out of memory")
    return None if status else filtered


def draw_rows(probs: Tensor, generator: torch.Generator, lib: ctypes.CDLL) -> Tensor | None:
    """torch.multinomial(probs, 1).squeeze(1) for contiguous float32 probs (B, V), `generator` (a CPU one) left in
    the state torch's draw leaves it in; None, the generator untouched, where torch must draw instead.

    torch's own draw advances the generator under its lock; this one reads the state, draws, and sets it. So that
    threads sharing a generator never draw the same numbers, these draws take turns, and one whose generator was
    advanced by another thread meanwhile (a torch op) gives way to torch's draw."""
    tokens = torch.empty(probs.size(0), dtype=torch.int64)
    with DRAW_LOCK:
        before = generator.get_state()
        state = before.clone()  # the copy the draw advances
        if lib.draw_rows(probs.data_ptr(), probs.size(0), probs.size(1), state.data_ptr(), state.numel(),
                         tokens.data_ptr()) or not torch.equal(generator.get_state(), before):
            return None
        generator.set_state(state)
    return tokens


DRAW_LOCK = threading.Lock()


def rows_product(x: Tensor, weight: Tensor, bias: Tensor | None = None, scales: Tensor | None = None,
                 outliers: Tensor | None = None, columns: Tensor | None = None, stream: bool = False,
                 lib: ctypes.CDLL | None = None) -> Tensor:
    """x (rows, in) float32 @ weight (out, in).T [* scales (out,), for int8] + bias (out,) [+ x's outlier
    dimensions (k,) int64 @ their float32 columns (out, k).T, int8's]: float32 (rows, out). The weight is
    float32, bfloat16 or int8 and contiguous; bias and scales are in FUNCTIONS' dtype. `stream`: one row of x
    reads the weight one row after another (else four rows at a time)."""
    return Product.of(weight, bias, scales, outliers, columns, stream).times(x, lib)


def native_run(x: Tensor, stored: tuple) -> Tensor:
    """The native candidates' Kernel.run: `stored` is a dense form's (weight, bias) or int8's weight-only form
    (quantized, scales, bias, outliers, columns); one row of x against four weight rows at a time."""
    return Product.of_form(stored).times(x)


def native_stream_run(x: Tensor, stored: tuple) -> Tensor:
    """native_run, but one row of x reads the weight rows one after another, as one stream."""
    return Product.of_form(stored, stream=True).times(x)


# The native candidates' Kernel.run, and whether each streams one row of x.
NATIVE_RUNS = {native_run: False, native_stream_run: True}


@dataclass(frozen=True)
class Product:
    """One product's operands as rows.c's `struct product` takes them (int8's scales, outliers, columns: None
    for float weights and where no input dimension is an outlier), and how one row of x reads the weight."""

    weight: Tensor
    bias: Tensor | None = None
    scales: Tensor | None = None
    outliers: Tensor | None = None
    columns: Tensor | None = None
    stream: bool = False

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None = None, scales: Tensor | None = None,
           outliers: Tensor | None = None, columns: Tensor | None = None, stream: bool = False) -> Product:
        if outliers is not None and outliers.numel() == 0:
            outliers = columns = None
        return cls(weight, bias, scales, outliers, columns, stream)

    @classmethod
    def of_form(cls, stored: tuple, stream: bool = False) -> Product:
        if len(stored) == 2:
            return cls.of(*stored, stream=stream)
        quantized, scales, bias, outliers, columns = stored
        return cls.of(quantized, bias, scales, outliers, columns, stream)

    def detached(self) -> Product:
        """The same product on detached views of its tensors, every other field as it is."""
        return replace(self, **{field.name: getattr(self, field.name).detach() for field in fields(self)
                                if isinstance(getattr(self, field.name), Tensor)})

    def check(self, x: Tensor | None = None) -> None:
        """ValueError unless the operands fit rows.c (and x (rows, in) float32 where given)."""
        weight = self.weight
        out_features, in_features = weight.shape if weight.dim() == 2 else (0, -1)
        n_outliers = 0 if self.outliers is None else self.outliers.numel()
        if weight.dtype not in FUNCTIONS or not weight.is_contiguous() or weight.dim() != 2 \
                or (x is not None and (x.dtype != torch.float32 or x.dim() != 2 or x.size(1) != in_features)) \
                or not _fits(self.bias, FUNCTIONS[weight.dtype][2], (out_features,)) \
                or (weight.dtype == torch.int8) != (self.scales is not None) \
                or not _fits(self.scales, torch.bfloat16, (out_features,)) \
                or not _fits(self.outliers, torch.int64, (n_outliers,)) \
                or not _fits(self.columns, torch.float32, (out_features, n_outliers)) \
                or (n_outliers and (int(self.outliers.min()) < 0 or int(self.outliers.max()) >= in_features)):
            shape = "" if x is None else f"x {tuple(x.shape)} {x.dtype}, "
            raise ValueError(f"the native product: operands {shape}weight {tuple(weight.shape)} {weight.dtype} "
                             "do not fit")

    def times(self, x: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
        """rows_product's result for x (rows, in) float32; ValueError where the operands do not fit."""
        weight = self.weight
        lib = lib or library(weight.dtype)
        x = x.contiguous()
        self.check(x)
        y = torch.empty(x.size(0), weight.size(0))
        getattr(lib, FUNCTIONS[weight.dtype][1])(x.data_ptr(), *self.pointers(), y.data_ptr(), x.size(0),
                                                 weight.size(1), weight.size(0), torch.get_num_threads())
        return y

    def pointers(self) -> tuple[int | None, ...]:
        """Its fields of struct product: weight, scales, bias, outliers, columns, n_outliers, stream."""
        def address(tensor: Tensor | None) -> int | None:
            return None if tensor is None else tensor.data_ptr()

        return (address(self.weight), address(self.scales), address(self.bias), address(self.outliers),
                address(self.columns), 0 if self.outliers is None else self.outliers.numel(), int(self.stream))


def _fits(tensor: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    return tensor is None or (tensor.dtype == dtype and tensor.shape == shape and tensor.is_contiguous())
