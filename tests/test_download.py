"""gpt2.download against a fake Hugging Face hub on 127.0.0.1 (no internet)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2 import download
from gpt2.download import (
    FILES,
    download_model,
    ensure_model,
    find_in_hf_cache,
    is_offline,
    main,
    model_dir,
    verify_vocab,
)
from gpt2.errors import GPT2Error

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "download_weights.sh"
LFS = {"model.safetensors"}


@dataclass
class Hub:
    """State of the fake hub; tests flip its switches."""

    files: dict[str, bytes] = field(default_factory=dict)  # "/{repo}/resolve/main/{file}" -> bytes
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    not_found: set[str] = field(default_factory=set)  # file names answering 404
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before cutting a GET
    cuts_left: int = 0  # how many GETs get cut
    wrong: dict[str, bytes] = field(default_factory=dict)  # file -> bytes served instead (HEAD stays right)
    ignore_range: bool = False
    chunk_delay: float = 0.0  # seconds per 16 KiB of the weights
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, name: str) -> list[dict[str, str]]:
        """Headers of the GETs that transferred `name` (the storage URL for LFS files)."""
        prefix = "/cdn/" if name in LFS else "/"
        return [h for m, p, h in self.log if m == "GET" and p.startswith(prefix) and p.endswith("/" + name)]


class QuietServer(ThreadingHTTPServer):
    """The test server: a client that hangs up mid-response (as the interrupted-download tests do) is
    expected, not an error to print."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _lookup(self) -> tuple[str, bytes | None, bool]:
            path = self.path
            cdn = path.startswith("/cdn/")
            key = "/" + path[len("/cdn/"):] if cdn else path
            name = key.rsplit("/", 1)[-1]
            if name in hub.not_found:
                return name, None, cdn
            return name, hub.files.get(key), cdn

        def do_HEAD(self) -> None:
            with hub.lock:
                hub.log.append(("HEAD", self.path, dict(self.headers)))
            name, data, _ = self._lookup()
            if data is None:
                self.send_error(404)
                return
            if name in LFS:  # like the hub: a redirect to storage, announcing size and sha256
                self.send_response(302)
                self.send_header("Location", "/cdn" + self.path)
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("ETag", '"abc123"')
                self.send_header("Content-Length", "0")
            else:
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()

        def do_GET(self) -> None:
            with hub.lock:
                hub.log.append(("GET", self.path, dict(self.headers)))
            name, data, cdn = self._lookup()
            if data is None:
                self.send_error(404)
                return
            if name in LFS and not cdn:
                self.send_response(302)
                self.send_header("Location", "/cdn" + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = hub.wrong.get(name, data)
            start = 0
            rng = self.headers.get("Range")
            if rng and not hub.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            limit = len(body)
            with hub.lock:
                if name in hub.cut_after and hub.cuts_left > 0:
                    hub.cuts_left -= 1
                    limit = min(limit, hub.cut_after[name])
            for i in range(0, limit, 16384):
                self.wfile.write(body[i:min(i + 16384, limit)])
                if hub.chunk_delay and name in LFS:
                    time.sleep(hub.chunk_delay)
            if limit < len(body):
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


@pytest.fixture(scope="session")
def hf_vocab(vocab_dir: Path) -> dict[str, bytes]:
    """The real vocabulary in Hugging Face's form."""
    encoder = json.loads((vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    return {
        "vocab.json": json.dumps(encoder, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
        "merges.txt": (vocab_dir / "vocab.bpe").read_bytes(),
    }


@pytest.fixture
def hub(hf_vocab: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    state = Hub()
    rnd = random.Random(0)
    for name, repo in download.REPOS.items():
        files = {
            "model.safetensors": rnd.randbytes(300_000),
            "config.json": json.dumps({"n_layer": 2, "model": name}).encode(),
            **hf_vocab,
        }
        for fname, data in files.items():
            state.files[f"/{repo}/resolve/main/{fname}"] = data
    server = QuietServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("GPT2_PYTORCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "RETRY_DELAY", 0.0)
    yield state
    server.shutdown()
    server.server_close()


def served(hub: Hub, name: str, fname: str) -> bytes:
    return hub.files[f"/{download.REPOS[name]}/resolve/main/{fname}"]


def assert_complete(hub: Hub, directory: Path, name: str = "gpt2") -> None:
    for fname in FILES:
        assert (directory / fname).read_bytes() == served(hub, name, fname), fname
    assert not list(directory.glob("*.part"))
    verify_vocab(directory)


def subprocess_env(hub: Hub, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_ENDPOINT=hub.url, GPT2_PYTORCH_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(REPO_ROOT), PYTHON=sys.executable)
    env.pop("HF_HUB_OFFLINE", None)
    return env


# --------------------------------------------------------------------------- plain download


def test_download_verifies_and_installs(hub: Hub, tmp_path: Path) -> None:
    directory = download_model("gpt2", quiet=True)
    assert directory == tmp_path / "cache" / "gpt2" == model_dir("gpt2")
    assert_complete(hub, directory)
    heads = [p for m, p, _ in hub.log if m == "HEAD"]
    assert heads and all("/resolve/main/" in p for p in heads)  # HEAD does not follow the redirect
    assert len(hub.gets("model.safetensors")) == 1


def test_complete_files_are_skipped(hub: Hub) -> None:
    directory = download_model("gpt2", quiet=True)
    (directory / "config.json").unlink()
    hub.log.clear()
    assert download_model("gpt2", quiet=True) == directory
    assert {p.rsplit("/", 1)[-1] for _, p, _ in hub.log} == {"config.json"}
    hub.log.clear()
    assert ensure_model("gpt2") == directory
    assert hub.log == []


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GPT2_PYTORCH_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_dir("distilgpt2") == tmp_path / ".cache" / "gpt2-pytorch" / "distilgpt2"


def test_unknown_name() -> None:
    with pytest.raises(GPT2Error, match="unknown model"):
        model_dir("gpt5")
    with pytest.raises(GPT2Error, match="unknown model"):
        download_model("../etc")
    with pytest.raises(SystemExit) as exc:
        main(["gpt5"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- failures


def test_404(hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    hub.not_found.add("config.json")
    with pytest.raises(GPT2Error, match=r"model file not found at http://127\.0\.0\.1:\d+/.*/config\.json"):
        download_model("gpt2", quiet=True)
    assert not (model_dir("gpt2") / "config.json").exists()
    assert main(["gpt2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model file not found") and err.count("\n") == 1


def test_resume_after_cut_connection(hub: Hub) -> None:
    hub.cut_after["model.safetensors"] = 140_000
    hub.cuts_left = 1
    directory = download_model("gpt2", quiet=True)
    assert_complete(hub, directory)
    first, second = hub.gets("model.safetensors")
    assert "Range" not in first
    offset = int(second["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= 140_000  # what was read before the cut (whole chunks) was kept


def test_resume_across_runs(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "RETRIES", 1)
    hub.cut_after["model.safetensors"] = 150_000
    hub.cuts_left = 1
    with pytest.raises(GPT2Error, match=r"model\.safetensors was cut after \d+ bytes.*run again to resume"):
        download_model("gpt2", quiet=True)
    directory = model_dir("gpt2")
    assert not (directory / "model.safetensors").exists()
    kept = (directory / "model.safetensors.part").stat().st_size
    assert 0 < kept <= 150_000
    download_model("gpt2", quiet=True)
    assert_complete(hub, directory)
    assert hub.gets("model.safetensors")[-1]["Range"] == f"bytes={kept}-"


def test_server_ignoring_range_restarts(hub: Hub) -> None:
    hub.cut_after["model.safetensors"] = 100_000
    hub.cuts_left = 1
    hub.ignore_range = True
    assert_complete(hub, download_model("gpt2", quiet=True))


def test_corrupt_part_is_restarted_once(hub: Hub) -> None:
    directory = model_dir("gpt2")
    directory.mkdir(parents=True)
    (directory / "model.safetensors.part").write_bytes(b"\0" * 1000)  # wrong bytes from an earlier run
    assert_complete(hub, download_model("gpt2", quiet=True))
    ranges = [h.get("Range") for h in hub.gets("model.safetensors")]
    assert ranges == ["bytes=1000-", None]


def test_checksum_mismatch(hub: Hub) -> None:
    good = served(hub, "gpt2", "model.safetensors")
    bad = bytes([good[0] ^ 1]) + good[1:]
    hub.wrong["model.safetensors"] = bad
    with pytest.raises(GPT2Error) as exc:
        download_model("gpt2", quiet=True)
    msg = str(exc.value)
    assert "model.safetensors" in msg and "checksum mismatch" in msg
    assert hashlib.sha256(good).hexdigest() in msg and hashlib.sha256(bad).hexdigest() in msg
    directory = model_dir("gpt2")
    assert not (directory / "model.safetensors").exists()
    assert not (directory / "model.safetensors.part").exists()


def test_wrong_size(hub: Hub) -> None:
    hub.wrong["config.json"] = served(hub, "gpt2", "config.json") + b" "
    with pytest.raises(GPT2Error, match="config.json: expected"):
        download_model("gpt2", quiet=True)
    assert not list(model_dir("gpt2").glob("config.json*"))


def test_tampered_vocab(hub: Hub) -> None:
    vocab = json.loads(served(hub, "gpt2", "vocab.json"))
    vocab["hello"] = 7
    hub.wrong["vocab.json"] = json.dumps(vocab).encode()
    hub.files[f"/{download.REPOS['gpt2']}/resolve/main/vocab.json"] = hub.wrong["vocab.json"]  # HEAD agrees
    with pytest.raises(GPT2Error, match=r"vocab\.json is not GPT-2's vocabulary"):
        download_model("gpt2", quiet=True)
    assert not list(model_dir("gpt2").glob("vocab.json*"))


def test_network_error(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(GPT2Error, match="network error") as exc:
        download_model("gpt2", quiet=True)
    assert "\n" not in str(exc.value)
    assert not (model_dir("gpt2") / "model.safetensors").exists()


def test_target_is_a_file(hub: Hub, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    with pytest.raises(GPT2Error, match="cannot write .*--dir or GPT2_PYTORCH_CACHE"):
        download_model("gpt2", tmp_path / "blocker" / "gpt2", quiet=True)
    assert hub.log == []


def test_disk_full(hub: Hub) -> None:
    directory = model_dir("gpt2")
    directory.mkdir(parents=True)
    (directory / "model.safetensors.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(GPT2Error, match=r"cannot write .*model\.safetensors\.part: No space left.*free disk"):
        download_model("gpt2", quiet=True)
    assert not (directory / "model.safetensors").exists()


def test_bad_endpoint(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "127.0.0.1:1")
    with pytest.raises(GPT2Error, match="check HF_ENDPOINT"):
        download_model("gpt2", quiet=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_read_only_directory(hub: Hub, tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        with pytest.raises(GPT2Error, match="cannot write"):
            download_model("gpt2", target, quiet=True)
    finally:
        target.chmod(0o755)


# --------------------------------------------------------------------------- vocabulary


def test_verify_vocab(vocab_dir: Path, hf_vocab: dict[str, bytes], tmp_path: Path) -> None:
    verify_vocab(vocab_dir)  # OpenAI's files, by raw digest
    hf = tmp_path / "hf"
    hf.mkdir()
    for name, data in hf_vocab.items():
        (hf / name).write_bytes(data)
    verify_vocab(hf)
    # reformatting does not matter: indented JSON, CRLF merges
    (hf / "vocab.json").write_text(json.dumps(json.loads(hf_vocab["vocab.json"]), indent=2), encoding="utf-8")
    (hf / "merges.txt").write_bytes(hf_vocab["merges.txt"].replace(b"\n", b"\r\n"))
    verify_vocab(hf)
    merges = hf_vocab["merges.txt"].decode("utf-8").split("\n")
    merges[1], merges[2] = merges[2], merges[1]
    (hf / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
    with pytest.raises(GPT2Error, match="merges.txt"):
        verify_vocab(hf)
    openai = tmp_path / "openai"
    openai.mkdir()
    (openai / "encoder.json").write_text("{not json")
    (openai / "vocab.bpe").write_bytes((vocab_dir / "vocab.bpe").read_bytes())
    with pytest.raises(GPT2Error, match="encoder.json"):
        verify_vocab(openai)
    with pytest.raises(GPT2Error, match="no vocabulary"):
        verify_vocab(tmp_path / "nothing")


# --------------------------------------------------------------------------- offline and the HF cache


@pytest.mark.parametrize(("flag", "env", "expected"), [
    (False, None, False), (True, None, True), (False, "1", True), (False, "TRUE", True),
    (False, "Yes", True), (False, "on", True), (False, "0", False), (False, "", False),
])
def test_is_offline(monkeypatch: pytest.MonkeyPatch, flag: bool, env: str | None, expected: bool) -> None:
    if env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", env)
    assert is_offline(flag) is expected


def test_offline_and_missing(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GPT2Error, match=r"offline mode is on: run scripts/download_weights\.sh gpt2"):
        ensure_model("gpt2", offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GPT2Error, match=r"download_weights\.sh gpt2-medium"):
        ensure_model("gpt2-medium")
    assert hub.log == []


def make_hf_snapshot(root: Path, hf_vocab: dict[str, bytes], weights: bool = True) -> Path:
    base = root / "hub" / "models--openai-community--gpt2"
    commit = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir()
    files = dict(hf_vocab, **({"model.safetensors": b"weights"} if weights else {}))
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hf_cache_used_without_http(hub: Hub, tmp_path: Path, hf_vocab: dict[str, bytes]) -> None:
    snapshot = make_hf_snapshot(tmp_path / "hf", hf_vocab)
    assert find_in_hf_cache("gpt2") == snapshot
    assert find_in_hf_cache("distilgpt2") is None
    assert ensure_model("gpt2") == snapshot
    assert ensure_model("gpt2", offline=True) == snapshot
    verify_vocab(snapshot)
    assert hub.log == []
    assert not (tmp_path / "cache").exists()


def test_hf_cache_without_weights_is_ignored(hub: Hub, tmp_path: Path, hf_vocab: dict[str, bytes]) -> None:
    make_hf_snapshot(tmp_path / "hf", hf_vocab, weights=False)
    assert find_in_hf_cache("gpt2") is None
    assert_complete(hub, ensure_model("gpt2", quiet=True))


# --------------------------------------------------------------------------- processes


def test_concurrent_downloads(hub: Hub, tmp_path: Path) -> None:
    hub.chunk_delay = 0.02  # about 0.4 s for the weights: the two runs overlap
    env = subprocess_env(hub, tmp_path)
    cmd = [sys.executable, "-m", "gpt2.download", "gpt2", "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=30) for p in procs]
    directory = tmp_path / "cache" / "gpt2"
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        assert out.strip() == str(directory)
    assert_complete(hub, directory)
    assert len(hub.gets("model.safetensors")) == 1  # the second run found it complete


def test_waits_for_the_lock(hub: Hub, tmp_path: Path) -> None:
    directory = tmp_path / "cache" / "gpt2"
    directory.mkdir(parents=True)
    with open(directory / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "gpt2.download", "gpt2", "--quiet"],
                                env=subprocess_env(hub, tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        assert "waiting for another download of gpt2" in line
        assert hub.log == []
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert_complete(hub, directory)


def test_script_end_to_end(hub: Hub, tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT), "distilgpt2"], env=subprocess_env(hub, tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "cache" / "distilgpt2"
    assert result.stdout.strip() == str(directory)
    assert_complete(hub, directory, "distilgpt2")
    assert any("/distilbert/distilgpt2/resolve/main/" in p for _, p, _ in hub.log)


def test_script_rejects_unknown_name(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT), "gpt5"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
