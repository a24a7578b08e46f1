"""Linear probe and fine-tuning at several training-label fractions (the MGCA protocol, see the evaluation spec).

Both fit one linear layer on the image encoder's global feature with AdamW, early-stop on validation loss and keep
the best-validation weights, once per seed x fraction; test metrics are reported as mean +- std over seeds.
The probe reads the cached frozen features; fine-tuning trains a copy of the encoder at ``lr * encoder_lr_ratio``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radalign.config import TaskSpec, check_params
from radalign.errors import ConfigError, DataError
from radalign.evaluation.context import FEATURE_KINDS, EvalContext, TaskResult
from radalign.evaluation.metrics import Metric, binary_auroc, over_seeds

COMMON_DEFAULTS: dict[str, Any] = {
    "fractions": [0.01, 0.1, 1.0],
    "epochs": 50,
    "lr": 5e-4,
    "weight_decay": 1e-6,
    "batch_size": 48,
    "patience": 10,
    "label_type": "multilabel",
}
# features: "global" = each method's own global image representation before its projection (LoVT's and PRIOR's
# attention pools; the encoder's pooled output for the others), "backbone" = the encoder's pooled output for all.
PROBE_DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, "features": "global"}
FINETUNE_DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, "encoder_lr_ratio": 0.1}
LABEL_TYPES = ("multilabel", "multiclass")

# A fresh pass over (inputs, raw 1/0/-1/NaN labels) batches; called once per epoch so shuffling can differ.
Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]


def run_linear_probe(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    """One linear layer on the frozen encoder's cached global features, per seed and training fraction."""
    p = _params(spec, PROBE_DEFAULTS)
    start = time.perf_counter()
    data = {}
    for role in ("train", "val", "test"):
        features = ctx.features(role, p["features"])
        keep = usable_rows(features.labels, p["label_type"])
        data[role] = (features.x[keep].to(ctx.device), torch.from_numpy(features.labels[keep]).to(ctx.device))
    x_train, y_train = data["train"]
    _check_labels(ctx, y_train.cpu().numpy(), data["val"][1].cpu().numpy(), p["label_type"])

    def one_run(seed: int, rows: np.ndarray) -> tuple[int, int, Tensor, Tensor]:
        head = _head(x_train.shape[1], len(ctx.vocabulary), seed).to(ctx.device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        generator = torch.Generator().manual_seed(seed)
        index = torch.from_numpy(rows).to(ctx.device)
        x, y = x_train[index], y_train[index]

        def train() -> Iterable[tuple[Tensor, Tensor]]:
            order = torch.randperm(len(x), generator=generator).to(ctx.device)
            return ((x[b], y[b]) for b in order.split(p["batch_size"]))

        best, ran = fit(head, optimizer, train, lambda: [data["val"]], p["label_type"], p["epochs"], p["patience"])
        return best, ran, *predict(head, [data["test"]])

    return _evaluate(ctx, spec, p, y_train.cpu().numpy(), one_run, start)


def run_finetune(ctx: EvalContext, spec: TaskSpec) -> TaskResult:
    """A copy of the image encoder plus a linear head, trained end to end on the images (encoder at a lower lr)."""
    from torch.utils.data import DataLoader, Subset

    from radalign.data.dataset import Collate
    from radalign.data.schema import labels_to_vector

    p = _params(spec, FINETUNE_DEFAULTS)
    start = time.perf_counter()
    subsets, labels = {}, {}
    for role in ("train", "val", "test"):
        dataset = ctx.dataset(role)
        raw = [labels_to_vector(r.labels, ctx.vocabulary) for r in dataset.records]
        raw = np.asarray(raw, dtype=np.float32).reshape(len(raw), len(ctx.vocabulary))
        keep = np.flatnonzero(usable_rows(raw, p["label_type"]))
        subsets[role], labels[role] = Subset(dataset, keep.tolist()), raw[keep]
    _check_labels(ctx, labels["train"], labels["val"], p["label_type"])

    def batches(loader: DataLoader) -> Batches:
        return lambda: ((b["image"], b["labels"]) for b in loader if b["batch_size"])  # unreadable images skipped

    val, test = (batches(ctx.loader(subsets[r], batch_size=p["batch_size"])) for r in ("val", "test"))

    def one_run(seed: int, rows: np.ndarray) -> tuple[int, int, Tensor, Tensor]:
        encoder = copy.deepcopy(ctx.method.image_encoder).requires_grad_(True)  # never touch the evaluated model
        model = _EncoderHead(encoder, _head(encoder.out_dim, len(ctx.vocabulary), seed)).to(ctx.device)
        groups = [
            {"params": encoder.parameters(), "lr": p["lr"] * p["encoder_lr_ratio"]},
            {"params": model.head.parameters()},
        ]
        optimizer = torch.optim.AdamW(groups, lr=p["lr"], weight_decay=p["weight_decay"])
        train = DataLoader(
            Subset(subsets["train"], rows.tolist()),
            batch_size=p["batch_size"],
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=Collate(),
        )
        best, ran = fit(model, optimizer, batches(train), val, p["label_type"], p["epochs"], p["patience"])
        return best, ran, *predict(model, test())

    return _evaluate(ctx, spec, p, labels["train"], one_run, start)


class _EncoderHead(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images).global_emb.float())


