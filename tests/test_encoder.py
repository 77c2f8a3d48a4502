"""
Tests for gpt2/encoder.py, GPT-2's byte-level BPE.

The oracle is tiktoken's GPT-2 encoding, rebuilt offline from the same encoder.json / vocab.bpe files
(the `vocab_dir` fixture) and the same pre-tokenising regex, so any difference is a bug in our BPE.
"""

from __future__ import annotations

import itertools
import random
import shutil
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2.encoder import GPT2_PATTERN, Encoder, bytes_to_unicode, get_encoder, get_pairs
from gpt2.errors import GPT2Error

EOT = "<|endoftext|>"

# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def enc(vocab_dir: Path) -> Encoder:
    return get_encoder(vocab_dir)


@pytest.fixture(scope="session")
def tk(vocab_dir: Path):
    """tiktoken's GPT-2 encoding, built from local files with caching and the network both disabled."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken_ext.openai_public import data_gym_to_mergeable_bpe_ranks

    def no_network(*args, **kwargs):
        raise AssertionError("the tiktoken oracle tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # "" = no cache: read the local files directly
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_dir / "vocab.bpe"),
            encoder_json_file=str(vocab_dir / "encoder.json"),
        )
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
    )


def oracle(tk, text: str) -> list[int]:
    # disallowed_special=() makes tiktoken treat "<|endoftext|>" in the text as plain text, like we do
    return tk.encode(text, allowed_special=set(), disallowed_special=())


# ---------------------------------------------------------------------------------------------------
# a deterministic corpus of awkward strings

FRAGMENTS = [
    # prose and contractions (only lower-case ones are special in GPT-2's regex)
    "hello world",
    "Hello World!",
    "The quick brown fox jumps over the lazy dog.",
    "It's a dog's life, isn't it? We'll see; they'd've known.",
    "I'M", "DON'T", "We'Re", "you'LL", "she'D", "it'S", "'s", "'", "''", "'t'", "rock'n'roll",
    "Mr. O'Neil said: \"no\" -- (really) [sic] {ok} <tag/>",
    "naïve café résumé coöperate",
    # code
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }",
    "if __name__ == '__main__':\n\tmain()\n",
    "x=[1,2,3];y={'a':1}\r\n",
    "    indented\n        more\n",
    # numbers
    "1234567", "3.14", "-0.5e10", "0x1F", "1,000,000", "2024-01-01", "１２３", "Ⅻ", "٣٤٥", "½",
    # CJK and other scripts
    "日本語のテキスト", "中文字符", "한국어", "Привет, мир", "Γειά σου", "مرحبا بالعالم", "שלום עולם",
    "नमस्ते दुनिया", "ภาษาไทย",
    # emoji, ZWJ sequences, flags, skin tones, variation selectors
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "❤️", "🤷‍♀️", "🙂🙃",
    # combining marks
    "e\u0301", "a\u0300\u0301\u0302", "Z\u0351\u0352\u0353algo", "\u0301",
    # whitespace runs
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", " \n", "\n ", "\r\n",
    "\u00a0", "\u3000", "\u2028",
    "trailing   ", "x \t\n y", "\x0b\x0c",
    # the special token's text as ordinary user text
    EOT, "before" + EOT + "after", " " + EOT, "<|endoftext", "|>",
    # control and odd characters
    "\x00", "\x01\x02\x1f", "\x7f", "\x85", "\ufeff", "\u200b", "\ufffd", "\U0010ffff", "\ue000",
    "",
]
SEPARATORS = ["", " ", "  ", "\n", "\t", "\n\n\n", " \n", "\r\n", "'", "'s "]


def build_corpus() -> list[str]:
    rng = random.Random(20240601)
    corpus = list(FRAGMENTS)
    corpus += [f + ws for f in FRAGMENTS for ws in (" ", "\n", "   ", "\t\n")]  # trailing whitespace
    pairs = list(itertools.product(FRAGMENTS, FRAGMENTS))
    for a, b in rng.sample(pairs, 900):
        corpus.append(a + rng.choice(SEPARATORS) + b)
    for _ in range(300):
        parts = rng.choices(FRAGMENTS, k=rng.randint(3, 7))
        corpus.append("".join(p + rng.choice(SEPARATORS) for p in parts))
    return list(dict.fromkeys(corpus))  # dedupe, keep order


CORPUS = build_corpus()


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 1000
    assert "" in CORPUS and EOT in CORPUS and "👨‍👩‍👧‍👦" in CORPUS


# ---------------------------------------------------------------------------------------------------
# known ids and agreement with tiktoken


def test_fixed_ids(enc: Encoder):
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode("Hello World!") == [15496, 2159, 0]
    assert enc.encode("") == []
    assert enc.decode([31373, 995]) == "hello world"


def test_corpus_matches_tiktoken_and_round_trips(enc: Encoder, tk):
    mismatches = [s for s in CORPUS if enc.encode(s) != oracle(tk, s)]
    assert not mismatches, f"{len(mismatches)} strings differ from tiktoken, e.g. {mismatches[:5]!r}"
    bad_round_trip = [s for s in CORPUS if enc.decode(enc.encode(s)) != s]
    assert not bad_round_trip, bad_round_trip[:5]


# No surrogates, and only characters assigned in Python's Unicode tables: `regex` and tiktoken each carry their own
# (Unicode 17 and 16 today), and a letter newer than tiktoken's is a symbol to it (docs/design.md, the encoder).
NO_SURROGATES = st.characters(exclude_categories=("Cs", "Cn"))
FRAGMENT_TEXT = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS + SEPARATORS), st.text(NO_SURROGATES, max_size=3)), max_size=10
).map("".join)
# the fixtures used by these tests are session-scoped and read-only, so sharing them across examples is fine
HYPOTHESIS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HYPOTHESIS
@given(st.text(NO_SURROGATES))
def test_any_text_matches_tiktoken_and_round_trips(enc: Encoder, tk, text: str):
    ids = enc.encode(text)
    assert ids == oracle(tk, text)
    assert enc.decode(ids) == text
    assert enc.decode_bytes(ids) == text.encode("utf-8")


@HYPOTHESIS
@given(FRAGMENT_TEXT)
def test_fragment_mixes_match_tiktoken_and_round_trip(enc: Encoder, tk, text: str):
    ids = enc.encode(text)
    assert ids == oracle(tk, text)
    assert enc.decode(ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.one_of(st.characters(categories=("Cs",)), st.sampled_from("ab 1\n😀"))))
def test_lone_surrogates_never_raise(enc: Encoder, tk, text: str):
    ids = enc.encode(text)  # must not raise
    # documented behaviour: pairs are joined, lone surrogates become U+FFFD (which is also what tiktoken does)
    fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert ids == enc.encode(fixed)
    assert ids == oracle(tk, text)
    assert enc.decode(ids) == fixed


def test_lone_surrogate_examples(enc: Encoder):
    assert enc.decode(enc.encode("a\ud800b")) == "a\ufffdb"
    assert enc.decode(enc.encode("\udcff")) == "\ufffd"
    assert enc.decode(enc.encode("\ud83d\ude00")) == "😀"  # a valid pair is the character it encodes


# ---------------------------------------------------------------------------------------------------
# <|endoftext|>


def test_endoftext_is_plain_text_in_user_input(enc: Encoder, tk):
    assert enc.eot_token == 50256
    assert enc.encoder[EOT] == 50256
    assert enc.decoder[50256] == EOT
    for text in (EOT, "a" + EOT + "b", EOT + EOT, " " + EOT + "\n"):
        ids = enc.encode(text)
        assert 50256 not in ids
        assert ids == oracle(tk, text)
        assert enc.decode(ids) == text
    assert enc.decode([50256]) == EOT


# ---------------------------------------------------------------------------------------------------
# decoding


def test_decode_bytes_keeps_partial_characters(enc: Encoder):
    text = "a😀"
    ids = enc.encode(text)
    assert len(ids) >= 3  # the emoji's 4 bytes span more than one token
    full = text.encode("utf-8")
    for k in range(len(ids) + 1):
        prefix = enc.decode_bytes(ids[:k])
        assert full.startswith(prefix)
    partial = enc.decode_bytes(ids[:2])
    assert partial not in (b"a", full) and partial.startswith(b"a")  # ends mid-character
    with pytest.raises(UnicodeDecodeError):
        partial.decode("utf-8")
    assert enc.decode(ids[:2]).startswith("a") and enc.decode(ids[:2]).endswith("\ufffd")
    # token-by-token bytes concatenate to the whole
    assert b"".join(enc.decode_bytes([i]) for i in ids) == full


def test_decode_unknown_id_raises_gpt2error(enc: Encoder):
    with pytest.raises(GPT2Error, match="99999"):
        enc.decode([31373, 99999])
    with pytest.raises(GPT2Error):
        enc.decode([-1])


def test_decode_accepts_tensor_ids(enc: Encoder):
    torch = pytest.importorskip("torch")
    assert enc.decode(torch.tensor([31373, 995])) == "hello world"
    assert enc.decode(torch.tensor([31373, 995]).tolist()) == "hello world"


# ---------------------------------------------------------------------------------------------------
# building blocks


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"
    assert bytes_to_unicode() is table  # cached


def test_get_pairs():
    assert get_pairs(("h", "e", "l", "l", "o")) == {("h", "e"), ("e", "l"), ("l", "l"), ("l", "o")}
    assert get_pairs(("a",)) == set()


def test_bpe(enc: Encoder):
    assert enc.bpe("Ġhello") == "Ġhello"
    pieces = enc.bpe("Ġantidisestablishmentarianism").split(" ")
    assert len(pieces) > 1 and "".join(pieces) == "Ġantidisestablishmentarianism"
    assert enc.bpe("Ġhello") is enc.bpe("Ġhello")  # memoised


def test_encoder_rejects_tables_that_do_not_belong_together():
    byte_pieces = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    ok = {**byte_pieces, "ab": 256, EOT: 257}
    assert Encoder(ok, [("a", "b")]).encode("abc") == [256, byte_pieces["c"]]
    with pytest.raises(ValueError, match="no id"):
        Encoder(ok, [("a", "c")])
    with pytest.raises(ValueError, match="endoftext"):
        Encoder(byte_pieces, [])


def test_added_token_outside_byte_alphabet_decodes_as_utf8():
    byte_pieces = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    # U+00A0 has no byte stand-in (byte 0xA0 is written as 'ł'), so it can only mean its UTF-8 bytes
    odd = Encoder({**byte_pieces, EOT: 256, "<pad\u00a0>": 257}, [])
    assert odd.decode_bytes([257, 256]) == b"<pad\xc2\xa0>" + EOT.encode()
    assert odd.decode(odd.encode("ab")) == "ab"


# ---------------------------------------------------------------------------------------------------
# get_encoder: file names and errors


def copy_vocab(
    vocab_dir: Path, dest: Path, enc_name: str = "encoder.json", bpe_name: str = "vocab.bpe"
) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab_dir / "encoder.json", dest / enc_name)
    shutil.copy(vocab_dir / "vocab.bpe", dest / bpe_name)
    return dest


def test_hugging_face_file_names(vocab_dir: Path, tmp_path: Path, enc: Encoder):
    hf = get_encoder(copy_vocab(vocab_dir, tmp_path, "vocab.json", "merges.txt"))
    for s in CORPUS[:200]:
        assert hf.encode(s) == enc.encode(s)
    assert hf.eot_token == 50256


def test_accepts_str_path(vocab_dir: Path):
    assert get_encoder(str(vocab_dir)).encode("hello world") == [31373, 995]


def test_crlf_merges_file(vocab_dir: Path, tmp_path: Path, enc: Encoder):
    d = copy_vocab(vocab_dir, tmp_path)
    (d / "vocab.bpe").write_bytes((vocab_dir / "vocab.bpe").read_bytes().replace(b"\n", b"\r\n"))
    assert get_encoder(d).encode(CORPUS[5]) == enc.encode(CORPUS[5])


def error_message(directory: Path) -> str:
    with pytest.raises(GPT2Error) as info:
        get_encoder(directory)
    message = str(info.value)
    assert "\n" not in message  # one line
    assert "download_weights.sh" in message  # says how to fix it
    return message


def test_missing_directory(tmp_path: Path):
    missing = tmp_path / "nope"
    assert str(missing) in error_message(missing)


def test_empty_directory_names_encoder_json(tmp_path: Path):
    assert "encoder.json" in error_message(tmp_path)


def test_missing_merges_file_is_named(vocab_dir: Path, tmp_path: Path):
    d = copy_vocab(vocab_dir, tmp_path)
    (d / "vocab.bpe").unlink()
    assert str(d / "vocab.bpe") in error_message(d)


def test_missing_hf_merges_file_is_named(vocab_dir: Path, tmp_path: Path):
    d = copy_vocab(vocab_dir, tmp_path, "vocab.json", "merges.txt")
    (d / "merges.txt").unlink()
    assert str(d / "merges.txt") in error_message(d)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"a": 1,', "not valid JSON"),
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"a": "1"}', "integer id"),
        (b'{"a": true}', "integer id"),
        (b'{"a": -3}', "integer id"),
        (b'{"a": 1, "b": 1}', "more than one token"),
    ],
)
def test_bad_encoder_json(vocab_dir: Path, tmp_path: Path, content: bytes, problem: str):
    d = copy_vocab(vocab_dir, tmp_path)
    (d / "encoder.json").write_bytes(content)
    message = error_message(d)
    assert str(d / "encoder.json") in message and problem in message


def test_malformed_merges_line(vocab_dir: Path, tmp_path: Path):
    d = copy_vocab(vocab_dir, tmp_path)
    lines = (vocab_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[10] = "Ġ t h"  # three pieces on line 11
    (d / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    message = error_message(d)
    assert str(d / "vocab.bpe") in message and "line 11" in message


def test_merges_that_do_not_match_the_vocabulary(vocab_dir: Path, tmp_path: Path):
    d = copy_vocab(vocab_dir, tmp_path)
    with open(d / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("zzzz qqqq\n")
    message = error_message(d)
    assert "encoder.json" in message and "vocab.bpe" in message and "zzzzqqqq" in message
