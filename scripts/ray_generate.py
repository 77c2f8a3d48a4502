"""Many prompts on many machines: a prompt file through Ray Data, records as `main.py --prompt_file FILE
--format jsonl` writes them.

    pip install -e ".[ray]"
    python scripts/ray_generate.py --prompt_file prompts.txt --output records.jsonl --seed 7 \\
        --nsamples 2 --length 64 --stop $'\\n' --num_actors 4

Each actor loads the model once and runs its share of the prompts through the library's continuous batcher
(gpt2.batching.run_jobs). With a seed every sample draws from its own generator (gpt2.batching.sample_seed),
so the records equal the CLI's on the same file and seed, tokens_per_second aside, whatever the actors,
batches or machines. Without --seed one is drawn and printed on stderr.

Without --address a local Ray instance is started on this machine. For a real cluster, give the head's
address, `--address ray://head:10001` (Ray Client) or `--address auto` on a node of the cluster, or set
RAY_ADDRESS; every node needs this package installed and the model (--model: a preset is downloaded where
it runs, or a path present on every node).

The driver reads the file's non-blank lines with their index (the prompt_index, counted as the CLI counts
it: read_text gives no line numbers) into `ray.data.from_items`, so the prompts themselves, not the model's
work, pass through one process. The records come back through a distributed sort by (prompt_index,
sample_index) and are written by the driver, in order, to one JSONL file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator, Sequence

import ray
import ray.data

from gpt2.batching import Prompt, encode_prompt, record, run_jobs
from gpt2.cli import DTYPES, add_sampling_flags, argv_text, parse_args, pick_device
from gpt2.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt_file", required=True, metavar="FILE", help="one prompt per line (blank lines skipped)")
    p.add_argument("--output", required=True, metavar="FILE", help="the JSONL records, in input order")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--num_actors", "--concurrency", type=int, default=1, help="model copies (actors), each "
                                                                              "on its own share of prompts (1)")
    p.add_argument("--prompts_per_call", type=int, default=256, help="prompts handed to an actor at a time (256)")
    p.add_argument("--nsamples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--batch_size", type=int, default=1, help="rows of each actor's continuous batcher (1)")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: drawn, printed on stderr)")
    p.add_argument("--model", default="gpt2", help="a preset or a checkpoint path, as main.py's --model")
    p.add_argument("--device", default=None, help="torch device of each actor: cpu, cuda (default: cuda if any)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight precision (default float32)")
    p.add_argument("--offline", action="store_true", help="never download the model")
    return p


def read_prompts(path: str) -> list[dict]:
    """The file's prompts as rows {prompt_index, prompt}, read and counted as the CLI reads them
    (gpt2.promptfile): invalid UTF-8 replaced, blank lines skipped and not counted."""
    try:
        with open(path, "rb") as f:
            lines = (line.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r") for line in f)
            texts = [text for text in lines if text.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read --prompt_file {path}: {exc.strerror or exc}") from exc
    if not texts:
        raise UsageError(f"no prompts in {path}: give one prompt per line")
    return [{"prompt_index": index, "prompt": text} for index, text in enumerate(texts)]


class Generator:
    """A Ray Data actor: the model, loaded once, and a batch of prompts' records as JSON lines."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from gpt2.checkpoint import load_model
        from gpt2.download import verify_vocab
        from gpt2.encoder import get_encoder
        from gpt2.locate import locate_model

        self.args = args
        weights, vocab_dir = locate_model(args.model, args.offline, quiet=True)
        verify_vocab(vocab_dir)
        self.enc = get_encoder(vocab_dir)
        int8 = args.dtype == "int8"
        dtype = torch.bfloat16 if int8 else getattr(torch, args.dtype)
        self.model = load_model(weights, device=pick_device(args.device), dtype=dtype, int8=int8)

    def __call__(self, batch: dict) -> dict:
        from gpt2.scheduler import ContinuousBatcher

        args, rows = self.args, {"prompt_index": [], "sample_index": [], "record": []}
        with ContinuousBatcher(self.model, args.batch_size, args.temperature, args.top_k, args.top_p,
                               self.enc.eot_token) as batcher:
            prompts = self._prompts(batch["prompt_index"], batch["prompt"])
            for job in run_jobs(batcher, prompts, args.nsamples, self.enc, args.stop, args.seed):
                rows["prompt_index"].append(job.prompt.index)
                rows["sample_index"].append(job.sample_index)
                rows["record"].append(json.dumps(record(job, args.seed), ensure_ascii=False))
        return rows

    def _prompts(self, indices: Sequence[int], texts: Sequence[str]) -> Iterator[Prompt]:
        """The batch's prompts, encoded as they are needed."""
        for index, text in zip(indices, texts):
            try:
                yield encode_prompt(int(index), str(text), self.enc, self.model.config.n_ctx, self.args.length)
            except UsageError as exc:
                raise UsageError(f"prompt {int(index) + 1}: {exc}") from None


def check_args(args: argparse.Namespace) -> None:
    for flag in ("nsamples", "batch_size", "num_actors", "prompts_per_call"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")
    if any(not stop for stop in args.stop):
        raise UsageError("--stop needs a non-empty string")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")


def generate(args: argparse.Namespace) -> int:
    """Every record of args.prompt_file written to args.output in (prompt_index, sample_index) order;
    returns how many. Uses the Ray instance already initialised, else connects to (or starts) one."""
    prompts = read_prompts(args.prompt_file)
    if not ray.is_initialized():
        ray.init(address=args.address)
    rows = ray.data.from_items(prompts)
    records = rows.map_batches(Generator, fn_constructor_args=(args,), batch_size=args.prompts_per_call,
                               concurrency=args.num_actors)
    count = 0
    with open(args.output, "w", encoding="utf-8") as out:
        for row in records.sort(["prompt_index", "sample_index"]).iter_rows():
            out.write(row["record"] + "\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        check_args(args)
        args.stop = [argv_text(stop) for stop in args.stop]
        if args.seed is None:
            args.seed = random.SystemRandom().randrange(2**31)
            print(f"seed: {args.seed}", file=sys.stderr)
        count = generate(args)
    except UsageError as exc:
        print(f"ray_generate.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} records written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
