"""The command line: `gpt2-generate`, `python -m gpt2` and graykode's `python main.py`.

A port of graykode/gpt-2-Pytorch's main.py: same flags, defaults and output layout, with its bugs
fixed. Samples go to stdout, everything else to stderr; a bad argument exits 2, any other problem the
user can fix exits 1, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from gpt2 import __version__
from gpt2.batching import Job, Prompt, check_memory, encode_prompt, iter_batches, record
from gpt2.errors import GPT2Error, UsageError
from gpt2.promptfile import PromptLines

DTYPES = ("float32", "bfloat16", "float16", "int8")
SEPARATOR = "=" * 40
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag_value(value: str) -> bool:
    """graykode's `--quiet True` / `--quiet False` (its flag was type=bool): parsed as meant."""
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _shard(value: str) -> tuple[int, int]:
    """--shard K/N: this run's share, K of N (0 <= K < N)."""
    k, slash, n = value.partition("/")
    try:
        shard = int(k), int(n)
    except ValueError:
        shard = None
    if not slash or shard is None or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N (this run's share K of N), got {value!r}")
    return shard


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--length, --temperature, --top_k, --top_p and --stop: graykode's defaults, shared with
    scripts/ray_generate.py."""
    p.add_argument("--length", type=int, default=None,
                   help="new tokens per sample (default: half the context window, shrunk to fit the prompt)")
    p.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 is greedy (0.7)")
    p.add_argument("--top_k", type=int, default=40, help="sample from the k most likely tokens; 0 = all (40)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off (1.0)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a sample at this string, which is not printed (repeatable)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Generate text with GPT-2 (samples on stdout, logs on stderr).")
    p.add_argument("--text", help="the prompt; without it (and without --prompt_file) read from stdin, or asked "
                                  "for interactively when stdin is a terminal")
    p.add_argument("--prompt_file", metavar="FILE",
                   help="one prompt per line (blank lines skipped), read as they come; - reads them from stdin")
    p.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="with --prompt_file: only the prompts whose index is K modulo N (records keep their "
                        "prompt_index), to split a file across runs")
    p.add_argument("--quiet", nargs="?", const=True, default=False, type=_flag_value, metavar="True|False",
                   help="print only the samples, no header or separators (graykode's --quiet True works too)")
    p.add_argument("--nsamples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--unconditional", action="store_true", help="generate from <|endoftext|>, no prompt")
    p.add_argument("--batch_size", type=int, default=1, help="samples per forward pass; divides --nsamples (1)")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, shown in the header)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="text (graykode's layout) or jsonl: one JSON object per sample (default text)")
    p.add_argument("--model", default="gpt2",
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or a path to a checkpoint "
                        "file or model directory with the vocabulary beside it (default gpt2)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weight precision (default float32); on CPU 16-bit weights decode with float32 "
                        "activations (a bfloat16 prompt computes in bfloat16 where the CPU has it natively); "
                        "int8: int8 weights, activations in bfloat16 or, where that keeps int8's bound, quantized")
    p.add_argument("--offline", action="store_true",
                   help="never download (also on with HF_HUB_OFFLINE=1); fail if the model is missing")
    p.add_argument("--stats", action="store_true", help="print load time, time to first token and tokens/s "
                                                        "to stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Argument errors that need neither the prompt nor the model."""
    if args.nsamples < 1 or args.batch_size < 1:
        raise UsageError("--nsamples and --batch_size must be at least 1")
    if args.nsamples % args.batch_size and args.prompt_file is None:  # a prompt file's batches mix prompts
        raise UsageError(f"--nsamples {args.nsamples} is not a multiple of --batch_size {args.batch_size}")
    if args.length is not None and args.length < 1:
        raise UsageError(f"--length must be at least 1, got {args.length}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be 0 (off) or more, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.prompt_file is not None and (args.text is not None or args.unconditional):
        raise UsageError("--prompt_file cannot be combined with --text or --unconditional: pick one")
    if args.shard is not None and args.prompt_file is None:
        raise UsageError("--shard needs --prompt_file: it splits a file of prompts across runs")
    if any(not s for s in args.stop):
        raise UsageError("--stop needs a non-empty string")


def _decode_input(data: bytes) -> str:
    """Prompt bytes as text; invalid UTF-8 becomes U+FFFD rather than an error."""
    return data.decode("utf-8", errors="replace")


def argv_text(value: str) -> str:
    """Command-line text as valid Unicode: bytes that were not UTF-8 (surrogate escapes) become U+FFFD."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that no byte string produced (only from Python callers)
        return value.encode("utf-8", "replace").decode("utf-8")


def open_prompt_file(args: argparse.Namespace) -> PromptLines:
    """--prompt_file's prompts, read from now on as they come (gpt2.promptfile)."""
    if args.prompt_file == "-":
        return PromptLines(sys.stdin.buffer, "-", args.shard or (0, 1))
    try:
        stream = open(args.prompt_file, "rb")  # noqa: SIM115 (the reader thread closes it)
    except OSError as exc:
        raise UsageError(f"cannot read --prompt_file {args.prompt_file}: {exc.strerror}") from exc
    return PromptLines(stream, args.prompt_file, args.shard or (0, 1), owned=True)


def read_prompts(args: argparse.Namespace) -> list[str | None] | None:
    """The prompt of a --text, stdin or unconditional run; [None] when unconditional; None means interactive."""
    if args.unconditional:
        return [None]
    text = None if args.text is None else argv_text(args.text)
    if text is None:
        if sys.stdin.isatty():
            return None
        text = _decode_input(sys.stdin.buffer.read()).removesuffix("\n").removesuffix("\r")
    if not text:
        raise UsageError("empty prompt: pass --text \"...\", pipe text on stdin, or use --unconditional")
    return [text]


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
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {requested!r} is not supported: use cpu or cuda")
    return device


class Output:
    """Everything written to stdout: graykode's text layout, or one JSON object per sample."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.args, self.seed = args, seed
        self.stream = sys.stdout.buffer
        self.jsonl = args.format == "jsonl"
        self.layout = not args.quiet and not self.jsonl
        self._header = ""  # a header held back until the first sample is written

    def write(self, text: str) -> None:
        # UTF-8 whatever the locale, flushed so that a reader sees every token as it comes.
        self.stream.write((self._header + text).encode("utf-8"))
        self.stream.flush()
        self._header = ""

    def header(self, settings: dict, lazy: bool = False) -> None:
        """The settings line; `lazy` holds it back until the first sample (none if a run fails first)."""
        if self.layout:
            line = f"Namespace({', '.join(f'{k}={v!r}' for k, v in settings.items() if k != 'shard' or v)})\n"
            if lazy:
                self._header = line
            else:
                self.write(line)

    def sample_start(self, job: Job) -> None:
        if not self.layout:
            return
        if job.sample_index == 0 and job.prompt.text is not None:
            self.write(job.prompt.text + "\n")
        self.write(f"{SEPARATOR} SAMPLE {job.sample_index + 1} {SEPARATOR}\n")

    def sample_text(self, text: str) -> None:
        if not self.jsonl and text:
            self.write(text)

    def sample_end(self, job: Job) -> None:
        if not self.jsonl:
            self.write("\n")
            return
        self.write(json.dumps(record(job, self.seed), ensure_ascii=False) + "\n")


class Stats:
    """--stats: load time, time to first token and decode tokens/s, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.loaded_at = self.t0
        self.first: float | None = None
        self.tokens = 0

    def loaded(self, model) -> None:  # noqa: ANN001 -- a GPT2LMHeadModel, imported with torch later
        self.loaded_at = time.perf_counter()
        if self.enabled:
            print(f"stats: model loaded in {self.loaded_at - self.t0:.2f} s", file=sys.stderr)
            from gpt2.tuning import describe

            kernels = describe(model.kernel_choices())
            if kernels:
                print(f"stats: kernels (decode / prefill): {kernels}", file=sys.stderr)

    def token(self, count: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.tokens += count

    def report(self) -> None:
        if not self.enabled or self.first is None:
            return
        elapsed = time.perf_counter() - self.first
        rate = f"{(self.tokens - 1) / elapsed:.1f} tokens/s" if elapsed > 0 and self.tokens > 1 else "n/a"
        print(f"stats: first token after {self.first - self.loaded_at:.3f} s, {self.tokens} tokens, {rate}",
              file=sys.stderr)


def generate_batch(model, enc, jobs: list[Job], args: argparse.Namespace, out: Output, stats: Stats) -> None:
    """Generate one batch of jobs; with one job, its text is written as it is generated."""
    from gpt2.sample import generate
    from gpt2.textstream import SampleText

    streaming = len(jobs) == 1 and not out.jsonl
    start = time.perf_counter()
    for job in jobs:
        job.text, job.started = SampleText(enc, args.stop), start
    if streaming:
        out.sample_start(jobs[0])
    length = max(job.prompt.length for job in jobs)
    steps = generate(model, [job.prompt.context for job in jobs], [job.prompt.length for job in jobs],
                     args.temperature, args.top_k, args.top_p, eot_token=enc.eot_token)
    progress = None
    # A bar for people watching a terminal, but not over text streaming to that same terminal.
    if not args.quiet and sys.stderr.isatty() and not (streaming and sys.stdout.isatty()):
        from tqdm import tqdm

        progress = tqdm(total=length, unit="tok", leave=False, file=sys.stderr)
    for step, tokens in enumerate(steps):
        stats.token(len(jobs))
        if progress is not None:
            progress.update()
        for job, token in zip(jobs, tokens.tolist()):
            if job.text.done:
                continue
            piece = job.text.push(token)
            if not job.text.done and step + 1 == job.prompt.length:
                piece += job.text.finish("length")
            if job.text.done:
                job.finished = time.perf_counter()
            if streaming:
                out.sample_text(piece)
        if all(job.text.done for job in jobs):
            steps.close()
            break
    if progress is not None:
        progress.close()
    for job in jobs:
        if not streaming:
            out.sample_start(job)
            out.sample_text(job.text.text)
        out.sample_end(job)


def _check_memory(model, prompts: list[Prompt], rows: int) -> None:
    slots = max(len(p.context) for p in prompts) + max(p.length for p in prompts)
    check_memory(model, rows, slots)


def run_prompt_file(model, enc, lines: PromptLines, args: argparse.Namespace, out: Output, stats: Stats,
                    settings: dict) -> int:
    """Every sample of every prompt of the file, continuously batched (gpt2.batching.run_jobs); each written
    as soon as it and every earlier one are done. At --batch_size 1 the text layout streams as it comes."""
    from gpt2.batching import run_jobs
    from gpt2.scheduler import ContinuousBatcher

    def prompts():
        for index, text in lines:
            try:
                yield encode_prompt(index, text, enc, model.config.n_ctx, args.length)
            except UsageError as exc:
                raise UsageError(f"prompt {index + 1}: {exc}") from None

    streaming = args.batch_size == 1 and not out.jsonl
    shown: list[Job] = []  # the job whose text is streaming

    def on_token(job: Job, piece: str) -> None:
        stats.token(1)
        if streaming:
            if not shown or shown[-1] is not job:
                shown[:] = [job]
                out.sample_start(job)
            out.sample_text(piece)

    progress = None
    if not args.quiet and sys.stderr.isatty() and not (streaming and sys.stdout.isatty()):
        from tqdm import tqdm

        progress = tqdm(unit="sample", leave=False, file=sys.stderr)
    out.header(settings, lazy=True)
    with ContinuousBatcher(model, args.batch_size, args.temperature, args.top_k, args.top_p,
                           enc.eot_token) as batcher:
        for job in run_jobs(batcher, prompts(), args.nsamples, enc, args.stop, out.seed, lines.ready, on_token):
            if not streaming:
                out.sample_start(job)
                out.sample_text(job.text.text)
            out.sample_end(job)
            if progress is not None:
                progress.update()
    if progress is not None:
        progress.close()
    stats.report()
    return 0


def run(args: argparse.Namespace, prog: str) -> int:
    check_args(args)
    lines = open_prompt_file(args) if args.prompt_file is not None else None
    try:
        return _run(args, prog, lines)
    finally:
        if lines is not None:
            lines.close()


def _run(args: argparse.Namespace, prog: str, lines: PromptLines | None) -> int:
    texts = read_prompts(args) if lines is None else []
    import torch

    from gpt2.checkpoint import load_model
    from gpt2.download import verify_vocab
    from gpt2.encoder import get_encoder
    from gpt2.locate import locate_model

    stats = Stats(args.stats)
    device = pick_device(args.device)
    weights, vocab_dir = locate_model(args.model, args.offline, args.quiet)
    verify_vocab(vocab_dir)
    enc = get_encoder(vocab_dir)
    args.stop = [argv_text(stop) for stop in args.stop]
    int8 = args.dtype == "int8"
    model = load_model(weights, device=device, dtype=torch.bfloat16 if int8 else getattr(torch, args.dtype), int8=int8)
    if model.config.vocab_size < len(enc.encoder):
        raise GPT2Error(f"{weights}: the model has {model.config.vocab_size} token embeddings but the vocabulary "
                        f"{len(enc.encoder)} tokens: use the vocabulary files that belong to this checkpoint")
    stats.loaded(model)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    out = Output(args, seed)
    if lines is not None:  # each sample draws from its own generator (gpt2.batching.sample_seed)
        settings = dict(vars(args), seed=seed, device=str(device))  # length: as given, None for the default
        return run_prompt_file(model, enc, lines, args, out, stats, settings)
    torch.manual_seed(seed)

    if texts is None:  # interactive, as openai/gpt-2's interactive_conditional_samples.py
        out.header(dict(vars(args), seed=seed, device=str(device)))
        while True:
            try:
                text = input("Model prompt >>> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not text.strip():
                print("Prompt should not be empty!", file=sys.stderr)
                continue
            try:
                prompts = [encode_prompt(0, text, enc, model.config.n_ctx, args.length)]
                _check_memory(model, prompts, min(args.batch_size, args.nsamples))
            except UsageError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                continue
            for batch in iter_batches(prompts, args.nsamples, args.batch_size):
                generate_batch(model, enc, batch, args, out, stats)
            stats.report()

    prompts = [encode_prompt(0, texts[0], enc, model.config.n_ctx, args.length)]
    _check_memory(model, prompts, min(args.batch_size, args.nsamples))
    out.header(dict(vars(args), length=prompts[0].length, seed=seed, device=str(device)))
    for batch in iter_batches(prompts, args.nsamples, args.batch_size):
        generate_batch(model, enc, batch, args, out, stats)
    stats.report()
    return 0


# argparse drops an option's value of exactly "--" (`--stop=--` parses as an empty list): such a value goes through
# it as this stand-in, put back after.
_DASHES = "\x00--"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv), keeping `--option=--` values."""
    marked = []
    for arg in sys.argv[1:] if argv is None else argv:
        name, equals, value = arg.partition("=")
        marked.append(f"{name}={_DASHES}" if arg.startswith("--") and equals and value == "--" else arg)
    args = parser.parse_args(marked)
    for name, value in vars(args).items():
        if value == _DASHES:
            setattr(args, name, "--")
        elif isinstance(value, list):
            setattr(args, name, ["--" if item == _DASHES else item for item in value])
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the command line on argv (default sys.argv[1:]); returns the exit status."""
    parser = build_parser(prog)
    args = parse_args(parser, argv)
    try:
        return run(args, parser.prog)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except GPT2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head -n 1`): stop quietly, and keep Python's exit-time flush of
        # stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
