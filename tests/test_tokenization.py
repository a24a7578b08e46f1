"""Token -> sentence and token -> word indices built from the tokenizer's offsets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radalign.data.tokenization import NO_INDEX, encode_report, sentence_spans
from radalign.errors import ConfigError


def test_sentence_spans_match_joined_text():
    text, spans = sentence_spans(["No effusion.", "Heart is normal."])
    assert text == "No effusion. Heart is normal."
    assert [text[s:e] for s, e in spans] == ["No effusion.", "Heart is normal."]


def test_token_sentence_index_recovers_each_sentence(minilm_tokenizer):
    sentences = ["Small left pleural effusion.", "Heart size is normal.", "No pneumothorax."]
    enc = encode_report(minilm_tokenizer, sentences, max_length=64)
    assert enc.n_sentences == 3
    # special tokens ([CLS], [SEP]) belong to no sentence
    assert enc.token_sentence[0] == NO_INDEX and enc.token_sentence[-1] == NO_INDEX
    for k, sentence in enumerate(sentences):
        ids = enc.input_ids[enc.token_sentence == k]
        decoded = minilm_tokenizer.decode(ids.tolist())
        assert decoded.replace(" ", "") == sentence.lower().replace(" ", "")
    # sentence ids are non-decreasing along the sequence
    inner = enc.token_sentence[enc.token_sentence >= 0]
    assert np.all(np.diff(inner) >= 0)


def test_word_pieces_of_one_word_share_an_index(minilm_tokenizer):
    enc = encode_report(minilm_tokenizer, ["Pneumomediastinum is absent."], max_length=32)
    tokens = minilm_tokenizer.convert_ids_to_tokens(enc.input_ids.tolist())
    pieces = [i for i, t in enumerate(tokens) if t.startswith("##")]
    assert pieces, "test premise: the long word is split into pieces"
    first = pieces[0] - 1
    assert all(enc.token_word[i] == enc.token_word[first] for i in pieces)
    # words: pneumomediastinum, is, absent, "."
    assert enc.n_words == 4


def test_truncation_keeps_only_sentences_with_tokens(minilm_tokenizer):
    sentences = [f"Sentence number {i} is here." for i in range(20)]
    enc = encode_report(minilm_tokenizer, sentences, max_length=16)
    assert len(enc.input_ids) == 16
    assert 1 <= enc.n_sentences < 20
    assert enc.token_sentence.max() == enc.n_sentences - 1


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast"):
        encode_report(Slow(), ["x."], 8)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="abcdefgh ijk.,-0123", min_size=1, max_size=30).filter(str.strip), max_size=6))
def test_every_content_token_lands_in_the_sentence_holding_its_text(minilm_tokenizer, sentences):
    sentences = [s.strip() for s in sentences]
    enc = encode_report(minilm_tokenizer, sentences, max_length=256)
    text, spans = sentence_spans(sentences)
    offsets = minilm_tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=256)["offset_mapping"]
    for (start, end), k in zip(offsets, enc.token_sentence, strict=True):
        if end > start:
            assert spans[k][0] <= start < spans[k][1]
        else:
            assert k == NO_INDEX
