"""Text encoders from transformers: any BERT-family model, the bundled MiniLM, or a tiny random BERT for tests.

Token embeddings are the last hidden states (optionally the sum of the last K layers, as GLoRIA does); word and
sentence embeddings are the means of their tokens through the data layer's token -> word / sentence indices
(:func:`radalign.models.pooling.segment_mean`), so every method sees the same segmentation.

On request (``cls_attention=True``) the encoder also returns the last layer's [CLS] -> token attention, averaged
over heads (MGCA weights its words with it). transformers' SDPA kernels never materialise attention
probabilities, so it is recomputed from the last layer's input hidden state with that layer's own query / key
projections, for the [CLS] query only: one (B, H, 1, T) score row, cheaper than switching layers to eager
attention, and exactly eager attention's softmax before its dropout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from radalign.errors import ConfigError, refused_model_code
from radalign.models.outputs import TextOutput
from radalign.models.pooling import AttentionPool, masked_softmax, segment_mean

Pooling = Literal["cls", "mean", "attention"]


def tiny_bert(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    intermediate: int | None = None,
    max_position: int = 512,
) -> nn.Module:
    """A randomly initialised BERT small enough for CPU tests and smoke runs (no pooler: it would be unused)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_position,
    )
    return BertModel(config, add_pooling_layer=False)


def load_text_model(name_or_path: str | Path, *, local_only: bool = False) -> nn.Module:
    """A transformers encoder from a local folder, ``"minilm"`` (bundled, offline) or a hub name (network, unless
    ``local_only``: then only a copy already on this machine). Code shipped with a model is never run."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    if str(name_or_path) == "minilm":
        from radalign.assets import minilm_path

        name_or_path = minilm_path()
    # A weight-loading bar per encoder would clutter every run's and the demo's output; restore the user's choice.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(name_or_path), trust_remote_code=False, local_files_only=local_only)
    except (OSError, ValueError) as err:
        refusal = refused_model_code(err, name_or_path)
        if refusal or local_only:
            raise ConfigError(
                refusal
                or (
                    f"text model {name_or_path!r} is not on this machine, and loading an export never downloads: "
                    f"put the model's folder here and set model.text.name in the export's config.json to it ({err})"
                )
            ) from err
        raise ConfigError(
            f"could not load a text model from {name_or_path!r}: {err}. Pass a local folder with config.json and "
            "weights, 'minilm' for the bundled MiniLM, 'tiny' for a random tiny BERT, or a hub name (needs network)"
        ) from err
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    # from_pretrained hands back an eval-mode model; training must see dropout like the rest of the method, and
    # Lightning keeps whatever mode a module starts fit in.
    return model.train()


def _find(model: nn.Module, paths: tuple[str, ...]) -> Any:
    for path in paths:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


def _last_self_attention(model: nn.Module) -> nn.Module:
    """The last layer's BERT-style self-attention (``query`` / ``key`` projections), for :func:`cls_token_attention`."""
    stack = _find(model, ("encoder.layer", "encoder.layers", "layers"))
    module = _find(stack[-1], ("attention.self",)) if stack is not None and len(stack) else None
    position = getattr(getattr(model, "config", None), "position_embedding_type", "absolute")
    ok = module is not None and all(hasattr(module, a) for a in ("query", "key", "num_attention_heads"))
    if not ok or position not in (None, "absolute"):
        raise ConfigError(
            f"text encoder {type(model).__name__}: cls_attention needs a BERT-style last layer (self-attention with "
            "query / key projections and absolute positions); this model has none"
        )
    return module


def cls_token_attention(attention: nn.Module, hidden: Tensor, token_mask: Tensor) -> Tensor:
    """[CLS] -> token attention of one BERT self-attention layer, averaged over heads: (B, T), rows summing to 1
    over the real tokens of ``token_mask`` (B, T) bool and exactly 0 on padding.

    ``hidden`` (B, T, D) is the layer's input. Scores and softmax are in float32 (under autocast too); the result
    keeps its graph (callers that use it as fixed weights detach it). This is eager attention's softmax before its
    dropout, i.e. ``output_attentions[-1][:, :, 0].mean(1)`` of an eager model in eval mode.
    """
    b, t, _ = hidden.shape
    heads = int(attention.num_attention_heads)
    q = attention.query(hidden[:, :1]).view(b, 1, heads, -1).transpose(1, 2).float()  # (B, H, 1, hd)
    k = attention.key(hidden).view(b, t, heads, -1).transpose(1, 2).float()  # (B, H, T, hd)
    scaling = float(getattr(attention, "scaling", q.shape[-1] ** -0.5))
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        scores = (q @ k.transpose(-2, -1)) * scaling  # (B, H, 1, T)
        weights = masked_softmax(scores, token_mask[:, None, None, :])
    return weights.mean(dim=1)[:, 0]


