"""A rule-based report labeler: finding labels for reports that have none, offline, in pure Python.

For each observation (the 14 of CheXpert plus the simulator's nodule and mass), a sentence is scanned for mention
phrases; each mention is then positive (1), negated (0) or uncertain (-1) by trigger phrases before or after it
in the same clause. A report's label per observation is its sentences' labels combined as CheXpert combines them:
positive if any sentence is, else uncertain if any is, else negative if any is, else not mentioned (absent from
the result). "No Finding" is derived, not matched: 1 when nothing but support devices is positive or uncertain.

The rules are data (``configs/labeler/default.yaml``, documented in docs/labeler.md); ``Labeler.from_yaml(path)``
reads a user's own file, and ``Labeler.from_yaml(path, extend=True)`` adds its phrases to the default ones.

Decisions:
- Matching is on lower-cased text, on word boundaries, longest phrase first within each observation, and a
  matched span is not matched again by that observation: "pleural effusion" is one mention, not also "effusion".
  An observation's excluded phrases ("pericardial effusion") hide its shorter mentions inside them; other
  observations may still match there ("compression fracture" is excluded from atelectasis, a fracture for
  fracture), and one phrase can mention two observations ("nodular opacity": a nodule and an opacity).
- A trigger acts on a mention in the same clause, at most ``window`` words away (NegEx's idea): clauses end at
  the ``scope_end`` words ("but", "however", ...) and marks (";", ":"); commas do not end a clause, so "no
  effusion, pneumothorax or consolidation" negates all three.
- Uncertainty wins over negation ("cannot be excluded" contains a negation word), negation over a plain mention.
  A ``negative`` phrase ("heart size is normal") is a negated mention whatever surrounds it, unless uncertain;
  an ``uncertain`` phrase ("heart size is borderline") is uncertain whatever surrounds it. ``pseudo`` phrases
  ("no change in") hide the trigger words inside them: "no change in the effusion" is an effusion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from radalign.errors import ConfigError

NO_FINDING = "no_finding"
# CheXpert: "No Finding" is positive when no pathology but support devices is positive or uncertain
_NOT_A_PATHOLOGY = {"support_devices", NO_FINDING}
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[;:]")


def default_rules_path() -> Path:
    return Path(str(resources.files("radalign") / "configs" / "labeler" / "default.yaml"))


@dataclass
class _Phrases:
    """Tokenised phrases, longest first, each with what it means: (tokens, observation, kind)."""

    items: list[tuple[tuple[str, ...], str, str]] = field(default_factory=list)

    def add(self, phrase: Any, observation: str, kind: str) -> None:
        if not isinstance(phrase, str):
            raise ConfigError(
                f"labeler rules: {phrase!r} under {observation!r} is not text; quote it (YAML reads no as false)"
            )
        tokens = tuple(_WORD.findall(phrase.lower()))
        if not tokens:
            raise ConfigError(f"labeler rules: the phrase {phrase!r} of {observation!r} has no words")
        self.items.append((tokens, observation, kind))

    def index(self) -> dict[str, list[tuple[tuple[str, ...], str, str]]]:
        """First word -> the phrases starting with it: a sentence is scanned once, not once per phrase."""
        out: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
        for item in self.items:
            out.setdefault(item[0][0], []).append(item)
        return out


def _matches(index: dict[str, list[tuple[tuple[str, ...], str, str]]], tokens: list[str]):
    """Every (start, end, group, kind) where a phrase of ``index`` occurs in ``tokens``."""
    for start, token in enumerate(tokens):
        for phrase, group, kind in index.get(token, ()):
            if tuple(tokens[start : start + len(phrase)]) == phrase:
                yield start, start + len(phrase), group, kind


def _longest_first(found: list[tuple[int, int, str, str]], key) -> list[tuple[int, int, str, str]]:
    """Within each ``key`` group, the longest matches that do not overlap a longer one ("pleural effusion" is one
    mention, not also "effusion"; an excluded phrase hides its observation's shorter mentions inside it)."""
    groups: dict[Any, list[tuple[int, int, str, str]]] = {}
    for match in found:
        groups.setdefault(key(match), []).append(match)
    kept = []
    for matches in groups.values():
        taken: set[int] = set()
        for match in sorted(matches, key=lambda m: (m[0] - m[1], m[0])):
            span = range(match[0], match[1])
            if not taken.intersection(span):
                taken.update(span)
                kept.append(match)
    return kept


@dataclass(frozen=True)
class SentenceLabels:
    text: str
    labels: dict[str, int]  # observation -> 1 / 0 / -1; observations not mentioned are absent


@dataclass(frozen=True)
class ReportLabels:
    labels: dict[str, int]  # observation -> 1 / 0 / -1 (plus no_finding = 1 where it applies)
    sentences: list[SentenceLabels]


class Labeler:
    """``Labeler.from_yaml()`` for the shipped rules; ``label_sentence`` / ``label_report`` label text."""

    def __init__(self, rules: dict[str, Any], window: int = 8) -> None:
        self.observations = tuple(rules["observations"])
        self.window = window
        self._mentions = _Phrases()
        self._also: dict[str, tuple[str, ...]] = {}
        for name, spec in rules["observations"].items():
            for phrase in spec.get("exclude", []):
                self._mentions.add(phrase, name, "exclude")
            for phrase in spec.get("negative", []):
                self._mentions.add(phrase, name, "negative")
            for phrase in spec.get("uncertain", []):
                self._mentions.add(phrase, name, "uncertain")
            for phrase in spec.get("mentions", []):
                self._mentions.add(phrase, name, "mention")
            self._also[name] = tuple(spec.get("also", []))
        self._mention_index = self._mentions.index()
        self._triggers = _Phrases()
        for family in ("negation", "uncertainty"):
            for where in ("pre", "post"):
                for phrase in rules.get(family, {}).get(where, []):
                    self._triggers.add(phrase, family, where)
        self._trigger_index = self._triggers.index()
        pseudo = _Phrases()
        for phrase in rules.get("pseudo", []):
            pseudo.add(phrase, "pseudo", "pseudo")
        self._pseudo_index = pseudo.index()
        scope = _Phrases()
        for phrase in rules.get("scope_end", []):
            scope.add(phrase, "scope_end", "end")
        self._scope_index = scope.index()

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, *, extend: bool = False, window: int = 8) -> Labeler:
        """The rules in ``path`` (default: the shipped ones); ``extend`` adds them to the shipped rules."""
        import yaml

        default = yaml.safe_load(default_rules_path().read_text(encoding="utf-8"))
        if path is None:
            return cls(default, window)
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"labeler rules {path} do not exist; start from {default_rules_path()}")
        rules = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        check_rules(rules, path)
        return cls(merge_rules(default, rules) if extend else rules, window)

    # -- labelling ----------------------------------------------------------------------------------------------
    def label_sentence(self, text: str) -> dict[str, int]:
        tokens = _WORD.findall(text.lower())
        # per observation: an exclusion ("pericardial effusion") hides that observation's mentions inside it only
        found = _longest_first(list(_matches(self._mention_index, tokens)), key=lambda m: m[2])
        mentions = [m for m in found if m[3] != "exclude"]  # (start, end, observation, kind)
        if not mentions:
            return {}
        triggers = self._find_triggers(tokens)
        clause = self._clauses(tokens)
        labels: dict[str, int] = {}
        for start, end, name, kind in mentions:
            value = self._value(start, end, kind, triggers, clause)
            for target in (name, *self._also.get(name, ())):
                labels[target] = _combine(labels.get(target), value)
        return labels

    def label_report(self, report: Any, sections: tuple[str, ...] = ("FINDINGS", "IMPRESSION")) -> ReportLabels:
        """A ``Report`` (data/reports.py) or raw report text -> per-report and per-sentence labels."""
        from radalign.data.reports import parse_report

        if isinstance(report, str | bytes):
            report = parse_report(report, sections=sections)
        per_sentence = [SentenceLabels(s, self.label_sentence(s)) for s in report.sentences]
        combined: dict[str, int] = {}
        for sentence in per_sentence:
            for name, value in sentence.labels.items():
                combined[name] = _combine(combined.get(name), value)
        if not any(v in (1, -1) for k, v in combined.items() if k not in _NOT_A_PATHOLOGY):
            combined[NO_FINDING] = 1
        return ReportLabels(combined, per_sentence)

    # -- rule machinery -----------------------------------------------------------------------------------------
    def _find_triggers(self, tokens: list[str]) -> list[tuple[int, int, str, str]]:
        # longest first within each (family, side): "no evidence of" is one trigger; a phrase listed on both sides
        # ("versus", "cannot be excluded") acts both ways
        found = _longest_first(list(_matches(self._trigger_index, tokens)), key=lambda m: (m[2], m[3]))
        # a pseudo-trigger ("no change in", "not only") holds trigger words that negate or hedge nothing
        hidden = {i for start, end, _, _ in _matches(self._pseudo_index, tokens) for i in range(start, end)}
        return [t for t in found if not hidden.intersection(range(t[0], t[1]))] if hidden else found

    def _clauses(self, tokens: list[str]) -> list[int]:
        """Clause number of every token: a scope-end word or mark starts the next clause."""
        ends = [False] * len(tokens)
        for start, _, _, _ in _matches(self._scope_index, tokens):
            ends[start] = True
        number, out = 0, []
        for is_end in ends:
            number += is_end
            out.append(number)
        return out

    def _value(self, start: int, end: int, kind: str, triggers: list, clause: list[int]) -> int:
        negated = kind == "negative"
        uncertain = kind == "uncertain"
        for t_start, t_end, family, where in triggers:
            if where == "pre" and t_end <= start:
                near = start - t_end <= self.window and clause[t_start] == clause[start]
            elif where == "post" and t_start >= end:
                near = t_start - end <= self.window and clause[t_start] == clause[end - 1]
            else:
                continue
            if near:
                negated |= family == "negation"
                uncertain |= family == "uncertainty"
        return -1 if uncertain else 0 if negated else 1


