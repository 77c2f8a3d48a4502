"""No surprises: importing gpt2 and generating on CPU change nothing in the process but the generator drawn from.

One fresh interpreter (tests/side_effects_probe.py, run with `python -c` from the repository root so that
it imports this checkout's gpt2, as `python main.py` does) records, from before anything but the standard library is
imported: the environment, torch's process-wide settings (thread counts, default dtype, grad mode, ...), the
global random generators (torch's, Python's, numpy's), and every C library function looked up or called through
ctypes (the way a Python library reaches glibc's mallopt or malloc_trim). It imports every gpt2 module, loads
the tiny checkpoint, then runs a CPU generate(generator=g) and a sample_sequence(generator=g) for the first
time in the process (the sampler's once-per-process self-check included). Each test here reads one part of
its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LEGACY_WEIGHTS, REPO, TIMEOUT

PROBE = Path(__file__).resolve().parent / "side_effects_probe.py"
MODULES = ["gpt2", "gpt2.cli", "gpt2.model", "gpt2.kernels", "gpt2.sample", "gpt2.checkpoint", "gpt2.quantize",
           "gpt2.download", "gpt2.encoder", "gpt2.batching", "gpt2.locate"]


@pytest.fixture(scope="module")
def report(tiny_1024_dir: Path, cli_env: dict[str, str]) -> dict:
    env = {k: v for k, v in cli_env.items() if not k.startswith(("OMP_", "MKL_"))}  # torch's own thread count
    proc = subprocess.run([sys.executable, "-c", PROBE.read_text(), str(tiny_1024_dir / LEGACY_WEIGHTS), *MODULES],
                          stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=REPO, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    return json.loads(proc.stdout)


def test_importing_every_gpt2_module_changes_no_environment_variable(report: dict) -> None:
    assert report["imported"] == MODULES
    assert report["env_after_import"] == report["env_before"]


def test_importing_changes_no_torch_setting_or_random_state(report: dict) -> None:
    assert report["torch_after_import"] == report["torch_before"]
    assert report["rng_after_import"] == report["rng_before"]


def test_generate_with_a_generator_changes_no_setting_environment_or_global_random_state(report: dict) -> None:
    assert report["tokens"] and all(len(row) == 6 for row in report["tokens"])
    assert report["env_after_generate"] == report["env_before"]
    assert report["torch_after_generate"] == report["torch_before"]  # torch.get_num_threads() among them
    assert report["rng_after_generate"] == report["rng_before_generate"]  # torch's, Python's, numpy's


def test_no_allocator_setting_is_changed(report: dict) -> None:
    """glibc's malloc parameters change only through mallopt() (or MALLOC_* variables, which only a new
    process reads: see the environment tests). Nothing looks mallopt up, at import, load or generation; and a
    generation calls no C allocator function at all (load may hand freed memory back with malloc_trim)."""
    assert "mallopt" not in report["libc_looked_up"], report["libc_looked_up"]
    assert report["libc_calls_during_generate"] == []