class HFTextEncoder(nn.Module):
    """A transformers encoder -> :class:`TextOutput` (global, tokens, words, sentences with masks).

    ``freeze_embeddings`` and ``freeze_layers`` (the first N transformer layers) set ``requires_grad=False``, as
    the seed methods do to keep a pretrained BERT's lower layers. ``pooling`` picks the global embedding: [CLS],
    the masked mean of the tokens, or a learned attention pool (its weights come back in ``pool_weights``).
    """

    def __init__(
        self,
        name_or_path: str | Path | nn.Module = "minilm",
        freeze_embeddings: bool = False,
        freeze_layers: int = 0,
        pooling: Pooling = "cls",
        sum_last_layers: int = 1,
        *,
        local_only: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "attention"):
            raise ConfigError(f"text encoder: pooling must be 'cls', 'mean' or 'attention', got {pooling!r}")
        if isinstance(name_or_path, nn.Module):
            self.model = name_or_path
        else:
            self.model = load_text_model(name_or_path, local_only=local_only)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's pooler is never used: unused parameters would break DDP
        self.out_dim = int(self.model.config.hidden_size)
        self.pooling = pooling
        self.sum_last_layers = max(1, int(sum_last_layers))
        self.attention_pool = AttentionPool(self.out_dim) if pooling == "attention" else None
        self.freeze(freeze_embeddings, freeze_layers)

    def freeze(self, embeddings: bool, layers: int) -> None:
        """Stop gradients into the input embeddings and/or the first ``layers`` transformer layers."""
        if embeddings:
            module = _find(self.model, ("embeddings", "transformer.embeddings"))
            if module is None:
                raise ConfigError(f"text encoder {type(self.model).__name__}: cannot find its embeddings to freeze")
            module.requires_grad_(False)
        if layers > 0:
            stack = _find(self.model, ("encoder.layer", "transformer.layer", "encoder.layers", "layers"))
            if stack is None or layers > len(stack):
                total = 0 if stack is None else len(stack)
                raise ConfigError(f"text encoder: freeze_layers={layers} but the model has {total} layers")
            for layer in list(stack)[:layers]:
                layer.requires_grad_(False)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_sentence: Tensor | None = None,
        token_word: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cls_attention: bool = False,
    ) -> TextOutput:
        """Tokenised text (B, T) with the data layer's indices (-1 = none) -> :class:`TextOutput`.

        ``inputs_embeds`` replaces ``input_ids`` (continuous prompts). Without ``token_sentence`` /
        ``token_word`` the word and sentence fields are empty (W = S = 0). ``cls_attention=True`` also fills
        ``TextOutput.cls_attention`` (the last layer's [CLS] -> token attention, :func:`cls_token_attention`);
        BERT-style models only.
        """
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ConfigError("text encoder: pass input_ids or inputs_embeds")
        b, t = reference.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=reference.device)
        many = self.sum_last_layers > 1
        attention = _last_self_attention(self.model) if cls_attention else None
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=many or cls_attention,
        )
        tokens = torch.stack(out.hidden_states[-self.sum_last_layers :]).sum(0) if many else out.last_hidden_state
        token_mask = attention_mask.bool()
        # hidden_states[-2] is the last layer's input (hidden_states = embeddings, then every layer's output)
        cls_weights = None if attention is None else cls_token_attention(attention, out.hidden_states[-2], token_mask)
        pool_weights = None
        if self.pooling == "cls":
            global_emb = tokens[:, 0]
        elif self.pooling == "mean":
            m = token_mask.unsqueeze(-1).to(tokens.dtype)
            global_emb = (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        else:
            global_emb, pool_weights = self.attention_pool(tokens, token_mask)
        none = torch.full((b, t), -1, dtype=torch.long, device=tokens.device)
        token_sentence = none if token_sentence is None else token_sentence.masked_fill(~token_mask, -1)
        token_word = none if token_word is None else token_word.masked_fill(~token_mask, -1)
        words, word_mask = segment_mean(tokens, token_word)
        sentences, sentence_mask = segment_mean(tokens, token_sentence)
        return TextOutput(
            global_emb=global_emb,
            tokens=tokens,
            token_mask=token_mask,
            words=words,
            word_mask=word_mask,
            sentences=sentences,
            sentence_mask=sentence_mask,
            token_sentence=token_sentence,
            token_word=token_word,
            pool_weights=pool_weights,
            cls_attention=cls_weights,
        )


def build_text_encoder(
    config: Mapping[str, Any] | Any, vocab_size: int | None = None, *, local_only: bool = False
) -> HFTextEncoder:
    """A text encoder from ``{"name", "freeze_embeddings", "freeze_layers", "pooling", "tiny"}`` (dict or dataclass).

    ``name: tiny`` builds :func:`tiny_bert` with the ``tiny`` sizes (hidden, layers, heads, intermediate); its
    vocabulary size comes from the tokenizer (``vocab_size`` here, or ``tiny.vocab_size``). ``local_only``: never
    download (what loading an export uses).
    """
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    name = cfg.pop("name", "minilm")
    tiny = dict(cfg.pop("tiny", None) or {})
    if name == "tiny":
        size = tiny.pop("vocab_size", vocab_size)
        if size is None:
            raise ConfigError("text encoder 'tiny' needs the tokenizer's vocabulary size (vocab_size)")
        unknown = sorted(set(tiny) - {"hidden", "layers", "heads", "intermediate", "max_position"})
        if unknown:
            raise ConfigError(f"text encoder tiny: unknown key {unknown[0]!r}; valid: hidden, layers, heads, ...")
        model: str | nn.Module = tiny_bert(int(size), **tiny)
    else:
        model = name
    try:
        return HFTextEncoder(model, **cfg, local_only=local_only)
    except TypeError as err:
        raise ConfigError(f"text encoder config: {err}") from err
