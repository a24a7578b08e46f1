"""GLoRIA's local (word <-> region) and global losses (marshuang80/gloria, ``gloria/loss/gloria_loss.py``).

Local attention: words of a report attend over the regions of an image with GLoRIA's double softmax,
a_wr = <w, r>, softmax over WORDS, times temp1, softmax over REGIONS, context c_w = sum_r a_wr r. The local score
of image i with report j is S_ij = log(agg_w exp(temp2 * cos(w_jw, c_ijw))) over the valid words of report j,
``agg`` being the sum (default) or the mean, as in the official code (``log(mean(exp(.)))``, not a mean of cosines).
The official loss loops over reports in Python; here all B_img x B_txt pairs are computed at once, with padding
masks replacing its slicing by caption length (and with a region mask the official code has no need of).

Trailing padding is cut first (to the longest report of the batch, or of the chunk): padded words would cost the
attention as much as real ones.

Speed and memory: the all-pairs attention is (B, B, W, N) and the attended context (B, B, W, D); about 2.4 GB at
batch 32 with 19x19 regions and 97 words, 39 GB at batch 128. ``chunk_size="auto"`` (the default) picks the
fastest form per device: on the CPU reports are scored 8 at a time (tensors that stay in cache; twice the speed of
all pairs at once), on a GPU all at once. An integer ``chunk_size`` bounds the memory: each chunk is recomputed in
the backward pass (activation checkpointing, ``recompute=True``), so the saved memory is one chunk's, for about
one more forward pass of compute.
Both directions of the cross-entropy are averaged (the official code adds them: twice this value; the paper
configs weigh the loss 2 so that the total, and what gradient clipping sees, equals the official one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.objectives.local.common import NEG, masked_fill_logits, masked_softmax

AGGREGATIONS = ("sum", "mean")


def _all_true(x: Tensor) -> Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _double_softmax(dots: Tensor, word_mask: Tensor, region_mask: Tensor, temp1: float) -> Tensor:
    """GLoRIA's attention from word-region dot products ``dots`` (..., W, N); masks broadcast to it.

    The first softmax normalises each region's column over the words, the second each word's row over the
    regions; the result is what a word attends to (rows sum to 1 over valid regions).
    """
    over_words = masked_softmax(dots, word_mask, dim=-2)  # (..., W, N)
    return masked_softmax(temp1 * over_words, region_mask, dim=-1)  # (..., W, N)


def gloria_attention(
    words: Tensor,
    regions: Tensor,
    temp1: float = 4.0,
    word_mask: Tensor | None = None,
    region_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Words of report b attend over the regions of image b (paired batches).

    words (B, W, D), regions (B, N, D), masks (B, W) / (B, N) bool with True = real (None: all real).
    Returns ``(context, attention)``: context (B, W, D), the attended region feature of each word, and
    attention (B, W, N) with ``attention[b, w, r]`` the weight word w of report b gives region r of image b
    (each valid word's row sums to 1 over valid regions; padded regions get 0).
    """
    word_mask = _all_true(words) if word_mask is None else word_mask.bool()
    region_mask = _all_true(regions) if region_mask is None else region_mask.bool()
    dots = torch.einsum("bwd,bnd->bwn", words, regions)  # (B, W, N)
    attention = _double_softmax(dots, word_mask[:, :, None], region_mask[:, None, :], temp1)  # (B, W, N)
    return attention @ regions, attention


def _aggregate(sim: Tensor, word_mask: Tensor, agg: str) -> Tensor:
    """log(sum or mean over valid words of exp(sim)); sim (..., W), word_mask broadcastable to it. A report
    without words scores the large negative NEG, however much padding it has (a match to nothing)."""
    if agg not in AGGREGATIONS:
        raise ConfigError(f"GLoRIA: agg must be one of {AGGREGATIONS}, got {agg!r}")
    scores = torch.logsumexp(masked_fill_logits(sim, word_mask), dim=-1)  # stable form of log(sum(exp))
    if agg == "mean":
        scores = scores - word_mask.sum(-1).clamp_min(1).to(sim.dtype).log()
    return torch.where(word_mask.any(dim=-1), scores, NEG)


def resolve_chunking(chunk_size: int | str | None, recompute: bool, device: torch.device) -> tuple[int | None, bool]:
    """(reports per chunk or None = all at once, recompute each chunk in the backward pass).

    ``"auto"``: the fastest form on the device, measured (docs/benchmarks.md): on the CPU 8 reports at a time,
    stored (blocks that stay in cache: ~2x the speed of the all-pairs form and of the official loop at GLoRIA's
    batch 48); on a GPU all pairs at once. An integer chunks with ``recompute`` (default: bounded memory).
    """
    if chunk_size == "auto":
        return (AUTO_CPU_CHUNK, False) if device.type == "cpu" else (None, False)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(
            f"GLoRIA: chunk_size must be 'auto', a positive number of reports or null, got {chunk_size!r}"
        )
    return chunk_size, recompute


AUTO_CPU_CHUNK = 8


