"""Run by test_side_effects.py in a fresh interpreter (`python -c`, from the repository root):

    python -c "$(cat tests/side_effects_probe.py)" CHECKPOINT MODULE...

Prints one JSON report of what importing MODULE... and a first CPU generation on CHECKPOINT changed."""

import ctypes
import importlib
import json
import os
import random
import sys

ENV_BEFORE = dict(os.environ)

# Every C function looked up through ctypes (CDLL.__getattr__ goes through __getitem__), and the calls of the
# allocator's: a Python library can change glibc's malloc parameters only through mallopt.
WATCHED = {"mallopt", "malloc_trim"}
LOOKED_UP: list[str] = []
CALLS: list[str] = []


class Recorded:
    """A ctypes function that records its calls; attributes (argtypes, restype) go to the function itself."""

    def __init__(self, name: str, func) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_func", func)

    def __call__(self, *args):
        CALLS.append(self._name)
        return self._func(*args)

    def __getattr__(self, key: str):
        return getattr(self._func, key)

    def __setattr__(self, key: str, value) -> None:
        setattr(self._func, key, value)


_real_getitem = ctypes.CDLL.__getitem__


def _getitem(self, name_or_ordinal):
    func = _real_getitem(self, name_or_ordinal)
    LOOKED_UP.append(str(name_or_ordinal))
    return Recorded(name_or_ordinal, func) if name_or_ordinal in WATCHED else func


ctypes.CDLL.__getitem__ = _getitem

import numpy  # noqa: E402  (after the hook and the environment snapshot)
import torch  # noqa: E402


def torch_settings() -> dict:
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "default_dtype": str(torch.get_default_dtype()),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "default_device": str(torch.get_default_device()),
    }


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state().tolist(),
        "python": repr(random.getstate()),
        "numpy": repr(numpy.random.get_state()),
    }


def main() -> None:
    checkpoint, modules = sys.argv[1], sys.argv[2:]
    report = {"env_before": ENV_BEFORE, "torch_before": torch_settings(), "rng_before": rng_state()}
    report["imported"] = [importlib.import_module(name).__name__ for name in modules]
    report.update(env_after_import=dict(os.environ), torch_after_import=torch_settings(),
                  rng_after_import=rng_state())

    from gpt2.checkpoint import load_model
    from gpt2.sample import generate, sample_sequence

    model = load_model(checkpoint, device="cpu")
    report["rng_before_generate"] = rng_state()
    calls = len(CALLS)
    g = torch.Generator().manual_seed(3)
    steps = list(generate(model, [[464, 3290, 318], [40]], 6, temperature=0.8, top_k=40, eot_token=None,
                          generator=g))
    rows = torch.stack(steps, dim=1).tolist()
    rows += sample_sequence(model, 6, context=[464, 3290], batch_size=1, temperature=0.8, top_k=0, top_p=0.9,
                            generator=g)[:, 2:].tolist()
    report.update(tokens=rows, libc_calls_during_generate=CALLS[calls:], env_after_generate=dict(os.environ),
                  torch_after_generate=torch_settings(), rng_after_generate=rng_state(),
                  libc_looked_up=sorted(set(LOOKED_UP)))
    print(json.dumps(report))


main()
