"""Zero-shot multi-label classification with positive-vs-negative prompt pairs.

For each finding, the image is compared with a prompt saying the finding is present and one saying it is
absent; the softmax over the two similarities is the score (the protocol of the seed papers for multi-label
AUROC, see the evaluation spec). Uncertain (-1) and missing labels are left out of that finding's AUROC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

# Plain radiology phrasing; several prompts per side are averaged (the prompt ensemble of CLIP/GLoRIA).
PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cardiomegaly": (("Cardiomegaly.", "The heart is enlarged."), ("Heart size is normal.", "No cardiomegaly.")),
    "edema": (("Pulmonary edema.", "There is interstitial edema."), ("No pulmonary edema.", "No edema.")),
    "consolidation": (
        ("Consolidation is present.", "There is airspace consolidation."),
        ("No focal consolidation.", "No consolidation."),
    ),
    "atelectasis": (("Atelectasis.", "There is atelectasis."), ("No atelectasis.", "No collapse.")),
    "pleural_effusion": (
        ("Pleural effusion.", "There is a pleural effusion."),
        ("No pleural effusion.", "No effusion."),
    ),
    "pneumothorax": (("Pneumothorax.", "There is a pneumothorax."), ("No pneumothorax.", "No pneumothorax is seen.")),
    "nodule": (("Pulmonary nodule.", "There is a nodule."), ("No pulmonary nodule.", "No nodules.")),
    "mass": (("Lung mass.", "There is a mass."), ("No mass.", "No lung mass.")),
    "support_devices": (("Support device in place.", "A tube is present."), ("No support devices.", "No tubes.")),
}


def prompts_for(finding: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The prompt pair for ``finding``; unknown findings get generic phrasing from the display name."""
    if finding in PROMPTS:
        return PROMPTS[finding]
    name = finding.replace("_", " ").capitalize()
    return (f"{name}.", f"There is {name.lower()}."), (f"No {name.lower()}.", f"No evidence of {name.lower()}.")


def class_embeddings(encode_texts, findings: Sequence[str]) -> torch.Tensor:
    """(K, 2, D): averaged, re-normalised positive and negative prompt embeddings per finding."""
    rows = []
    for finding in findings:
        pair = []
        for prompts in prompts_for(finding):
            mean = encode_texts(list(prompts)).mean(dim=0)
            pair.append(mean / mean.norm().clamp_min(1e-8))
        rows.append(torch.stack(pair))
    return torch.stack(rows)


def zero_shot_scores(image_embeddings: torch.Tensor, classes: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """(N, D) images, (K, 2, D) prompt pairs -> (N, K) probability that each finding is present."""
    logits = torch.einsum("nd,kpd->nkp", image_embeddings, classes) / temperature
    return logits.softmax(dim=-1)[..., 0]


def auroc_per_finding(scores: np.ndarray, labels: np.ndarray, findings: Sequence[str]) -> dict[str, float]:
    """AUROC per finding over samples labelled 1 or 0 (uncertain -1 and missing NaN excluded); NaN if one class."""
    from sklearn.metrics import roc_auc_score

    result: dict[str, float] = {}
    for k, finding in enumerate(findings):
        keep = np.isin(labels[:, k], (0.0, 1.0))
        y = labels[keep, k]
        result[finding] = float(roc_auc_score(y, scores[keep, k])) if 0 < y.sum() < len(y) else float("nan")
    return result


def mean_auroc(per_finding: Mapping[str, float]) -> float:
    values = [v for v in per_finding.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
