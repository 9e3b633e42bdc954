"""tokenizer.json conversions agree with their sources."""

from __future__ import annotations

import pytest

from moedge.tokenizer import byte_level_tokenizer, sentencepiece_bpe_tokenizer

SAMPLES = [
    "Once upon a time, there was a little girl named Lily.",
    'She said: "Don\'t go!"  Numbers 12,345 and unicode ü ☃ too.\nA new line.',
]


def test_sentencepiece_conversion_matches_sentencepiece(data_dir):
    spm = pytest.importorskip("sentencepiece")
    model = data_dir / "stories260K" / "tok512.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = sentencepiece_bpe_tokenizer(model)
    for text in SAMPLES:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == ids
        assert tok.decode(ids) == sp.decode(ids)


def test_byte_level_round_trip():
    tok = byte_level_tokenizer()
    for text in SAMPLES:
        ids = tok.encode(text).ids
        assert max(ids) < 256
        assert tok.decode(ids) == text
    assert tok.token_to_id("<s>") == 256 and tok.token_to_id("</s>") == 257
