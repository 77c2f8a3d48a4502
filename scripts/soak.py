"""Long-run memory check: many prompts generated to the full context window in one process.

Builds a random-initialised GPT-2 (124M by default, or a smaller shape for a quick look), then runs
--prompts prompts, each filled to the full window (prompt + new tokens = n_ctx), through the library's
generation loop, and prints the process's RSS after each. The criterion: the peak RSS grows at most 2%
after the first prompt (the KV caches are allocated once and reused, and a prompt's transient buffers
are those of one 512-row chunk). The exit status is 1 when it grows more.

    python scripts/soak.py                 # 100 prompts, 124M, 993-1000-token prompts + 24-31 new tokens
    python scripts/soak.py --prompts 10 --n-layer 2
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time

MAX_GROWTH = 0.02  # of the peak after the first prompt


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens generated after each prompt")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    from gpt2.checkpoint import load_model
    from gpt2.sample import generate

    with tempfile.TemporaryDirectory() as tmp:
        # The random checkpoint is written by a child process, so that this one's peak RSS is ours alone.
        subprocess.run([sys.executable, "-c", "import sys, torch, transformers as t; torch.manual_seed(0); "
                        "t.GPT2LMHeadModel(t.GPT2Config(n_layer=int(sys.argv[2]))).save_pretrained(sys.argv[1])",
                        tmp, str(args.n_layer)], check=True, capture_output=True)
        model = load_model(tmp)
    n_ctx = model.config.n_ctx
    rng = random.Random(0)
    first_peak = None
    print(f"after load: rss {rss_mib():.0f} MiB, peak {peak_rss_mib():.0f} MiB", flush=True)
    start = time.perf_counter()
    for i in range(args.prompts):
        # The first prompt is the longest, so that its peak is the one to hold; the others vary a little below.
        prompt_len = n_ctx - args.new_tokens - (rng.randrange(0, 8) if i else 0)
        prompts = [[rng.randrange(50256) for _ in range(prompt_len)] for _ in range(args.batch_size)]
        steps = sum(1 for _ in generate(model, prompts, n_ctx - prompt_len, 0.7, 40))
        if first_peak is None:
            first_peak = peak_rss_mib()
        print(f"prompt {i + 1}: {prompt_len}+{steps} tokens, rss {rss_mib():.0f} MiB, peak {peak_rss_mib():.1f} MiB",
              flush=True)
    growth = peak_rss_mib() - first_peak
    print(f"{args.prompts} prompts in {time.perf_counter() - start:.0f} s; peak RSS after the first prompt "
          f"{first_peak:.0f} MiB, at the end {peak_rss_mib():.0f} MiB (growth {growth:.1f} MiB, "
          f"{100 * growth / first_peak:.2f}%; at most {100 * MAX_GROWTH:.0f}% passes)")
    return 0 if growth <= MAX_GROWTH * first_peak else 1


if __name__ == "__main__":
    sys.exit(main())
