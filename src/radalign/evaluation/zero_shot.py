"""Zero-shot classification: score images against class prompts, no training.

Prompt sets (``prompts`` param):

- ``pairs``: a positive and a negative prompt per finding ("Pleural effusion." / "No pleural effusion."); the
  softmax over the two similarities is the score. The usual protocol for multi-label AUROC.
- ``single``: one template per class ("{name} is observed.", PRIOR); the score is the cosine similarity.
- ``ensemble``: GLoRIA-style: prompts composed from severity x subtype x location word lists, ``n_prompts``
  sampled per class (seeded), embeddings averaged and re-normalised.
- ``custom``: ``{finding: {positive: [...], negative: [...]}}`` from the protocol.
- ``learned``: the model's own learned prompt context (UMCL) before the finding's name and before "no <name>",
  scored as a pair.

``mode: multilabel`` gives AUROC per finding (uncertain and missing labels left out) and the macro mean;
``mode: multiclass`` (CheXpert 5x200 style) keeps images with exactly one positive among the findings and
reports accuracy, macro-F1 and Cohen's kappa with a confusion matrix. Every number has a bootstrap interval.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from radalign.evaluation.metrics import binary_auroc, bootstrap, macro_auroc

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

# GLoRIA-style composition (our own word lists, in the spirit of gloria/constants.py): severity x subtype x location.
ENSEMBLE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "cardiomegaly": (("", "mild", "moderate", "marked"), ("cardiomegaly", "enlargement of the cardiac silhouette"),
                     ("", "with normal pulmonary vasculature", "without edema")),
    "edema": (("", "mild", "moderate", "severe"), ("pulmonary edema", "interstitial edema", "vascular congestion"),
              ("", "bilateral", "perihilar")),
    "consolidation": (("", "small", "patchy", "dense"), ("consolidation", "airspace opacity", "airspace disease"),
                      ("", "in the right upper lobe", "in the left lower lobe", "at the lung base")),
    "atelectasis": (("", "mild", "subsegmental", "minimal"), ("atelectasis", "volume loss"),
                    ("", "at the left base", "at the right base", "bibasilar")),
    "pleural_effusion": (("", "small", "moderate", "large"), ("pleural effusion", "effusion"),
                         ("", "on the left", "on the right", "bilateral")),
    "pneumothorax": (("", "small", "moderate", "large"), ("pneumothorax", "apical pneumothorax"),
                     ("", "on the left", "on the right")),
    "nodule": (("", "small", "1 cm", "well-defined"), ("pulmonary nodule", "nodular opacity"),
               ("", "in the right upper lobe", "in the left lung", "in the right lower lobe")),
    "mass": (("", "large", "4 cm", "lobulated"), ("lung mass", "mass lesion"),
             ("", "in the right upper lobe", "in the left lung", "in the hilum")),
    "support_devices": (("",), ("endotracheal tube", "central venous catheter", "nasogastric tube", "pacemaker"),
                        ("in place", "with tip in good position", "")),
}  # fmt: skip

DEFAULTS: dict[str, Any] = {
    "mode": "multilabel",
    "prompts": "pairs",
    "template": "{name} is observed.",
    "n_prompts": 5,
    "custom": {},
    "findings": [],
    "temperature": 0.07,
    "local_weight": 0.0,  # GLoRIA / PRIOR: score = global + local_weight x the method's local similarity
}


def display_name(finding: str) -> str:
    return finding.replace("_", " ")


def prompts_for(finding: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The prompt pair for ``finding``; unknown findings get generic phrasing from the display name."""
    if finding in PROMPTS:
        return PROMPTS[finding]
    name = display_name(finding)
    return (f"{name.capitalize()}.", f"There is {name}."), (f"No {name}.", f"No evidence of {name}.")


def ensemble_prompts(finding: str, n: int, seed: int = 0) -> list[str]:
    """``n`` GLoRIA-style prompts for ``finding``, sampled without replacement from severity x subtype x location."""
    severity, subtype, location = ENSEMBLE_WORDS.get(finding, (("",), (display_name(finding),), ("",)))
    combos = [" ".join(w for w in c if w) for c in itertools.product(severity, subtype, location)]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(combos), size=min(n, len(combos)), replace=False)
    return [combos[i][0].upper() + combos[i][1:] + "." for i in sorted(chosen)]


