"""The same acceptance checks on a CUDA GPU (skipped where there is none, as on CI).

float32 logits within 1e-4 of transformers on the same GPU (TF32 off, as torch defaults), seeded samples
token-identical to transformers' generate() there, the half-precision dtypes within their documented
tolerance of float32, int8, and the CLI with --device cuda.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, random_hf_model
from test_dtypes import TOLERANCE

from gpt2.checkpoint import load_model
from gpt2.encoder import get_encoder
from gpt2.sample import generate, sample_sequence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

CUDA = torch.device("cuda")
EOT = 50256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random transformers GPT-2 over the real vocabulary, saved once; transformers' copy on the GPU."""
    hf = random_hf_model(11, n_layer=3, n_embd=128, n_head=4, vocab_size=50257, n_positions=1024)
    directory = tmp_path_factory.mktemp("cuda_model")
    hf.save_pretrained(directory)
    return directory, hf.to(CUDA)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(5)).to(CUDA)


def test_float32_logits_match_transformers_with_and_without_the_cache(checkpoint, ids):
    directory, hf = checkpoint
    model = load_model(directory, device=CUDA)
    assert model.transformer.wte.weight.is_cuda
    with torch.inference_mode():
        ref = hf(ids).logits
        assert (model(ids) - ref).abs().max().item() < 1e-4
        model.setup_caches(ids.size(0), ids.size(1))
        try:
            steps = [model(ids[:, :32], 0)]
            steps += [model(ids[:, t:t + 1], t) for t in range(32, ids.size(1))]
        finally:
            model.clear_caches()
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("batch, eot", [(1, None), (3, EOT)])
def test_seeded_samples_match_transformers_generate(checkpoint, batch, eot):
    directory, hf = checkpoint
    model = load_model(directory, device=CUDA)
    context = list(range(300, 310))
    torch.manual_seed(99)
    mine = sample_sequence(model, 128, context=context, batch_size=batch, temperature=0.7, top_k=40,
                           eot_token=eot)
    prompt = torch.tensor([context] * batch, device=CUDA)
    torch.manual_seed(99)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=40,
                         temperature=0.7, max_new_tokens=128, pad_token_id=EOT, eos_token_id=EOT)
    assert mine.is_cuda and len(set(mine[:, 10:].flatten().tolist())) > 20
    assert torch.equal(mine, theirs)


def test_cuda_graph_steps_sample_what_eager_steps_sample(checkpoint):
    """Mixed-length prompts (padding masks, clamped positions), then another batch size (a new capture),
    then the first batch again: the graph path and the eager path draw the same tokens."""
    from gpt2 import cuda_graph

    directory, _ = checkpoint
    model = load_model(directory, device=CUDA)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    for batch in (prompts, prompts[:1], prompts):
        runs = []
        for graph in (True, False):
            torch.manual_seed(4)
            runs.append(torch.stack(list(generate(model, batch, 48, 0.7, 40, cuda_graph=graph))))
        assert torch.equal(runs[0], runs[1])
        assert cuda_graph._captured[model].token.size(0) == len(batch)
    model.clear_caches(release=True)  # new, longer caches, possibly where the released ones were
    runs = []
    for graph in (True, False):
        torch.manual_seed(5)
        runs.append(torch.stack(list(generate(model, prompts, 200, 0.7, 40, cuda_graph=graph))))
    assert torch.equal(runs[0], runs[1])
    with torch.inference_mode():
        model.setup_caches(3, 60)
        try:
            ids = torch.randint(0, 50257, (3, 20), device=CUDA)
            eager = model(ids)[:, -1]
            model(ids[:, :-1])
            graph = cuda_graph.decode_graph(model, 3)
            replayed = graph(ids[:, -1], 19, None, None)
        finally:
            model.clear_caches()
    assert (replayed - eager).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_within_the_documented_tolerance(checkpoint, ids, dtype):
    directory, _ = checkpoint
    with torch.inference_mode():
        exact = load_model(directory, device=CUDA)(ids)
        reduced = load_model(directory, device=CUDA, dtype=dtype)(ids).float()
    error = (reduced - exact).abs().max().item()
    assert 0 < error <= TOLERANCE["bfloat16"] * exact.abs().max().item()


def test_int8_on_the_gpu(checkpoint, ids):
    directory, _ = checkpoint
    model = load_model(directory, device=CUDA, dtype=torch.bfloat16, int8=True)
    assert model.lm_head.weight.dtype == torch.int8 and model.lm_head.weight.is_cuda
    with torch.inference_mode():
        exact = load_model(directory, device=CUDA)(ids)
        error = (model(ids).float() - exact).abs().max().item()
    assert 0 < error <= TOLERANCE["int8"] * exact.abs().max().item()
    steps = list(generate(model, [[464, 3290], [40]], 5, temperature=0))
    assert len(steps) == 5 and all(step.shape == (2,) and step.is_cuda for step in steps)


def test_cli_on_the_gpu_prints_what_the_library_generates(checkpoint, vocab_dir, tmp_path):
    directory, _ = checkpoint
    for name in ("encoder.json", "vocab.bpe"):
        (directory / name).write_bytes((vocab_dir / name).read_bytes())
    enc = get_encoder(directory)
    command = [sys.executable, str(REPO / "main.py"), "--model", str(directory), "--device", "cuda",
               "--text", "Hello there", "--seed", "3", "--length", "24", "--quiet"]
    done = subprocess.run(command, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    model = load_model(directory, device=CUDA)
    context = enc.encode("Hello there")
    torch.manual_seed(3)
    out = sample_sequence(model, 24, context=context, temperature=0.7, top_k=40, eot_token=EOT)
    row = out[0, len(context):].tolist()
    row = row[:row.index(EOT)] if EOT in row else row
    assert done.stdout.decode() == enc.decode(row) + "\n"
