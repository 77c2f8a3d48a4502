"""Generate text with GPT-2: `python main.py --text "AI is the new electricity" --top_k=40`.

A port of graykode/gpt-2-Pytorch's main.py: same flags, defaults and output layout, with its bugs
fixed. This file only parses arguments, wires the gpt2 package together and prints; samples go to
stdout, everything else to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import os
import random
import sys
from pathlib import Path

LEGACY_WEIGHTS = "gpt2-pytorch_model.bin"  # graykode's file name, looked for in the working directory
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A bad argument found after parsing (it needs the prompt or the model): exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="main.py", description="Generate text with GPT-2 (samples on stdout, logs on stderr).")
    p.add_argument("--text", help="the prompt; without it (and without --unconditional) read from stdin")
    p.add_argument("--quiet", action="store_true", help="print only the samples, no header or separators")
    p.add_argument("--nsamples", type=int, default=1, help="samples to generate (default 1)")
    p.add_argument("--unconditional", action="store_true", help="generate from <|endoftext|>, no prompt")
    p.add_argument("--batch_size", type=int, default=1, help="samples per forward pass; divides --nsamples")
    p.add_argument("--length", type=int, default=None,
                   help="new tokens per sample (default: half the context window, shrunk to fit the prompt)")
    p.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 is greedy (0.7)")
    p.add_argument("--top_k", type=int, default=40, help="sample from the k most likely tokens; 0 = all (40)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off (1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, shown in the header)")
    p.add_argument("--model", default="gpt2",
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or a path to a checkpoint "
                        "file or model directory with the vocabulary beside it (default gpt2)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight precision (default float32)")
    p.add_argument("--offline", action="store_true",
                   help="never download (also on with HF_HUB_OFFLINE=1); fail if the model is missing")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Argument errors that need neither the prompt nor the model."""
    if args.nsamples < 1 or args.batch_size < 1:
        raise UsageError("--nsamples and --batch_size must be at least 1")
    if args.nsamples % args.batch_size:
        raise UsageError(f"--nsamples {args.nsamples} is not a multiple of --batch_size {args.batch_size}")
    if args.length is not None and args.length < 1:
        raise UsageError(f"--length must be at least 1, got {args.length}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be 0 (off) or more, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt text: --text, else stdin when it is not a terminal; None when unconditional."""
    if args.unconditional:
        return None
    text = args.text
    if text is None and not sys.stdin.isatty():
        text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
        text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise UsageError("empty prompt: pass --text \"...\", pipe text on stdin, or use --unconditional")
    return text


def locate_model(spec: str, offline: bool, quiet: bool) -> tuple[Path, Path]:
    """(weights file or model directory, vocabulary directory) for a --model value."""
    from gpt2.config import PRESETS
    from gpt2.download import ensure_model, model_dir
    from gpt2.errors import GPT2Error

    if spec in PRESETS:
        legacy = Path.cwd() / LEGACY_WEIGHTS
        if spec == "gpt2" and legacy.is_file():  # graykode's layout: the weights in the working directory
            vocab = legacy.parent if _has_vocab(legacy.parent) else model_dir("gpt2")
            if not _has_vocab(vocab):
                raise GPT2Error(f"no encoder.json and vocab.bpe beside {legacy}: copy them there or run "
                                "scripts/download_weights.sh gpt2")
            return legacy, vocab
        directory = ensure_model(spec, offline=offline, quiet=quiet)
        return directory, directory
    path = Path(spec).expanduser()
    if not path.exists():
        if os.sep not in spec and not path.suffix:
            raise UsageError(f"unknown model {spec!r}: use one of {', '.join(PRESETS)} or a path")
        raise GPT2Error(f"{path}: no such checkpoint file or directory; check the path")
    vocab = path if path.is_dir() else path.parent
    return path, vocab


def _has_vocab(directory: Path) -> bool:
    return any(all((directory / n).is_file() for n in pair)
               for pair in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")))


def resolve_length(requested: int | None, prompt_tokens: int, n_ctx: int) -> int:
    if prompt_tokens >= n_ctx:
        raise UsageError(f"the prompt is {prompt_tokens} tokens; the model's window is {n_ctx}: shorten it")
    room = n_ctx - prompt_tokens
    if requested is None:
        return min(n_ctx // 2, room)
    if requested > room:
        raise UsageError(f"--length {requested} does not fit: the prompt is {prompt_tokens} tokens and the "
                         f"window {n_ctx}; use --length {room} or less")
    return requested


def pick_device(requested: str | None):
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UsageError(f"unknown --device {requested!r}: use cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is available: use --device cpu")
    return device


def write(stream, text: str) -> None:
    """Write text as UTF-8 whatever the locale, and flush (so a reader sees it at once)."""
    stream.write(text.encode("utf-8"))
    stream.flush()


def run(args: argparse.Namespace) -> int:
    check_args(args)
    prompt = read_prompt(args)
    import torch

    from gpt2.checkpoint import load_model
    from gpt2.download import verify_vocab
    from gpt2.encoder import get_encoder
    from gpt2.sample import generate

    device = pick_device(args.device)
    weights, vocab_dir = locate_model(args.model, args.offline, args.quiet)
    verify_vocab(vocab_dir)
    enc = get_encoder(vocab_dir)
    model = load_model(weights, device=device, dtype=getattr(torch, args.dtype))
    context = enc.encode(prompt) if prompt is not None else [enc.eot_token]
    length = resolve_length(args.length, len(context), model.config.n_ctx)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)

    out = sys.stdout.buffer
    if not args.quiet:
        settings = dict(vars(args), length=length, seed=seed, device=str(device))
        write(out, f"Namespace({', '.join(f'{k}={v!r}' for k, v in settings.items())})\n")
        if prompt is not None:
            write(out, prompt + "\n")
    generated = 0
    for _ in range(args.nsamples // args.batch_size):
        rows: list[list[int]] = [[] for _ in range(args.batch_size)]
        stream = args.batch_size == 1
        if stream and not args.quiet:
            write(out, f"{'=' * 40} SAMPLE {generated + 1} {'=' * 40}\n")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if stream else None
        for step in generate(model, [context] * args.batch_size, length, args.temperature, args.top_k,
                             args.top_p, eot_token=enc.eot_token):
            for row, token in zip(rows, step.tolist()):
                if token != enc.eot_token and (not row or row[-1] != enc.eot_token):
                    row.append(token)
                    if decoder is not None:
                        write(out, decoder.decode(enc.decode_bytes([token])))
            if all(row and row[-1] == enc.eot_token for row in rows):
                break
        for row in rows:
            generated += 1
            if decoder is not None:
                write(out, decoder.decode(b"", final=True) + "\n")
                continue
            if not args.quiet:
                write(out, f"{'=' * 40} SAMPLE {generated} {'=' * 40}\n")
            write(out, enc.decode(row) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from gpt2.errors import GPT2Error

    try:
        return run(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except GPT2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
