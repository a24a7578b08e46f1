"""UMCL: unified image-text-label contrast with continuous prompts (Wang, BIBM 2023; docs/methods/umcl.md).

CLIP's encoders and global InfoNCE, with three changes:
1. **Labels decide the positives** (UniCL): two samples with the same label set are positives of each other in
   both directions (``positives: label_set``), or the targets are MedCLIP's soft label similarity
   (``positives: soft``); a sample without labels has only itself. Labels are gathered across processes with the
   embeddings, so a positive on another process counts.
2. **Image-label samples become image-text samples**: a sample without a report gets a text made from its labels
   ("cardiomegaly, pleural effusion"; "no finding" has its own), through hand-written templates sampled from
   torch's generator (seeded by the run, kept in checkpoints) or through the continuous prompt learner
   (``models/prompts.py``), both in one batch with the report samples, one loss over all of them.
3. **Learned prompts for zero-shot**: ``encode_learned_prompts`` scores class names through the same context
   vectors (the zero-shot task's ``prompts: learned``); exports carry the vectors.

Labels: ``uncertain`` maps -1 to positive, negative or unknown (``ignore``), for all findings or per finding (as
MGCA reads CheXpert); ``missing`` counts an empty cell of a labelled sample as negative (what a report that does
not mention a finding says) or unknown. Reports without any label are labelled on the fly by radalign's report
labeler (``label_reports``). Every reading of the paper is marked [design] in the doc page.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from radalign.config import check_options
from radalign.data.schema import DEFAULT_FINDINGS
from radalign.errors import ConfigError
from radalign.methods.clip import CLIP
from radalign.methods.registry import register
from radalign.objectives.contrastive import gather_rows, label_positives, label_similarity_targets

NO_FINDING = "no_finding"
# findings whose presence does not make a study abnormal (CheXpert's No Finding rule)
NOT_PATHOLOGY = {NO_FINDING, "support_devices"}
POLICIES = ("ignore", "positive", "negative")
MODEL_OPTIONS: dict[str, Any] = {
    "classes": list(DEFAULT_FINDINGS),
    "positives": "label_set",  # label_set (UniCL) | soft (MedCLIP) | none (plain CLIP)
    "uncertain": "ignore",  # ignore | positive | negative, or {finding: policy} (unlisted findings: ignore)
    "missing": "negative",  # negative | unknown: an empty label cell of a sample that has labels
    "label_reports": True,  # reports with no label at all get the report labeler's labels
    "prompts": "learned",  # learned | template: how a sample without a report gets its text
    "templates": ["{findings}.", "There is {findings}.", "Findings consistent with {findings}.",
                  "The radiograph shows {findings}.", "{findings} is seen."],
    "no_finding_text": "no acute abnormality",
    "prompt_negatives": False,  # also name the findings labelled 0: "cardiomegaly, no pleural effusion"
    "n_ctx": 16,  # context vectors of a randomly initialised prompt learner
    "prompt_init": "findings consistent with",  # the template the context starts from; null = random (std 0.02)
    "class_specific": False,
}  # fmt: skip


@register("umcl")
class UMCL(CLIP):
    objective_names = ("global",)
    label_only_samples: ClassVar[bool] = True

    def __init__(self, config: Any, tokenizer: Any = None, *, for_inference: bool = False) -> None:
        options = check_options("umcl model.options", config.model.options, MODEL_OPTIONS)
        self.options = _checked(options)
        super().__init__(config, tokenizer, for_inference=for_inference)
        self.classes = list(self.options["classes"])
        self.prompt_learner = None
        if self.options["prompts"] == "learned":
            from radalign.models.prompts import PromptLearner

            self.prompt_learner = PromptLearner(
                self.text_encoder.model.get_input_embeddings(), tokenizer, n_ctx=int(self.options["n_ctx"]),
                init=self.options["prompt_init"], classes=self.classes,
                class_specific=bool(self.options["class_specific"]), max_length=config.loader.max_length,
            )  # fmt: skip
        self._labeler = None

    # -- labels ---------------------------------------------------------------------------------------------------
    def class_labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, C) labels over ``classes`` after the uncertainty and missing-label policies: 1, 0 or NaN."""
        vocabulary = list(batch.get("vocabulary", ()))
        raw = batch["labels"].float()
        labels = torch.full((raw.shape[0], len(self.classes)), float("nan"), device=raw.device)
        for c, name in enumerate(self.classes):
            if name in vocabulary:
                labels[:, c] = raw[:, vocabulary.index(name)]
        if self.options["label_reports"] and "sentences" in batch:
            self._label_reports(labels, batch)
        labelled = ~labels.isnan().all(dim=1)
        for c, name in enumerate(self.classes):
            policy = self._policy(name)
            column = labels[:, c]
            column[column == -1] = {"positive": 1.0, "negative": 0.0, "ignore": float("nan")}[policy]
            if self.options["missing"] == "negative":
                column[column.isnan() & labelled] = 0.0
        if NO_FINDING in self.classes:  # derived where the source did not say: no pathology positive
            c = self.classes.index(NO_FINDING)
            pathology = [i for i, n in enumerate(self.classes) if n not in NOT_PATHOLOGY]
            derived = (labels[:, pathology] != 1).all(dim=1).float()
            unset = labels[:, c].isnan() & labelled
            labels[unset, c] = derived[unset]
        return labels

    def _policy(self, name: str) -> str:
        policy = self.options["uncertain"]
        return policy.get(name, "ignore") if isinstance(policy, dict) else policy

    def _label_reports(self, labels: torch.Tensor, batch: dict[str, Any]) -> None:
        """Fill the labels of report samples that have none from the report labeler (data/labeler.py)."""
        if self._labeler is None:
            from radalign.data.labeler import Labeler

            self._labeler = Labeler.from_yaml()
        has_report = batch.get("has_report", torch.ones(labels.shape[0], dtype=torch.bool))
        for i, sentences in enumerate(batch["sentences"]):
            if not bool(has_report[i]) or not sentences or not labels[i].isnan().all():
                continue
            found = self._labeler.label_report(" ".join(sentences)).labels
            for c, name in enumerate(self.classes):
                if name in found:
                    labels[i, c] = float(found[name])

    def targets(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The InfoNCE's positives or soft targets for this process's rows against the gathered batch."""
        kind = self.options["positives"]
        if kind == "none":
            return {}
        gathered, _ = gather_rows(labels, with_grad=False)
        if kind == "label_set":
            return {"positives": label_positives(labels, gathered, unknown="ignore")}
        return {"soft_targets": label_similarity_targets(labels, gathered)}

    # -- text -------------------------------------------------------------------------------------------------
    def label_texts(self, labels: torch.Tensor) -> tuple[list[str], list[list[str]]]:
        """The class text of each sample from its labels, and the findings it names."""
        texts, named = [], []
        for row in labels.tolist():
            positive = [n for n, v in zip(self.classes, row, strict=True) if v == 1 and n != NO_FINDING]
            parts = [n.replace("_", " ") for n in positive] or [self.options["no_finding_text"]]
            if self.options["prompt_negatives"]:
                parts += [f"no {n.replace('_', ' ')}" for n, v in zip(self.classes, row, strict=True)
                          if v == 0 and n != NO_FINDING]  # fmt: skip
            texts.append(", ".join(parts))
            named.append(positive or [NO_FINDING])
        return texts, named

    def encode_label_texts(self, texts: list[str], findings: list[list[str]]) -> torch.Tensor:
        """Class texts -> (N, D) embeddings: through the learned context, or a sampled hand-written template."""
        if self.prompt_learner is not None:
            return self.encode_learned_prompts(texts, findings)
        templates = self.options["templates"]
        picks = torch.randint(len(templates), (len(texts),)).tolist()  # the run's seeded, checkpointed generator
        written = [templates[k].format(findings=t) for k, t in zip(picks, texts, strict=True)]
        return self.encode_texts(self.tokenize([w[0].upper() + w[1:] for w in written], purpose="write prompts"))

    def encode_learned_prompts(self, texts: list[str], findings: list[list[str]] | None = None) -> torch.Tensor:
        """Class texts ("pleural effusion", "no pneumothorax") through the learned context -> (N, D) normalised;
        ``findings`` per text selects class-specific contexts (default: the classes each text names)."""
        if self.prompt_learner is None:
            raise ConfigError("umcl: this model was trained with prompts: template and has no learned prompts")
        if findings is None:
            findings = [self._named(text) for text in texts]
        embeds, mask = self.prompt_learner(texts, findings)
        out = self.text_encoder(inputs_embeds=embeds, attention_mask=mask)
        return F.normalize(self.text_head(out.global_emb), dim=-1)

    def _named(self, text: str) -> list[str]:
        return [c for c in self.classes if re.search(rf"\b{re.escape(c.replace('_', ' '))}\b", text.lower())]

    # -- the loss ---------------------------------------------------------------------------------------------
    def batch_texts(self, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """(B, D) text embeddings: the report of each report sample, a label prompt for the others."""
        b = labels.shape[0]
        has_report = batch.get("has_report")
        if has_report is None:
            has_report = torch.full((b,), "input_ids" in batch, dtype=torch.bool)
        has_report = has_report.to(labels.device)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        if bool(has_report.any()):
            rows = has_report.nonzero().squeeze(1)
            text = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "token_sentence", "token_word")}
            parts.append((rows, self.encode_texts(text)))
        if not bool(has_report.all()):
            rows = (~has_report).nonzero().squeeze(1)
            texts, named = self.label_texts(labels[rows])
            parts.append((rows, self.encode_label_texts(texts, named)))
        out = torch.empty(b, parts[0][1].shape[1], device=labels.device, dtype=parts[0][1].dtype)
        for rows, values in parts:
            out[rows] = values.to(out.dtype)
        return out

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = self.class_labels(batch)
        images = self.encode_images(batch["image"])
        texts = self.batch_texts(batch, labels)
        return {"global": self.contrast(images, texts, **self.targets(labels))}


def _checked(options: dict[str, Any]) -> dict[str, Any]:
    choices = {"positives": ("label_set", "soft", "none"), "missing": ("negative", "unknown"),
               "prompts": ("learned", "template")}  # fmt: skip
    for key, allowed in choices.items():
        if options[key] not in allowed:
            raise ConfigError(f"umcl: model.options.{key} must be one of {allowed}, got {options[key]!r}")
    policy = options["uncertain"]
    policies = policy.values() if isinstance(policy, dict) else [policy]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ConfigError(f"umcl: model.options.uncertain: {bad[0]!r} is not one of {POLICIES} (or a per-finding map)")
    if options["prompts"] == "template" and not options["templates"]:
        raise ConfigError("umcl: prompts: template needs at least one entry in model.options.templates")
    for template in options["templates"]:
        if "{findings}" not in template:
            raise ConfigError(f"umcl: the template {template!r} has no {{findings}} slot")
    return options
