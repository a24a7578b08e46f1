"""Continuous prompts (CoOp, Zhou et al. 2022): learnable context vectors in a text encoder's input-embedding space.

A prompt for class text "pleural effusion" is the sequence ``[CLS] v_1 ... v_M <pleural> <effusion> [SEP]``: the
M context vectors sit after [CLS] and before the class-name tokens, the attention mask covers them, and the
sequence goes into the text encoder as ``inputs_embeds`` (its position and token-type embeddings are added there
as for any text), so any transformers BERT-family encoder takes it, frozen or not.

Decisions:
- **Initialisation.** From a hand-written template ("findings consistent with"): the vectors start as that
  template's token embeddings, so M is the template's token count and training starts exactly from the text
  "findings consistent with pleural effusion" (tested). Or at random (std 0.02, as CoOp) with ``n_ctx`` vectors.
- **Shared or class-specific.** One context for every class, or one per class of ``classes`` (CoOp's CSC). A
  class-specific prompt for a text naming several findings ("cardiomegaly and pleural effusion") uses the mean of
  their contexts; any other text (no finding, a finding not in ``classes``) uses the context of ``no_finding``
  when it is a class, else the mean of all of them. [design]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from radalign.errors import ConfigError


class PromptLearner(nn.Module):
    """M learnable context vectors (shared, or per class) -> ``inputs_embeds`` and ``attention_mask`` for a text
    encoder whose word embeddings are ``embeddings`` and whose tokenizer is ``tokenizer``."""

    def __init__(
        self,
        embeddings: nn.Embedding,
        tokenizer: Any,
        *,
        n_ctx: int = 16,
        init: str | None = "findings consistent with",
        classes: Sequence[str] = (),
        class_specific: bool = False,
        max_length: int = 77,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ConfigError("prompt learner: needs the text tokenizer (set loader.tokenizer)")
        self.tokenizer = tokenizer
        self.embeddings = [embeddings]  # a list: the text encoder owns (and saves) these weights, not this module
        self.classes = list(classes)
        if class_specific and not self.classes:
            raise ConfigError("prompt learner: class_specific contexts need the class list (model.options.classes)")
        self.class_specific = class_specific
        self.max_length = max_length
        copies = len(self.classes) if class_specific else 1
        dim = embeddings.weight.shape[1]
        if init:
            ids = self._ids(init)
            if not ids:
                raise ConfigError(f"prompt learner: the template {init!r} has no tokens")
            with torch.no_grad():
                start = embeddings.weight[torch.tensor(ids)].detach().clone()
            ctx = start.unsqueeze(0).repeat(copies, 1, 1)
        else:
            if n_ctx <= 0:
                raise ConfigError(f"prompt learner: n_ctx must be positive, got {n_ctx}")
            ctx = torch.randn(copies, n_ctx, dim) * 0.02
        self.ctx = nn.Parameter(ctx)  # (copies, M, H)
        self.init = init

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[1])

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def context_for(self, findings: Sequence[str]) -> Tensor:
        """(M, H) the context of a text naming ``findings`` (see the module docstring for class-specific ones)."""
        if not self.class_specific:
            return self.ctx[0]
        known = [self.classes.index(f) for f in findings if f in self.classes and f != "no_finding"]
        if known:
            return self.ctx[known].mean(dim=0)
        if "no_finding" in self.classes:
            return self.ctx[self.classes.index("no_finding")]
        return self.ctx.mean(dim=0)

    def forward(self, texts: Sequence[str], findings: Sequence[Sequence[str]] | None = None) -> tuple[Tensor, Tensor]:
        """Class texts -> (inputs_embeds (N, T, H), attention_mask (N, T)) of ``[CLS] ctx... text [SEP]``;
        ``findings``: the findings each text names (which contexts a class-specific learner uses)."""
        embed = self.embeddings[0]
        device = embed.weight.device
        cls, sep, pad = (getattr(self.tokenizer, f"{k}_token_id") for k in ("cls", "sep", "pad"))
        budget = self.max_length - self.n_ctx - 2
        if budget < 1:
            raise ConfigError(f"prompt learner: {self.n_ctx} context vectors leave no room in {self.max_length}")
        rows, lengths = [], []
        for index, text in enumerate(texts):
            ids = torch.tensor([cls, *self._ids(text)[:budget], sep], device=device)
            words = embed(ids)
            ctx = self.context_for(findings[index] if findings is not None else ()).to(words.dtype)
            rows.append(torch.cat([words[:1], ctx, words[1:]]))
            lengths.append(rows[-1].shape[0])
        longest = max(lengths)
        pad_vector = embed(torch.tensor([pad or 0], device=device))[0]
        out = pad_vector.expand(len(rows), longest, -1).clone()
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = 1
        return out, mask