def gloria_local_scores(
    words: Tensor,
    word_mask: Tensor | None,
    regions: Tensor,
    region_mask: Tensor | None,
    temp1: float = 4.0,
    temp2: float = 5.0,
    agg: str = "sum",
    chunk_size: int | str | None = "auto",
    recompute: bool = True,
) -> Tensor:
    """(B_img, B_txt) local similarity S_ij of image i with report j (words of report j attend over regions of i).

    words (B_txt, W, D), regions (B_img, N, D); masks True = real (None: all real). ``chunk_size``: score that
    many reports at a time (same result), each chunk recomputed in the backward pass when ``recompute`` (bounded
    memory); ``"auto"``: see :func:`resolve_chunking`.
    """
    word_mask = _all_true(words) if word_mask is None else word_mask.bool()
    region_mask = _all_true(regions) if region_mask is None else region_mask.bool()
    chunk_size, recompute = resolve_chunking(chunk_size, recompute, words.device)
    if chunk_size is None or chunk_size >= words.shape[0]:
        return _all_pair_scores(*_trimmed(words, word_mask), regions, region_mask, temp1, temp2, agg)
    from torch.utils.checkpoint import checkpoint

    columns = []
    for start in range(0, words.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        args = (*_trimmed(words[part], word_mask[part]), regions, region_mask, temp1, temp2, agg)
        if recompute and torch.is_grad_enabled():
            columns.append(checkpoint(_all_pair_scores, *args, use_reentrant=False))
        else:
            columns.append(_all_pair_scores(*args))
    return torch.cat(columns, dim=1)


def _trimmed(words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``words`` (B, W, D) and ``word_mask`` cut after the last position any report uses: trailing padding would
    cost the all-pairs attention as much as real words (a third of it at GLoRIA's lengths)."""
    used = word_mask.any(dim=0).nonzero()
    keep = int(used[-1]) + 1 if len(used) else 1  # reports without words keep one (masked) slot: finite scores
    return words[:, :keep], word_mask[:, :keep]


def _all_pair_scores(
    words: Tensor, word_mask: Tensor, regions: Tensor, region_mask: Tensor, temp1: float, temp2: float, agg: str
) -> Tensor:
    dots = torch.einsum("jwd,ind->ijwn", words, regions)  # (B_img, B_txt, W, N)
    attention = _double_softmax(dots, word_mask[None, :, :, None], region_mask[:, None, None, :], temp1)
    context = torch.einsum("ijwn,ind->ijwd", attention, regions)  # (B_img, B_txt, W, D)
    cos = F.cosine_similarity(words[None], context, dim=-1)  # (B_img, B_txt, W); same eps as the official code
    return _aggregate(temp2 * cos, word_mask[None], agg)  # (B_img, B_txt)


def _symmetric_cross_entropy(logits: Tensor) -> Tensor:
    """Mean of image->text (rows) and text->image (columns) cross-entropy with the diagonal as the pairs."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class GloriaLocalLoss(nn.Module):
    """GLoRIA's local loss: temp3 * S over the batch, cross-entropy in both directions (cross-sample negatives).

    ``forward`` returns the loss; ``attention_maps`` gives each report's word attention over its own image
    (B, W, N) for visualisation (reshape N to the grid), computed separately so training pays nothing for it.
    """

    def __init__(
        self,
        temp1: float = 4.0,
        temp2: float = 5.0,
        temp3: float = 10.0,
        agg: str = "sum",
        chunk_size: int | str | None = "auto",
        recompute: bool = True,
    ) -> None:
        super().__init__()
        if agg not in AGGREGATIONS:
            raise ConfigError(f"GLoRIA: agg must be one of {AGGREGATIONS}, got {agg!r}")
        resolve_chunking(chunk_size, recompute, torch.device("cpu"))  # a bad value fails here, not at step 1
        self.temp1, self.temp2, self.temp3, self.agg = temp1, temp2, temp3, agg
        self.chunk_size, self.recompute = chunk_size, recompute

    def scores(
        self, image_local: Tensor, region_mask: Tensor | None, words: Tensor, word_mask: Tensor | None
    ) -> Tensor:
        """(B_img, B_txt) local similarities S (before temp3)."""
        return gloria_local_scores(
            words,
            word_mask,
            image_local,
            region_mask,
            self.temp1,
            self.temp2,
            self.agg,
            self.chunk_size,
            self.recompute,
        )

    def forward(
        self, image_out_local: Tensor, region_mask: Tensor | None, words: Tensor, word_mask: Tensor | None
    ) -> Tensor:
        """image_out_local (B, N, D) = ImageOutput.local, region_mask its local_mask; words (B, W, D) and
        word_mask from TextOutput. Sample b of both is a pair."""
        if image_out_local.shape[0] != words.shape[0]:
            raise ConfigError(f"GLoRIA: {image_out_local.shape[0]} images but {words.shape[0]} reports")
        return _symmetric_cross_entropy(self.temp3 * self.scores(image_out_local, region_mask, words, word_mask))

    @torch.no_grad()
    def attention_maps(
        self, image_out_local: Tensor, region_mask: Tensor | None, words: Tensor, word_mask: Tensor | None
    ) -> Tensor:
        """(B, W, N) attention of each report's words over the regions of its own image."""
        return gloria_attention(words, image_out_local, self.temp1, word_mask, region_mask)[1]


def gloria_global_loss(image_emb: Tensor, text_emb: Tensor, temp3: float = 10.0) -> Tensor:
    """GLoRIA's global loss: cosine similarity (B_img, B_txt) x temp3, cross-entropy both directions, averaged."""
    sim = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B, B)
    return _symmetric_cross_entropy(temp3 * sim)
