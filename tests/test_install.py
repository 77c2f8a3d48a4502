"""The package installs: a fresh virtual environment (system site packages visible, so torch and the other
dependencies are not downloaded again) gets gpt2-pytorch from a copy of this checkout, offline, and its
`gpt2-generate` command runs.

pip comes from the system site packages too (the venv is made --without-pip: no ensurepip, seconds saved);
`--no-build-isolation --no-index --no-deps` builds with the setuptools already installed and never touches the
network. The copy keeps the build's egg-info and build/ out of the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from conftest import REPO, TIMEOUT, ok

import gpt2
import gpt2.native


def _run(*command: str | Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], stdin=subprocess.DEVNULL, capture_output=True, env=env,
                          cwd=cwd, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """(the venv's bin directory, an environment that finds nothing of this checkout but the installed copy)"""
    root = tmp_path_factory.mktemp("install")
    source, env_dir = root / "source", root / "venv"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "gpt2", source / "gpt2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    except Exception as exc:  # no venv module, no permission, ...
        pytest.skip(f"cannot create a virtual environment here: {exc}")
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in cli_env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_NO_INPUT"] = "1"
    for tool in ("pip", "setuptools"):  # to install offline, without build isolation
        probe = _run(python, "-c", f"import {tool}", env=env, cwd=root)
        if probe.returncode != 0:
            pytest.skip(f"no {tool} in the system site packages, so nothing can be installed into a virtual "
                        f"environment offline: {probe.stderr.decode('utf-8', 'replace').strip()[-200:]}")
    proc = _run(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                source, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    return env_dir / "bin", env


def test_installed_package_is_the_copy_in_the_venv(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    proc = _run(bin_dir / "python", "-c", "import gpt2; print(gpt2.__file__)", env=env, cwd=tmp_path)
    where = Path(ok(proc).decode().strip())
    assert where.is_relative_to(bin_dir.parent), where  # not this checkout, not an editable install elsewhere


def test_installed_package_has_the_kernel_source(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    proc = _run(bin_dir / "python", "-c", "import gpt2.native as n; print(n.SOURCE.read_bytes() == "
                f"open({str(gpt2.native.SOURCE)!r}, 'rb').read())", env=env, cwd=tmp_path)
    assert ok(proc) == b"True\n"


def test_gpt2_generate_version(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    proc = _run(bin_dir / "gpt2-generate", "--version", env=env, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr.decode("utf-8", "replace")
    assert proc.stdout == f"gpt2-generate {gpt2.__version__}\n".encode()


def test_gpt2_generate_prints_what_main_py_prints(installed: tuple[Path, dict[str, str]], tiny_dir: Path,
                                                  run_cli, tmp_path: Path) -> None:
    bin_dir, env = installed
    args = ("--model", str(tiny_dir), "--text", "Hello there", "--length", "3", "--seed", "1", "--quiet")
    proc = _run(bin_dir / "gpt2-generate", *args, env=env, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr.decode("utf-8", "replace")
    assert proc.stdout == ok(run_cli(*args))