def usable_rows(labels: np.ndarray, label_type: str) -> np.ndarray:
    """Rows a task can learn from: all (multi-label masks per finding) or exactly one positive (multi-class)."""
    if label_type == "multiclass":
        return (labels == 1).sum(axis=1) == 1
    return np.ones(len(labels), dtype=bool)


def sample_subset(labels: np.ndarray, fraction: float, seed: int, label_type: str = "multilabel") -> np.ndarray:
    """Sorted row indices of a seeded subset with max(round(fraction * N), m) rows; fraction 1 keeps all rows.

    The minimum m: multi-label, one positive and one negative row for every finding that has them in the split
    (a greedy cover, at most 2 per finding); multi-class, two rows per class (all of a class if it has fewer).
    """
    n = len(labels)
    if fraction >= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)  # same permutation for every fraction of a seed: subsets are nested-ish
    order = rng.permutation(n)
    required: list[int] = []
    if label_type == "multiclass":
        classes = (labels[order] == 1).argmax(axis=1)
        for c in np.unique(classes):
            required += order[classes == c][:2].tolist()
    else:
        for k in range(labels.shape[1]):
            for value in (1.0, 0.0):
                hits = order[labels[order, k] == value]
                if len(hits) and not (labels[required, k] == value).any():
                    required.append(int(hits[0]))
    size = min(n, max(int(fraction * n + 0.5), len(required), 1))
    rest = order[~np.isin(order, required)][: size - len(required)]
    return np.sort(np.concatenate([np.asarray(required, dtype=int), rest]))


def loss_fn(logits: Tensor, labels: Tensor, label_type: str) -> Tensor:
    """BCE over the findings labelled 0/1 of each row (uncertain and missing masked), or cross-entropy."""
    if label_type == "multiclass":
        return F.cross_entropy(logits, (labels == 1).float().argmax(dim=1))
    known = (labels == 0) | (labels == 1)
    target = torch.where(known, labels, torch.zeros_like(labels))
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Batches,
    val: Batches,
    label_type: str,
    epochs: int,
    patience: int,
) -> tuple[int, int]:
    """Train until validation loss has not improved for ``patience`` epochs; restore the best weights.

    Returns (best epoch, epochs run), both counted from 1.
    """
    device = next(model.parameters()).device
    best_loss, best_epoch = math.inf, 0
    best_state = copy.deepcopy(model.state_dict())
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train():
            loss = loss_fn(model(x.to(device)), y.to(device), label_type)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_loss = float(loss_fn(*predict(model, val()), label_type))
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return best_epoch, epoch


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(logits, raw labels) over all batches, on the CPU, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [(model(x.to(device)).float().cpu(), y.float().cpu()) for x, y in batches]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def scores(logits: Tensor, labels: Tensor, label_type: str, findings: Sequence[str]) -> dict[str, Any]:
    """Test metrics of one run: macro and per-finding AUROC, or accuracy and macro-F1 (scikit-learn)."""
    y = labels.numpy()
    if label_type == "multiclass":
        from sklearn.metrics import accuracy_score, f1_score

        truth, pred = (y == 1).argmax(axis=1), logits.argmax(dim=1).numpy()
        return {
            "accuracy": float(accuracy_score(truth, pred)),
            "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        }
    probs = torch.sigmoid(logits).numpy()
    per = {f: binary_auroc(y[:, k], probs[:, k]) for k, f in enumerate(findings)}
    finite = [v for v in per.values() if not np.isnan(v)]
    return {"auroc": float(np.mean(finite)) if finite else float("nan"), "per_finding": per}


def _params(spec: TaskSpec, defaults: dict[str, Any]) -> dict[str, Any]:
    p = check_params(spec.name, spec.params, defaults)
    fractions = p["fractions"] if isinstance(p["fractions"], list | tuple) else [p["fractions"]]
    if not fractions or not all(isinstance(f, int | float) and 0 < f <= 1 for f in fractions):
        raise ConfigError(
            f"task {spec.name}: fractions must be numbers in (0, 1], e.g. [0.01, 0.1, 1.0]; got {p['fractions']!r}"
        )
    if p["label_type"] not in LABEL_TYPES:
        raise ConfigError(f"task {spec.name}: label_type must be one of {LABEL_TYPES}; got {p['label_type']!r}")
    if "features" in p and p["features"] not in FEATURE_KINDS:
        raise ConfigError(
            f"task {spec.name}: features must be one of {', '.join(FEATURE_KINDS)} (global: each method's own global "
            f"image representation; backbone: the image encoder's pooled output); got {p['features']!r}"
        )
    for key, kind, low in (("epochs", int, 1), ("batch_size", int, 1), ("patience", int, 1), ("lr", float, 1e-12),
                           ("weight_decay", float, 0), ("encoder_lr_ratio", float, 0)):  # fmt: skip
        value = p.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int | kind) or value < low:  # YAML reads 5e-4 as a str
            raise ConfigError(f"task {spec.name}: {key} must be a {kind.__name__} >= {low:g}; got {value!r}")
    return {**p, "fractions": sorted({float(f) for f in fractions})}


