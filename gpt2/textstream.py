"""Turn a sample's tokens into text as they arrive: whole UTF-8 characters only, cut at stop strings.

Streaming and non-streaming output both go through `SampleText`, so the streamed text is byte for
byte the text printed at once.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from gpt2.encoder import Encoder


class SampleText:
    """Text of one sample, fed a token at a time.

    `push` returns the text that is now final: a multi-byte character split over tokens waits for its
    last byte, and text that could be the start of a stop string waits until it is known not to be one.
    Once a stop string (or end-of-text) is seen, `finish_reason` is set and later tokens are ignored.
    """

    def __init__(self, encoder: Encoder, stops: Sequence[str] = ()) -> None:
        self._encoder = encoder
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text not yet returned
        self.text = ""  # text returned so far
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "eot", "stop" or "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token == self._encoder.eot_token:
            return self.finish("eot")
        self.tokens.append(token)
        self._pending += self._decoder.decode(self._encoder.decode_bytes([token]))
        return self._release(final=False)

    def finish(self, reason: str = "length") -> str:
        """End the sample (unless a stop string already did) and return the text held back."""
        if self.done:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        released = self._release(final=True)
        if not self.done:
            self.finish_reason = reason
        return released

    def _release(self, final: bool) -> str:
        # A stop string may straddle what was already returned only by its held-back prefix, so the
        # search covers just the pending text.
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            self.finish_reason = "stop"
        elif final:
            out, self._pending = self._pending, ""
        else:
            keep = self._possible_stop_start()
            out, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        self.text += out
        return out

    def _possible_stop_start(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
