"""Write a radiology report and CheXpert-style labels from a simulated patient's findings.

Design decisions (docs/simulated-data.md):

- Wording is data (``report_templates.py``); this module decides what to say. Every sentence records what it
  asserts, as (label key, value) pairs (``ReportSentence.mentions``), and the labels are computed from those
  assertions only, so the text and the labels cannot drift apart. A finding's sentence also records which finding
  it describes (``source``), so each region can carry its phrase (``finding_phrase``) for grounding.
- Shape. ``text`` is ``"FINDINGS: ...\\n\\nIMPRESSION: ..."``, which ``radalign.data.reports.parse_report`` splits
  into exactly the sentences recorded here. FINDINGS has four blocks in one of a few radiologist orders:
  devices (with tip position), heart and mediastinum, lungs and pleura, bones. Each finding gets one sentence,
  with its side, lobe or zone, size and severity words; structures without findings get normal-anatomy sentences
  ("The lungs are clear.", "Heart size is normal.") some of the time. IMPRESSION restates the findings by
  importance (pneumothorax, mass, consolidation, edema, effusion, cardiomegaly, nodule, atelectasis; uncertain
  after definite; atelectasis is left out 40% of the time), may merge cardiomegaly with edema as heart failure,
  may add a recommendation, and is "No acute cardiopulmonary ..." when only devices (or nothing) are present.
- Negations. Each absent finding is explicitly negated with probability ``negation_rate`` times a per-finding
  factor (1 for pneumothorax and effusion, lower for findings reports rarely negate), alone or in lists
  ("No pleural effusion or pneumothorax."). ``negation_rate=0`` removes explicit negations; normal-anatomy
  sentences ("Heart size is normal." negates cardiomegaly) still appear.
- Never contradictory. A negation or normal-anatomy sentence is used only when every finding kind it denies is
  absent from the patient; an uncertain finding counts as present. The labels are checked for a key that is both
  asserted and denied, which raises (it would be a bug in the templates).
- Uncertainty. A finding with certainty "uncertain" is always hedged ("possible", "questionable", "may represent",
  "cannot be excluded", "borderline") and labelled -1, in both sections.
- Labels over ``DEFAULT_FINDINGS``: asserted present 1, hedged -1, denied 0; if one key gets both 1 and -1 (a
  definite and a possible nodule) it is 1. Keys the report never mentions get ``unmentioned``: 0 by default,
  because the simulation knows the ground truth (the finding is absent); ``unmentioned=None`` leaves them out
  (missing), as a report labeler would. Mapping: nodule -> nodule and lung_lesion; mass -> mass and lung_lesion;
  consolidation -> consolidation; pneumonia only from the report's interpretation of a consolidation ("consistent
  with pneumonia" 1, "concerning for pneumonia" -1; a consolidation without interpretation leaves pneumonia
  unmentioned, i.e. 0); cardiomegaly -> cardiomegaly; devices -> support_devices. CheXpert hierarchy:
  lung_opacity is 1 if any of consolidation, pneumonia, edema, atelectasis, nodule, mass is 1, else -1 if any is
  -1; enlarged_cardiomediastinum follows cardiomegaly. no_finding is 1 iff no key other than support_devices is 1
  or -1, else 0 (always set). fracture and pleural_other are never simulated: 0 (or missing).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from radalign.data.schema import DEFAULT_FINDINGS, NEGATIVE, POSITIVE, UNCERTAIN
from radalign.data.simulate import report_templates as T
from radalign.data.simulate.findings import Finding
from radalign.errors import ConfigError

KIND_LABELS: dict[str, tuple[str, ...]] = {
    "nodule": ("nodule", "lung_lesion"), "mass": ("mass", "lung_lesion"), "consolidation": ("consolidation",),
    "atelectasis": ("atelectasis",), "pleural_effusion": ("pleural_effusion",), "pneumothorax": ("pneumothorax",),
    "cardiomegaly": ("cardiomegaly",), "edema": ("edema",), "support_device": ("support_devices",),
}  # fmt: skip
# IMPRESSION order: the most urgent or consequential first
IMPORTANCE = (
    "pneumothorax", "mass", "consolidation", "edema", "pleural_effusion", "cardiomegaly", "nodule", "atelectasis",
)  # fmt: skip
IMPRESSION_INCLUDE = {"atelectasis": 0.6}  # chance a minor finding is restated; others always are
HIERARCHY = {
    "lung_opacity": ("consolidation", "pneumonia", "edema", "atelectasis", "nodule", "mass", "lung_lesion"),
    "enlarged_cardiomediastinum": ("cardiomegaly",),
}
_PNEUMONIA_VALUE = {"definite": POSITIVE, "hedged": UNCERTAIN}
_PRIORITY = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}

Mention = tuple[str, int]


@dataclass(frozen=True)
class ReportSentence:
    section: str  # "FINDINGS" | "IMPRESSION"
    text: str
    mentions: tuple[Mention, ...] = ()  # what the sentence asserts: (label key, 1 / -1 / 0)
    source: int | None = None  # index of the one finding the sentence describes (regions' "phrase" uses it)


@dataclass(frozen=True)
class SimulatedReport:
    findings_text: str
    impression_text: str
    text: str  # "FINDINGS: ...\n\nIMPRESSION: ..."
    labels: dict[str, int]
    mentions: list[Mention]  # every sentence's mentions, in reading order
    sentences: list[ReportSentence]


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


@cache
def _placeholders(template: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU]|8|11\b|11\.|18\b|18\.)")


def _tidy(text: str) -> str:
    text = re.sub(r"\s+([,.;])", r"\1", " ".join(text.split()))
    text = _AN.sub(r"\1n ", text)
    return text[:1].upper() + text[1:]


def _fill(rng: np.random.Generator, templates: Sequence[str], fields: dict[str, str]) -> str:
    """A random template among those whose placeholders all have a value, filled and tidied."""
    eligible = [t for t in templates if all(fields.get(name) for name in _placeholders(t))]
    if not eligible:  # a gap in report_templates: every list needs a template for findings without size/severity
        raise RuntimeError(f"no template fits the fields {sorted(fields)} among {templates}")
    return _tidy(_pick(rng, eligible).format(**fields))


def _size_text(rng: np.random.Generator, size_mm: float, kind: str) -> str:
    if size_mm >= 10 and rng.random() < (0.85 if kind == "mass" else 0.6):  # sub-centimetre sizes stay in mm
        return f"{round(size_mm / 10.0, 1):g} cm"
    return f"{round(size_mm):d} mm"


def _fields(rng: np.random.Generator, finding: Finding) -> dict[str, str]:
    """Words for one finding; drawn anew per sentence, so FINDINGS and IMPRESSION may word it differently."""
    fields: dict[str, str] = {}
    if finding.location in T.LOBE_WHERE:
        fields["where"] = _pick(rng, T.LOBE_WHERE[finding.location])
        fields["lobe"] = _pick(rng, T.LOBE_ATTRIBUTIVE[finding.location])
    if finding.side in ("left", "right"):
        fields["side"] = finding.side
    words = T.SEVERITY_WORDS.get(finding.kind, {}).get(finding.severity or "")
    if words:
        fields["sev"] = _pick(rng, words)
        fields["adv"] = _pick(rng, T.SEVERITY_ADVERBS.get(finding.severity or "", ("",)))
    if finding.size_mm:
        fields["size"] = _size_text(rng, finding.size_mm, finding.kind)
    if finding.tip_cm:
        fields["tip"] = f"{finding.tip_cm:g} cm"
    return fields


def _template_key(finding: Finding, additional: bool) -> str:
    if finding.kind == "support_device":
        return str(finding.device)
    if finding.kind == "pleural_effusion" and finding.side == "bilateral":
        return "pleural_effusion_bilateral"
    return "nodule_additional" if finding.kind == "nodule" and additional else finding.kind


def _templates(table: dict[str, dict[str, tuple[str, ...]]], key: str, finding: Finding) -> tuple[str, ...]:
    extra = table.get(f"{key}/{finding.severity}", {}).get(finding.certainty, ())
    return table[key][finding.certainty] + extra


def _or_list(phrases: Sequence[str]) -> str:
    if len(phrases) <= 2:
        return " or ".join(phrases)
    return f"{', '.join(phrases[:-1])}, or {phrases[-1]}"


class _Writer:
    def __init__(self, findings: Sequence[Finding], rng: np.random.Generator, negation_rate: float) -> None:
        self.findings = list(findings)
        self.rng = rng
        self.negation_rate = negation_rate
        self.kinds = {f.kind for f in self.findings}  # present or uncertain: never denied
        # how the report interprets each consolidation: as pneumonia ("definite"), possibly ("hedged"), or not
        self.pneumonia: dict[int, str] = {}
        for i, f in enumerate(self.findings):
            if f.kind == "consolidation":
                options, weights = (("none", "definite", "hedged"), (0.4, 0.3, 0.3))
                if f.certainty == "uncertain":
                    options, weights = ("none", "hedged"), (0.5, 0.5)
                self.pneumonia[i] = options[int(rng.choice(len(options), p=weights))]

    def absent(self, kinds: Sequence[str]) -> bool:
        return not self.kinds.intersection(kinds)

    def indices(self, kinds: Sequence[str], shuffle: bool = False) -> list[int]:
        found = [i for i, f in enumerate(self.findings) if f.kind in kinds]
        return [found[j] for j in self.rng.permutation(len(found))] if shuffle else found

    def rank(self, i: int) -> tuple[bool, int, int]:
        return self.findings[i].certainty != "definite", IMPORTANCE.index(self.findings[i].kind), i

    # -- one finding -------------------------------------------------------------------------------------------
    def finding_sentence(self, i: int, section: str, additional: bool) -> ReportSentence:
        f = self.findings[i]
        value = POSITIVE if f.certainty == "definite" else UNCERTAIN
        mentions = [(key, value) for key in KIND_LABELS[f.kind]]
        fields = _fields(self.rng, f)
        key = _template_key(f, additional)
        interpretation = self.pneumonia.get(i, "none")
        if section == "IMPRESSION" and interpretation != "none" and self.rng.random() < 0.5:
            # the impression names the pneumonia itself ("Right lower lobe pneumonia.")
            templates = T.IMPRESSION_SENTENCES["pneumonia"][interpretation]
            mention = ("pneumonia", _PNEUMONIA_VALUE[interpretation])
            return ReportSentence(section, _fill(self.rng, templates, fields), (mention,), i)
        table = T.FINDING_SENTENCES if section == "FINDINGS" else T.IMPRESSION_SENTENCES
        text = _fill(self.rng, _templates(table, key, f), fields)
        # the impression always carries the interpretation; FINDINGS half the time, and only for a definite one
        says_it = section == "IMPRESSION" or (f.certainty == "definite" and self.rng.random() < 0.5)
        if interpretation != "none" and says_it:
            text = text[:-1] + _pick(self.rng, T.PNEUMONIA_SUFFIX[interpretation]) + "."
            mentions.append(("pneumonia", _PNEUMONIA_VALUE[interpretation]))
        return ReportSentence(section, text, tuple(mentions), i)

    def findings_sentences(self, indices: Sequence[int], section: str) -> list[ReportSentence]:
        nodules, out = 0, []
        for i in indices:
            out.append(self.finding_sentence(i, section, additional=nodules > 0))
            nodules += self.findings[i].kind == "nodule"
        return out

    # -- FINDINGS ----------------------------------------------------------------------------------------------
    def normal(self, group: str) -> ReportSentence:
        text, negated = _pick(self.rng, T.NORMAL_SENTENCES[group])
        return ReportSentence("FINDINGS", text, tuple((key, NEGATIVE) for key in negated))

    def allowed(self, group: str) -> bool:
        return self.absent(T.NORMAL_REQUIRES_ABSENT.get(group, ()))

    def negations(self, units: Sequence[str]) -> list[str]:
        chosen = []
        for unit in units:
            _, requires, _, factor = T.NEGATION_UNITS[unit]
            if self.absent(requires) and self.rng.random() < self.negation_rate * factor:
                chosen.append(unit)
        return [chosen[j] for j in self.rng.permutation(len(chosen))]

    def negation_sentence(self, units: Sequence[str], lungs_clear: bool = False) -> ReportSentence:
        """'No a, b, or c.'; with ``lungs_clear``: 'The lungs are clear without a, b, or c.'"""
        phrases = [_pick(self.rng, T.NEGATION_UNITS[unit][0]) for unit in units]
        mentions = [(key, NEGATIVE) for unit in units for key in T.NEGATION_UNITS[unit][2]]
        if lungs_clear:
            text = _pick(self.rng, T.LUNGS_CLEAR_WITH_NEGATIONS).format(list=_or_list(phrases))
            mentions.insert(0, ("lung_opacity", NEGATIVE))
        else:
            text = _pick(self.rng, T.NEGATION_FRAMES[len(units)]).format(*phrases)
        return ReportSentence("FINDINGS", _tidy(text), tuple(mentions))

    def negation_sentences(self, units: list[str]) -> list[ReportSentence]:
        solo = [[u] for u in units if u in T.SOLO_NEGATIONS]
        rest = [u for u in units if u not in T.SOLO_NEGATIONS]
        chunks = []
        while rest:
            size = min(len(rest), int(self.rng.choice(3, p=(0.3, 0.35, 0.35))) + 1)
            chunks.append(rest[:size])
            rest = rest[size:]
        groups = chunks + solo
        return [self.negation_sentence(groups[j]) for j in self.rng.permutation(len(groups))]

    def chest_block(self) -> list[ReportSentence]:
        parenchyma, pleura = self.indices(T.PARENCHYMA, shuffle=True), self.indices(T.PLEURA, shuffle=True)
        order = pleura + parenchyma if self.rng.random() < 0.25 else parenchyma + pleura
        out = self.findings_sentences(order, "FINDINGS")
        units = self.negations([u for u in T.NEGATION_UNITS if u != "cardiomegaly"])
        if not order and self.allowed("lungs_clear") and self.rng.random() < 0.85:
            listable = [u for u in units if u not in T.SOLO_NEGATIONS]
            if listable and self.rng.random() < 0.4:
                take = listable[:3]
                out.append(self.negation_sentence(take, lungs_clear=True))
                units = [u for u in units if u not in take]
            else:
                out.append(self.normal("lungs_clear"))
        elif order and "edema" not in self.kinds and self.rng.random() < 0.3:
            out.append(self.normal("lungs_otherwise"))
        return out + self.negation_sentences(units)

    def heart_block(self) -> list[ReportSentence]:
        out = self.findings_sentences(self.indices(("cardiomegaly",)), "FINDINGS")
        if self.allowed("heart"):
            u = self.rng.random()
            if u < 0.55:
                out.append(self.normal("heart"))
                if self.rng.random() < 0.5:
                    out.append(self.normal("mediastinum"))
            elif u < 0.85:
                out.append(self.normal("cardiomediastinal"))
            else:
                out += self.negation_sentences(self.negations(["cardiomegaly"]))
        if self.rng.random() < 0.15:
            out.append(self.normal("trachea"))
        if self.allowed("vascularity") and self.rng.random() < 0.2:
            out.append(self.normal("vascularity"))
        return out

    def findings_section(self) -> list[ReportSentence]:
        blocks = {
            "devices": self.findings_sentences(self.indices(("support_device",)), "FINDINGS"),
            "heart": self.heart_block(),
            "chest": self.chest_block(),
            "bones": [self.normal("bones")] if self.rng.random() < 0.55 else [],
        }
        return [s for name in _pick(self.rng, T.BLOCK_ORDERS) for s in blocks[name]]

    # -- IMPRESSION --------------------------------------------------------------------------------------------
    def impression_items(self) -> list[list[ReportSentence]]:
        """Numbered-list items, each one or more sentences."""
        rng = self.rng
        items: list[list[ReportSentence]] = []
        abnormal = [i for i, f in enumerate(self.findings) if f.kind != "support_device"]
        devices = self.indices(("support_device",))
        if not abnormal:
            options = T.NORMAL_IMPRESSIONS + (() if devices else T.NORMAL_IMPRESSIONS_NO_DEVICE)
            items.append([ReportSentence("IMPRESSION", _pick(rng, options))])
        order = sorted(abnormal, key=self.rank)
        # one definite cardiomegaly and one definite edema may be reported together as heart failure
        heart_failure = [i for i in order if self.findings[i].kind in ("cardiomegaly", "edema") and not self.rank(i)[0]]
        pair = sorted(self.findings[i].kind for i in heart_failure) == ["cardiomegaly", "edema"]
        merge_chf = pair and rng.random() < 0.5
        recommended, nodules = False, 0
        for i in order:
            f = self.findings[i]
            if merge_chf and i in heart_failure:
                if i == heart_failure[0]:
                    items.append([self.chf_sentence(heart_failure)])
                continue
            if items and rng.random() >= IMPRESSION_INCLUDE.get(f.kind, 1.0):
                continue
            item = [self.finding_sentence(i, "IMPRESSION", additional=nodules > 0)]
            nodules += f.kind == "nodule"
            reason = self.recommendation_reason(i)
            if reason and not recommended and rng.random() < 0.4:
                item.append(ReportSentence("IMPRESSION", _pick(rng, T.RECOMMENDATIONS[reason])))
                recommended = True
            items.append(item)
        if devices and rng.random() < (0.7 if not abnormal else 0.5):
            if len(devices) > 1 or rng.random() < 0.3:
                items.append(
                    [ReportSentence("IMPRESSION", _pick(rng, T.DEVICES_SUMMARY), (("support_devices", POSITIVE),))]
                )
            else:
                items.append(self.findings_sentences(devices, "IMPRESSION"))
        lines = [i for i in devices if self.findings[i].device == "central venous catheter"]
        if lines and self.absent(("pneumothorax",)) and rng.random() < self.negation_rate * 0.5:
            items.append([ReportSentence("IMPRESSION", "No pneumothorax.", (("pneumothorax", NEGATIVE),))])
        return items

    def chf_sentence(self, pair: Sequence[int]) -> ReportSentence:
        cardio, edema = sorted(pair, key=lambda i: self.findings[i].kind != "cardiomegaly")
        csev = _fields(self.rng, self.findings[cardio]).get("sev", "")
        esev = _fields(self.rng, self.findings[edema]).get("sev", "")
        text = _fill(self.rng, T.CHF_IMPRESSIONS, {"csev": csev, "esev": esev})
        return ReportSentence("IMPRESSION", text, (("cardiomegaly", POSITIVE), ("edema", POSITIVE)))

    def recommendation_reason(self, i: int) -> str | None:
        f = self.findings[i]
        if f.kind in ("nodule", "mass"):
            return "lesion"
        if f.kind == "consolidation" and self.pneumonia.get(i) == "definite":
            return "pneumonia"
        if f.kind == "pneumothorax" and f.certainty == "definite" and f.severity in ("moderate", "large"):
            return "pneumothorax"
        return None


def _labels(mentions: Sequence[Mention], unmentioned: int | None) -> dict[str, int]:
    values: dict[str, set[int]] = {}
    for key, value in mentions:
        values.setdefault(key, set()).add(value)
    labels: dict[str, int] = {}
    for key, seen in values.items():
        if NEGATIVE in seen and len(seen) > 1:
            raise RuntimeError(f"simulated report both asserts and denies {key!r}: a bug in report_templates")
        labels[key] = max(seen, key=_PRIORITY.__getitem__)
    for parent, children in HIERARCHY.items():
        derived = [labels[c] for c in children if labels.get(c) in (POSITIVE, UNCERTAIN)]
        if derived:
            if labels.get(parent) == NEGATIVE:
                raise RuntimeError(f"simulated report denies {parent!r} but asserts one of {children}")
            labels[parent] = max([*derived, labels.get(parent, NEGATIVE)], key=_PRIORITY.__getitem__)
    pathology = [k for k, v in labels.items() if k != "support_devices" and v in (POSITIVE, UNCERTAIN)]
    labels["no_finding"] = NEGATIVE if pathology else POSITIVE
    if unmentioned is not None:
        for key in DEFAULT_FINDINGS:
            labels.setdefault(key, unmentioned)
    unknown = set(labels) - set(DEFAULT_FINDINGS)
    if unknown:
        raise RuntimeError(f"simulated report labels {sorted(unknown)} outside DEFAULT_FINDINGS")
    return {key: labels[key] for key in DEFAULT_FINDINGS if key in labels}


def finding_phrase(report: SimulatedReport, index: int, kind: str) -> str | None:
    """The sentence that asserts finding ``index`` (of kind ``kind``), verbatim: FINDINGS first, else IMPRESSION.

    Only a sentence mentioning the finding's own label counts (an impression that names just the pneumonia does
    not); a hedged finding's hedged sentence does. None if the report never describes it alone (CHF merge)."""
    key = KIND_LABELS[kind][0]
    for section in ("FINDINGS", "IMPRESSION"):
        for s in report.sentences:
            if s.section == section and s.source == index and any(k == key and v != NEGATIVE for k, v in s.mentions):
                return s.text
    return None