def _check_labels(ctx: EvalContext, train: np.ndarray, val: np.ndarray, label_type: str) -> None:
    if not ctx.vocabulary:
        raise ConfigError("the probe needs findings: set the protocol's findings or add label_* manifest columns")
    for role, labels in (("train", train), ("val", val)):
        split = ctx.protocol.splits[role]
        if label_type == "multiclass" and not len(labels):
            raise DataError(
                f"split {split!r} has no row with exactly one positive finding among "
                f"{list(ctx.vocabulary)}; use label_type: multilabel or add single-label rows"
            )
        if label_type == "multilabel" and not np.isin(labels, (0.0, 1.0)).any():
            raise DataError(
                f"split {split!r} has no 0/1 label for any of {list(ctx.vocabulary)}; add label_* "
                "columns for these findings to the manifest or set the protocol's findings"
            )


def _head(dim: int, classes: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's random state
        torch.manual_seed(seed)
        return nn.Linear(dim, classes)


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _evaluate(
    ctx: EvalContext,
    spec: TaskSpec,
    p: dict[str, Any],
    train_labels: np.ndarray,
    one_run: Callable[[int, np.ndarray], tuple[int, int, Tensor, Tensor]],
    start: float,
) -> TaskResult:
    """Every (seed, fraction) run, then metrics over seeds, details and the label-efficiency figure."""
    from rich.progress import track

    label_type, findings, largest = p["label_type"], list(ctx.vocabulary), p["fractions"][-1]
    runs = [(seed, f) for seed in ctx.protocol.seeds for f in p["fractions"]]
    details: list[dict[str, Any]] = []
    for seed, fraction in track(runs, f"{spec.name} (seed x fraction)", disable=not ctx.progress, transient=True):
        rows = sample_subset(train_labels, fraction, seed, label_type)
        best, ran, logits, labels = one_run(seed, rows)
        run = {"seed": seed, "fraction": fraction, "n_train": len(rows), "best_epoch": best, "epochs_run": ran}
        details.append({**run, **scores(logits, labels, label_type, findings)})
    names = ("accuracy", "macro_f1") if label_type == "multiclass" else ("auroc",)
    metrics: dict[str, Metric] = {}
    for fraction in p["fractions"]:
        for name in names:
            metrics[f"{name}@{_pct(fraction)}"] = over_seeds([d[name] for d in details if d["fraction"] == fraction])
    notes = []
    if label_type == "multilabel":  # per finding only at the largest fraction: keeps the report's table short
        for finding in findings:
            values = [d["per_finding"][finding] for d in details if d["fraction"] == largest]
            metrics[f"auroc@{_pct(largest)}/{finding}"] = over_seeds(values)
        missing = [f for k, f in enumerate(findings) if not (train_labels[:, k] == 1).any()]
        if missing:
            notes.append(f"no positive training label for {', '.join(missing)}: their AUROC reflects an untrained head")
    figure = _figure(ctx, spec, p["fractions"], [metrics[f"{names[0]}@{_pct(f)}"] for f in p["fractions"]], names[0])
    summary = {"label_type": label_type, "findings": findings, "n_train_rows": len(train_labels), "params": p}
    if "features" in p:  # the linear probe: which representation it read, in words
        summary["features"] = (
            ctx.method.global_feature_name if p["features"] == "global" else "the image encoder's pooled output"
        )
    return TaskResult(metrics, [figure], {**summary, "runs": details}, notes=notes, seconds=time.perf_counter() - start)


def _figure(ctx: EvalContext, spec: TaskSpec, fractions: list[float], values: list[Metric], name: str) -> str:
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never touches a global backend

    path, rel = ctx.figure(spec.name, "label_efficiency.png")
    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.subplots()
    ax.errorbar(
        [f * 100 for f in fractions],
        [m.value for m in values],
        yerr=[m.std or 0 for m in values],
        marker="o",
        capsize=3,
    )
    ax.set_xscale("log")
    ax.set_xticks([f * 100 for f in fractions], [_pct(f) for f in fractions])
    ax.set_xlabel("training labels")
    ax.set_ylabel(f"test {name} (mean ± std, {values[0].n} seeds)")
    ax.set_title(spec.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return rel