def _combine(old: int | None, new: int) -> int:
    """CheXpert's order across mentions and sentences: positive over uncertain over negative."""
    if old is None:
        return new
    rank = {1: 2, -1: 1, 0: 0}
    return old if rank[old] >= rank[new] else new


def simulated_agreement(labeler: Labeler, reports: int, seed: int = 9) -> dict[str, tuple[int, int]]:
    """Observation -> (labels reproduced, labels) over the sentences of ``reports`` simulated reports, each of
    which records what it asserts. A sanity check of the rules against the simulator's phrasing (our own), not a
    measure of quality on real text (docs/labeler.md)."""
    import numpy as np

    from radalign.data.simulate.findings import sample_findings
    from radalign.data.simulate.report import write_report

    counts: dict[str, list[int]] = {}
    for index in range(reports):
        rng = np.random.default_rng([seed, index])
        for sentence in write_report(sample_findings(rng), rng).sentences:
            truth: dict[str, int] = {}
            for key, value in sentence.mentions:
                truth[key] = _combine(truth.get(key), value)
            got = labeler.label_sentence(sentence.text)
            for key, value in truth.items():
                count = counts.setdefault(key, [0, 0])
                count[0] += got.get(key) == value
                count[1] += 1
    return {key: (ok, n) for key, (ok, n) in counts.items()}


