"""The decode kernel compiled on this machine (gpt2.native, gpt2/rows.c): its products against float64 ones on
every tail of its tiling, for each weight dtype, in its AVX-512 and AVX2 builds; where it cannot be built, no
candidate and no error."""

from __future__ import annotations

import subprocess

import pytest
import torch

import gpt2.native
from gpt2.checkpoint import load_model
from gpt2.kernels import kernels_for
from gpt2.native import FLAGS, FUNCTIONS, library, rows_product
from gpt2.quantize import quantize_rows

# -mno-avx512f: the AVX2 build (8-float vectors, its own tile shapes), which this CPU runs too.
BUILDS = {"native": FLAGS, "avx2": (*FLAGS, "-mno-avx512f")}
DTYPES = (torch.float32, torch.bfloat16, torch.int8)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The kernel of each dtype in each build, compiled once for the module into a cache of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPT2_PYTORCH_CACHE", str(tmp_path_factory.mktemp("native")))
        library.cache_clear()
        compiled = {(dtype, build): library(dtype, flags) for dtype in DTYPES for build, flags in BUILDS.items()}
    library.cache_clear()
    return compiled


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A cache of the test's own, and no build of an earlier test in this process."""
    monkeypatch.setenv("GPT2_PYTORCH_CACHE", str(tmp_path / "cache"))
    library.cache_clear()
    yield
    library.cache_clear()


def _compiled(builds, dtype: torch.dtype, build: str = "native"):
    if builds[dtype, build] is None:
        pytest.skip("no C compiler or OpenMP here")
    return builds[dtype, build]


def _operands(rows: int, out_features: int, in_features: int, dtype: torch.dtype, bias: bool):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen).to(FUNCTIONS[dtype][2]) if bias else None
    if dtype == torch.int8:
        quantized, scales = quantize_rows(weight)
        scales = scales.bfloat16()
        exact = x.double() @ (quantized.double() * scales.double()[:, None]).T
        return x, quantized, b, scales, exact + (0 if b is None else b.double())
    weight = weight.to(dtype)
    return x, weight, b, None, x.double() @ weight.double().T + (0 if b is None else b.double())


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize(("out_features", "in_features", "bias"), [(768, 768, True), (13, 77, False), (50, 200, True)])
def test_products_equal_float64_ones(builds, build, dtype, rows, out_features, in_features, bias):
    """Every tile shape and tail (x rows by 8, 4, 2 and 1; weight rows by 4 and one; the inputs past the last
    cache line), with and without bias and scales: float32 sums of exact products."""
    lib = _compiled(builds, dtype, build)
    x, weight, b, scales, exact = _operands(rows, out_features, in_features, dtype, bias)
    y = rows_product(x, weight, b, scales, lib)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    assert (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_products_do_not_depend_on_the_thread_count(builds):
    """Each output is one thread's sum, so one thread or two give the same bits."""
    lib = _compiled(builds, torch.bfloat16)
    x, weight, b, _, _ = _operands(8, 1001, 768, torch.bfloat16, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rows_product(x, weight, b, None, lib)
        torch.set_num_threads(2)
        two = rows_product(x, weight, b, None, lib)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_operands_that_do_not_fit_are_refused(builds):
    lib = _compiled(builds, torch.int8)
    x, weight, b, scales, _ = _operands(2, 16, 32, torch.int8, True)
    with pytest.raises(ValueError, match="do not fit"):
        rows_product(x[:, :31], weight, b, scales, lib)
    with pytest.raises(ValueError, match="do not fit"):
        rows_product(x, weight, b, None, lib)  # int8 needs its scales
    with pytest.raises(ValueError, match="do not fit"):
        rows_product(x, weight, b.float(), scales, lib)


def test_a_build_is_kept_and_loaded_again_without_compiling(fresh, tmp_path, monkeypatch):
    assert library(torch.bfloat16) is not None or pytest.skip("no C compiler or OpenMP here")
    built = list((tmp_path / "cache" / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no partial file left beside it
    library.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert library(torch.bfloat16) is not None


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_there_is_no_native_candidate(fresh, tmp_path, monkeypatch, compiler):
    """No compiler, or one that fails: no candidate, nothing half-written in the cache, and a model loads."""
    monkeypatch.setenv("CC", compiler)
    assert library(torch.bfloat16) is None
    assert not any("native" in k.name for k in kernels_for("bfloat16"))
    assert not any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


def test_kernel_mode_default_builds_nothing(fresh, tmp_path, tiny_dir, monkeypatch):
    """Mode "default" touches no file: it neither builds nor offers the compiled kernel."""
    called = []
    monkeypatch.setattr(gpt2.native, "library", lambda *args: called.append(args))
    model = load_model(tiny_dir, dtype=torch.bfloat16, kernels="default")
    assert not called and not any("native" in decode for decode, _ in model.kernel_choices().values())
    assert not (tmp_path / "cache").exists()
