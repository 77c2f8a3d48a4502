"""
Byte-level BPE, the tokenizer GPT-2 was trained with: text -> list of ints and back.

It must be *exactly* GPT-2's, or the model sees token ids it never saw in training. The pipeline:

1. Pre-tokenise: a regex splits the text into pieces (words with their leading space, runs of digits,
   runs of punctuation, runs of whitespace). BPE never merges across these boundaries, so "dog." and
   "dog!" share the token " dog" instead of needing separate tokens for every word+punctuation combo.
2. Each piece is turned into its UTF-8 bytes, and each byte into one printable unicode character
   (bytes_to_unicode). Working on bytes means *any* string can be encoded with no <unk> token.
3. BPE: starting from single bytes, repeatedly merge the adjacent pair that was merged earliest
   during GPT-2's training (vocab.bpe lists the 50,000 merges in that order), until no pair is mergeable.
4. Look each resulting piece up in encoder.json to get its id.

Decoding runs the table backwards: id -> piece -> bytes -> UTF-8 text.

The vocabulary is two files: encoder.json (piece -> id) and vocab.bpe (the ranked merges); Hugging Face
ships the same data as vocab.json and merges.txt. get_encoder() reads either pair.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path

import regex

from gpt2.errors import GPT2Error

ENDOFTEXT = "<|endoftext|>"
BPE_CACHE_WORDS = 10_000  # bpe() results kept, at most (a few MB)

# GPT-2's pre-tokenising pattern, verbatim. In order: the common English contractions (only lower
# case, a quirk of the original: "DON'T" splits differently from "don't"); an optional space followed
# by letters, by digits, or by other symbols; whitespace not followed by a non-space (so in "a   b" the
# last space stays attached to " b"); and finally any remaining whitespace.
# It needs the `regex` package: the stdlib `re` has no \p{L} / \p{N} classes.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SPLIT = regex.compile(GPT2_PATTERN)

# Lone surrogates (U+D800..U+DFFF) are legal in a Python str but cannot be UTF-8 encoded.
_SURROGATE = regex.compile(r"[\ud800-\udfff]")


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """
    Map every byte 0..255 to a unicode character that is printable and not whitespace.

    Why: the BPE merges are stored in a text file as space-separated pairs, and the regex/BPE code
    works on strings. Raw bytes like 0x20 (space) or 0x0A (newline) would break that file format, and
    bytes 0x80..0xFF are not valid characters on their own. So each byte gets a stand-in character:
    bytes that are already "nice" printable latin-1 characters map to themselves ('a' -> 'a'), and the
    other 68 (control chars, space, etc.) are shifted up to 256 + n. That is why GPT-2 tokens look like
    'Ġthe' - 'Ġ' (U+0120) is the stand-in for the space byte 0x20.

    The mapping is a bijection, so it can be inverted to get the bytes back when decoding.
    The returned dict is cached and shared: do not mutate it.
    """
    nice = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(nice)
    n = 0
    for b in range(256):
        if b not in nice:
            nice.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(nice, (chr(c) for c in chars)))


def get_pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    """
    Return the set of adjacent symbol pairs in a word (a sequence of symbols, e.g. a tuple of strings).

    BPE only ever considers merging neighbours, so these are the candidates for the next merge.
    get_pairs(("h", "e", "l", "l", "o")) == {("h", "e"), ("e", "l"), ("l", "l"), ("l", "o")}.
    """
    return set(zip(word, word[1:]))


class Encoder:
    """
    GPT-2's byte-level BPE tokenizer.

    encoder: piece -> id, e.g. {"Ġthe": 262, ..., "<|endoftext|>": 50256} (the content of encoder.json).
    bpe_merges: the ranked merges, earliest first, e.g. [("Ġ", "t"), ("Ġ", "a"), ...] (vocab.bpe).

    Attributes: `encoder` (piece -> id), `decoder` (id -> piece), `eot_token` (the id of
    <|endoftext|>, 50256 for GPT-2), `bpe_ranks` ((a, b) -> rank), `byte_encoder` / `byte_decoder`
    (the bytes_to_unicode table and its inverse).

    The constructor checks that the two tables belong together (every single byte and every merge result
    has an id); that is what guarantees encode() can never fail on a lookup. It raises ValueError if not.
    """

    def __init__(self, encoder: dict[str, int], bpe_merges: list[tuple[str, str]]) -> None:
        self.encoder = encoder
        self.decoder = {i: piece for piece, i in encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # rank = position in the merge list; lower means "merged earlier in training", i.e. higher priority
        self.bpe_ranks = dict(zip(bpe_merges, range(len(bpe_merges))))
        # memo for bpe(): text repeats words a lot, and the merge loop is the slow part. Emptied when it
        # holds BPE_CACHE_WORDS words, so that a stream of prompts (--prompt_file -) keeps memory flat.
        self.cache: dict[str, str] = {}

        if ENDOFTEXT not in encoder:
            raise ValueError(f"the vocabulary has no {ENDOFTEXT} token")
        self.eot_token = encoder[ENDOFTEXT]
        for c in self.byte_encoder.values():
            if c not in encoder:
                raise ValueError(f"the single-byte piece {c!r} has no id")
        if not encoder.keys() >= set(map("".join, bpe_merges)):  # set operations run in C: fast start-up
            for rank, (a, b) in enumerate(bpe_merges):
                if a + b not in encoder:
                    raise ValueError(f"merge {rank + 1} ({a} {b}) makes {a + b!r}, which has no id")

        # str.translate tables between the 256 stand-in characters and the latin-1 characters with the
        # same code points as the bytes: this lets encode/decode convert whole strings at C speed.
        self._to_stand_in = self.byte_encoder
        self._from_stand_in = {ord(c): b for b, c in self.byte_encoder.items()}
        # the bytes of every id, precomputed so decoding is a join; built on first use (it costs tens of
        # ms, which a CLI that loads the vocabulary only to encode a prompt need not pay at start-up)
        self._id_bytes_table: dict[int, bytes] | None = None

    @property
    def _id_bytes(self) -> dict[int, bytes]:
        if self._id_bytes_table is None:
            ids = list(self.decoder)
            pieces = [self.decoder[i] for i in ids]
            joined = "".join(pieces)
            if set(joined) <= self.byte_decoder.keys():
                # one translate + encode over all pieces at once, then cut it up: every stand-in character
                # is one byte, so piece k covers bytes ends[k-1]:ends[k]
                blob = joined.translate(self._from_stand_in).encode("latin-1")
                ends = list(itertools.accumulate(map(len, pieces)))
                blobs = [blob[a:b] for a, b in zip([0, *ends], ends)]
            else:  # some added token has characters outside the byte alphabet: go piece by piece
                blobs = [self._piece_bytes(p) for p in pieces]
            self._id_bytes_table = dict(zip(ids, blobs))
        return self._id_bytes_table

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most bytes one token stands for (one stand-in character per byte): a bound on how much
        text a window of n tokens can hold."""
        return max(len(piece) for piece in self.encoder)

    def _piece_bytes(self, piece: str) -> bytes:
        """The raw bytes a vocabulary piece stands for ('Ġthe' -> b' the')."""
        return b"".join(
            bytes([self.byte_decoder[c]]) if c in self.byte_decoder else c.encode("utf-8", "replace")
            for c in piece
        )

    def bpe(self, token: str) -> str:
        """
        Apply the merges to one pre-token (already mapped through bytes_to_unicode) and return its
        pieces joined by spaces, e.g. bpe("Ġhello") == "Ġhello", bpe("Ġfoobarbaz") == "Ġfoo bar baz".

        The algorithm: start with one symbol per character; find the adjacent pair with the lowest
        merge rank; merge every occurrence of that pair, left to right; repeat until no adjacent pair
        appears in the merge list. (Spaces are safe as a separator because the stand-in alphabet has
        none.) Results are memoised, so each distinct word is merged only once.
        """
        cached = self.cache.get(token)
        if cached is not None:
            return cached

        word: tuple[str, ...] = tuple(token)
        ranks = self.bpe_ranks
        while len(word) > 1:
            pairs = get_pairs(word)
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)

        result = " ".join(word)
        if len(self.cache) >= BPE_CACHE_WORDS:
            self.cache.clear()
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """
        Turn text into GPT-2 token ids. Never raises for a str.

        Special tokens are *not* recognised: "<|endoftext|>" typed by a user is encoded as the ordinary
        pieces "<", "|", "endoftext", "|", ">" (as openai/gpt-2 does), so user text can never inject the
        document separator; use `eot_token` to add it on purpose.

        Lone surrogates (e.g. from os.fsdecode of undecodable bytes) have no UTF-8 form. They are
        handled the way tiktoken does: a surrogate pair is joined into the character it encodes and any
        remaining lone surrogate becomes U+FFFD. So only strings without surrogates round-trip exactly.
        """
        if _SURROGATE.search(text) is not None:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        encoder = self.encoder
        for piece in _SPLIT.findall(text):
            # UTF-8 bytes -> same-valued latin-1 chars -> stand-in chars, all in C
            token = piece.encode("utf-8").decode("latin-1").translate(self._to_stand_in)
            ids.extend(encoder[p] for p in self.bpe(token).split(" "))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """
        The raw bytes that the ids stand for, with no UTF-8 decoding.

        One character can span several tokens (most emoji and CJK characters are 2-4 byte-level
        tokens), so the bytes of a prefix of a token sequence may end in the middle of a character.
        A streaming printer needs these raw bytes to hold back an incomplete tail instead of printing
        U+FFFD. Raises GPT2Error for an id that is not in the vocabulary.
        """
        table = self._id_bytes
        try:
            return b"".join([table[i] for i in ids])
        except (KeyError, TypeError):
            pass
        # slow path: ids that are integers but not int (e.g. 0-d tensors), or a bad id to report.
        # operator.index, unlike int(), refuses floats instead of silently truncating them.
        parts = []
        for i in ids:
            try:
                parts.append(table[operator.index(i)])
            except (KeyError, TypeError):
                raise GPT2Error(
                    f"token id {i!r} is not in the vocabulary of {len(table)} tokens; "
                    "the model and encoder.json do not match"
                ) from None
        return b"".join(parts)

    def decode(self, ids: Sequence[int]) -> str:
        """
        Turn token ids back into text. Byte sequences that are not valid UTF-8 (the model can emit
        any tokens, including half a character) become U+FFFD rather than raising.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _fix_hint(directory: Path) -> str:
    return f"run scripts/download_weights.sh gpt2 or put encoder.json and vocab.bpe in {directory}"


def _read_text(path: Path, directory: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GPT2Error(f"{path} is not UTF-8 text ({e.reason}); {_fix_hint(directory)}") from None
    except OSError as e:
        raise GPT2Error(f"cannot read {path} ({e.strerror or e}); {_fix_hint(directory)}") from None


def _load_encoder_json(path: Path, directory: Path) -> dict[str, int]:
    text = _read_text(path, directory)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise GPT2Error(f"{path} is not valid JSON ({e}); {_fix_hint(directory)}") from None
    if not isinstance(data, dict):
        raise GPT2Error(
            f"{path} must be a JSON object of token -> id, not {type(data).__name__}; {_fix_hint(directory)}"
        )
    values = list(data.values())
    # fast check first (type() is int also rejects bool, which is an int subclass but not an id)
    if not (all(type(v) is int for v in values) and min(values, default=0) >= 0):
        for key, value in data.items():
            if type(value) is not int or value < 0:
                raise GPT2Error(
                    f"{path}: token {key!r} maps to {value!r}, not a non-negative integer id; "
                    f"{_fix_hint(directory)}"
                )
    if len(set(values)) != len(values):
        raise GPT2Error(f"{path}: some id is used by more than one token; {_fix_hint(directory)}")
    return data


def _load_merges(path: Path, directory: Path) -> list[tuple[str, str]]:
    lines = _read_text(path, directory).split("\n")
    start = 1 if lines[0].startswith("#version") else 0
    # map() keeps this loop in C: the file has 50,000 lines and start-up time matters
    merges: list[tuple[str, ...]] = list(map(tuple, map(str.split, lines[start:])))
    lengths = set(map(len, merges))
    if lengths - {0, 2}:
        for lineno, line in enumerate(lines[start:], start=start + 1):
            if len(line.split()) not in (0, 2):
                shown = line if len(line) <= 60 else line[:57] + "..."
                raise GPT2Error(
                    f"{path} line {lineno} is malformed ({shown!r}): expected two space-separated pieces; "
                    f"{_fix_hint(directory)}"
                )
    if 0 in lengths:  # blank lines (e.g. after the final newline) are skipped
        merges = [m for m in merges if m]
    return merges  # type: ignore[return-value]  # every tuple has length 2 here


def get_encoder(directory: str | os.PathLike[str]) -> Encoder:
    """
    Load the GPT-2 tokenizer from a directory holding encoder.json + vocab.bpe (OpenAI's names) or,
    if those are absent, vocab.json + merges.txt (Hugging Face's names for the same data).

    The directory is used as given, never resolved against a fixed location, so the caller decides
    where the vocabulary lives. Every problem (missing files, bad JSON, malformed merges, files that do
    not belong together) raises GPT2Error with a one-line message naming the file and the fix.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise GPT2Error(f"vocabulary directory {d} does not exist or is not a directory; {_fix_hint(d)}")
    names = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]
    for enc_name, bpe_name in names:
        if (d / enc_name).is_file() and (d / bpe_name).is_file():
            break
    else:
        if (d / "vocab.json").exists() or (d / "merges.txt").exists():
            enc_name, bpe_name = names[1]
        else:
            enc_name, bpe_name = names[0]
        missing = enc_name if not (d / enc_name).is_file() else bpe_name
        raise GPT2Error(f"{d / missing} not found; {_fix_hint(d)}")

    enc_path, bpe_path = d / enc_name, d / bpe_name
    encoder = _load_encoder_json(enc_path, d)
    merges = _load_merges(bpe_path, d)
    try:
        return Encoder(encoder, merges)
    except ValueError as e:
        raise GPT2Error(f"{enc_path} and {bpe_path} do not match: {e}; {_fix_hint(d)}") from None