def check_rules(rules: Any, where: Path | str) -> None:
    """A rules file's shape, with the key and file named when it is wrong."""
    if not isinstance(rules, dict) or not isinstance(rules.get("observations", {}), dict):
        raise ConfigError(f"labeler rules {where}: expected a mapping with an 'observations' mapping")
    known = {"version", "observations", "negation", "uncertainty", "pseudo", "scope_end"}
    unknown = sorted(set(rules) - known)
    if unknown:
        raise ConfigError(f"labeler rules {where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(known))}")
    for name, spec in rules.get("observations", {}).items():
        if not isinstance(spec, dict):
            raise ConfigError(f"labeler rules {where}: observation {name!r} must be a mapping of phrase lists")
        bad = sorted(set(spec) - {"mentions", "negative", "uncertain", "exclude", "also"})
        if bad:
            raise ConfigError(
                f"labeler rules {where}: observation {name!r} has unknown key {bad[0]!r}; "
                "valid: mentions, negative, uncertain, exclude, also"
            )


def merge_rules(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra``'s phrases added to ``base``'s (new observations included)."""
    out: dict[str, Any] = {
        "observations": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in base["observations"].items()},
        "negation": {k: list(v) for k, v in base.get("negation", {}).items()},
        "uncertainty": {k: list(v) for k, v in base.get("uncertainty", {}).items()},
        "pseudo": list(base.get("pseudo", [])),
        "scope_end": list(base.get("scope_end", [])),
    }
    for name, spec in extra.get("observations", {}).items():
        target = out["observations"].setdefault(name, {})
        for key, phrases in spec.items():
            target.setdefault(key, [])
            target[key] += [p for p in phrases if p not in target[key]]
    for family in ("negation", "uncertainty"):
        for where, phrases in extra.get(family, {}).items():
            out[family].setdefault(where, [])
            out[family][where] += [p for p in phrases if p not in out[family][where]]
    for key in ("pseudo", "scope_end"):
        out[key] += [p for p in extra.get(key, []) if p not in out[key]]
    return out