def _mean_embedding(encode_texts: Callable[[list[str]], torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
    mean = encode_texts(list(prompts)).mean(dim=0)
    return mean / mean.norm().clamp_min(1e-8)


def class_embeddings(encode_texts, findings: Sequence[str]) -> torch.Tensor:
    """(K, 2, D): averaged, re-normalised positive and negative prompt embeddings per finding."""
    return torch.stack(
        [torch.stack([_mean_embedding(encode_texts, side) for side in prompts_for(f)]) for f in findings]
    )


def prompt_set(findings: Sequence[str], params: Mapping[str, Any]) -> dict[str, tuple[list[str], list[str]]]:
    """finding -> (positive prompts, negative prompts; empty when the set has no negatives)."""
    kind = params["prompts"]
    result: dict[str, tuple[list[str], list[str]]] = {}
    for finding in findings:
        if kind == "pairs":
            positive, negative = prompts_for(finding)
            result[finding] = (list(positive), list(negative))
        elif kind == "single":
            result[finding] = ([params["template"].format(name=display_name(finding).capitalize())], [])
        elif kind == "ensemble":
            result[finding] = (ensemble_prompts(finding, params["n_prompts"]), [])
        elif kind == "learned":  # encoded through the model's context vectors (encode_learned_prompts)
            result[finding] = ([display_name(finding)], [f"no {display_name(finding)}"])
        elif kind == "custom":
            spec = params["custom"].get(finding)
            if not spec or not spec.get("positive"):
                from radalign.errors import ConfigError

                raise ConfigError(f"zero_shot: custom prompts give no 'positive' list for finding {finding!r}")
            result[finding] = (list(spec["positive"]), list(spec.get("negative", [])))
        else:
            from radalign.errors import ConfigError

            raise ConfigError(f"zero_shot: prompts must be pairs, single, ensemble, custom or learned, got {kind!r}")
    return result


def zero_shot_scores(image_embeddings: torch.Tensor, classes: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """(N, D) images, (K, 2, D) prompt pairs -> (N, K) probability that each finding is present."""
    logits = torch.einsum("nd,kpd->nkp", image_embeddings, classes) / temperature
    return logits.softmax(dim=-1)[..., 0]


def score_images(
    images: torch.Tensor,
    encode_texts: Callable[[list[str]], torch.Tensor],
    prompts: Mapping[str, Any],
    temp: float,
    *,
    local: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    local_weight: float = 0.0,
) -> np.ndarray:
    """(N, D) image embeddings -> (N, K) scores: pair softmax where a class has negatives, else cosine.

    ``local``: per class, (N,) local similarities of the positive (and negative) prompts, added with
    ``local_weight`` to the global cosine before the pair softmax.
    """
    columns = []
    for finding, (positive, negative) in prompts.items():
        pos_sim = images @ _mean_embedding(encode_texts, positive)
        neg_sim = images @ _mean_embedding(encode_texts, negative) if negative else None
        if local is not None:
            local_pos, local_neg = local[finding]
            pos_sim = pos_sim + local_weight * local_pos
            if neg_sim is not None and local_neg is not None:
                neg_sim = neg_sim + local_weight * local_neg
        if neg_sim is None:
            columns.append(pos_sim)
        else:
            columns.append(torch.stack([pos_sim, neg_sim], dim=1).div(temp).softmax(dim=1)[:, 0])
    return torch.stack(columns, dim=1).numpy()


@torch.no_grad()
def _local_scores(ctx: Any, prompts: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per class, the method's local similarity of every test image with its prompts, averaged over prompts."""
    from radalign.errors import ConfigError

    texts = sorted({t for positive, negative in prompts.values() for t in (*positive, *negative)})
    tokens = {k: v.to(ctx.device) for k, v in ctx.model.tokenize(texts).items() if k != "n_sentences"}
    rows = []
    for batch in ctx.loader(ctx.dataset("test")):
        if batch["batch_size"]:
            sim = ctx.method.local_similarity(batch["image"].to(ctx.device), tokens)
            if sim is None:
                raise ConfigError(
                    f"zero_shot: local_weight is set but method {ctx.method.config.method!r} has no local "
                    "similarity (global-only methods: leave local_weight at 0)"
                )
            rows.append(sim.float().cpu())
    table = torch.cat(rows)  # (N, P) in the order of ``texts``; the same test order as ``ctx.embedded``
    column = {t: i for i, t in enumerate(texts)}

    def mean_over(group: list[str]) -> torch.Tensor | None:
        return table[:, [column[t] for t in group]].mean(dim=1) if group else None

    return {f: (mean_over(list(p)), mean_over(list(n))) for f, (p, n) in prompts.items()}


def auroc_per_finding(scores: np.ndarray, labels: np.ndarray, findings: Sequence[str]) -> dict[str, float]:
    """AUROC per finding over samples labelled 1 or 0 (uncertain -1 and missing NaN excluded); NaN if one class."""
    return {f: binary_auroc(labels[:, k], scores[:, k]) for k, f in enumerate(findings)}


def mean_auroc(per_finding: Mapping[str, float]) -> float:
    values = [v for v in per_finding.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def run_zero_shot(ctx: Any, spec: Any) -> Any:
    """The zero-shot task of a protocol on the test split (see the module docstring for params)."""
    from radalign.config import check_params
    from radalign.evaluation.context import TaskResult

    start = time.perf_counter()
    params = check_params("zero_shot", spec.params, DEFAULTS)
    embedded = ctx.embedded("test", text=False)
    findings = [f for f in (params["findings"] or ctx.vocabulary) if f in embedded.vocabulary]
    if not findings:
        from radalign.errors import ConfigError

        raise ConfigError(f"zero_shot: none of the findings {params['findings']} is a label of the manifest")
    labels = embedded.labels[:, [embedded.vocabulary.index(f) for f in findings]]
    if not np.isin(labels, (0.0, 1.0)).any():
        from radalign.errors import DataError

        raise DataError(
            f"zero_shot: the test split has no 0/1 label for any of {findings}, so no AUROC can be computed; add "
            "label_<finding> columns (or CheXpert-named ones) to the manifest, or label the reports first"
        )
    prompts = prompt_set(findings, params)
    local = _local_scores(ctx, prompts) if params["local_weight"] else None
    encode = ctx.model.encode_learned_prompts if params["prompts"] == "learned" else ctx.model.encode_texts
    scores = score_images(embedded.images, encode, prompts, params["temperature"],
                          local=local, local_weight=params["local_weight"])  # fmt: skip
    resamples = ctx.protocol.bootstrap
    if params["mode"] == "multiclass":
        result = _multiclass(ctx, spec, scores, labels, findings, resamples)
    else:
        metrics = {"auroc": bootstrap(macro_auroc, labels, scores, resamples=resamples)}
        for k, f in enumerate(findings):
            metrics[f"auroc/{f}"] = bootstrap(binary_auroc, labels[:, k], scores[:, k], resamples=resamples)
        result = TaskResult(metrics, figures=[_roc_figure(ctx, spec.name, labels, scores, findings)])
    result.details["prompts"] = {f: {"positive": p, "negative": n} for f, (p, n) in prompts.items()}
    result.details["n_images"] = len(scores)
    result.seconds = time.perf_counter() - start
    return result


def _multiclass(ctx: Any, spec: Any, scores: np.ndarray, labels: np.ndarray, findings: list[str], resamples: int):
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    from radalign.evaluation.context import TaskResult

    one_positive = (labels == 1).sum(axis=1) == 1
    y = np.argmax(labels[one_positive] == 1, axis=1)
    predicted = scores[one_positive].argmax(axis=1)
    classes = list(range(len(findings)))
    metrics = {
        "accuracy": bootstrap(lambda a, b: accuracy_score(a, b), y, predicted, resamples=resamples),
        "macro_f1": bootstrap(
            lambda a, b: f1_score(a, b, labels=classes, average="macro", zero_division=0), y, predicted,
            resamples=resamples,
        ),
        "kappa": bootstrap(lambda a, b: cohen_kappa_score(a, b, labels=classes), y, predicted, resamples=resamples),
    }  # fmt: skip
    figure = _confusion_figure(ctx, spec.name, y, predicted, findings)
    notes = [f"{int(one_positive.sum())} of {len(labels)} test images have exactly one of the classes"]
    return TaskResult(metrics, figures=[figure], notes=notes)


def _roc_figure(ctx: Any, task: str, labels: np.ndarray, scores: np.ndarray, findings: list[str]) -> str:
    from radalign.utils.plotting import pyplot, save

    plt = pyplot()
    from sklearn.metrics import roc_curve

    path, relative = ctx.figure(task, "roc.png")
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
    for k, finding in enumerate(findings):
        keep = np.isin(labels[:, k], (0.0, 1.0))
        y = labels[keep, k]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, scores[keep, k])
            ax.plot(fpr, tpr, lw=1.2, label=f"{display_name(finding)} ({binary_auroc(labels[:, k], scores[:, k]):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("zero-shot ROC (AUROC)")
    ax.legend(fontsize=7, loc="lower right")
    save(fig, path)
    return relative


def _confusion_figure(ctx: Any, task: str, y: np.ndarray, predicted: np.ndarray, findings: list[str]) -> str:
    from radalign.utils.plotting import pyplot, save

    plt = pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    path, relative = ctx.figure(task, "confusion.png")
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    ConfusionMatrixDisplay.from_predictions(
        y, predicted, labels=list(range(len(findings))), display_labels=[display_name(f) for f in findings],
        ax=ax, colorbar=False, xticks_rotation=45,
    )  # fmt: skip
    ax.set_title("zero-shot, one class per image")
    save(fig, path)
    return relative
