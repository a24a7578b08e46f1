"""Stochastic views of reports for MLIP (docs/methods/mlip.md): a divergent view of the tokenised batch (token
masking, sentence shuffling) and mismatched reports built by swapping one sentence between reports.

All draws come from a ``torch.Generator`` the caller seeds (from the run's seed and the step), so a view is
deterministic by seed and the same after a resume, without a generator state in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

from radalign.errors import ConfigError


def mask_tokens(
    input_ids: Tensor, token_word: Tensor, mask_token_id: int, ratio: float, generator: torch.Generator
) -> Tensor:
    """A copy of (B, T) ``input_ids`` with each word piece (``token_word >= 0``: never [CLS], [SEP] or padding)
    replaced by ``mask_token_id`` with probability ``ratio``."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"token masking: mask_ratio must be in [0, 1), got {ratio}")
    draw = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    hit = (draw < ratio) & (token_word >= 0)
    return torch.where(hit, torch.full_like(input_ids, mask_token_id), input_ids)


def shuffle_sentences(input_ids: Tensor, token_sentence: Tensor, generator: torch.Generator) -> Tensor:
    """A copy of (B, T) ``input_ids`` whose sentences (token spans with one ``token_sentence`` id) are in a random
    order per report; tokens outside every sentence ([CLS], [SEP], padding) stay where they are, so the attention
    mask is unchanged.

    One batched sort, no loop over reports: each sentence draws a random key; the sentence tokens, stably sorted by
    their sentence's key (so a sentence keeps its inner order), refill the positions sentence tokens held.
    """
    b, t = input_ids.shape
    inside = token_sentence >= 0
    n_keys = int(token_sentence.max().clamp_min(0)) + 1
    keys = torch.rand(b, n_keys, generator=generator).to(input_ids.device)
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    # outside tokens sort last, in position order (keys are < 1): the same order in both sorts, so they stay put
    token_key = torch.where(inside, keys.gather(1, token_sentence.clamp_min(0)), 2.0 + positions / t)
    tokens = token_key.sort(dim=1, stable=True).indices
    slots = (~inside).to(torch.int8).sort(dim=1, stable=True).indices
    return input_ids.scatter(1, slots, input_ids.gather(1, tokens))


def swap_sentences(reports: list[list[str]], generator: torch.Generator) -> tuple[list[str], list[bool]]:
    """For each report, a copy with one sentence replaced by a sentence of another report of the batch (MLIP's
    text swapping), and whether a swap was found: the new sentence must differ from every sentence of the report
    (a swapped-in "No pneumothorax." into a report that says so already is no negative). Reports are lists of
    sentences; an empty report, or a batch of one, has no swap (the report is returned as it is, flag False)."""
    b = len(reports)
    normalized = [{s.strip().lower() for s in r} for r in reports]
    texts, swapped = [], []
    for i, sentences in enumerate(reports):
        done = False
        if sentences and b > 1:
            others = [j for j in range(b) if j != i]
            for k in torch.randperm(len(others), generator=generator).tolist():
                candidates = [s for s in reports[others[k]] if s.strip().lower() not in normalized[i]]
                if not candidates:
                    continue
                new = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
                where = int(torch.randint(len(sentences), (1,), generator=generator))
                sentences = [*sentences[:where], new, *sentences[where + 1 :]]
                done = True
                break
        texts.append(" ".join(sentences))
        swapped.append(done)
    return texts, swapped
