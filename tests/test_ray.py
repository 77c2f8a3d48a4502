"""scripts/ray_generate.py on a local Ray instance: the same records as the CLI on the same file and seed."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO, ok, records

ray = pytest.importorskip("ray")

PROMPTS = ["Hello there", "", "The quick brown fox", "Once upon a time", "  ", "A", "Ray runs many machines"]
FLAGS = ["--seed", "7", "--nsamples", "2", "--length", "8", "--batch_size", "3", "--stop", "e"]


@pytest.fixture(scope="module")
def ray_generate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The script as a module, with a local Ray instance whose workers import it and gpt2 from this tree."""
    spec = importlib.util.spec_from_file_location("ray_generate", REPO / "scripts" / "ray_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "scripts")]), "HF_HUB_OFFLINE": "1",
           "GPT2_PYTORCH_KERNELS": "default", "GPT2_PYTORCH_CACHE": str(tmp_path_factory.mktemp("ray-cache"))}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        yield module
    finally:
        ray.shutdown()


def test_records_equal_the_cli(ray_generate: ModuleType, run_cli, tiny_1024_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    output = tmp_path / "records.jsonl"
    argv = ["--prompt_file", str(prompts), "--output", str(output), "--model", str(tiny_1024_dir),
            "--device", "cpu", "--num_actors", "2", "--prompts_per_call", "2", *FLAGS]
    assert ray_generate.main(argv) == 0
    ours = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    cli = records(ok(run_cli("--prompt_file", prompts, "--format", "jsonl", "--model", tiny_1024_dir,
                             "--device", "cpu", *FLAGS)))
    assert len(cli) == 10
    for record in ours + cli:
        record.pop("tokens_per_second")
    assert ours == cli
