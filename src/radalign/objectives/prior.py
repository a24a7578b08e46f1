"""PRIOR's Sentence Prototype Bank and the prototype-reconstruction losses (docs/methods/prior.md).

- :class:`SentencePrototypeBank` quantises sentence embeddings onto a learnable codebook (Gumbel-softmax in
  training, noise-free at evaluation) and returns L_SPB = mean |s^ - s|.
- :func:`prototype_reconstruction_loss` is L_spg without its weight: Hungarian matching of the decoder's query
  outputs to the report's prototypes, then the L1 loss over the VALID slots only.
- :func:`prototype_kl_loss` is L_kl = KL(softmax(s E^T) || softmax(O E^T)) over the matched valid slots.

Fixed official bugs: Gumbel noise at test time (4) - eval mode is deterministic; zero-padded prototype slots in the
L1 loss (3) - only valid slots count. Loss weights (10 L_SPB, 10 L_spg) are the caller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.objectives.local.common import masked_mean

EVAL_ASSIGNMENTS = ("softmax", "argmax")


def _upcast(x: Tensor) -> Tensor:
    """Half / bfloat16 -> float32 for reductions (sums over many elements overflow or lose precision in 16 bit)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class SentencePrototypeBank(nn.Module):
    """PRIOR's SPB: codebook E (n_prototypes, dim), N(0, 1) init; s^ = pi E with pi an assignment over E.

    Training: pi = GumbelSoftmax(s E^T, tau, soft). Evaluation (``not self.training``): no noise, so inference is
    deterministic (fixes official bug 4): ``eval_assignment="softmax"`` gives pi = softmax(s E^T / tau),
    ``"argmax"`` the one-hot of the best prototype (s^ is then exactly a codebook row).
    """

    def __init__(
        self, n_prototypes: int = 512, dim: int = 768, tau: float = 0.9, eval_assignment: str = "softmax"
    ) -> None:
        super().__init__()
        if eval_assignment not in EVAL_ASSIGNMENTS:
            raise ConfigError(
                f"SentencePrototypeBank eval_assignment={eval_assignment!r} is not one of {list(EVAL_ASSIGNMENTS)}; "
                "choose 'softmax' (noise-free soft assignment) or 'argmax' (nearest prototype)."
            )
        if not tau > 0:
            raise ConfigError(f"SentencePrototypeBank tau={tau!r} must be > 0 (Gumbel-softmax temperature).")
        self.n_prototypes, self.dim, self.tau, self.eval_assignment = n_prototypes, dim, float(tau), eval_assignment
        self.codebook = nn.Parameter(torch.randn(n_prototypes, dim))

    def forward(self, sentences: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """sentences (B, S, D), mask (B, S) bool (True = real) or None (all real).

        Returns (quantised (B, S, D), loss, logits (B, S, n)) with logits = s E^T, quantised = pi E (zero on padded
        rows) and loss = mean |quantised - s| over the valid rows and the D dims. The loss is not detached on
        either side: it pulls the codebook towards the sentences and the sentences towards the codebook.
        """
        codebook = self.codebook.to(sentences.dtype)
        logits = sentences @ codebook.T  # (B, S, n)
        if self.training:
            assignment = F.gumbel_softmax(logits, tau=self.tau, hard=False, dim=-1)
        elif self.eval_assignment == "softmax":
            assignment = (logits / self.tau).softmax(dim=-1)
        else:
            assignment = F.one_hot(logits.argmax(dim=-1), self.n_prototypes).to(logits.dtype)
        quantised = assignment @ codebook  # (B, S, D)
        if mask is None:
            mask = torch.ones(sentences.shape[:2], dtype=torch.bool, device=sentences.device)
        mask = mask.bool()
        quantised = torch.where(mask[..., None], quantised, 0.0)
        per_row = (_upcast(quantised) - _upcast(sentences)).abs().mean(dim=-1)  # (B, S)
        return quantised, masked_mean(per_row, mask, dim=(0, 1)), logits

    def extra_repr(self) -> str:
        return f"n_prototypes={self.n_prototypes}, dim={self.dim}, tau={self.tau}, eval={self.eval_assignment}"


def prototype_perplexity(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """exp(entropy) of how the batch's valid sentences spread over their nearest prototypes (argmax of s E^T),
    as VQ codebooks are monitored: the effective number of prototypes in use, 1 when every sentence goes to the
    same prototype (a collapsed bank), n_prototypes at most. A training diagnostic, not a loss (no gradient)."""
    rows = logits.detach().reshape(-1, logits.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]
    if rows.shape[0] == 0:
        return torch.tensor(float("nan"), device=logits.device)
    share = torch.bincount(rows.argmax(dim=-1), minlength=rows.shape[-1]).float() / rows.shape[0]
    return torch.exp(-(share * share.clamp_min(1e-12).log()).sum())


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment for a (Q, T) cost matrix: (rows, cols) LongTensors of length min(Q, T).

    scipy's ``linear_sum_assignment`` on a detached float64 CPU copy (rows sorted ascending); the indices come back
    on ``cost``'s device. Rectangular costs match min(Q, T) pairs, leaving the surplus rows or columns unmatched.
    """
    rows, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy())
    return (
        torch.as_tensor(rows, dtype=torch.long, device=cost.device),
        torch.as_tensor(cols, dtype=torch.long, device=cost.device),
    )


def prototype_reconstruction_loss(
    outputs: Tensor, targets: Tensor, target_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """L_spg without its weight: outputs (B, Q, D) decoder queries, targets (B, T, D) prototypes, target_mask (B, T).

    Per sample, the outputs are matched to the VALID targets by the Hungarian algorithm on the L1 cost
    cost[q, t] = mean_d |O_q - T_t| ([design] the mean over D rather than the sum: same assignment, a cost on the
    loss's scale). Returns (loss, matched (B, T, D), match_mask (B, T)): matched[b, t] is the output assigned to
    target t (zero where none), match_mask marks the matched valid targets (all valid ones when Q >= their count),
    and loss = mean |matched - T| over the matched slots and D (padded slots never count: fixes official bug 3).
    Targets are not detached here; the caller decides. The cost is vectorised; only the assignment loops (scipy).
    """
    b, t, d = targets.shape
    mask = target_mask.bool()
    with torch.no_grad():
        cost = torch.cdist(_upcast(outputs.detach()), _upcast(targets.detach()), p=1) / d  # (B, Q, T)
    # One device -> host copy for the whole batch rather than one per sample.
    cost_cpu, mask_cpu = cost.to("cpu", torch.float64), mask.cpu()
    assign = torch.zeros(b, t, dtype=torch.long)  # (B, T): the query matched to each target
    match_mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        valid = mask_cpu[i].nonzero().squeeze(1)
        if valid.numel() == 0:
            continue
        rows, cols = hungarian_match(cost_cpu[i][:, valid])
        assign[i, valid[cols]] = rows
        match_mask[i, valid[cols]] = True
    assign, match_mask = assign.to(outputs.device), match_mask.to(outputs.device)
    matched = outputs.gather(1, assign[..., None].expand(b, t, outputs.shape[-1]))
    matched = torch.where(match_mask[..., None], matched, 0.0)
    per_slot = (_upcast(matched) - _upcast(targets)).abs().mean(dim=-1)  # (B, T)
    return masked_mean(per_slot, match_mask, dim=(0, 1)), matched, match_mask


def prototype_kl_loss(sentence_logits: Tensor, output_logits: Tensor, mask: Tensor) -> Tensor:
    """L_kl = KL(softmax(sentence_logits) || softmax(output_logits)), summed over the n prototypes, averaged over
    the valid slots ("batchmean" over the rows where ``mask`` (B, T) is True).

    sentence_logits, output_logits (B, T, n): s E^T of the report's sentences and O E^T of the matched decoder
    outputs, slot-aligned (see :func:`prototype_reconstruction_loss`). Neither side is detached here.
    """
    kl = F.kl_div(
        _upcast(output_logits).log_softmax(dim=-1),
        _upcast(sentence_logits).log_softmax(dim=-1),
        log_target=True,
        reduction="none",
    ).sum(dim=-1)  # (B, T)
    return masked_mean(kl, mask, dim=(0, 1))
