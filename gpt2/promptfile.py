"""Prompt files read as they arrive: one prompt per line, from a file or a pipe.

A thread reads the lines into a small queue, so that generation never waits for input while it has other
work (a coprocess that sends a prompt and waits for its answer, `tail -f`), and memory holds a few lines
whatever the input's length. Blank lines are skipped and do not count; the thread also drops the prompts
of other shards, so that whatever is queued is work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import BinaryIO

from gpt2.errors import UsageError

QUEUE_LINES = 64  # prompts read ahead of generation, at most


class PromptLines:
    """The prompts of `stream` as (prompt index, text), index counted over non-blank lines, for shard
    (K, N) only those whose index is K modulo N. Iterating blocks until the next one is read; `ready()`
    says whether it would not. A file without any prompt is a UsageError, raised when iteration gets there.
    With `owned`, the stream is closed once reading ends."""

    def __init__(self, stream: BinaryIO, name: str, shard: tuple[int, int] = (0, 1), owned: bool = False) -> None:
        self._stream, self._name, self._shard, self._owned = stream, name, shard, owned
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_LINES)
        self._closed = threading.Event()
        threading.Thread(target=self._read, name="prompt-lines", daemon=True).start()

    def _read(self) -> None:
        try:
            self._put(self._read_lines())
        finally:
            if self._owned:
                self._stream.close()

    def _read_lines(self) -> UsageError | None:
        """Queue every prompt; return what ends the input: None, or the error to raise there."""
        count, (k, n) = 0, self._shard
        try:
            for line in iter(self._stream.readline, b""):
                # Line by line as the whole file would decode: a newline byte never ends a UTF-8 sequence.
                text = line.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")
                if not text.strip():
                    continue
                if count % n == k and not self._put((count, text)):
                    return None  # closed: nobody reads the end
                count += 1
        except OSError as exc:
            return UsageError(f"cannot read --prompt_file {self._name}: {exc.strerror or exc}")
        return None if count else UsageError(f"no prompts in {self._name}: give one prompt per line")

    def _put(self, item: object) -> bool:
        """Queue item unless close() was called first (then False)."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def ready(self) -> bool:
        """Whether the next prompt (or the end) has been read already."""
        return not self._queue.empty()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        """Stop reading: a thread waiting on a full queue ends now, one waiting on a pipe with the process."""
        self._closed.set()