def write_report(
    findings: Sequence[Finding],
    rng: np.random.Generator,
    *,
    negation_rate: float = 0.7,
    unmentioned: int | None = NEGATIVE,
) -> SimulatedReport:
    """A FINDINGS + IMPRESSION report for ``findings`` and its labels over ``DEFAULT_FINDINGS``.

    ``unmentioned`` is the label of keys the report does not mention: 0 (default; the simulation knows they are
    absent) or None (left out, i.e. missing). Deterministic for a given ``rng`` state."""
    if isinstance(negation_rate, bool) or not isinstance(negation_rate, int | float) or not 0 <= negation_rate <= 1:
        raise ConfigError(f"negation_rate = {negation_rate!r} is not a probability; use a number in [0, 1]")
    if unmentioned is not None and (isinstance(unmentioned, bool) or unmentioned != NEGATIVE):
        raise ConfigError(f"unmentioned = {unmentioned!r}; use 0 (absent findings are negative) or None (missing)")
    for f in findings:
        if not isinstance(f, Finding):
            raise ConfigError(f"write_report: expected Finding objects, got {type(f).__name__}: {f!r:.80}")
    writer = _Writer(findings, rng, float(negation_rate))
    found = writer.findings_section()
    items = writer.impression_items()
    numbered = len(items) > 1 and rng.random() < 0.5
    parts = [" ".join(s.text for s in item) for item in items]
    impression_text = " ".join(f"{n}. {p}" for n, p in enumerate(parts, 1)) if numbered else " ".join(parts)
    findings_text = " ".join(s.text for s in found)
    sentences = found + [s for item in items for s in item]
    mentions = [m for s in sentences for m in s.mentions]
    return SimulatedReport(
        findings_text=findings_text,
        impression_text=impression_text,
        text=f"FINDINGS: {findings_text}\n\nIMPRESSION: {impression_text}",
        labels=_labels(mentions, unmentioned),
        mentions=mentions,
        sentences=sentences,
    )
