"""Simulated findings and reports: vocabulary, sampling, phrasing variety, and labels that agree with the text.

The text checks use this file's own word lists and cue patterns, not the generator's bookkeeping, so a template
that says something other than what its labels claim is caught.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from radalign.data.schema import DEFAULT_FINDINGS
from radalign.data.simulate import report_templates as T
from radalign.data.simulate.findings import (
    DEFAULT_PREVALENCES,
    FINDING_KINDS,
    LOBES,
    Finding,
    sample_findings,
    validate_prevalences,
)
from radalign.data.simulate.report import KIND_LABELS, SimulatedReport, write_report
from radalign.errors import ConfigError

N_SAMPLES = 2000

# What a sentence about each finding kind / label key must contain (independent of report_templates).
KIND_WORDS = {
    "nodule": r"nodul",
    "mass": r"\bmass\b",
    "consolidation": r"consolidat|pneumonia",
    "atelectasis": r"atelecta",
    "pleural_effusion": r"effusion|pleural fluid|costophrenic",
    "pneumothorax": r"pneumothora",
    "cardiomegaly": r"cardiomegaly|\bheart\b|cardiac|cardiomediastinal|mediastin",
    "edema": r"edema|congestion",
    "support_device": r"\btubes?\b|catheter|\blines?\b",
}
KEY_WORDS = {
    **{key: KIND_WORDS[kind] for kind, keys in KIND_LABELS.items() for key in keys if key != "lung_lesion"},
    "lung_lesion": r"nodul|\bmass\b",
    "pneumonia": r"pneumonia",
    "consolidation": r"consolidat",
    "support_devices": r"\btubes?\b|catheter|\blines?\b|devices",
    "lung_opacity": r"\bclear\b|airspace",
    "enlarged_cardiomediastinum": r"mediastin",
    "fracture": r"fracture",
}
UNCERTAIN = re.compile(r"possibl|questionable|\bmay\b|cannot|borderline|concerning|equivocal", re.I)
NEGATED = re.compile(r"^(no|there is no|negative for)\b|\bwithout\b|\bwith no\b|\bclear of\b", re.I)
NORMAL = re.compile(r"\bnormal\b|unremarkable|within normal limits", re.I)
LUNGS_CLEAR = re.compile(r"lungs are (\w+ )*clear|clear lungs|free of focal", re.I)
NORMAL_IMPRESSION = re.compile(r"^(no acute|no active|normal chest|no radiographic evidence of acute)", re.I)
SIDE_WORDS = re.compile(r"\b(left|right|bilateral|bilaterally|both)\b", re.I)


def kinds_in(sentence: str) -> set[str]:
    return {kind for kind, pattern in KIND_WORDS.items() if re.search(pattern, sentence, re.I)}


def simulate(seed: int, **kwargs) -> tuple[list[Finding], SimulatedReport]:
    rng = np.random.default_rng([seed, 4242])
    findings = sample_findings(rng, **kwargs)
    return findings, write_report(findings, rng)


@pytest.fixture(scope="module")
def samples() -> list[tuple[list[Finding], SimulatedReport]]:
    return [simulate(i) for i in range(N_SAMPLES)]


# -- findings ---------------------------------------------------------------------------------------------------
def test_same_seed_same_findings_and_text():
    for seed in range(20):
        a, b = simulate(seed), simulate(seed)
        assert a[0] == b[0]
        assert a[1].text == b[1].text and a[1].labels == b[1].labels
    assert len({simulate(seed)[1].text for seed in range(20)}) >= 15


def test_lobes_match_the_anatomy_masks():
    from radalign.data.simulate.anatomy import LOBES as ANATOMY_LOBES

    assert LOBES == ANATOMY_LOBES


@pytest.mark.parametrize("kind", FINDING_KINDS)
def test_every_kind_appears_at_prevalence_one(kind):
    prevalences = {k: 1.0 if k == kind else 0.0 for k in FINDING_KINDS}
    for seed in range(30):
        findings, report = simulate(seed, prevalences=prevalences, normal_fraction=0.0)
        assert {f.kind for f in findings} == {kind}
        assert report.labels[KIND_LABELS[kind][0]] in (1, -1)


def test_all_kinds_together_at_prevalence_one():
    findings, _ = simulate(0, prevalences=dict.fromkeys(FINDING_KINDS, 1.0), normal_fraction=0.0)
    assert {f.kind for f in findings} == set(FINDING_KINDS)


def test_sampled_findings_are_anatomically_valid(samples):
    kinds = Counter()
    for findings, _ in samples:
        count = Counter(f.kind for f in findings)
        assert all(n == 1 for kind, n in count.items() if kind != "nodule") and count["nodule"] <= 2
        assert len({f.location for f in findings if f.kind == "nodule"}) == count["nodule"]  # distinct lobes
        for f in findings:
            kinds[f.kind] += 1
            if f.kind == "nodule":
                assert 6 <= f.size_mm <= 29
            if f.kind == "mass":
                assert 30 <= f.size_mm <= 60
            if f.kind == "atelectasis":
                assert f.location != "right_upper"
            if f.kind == "support_device" and f.device == "endotracheal tube":
                assert 3.0 <= f.tip_cm <= 6.0
            if f.certainty == "uncertain":
                assert f.severity in (None, "small", "mild") and f.kind != "support_device"
    normal = sum(not findings for findings, _ in samples) / len(samples)
    print(f"normal share {normal:.2f}; kinds per {len(samples)} samples: {dict(sorted(kinds.items()))}")
    assert 0.25 < normal < 0.35
    assert set(kinds) == set(FINDING_KINDS)


def test_edema_raises_effusion_and_cardiomegaly():
    def rate(edema: float, kind: str) -> float:
        prevalences = {**DEFAULT_PREVALENCES, "edema": edema}
        drawn = [simulate(seed, prevalences=prevalences, normal_fraction=0.0)[0] for seed in range(300)]
        return np.mean([any(f.kind == kind for f in findings) for findings in drawn])

    for kind in ("pleural_effusion", "cardiomegaly"):
        assert rate(1.0, kind) > rate(0.0, kind) + 0.15


def test_side_is_derived_from_the_lobe():
    assert Finding("nodule", location="left_lower", size_mm=9.0).side == "left"
    assert Finding("edema", location="perihilar").side == "bilateral"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "unicorn"}, r"kind.*'unicorn'.*allowed.*'nodule'"),
        ({"kind": "nodule", "side": "up", "location": "right_upper"}, r"side.*'up'.*allowed.*'left'"),
        ({"kind": "nodule", "location": "liver"}, r"location.*'liver'.*allowed.*'right_upper'"),
        (
            {"kind": "cardiomegaly", "location": "heart", "severity": "large"},
            r"severity.*'large'.*cardiomegaly.*'mild'",
        ),
        ({"kind": "nodule", "side": "left", "location": "right_upper"}, r"'left' contradicts location 'right_upper'"),
        ({"kind": "pneumothorax", "side": "bilateral", "location": "apical"}, r"side.*'bilateral'.*pneumothorax"),
        ({"kind": "pleural_effusion", "location": "basal"}, r"side.*None.*pleural_effusion.*'left'"),
        ({"kind": "nodule", "location": "right_upper", "size_mm": 35.0}, r"too large for a nodule"),
        ({"kind": "mass", "location": "right_upper", "size_mm": 12.0}, r"too small for a mass"),
        ({"kind": "support_device"}, r"device.*needs one"),
        ({"kind": "nodule", "location": "right_upper", "certainty": "maybe"}, r"certainty.*'maybe'"),
    ],
)
def test_bad_findings_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Finding(**kwargs)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prevalences": {"unicorn": 0.5}}, r"unknown finding 'unicorn'.*pleural_effusion"),
        ({"prevalences": {"nodule": 1.5}}, r"'nodule' = 1\.5.*\[0, 1\]"),
        ({"prevalences": {"edema": -0.1}}, r"'edema' = -0\.1.*\[0, 1\]"),
        ({"normal_fraction": -0.1}, r"normal_fraction = -0\.1.*\[0, 1\]"),
        ({"uncertain_fraction": 2}, r"uncertain_fraction = 2"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        sample_findings(np.random.default_rng(0), **settings)


def test_prevalence_names_are_normalised():
    table = validate_prevalences({"Pleural Effusion": 0.5, "support_devices": 0.0})
    assert table["pleural_effusion"] == 0.5 and table["support_device"] == 0.0
    assert validate_prevalences(None) == DEFAULT_PREVALENCES


def test_bad_report_settings_are_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match=r"negation_rate = 1\.5"):
        write_report([], rng, negation_rate=1.5)
    with pytest.raises(ConfigError, match=r"unmentioned = -1"):
        write_report([], rng, unmentioned=-1)
    with pytest.raises(ConfigError, match="Finding objects"):
        write_report(["nodule"], rng)  # type: ignore[list-item]


# -- reports ----------------------------------------------------------------------------------------------------
def test_normal_report_has_no_positive_labels():
    for seed in range(50):
        report = write_report([], np.random.default_rng(seed))
        assert report.labels["no_finding"] == 1
        assert all(v == 0 for k, v in report.labels.items() if k != "no_finding")
        assert set(report.labels) == set(DEFAULT_FINDINGS)
        assert report.text.startswith("FINDINGS: ") and "\n\nIMPRESSION: " in report.text
        assert NORMAL_IMPRESSION.search(report.impression_text)


def test_unmentioned_none_leaves_keys_missing():
    finding = Finding("pleural_effusion", "left", "basal", severity="small")
    report = write_report([finding], np.random.default_rng(3), unmentioned=None, negation_rate=0.0)
    assert report.labels["pleural_effusion"] == 1 and report.labels["no_finding"] == 0
    assert "mass" not in report.labels and "fracture" not in report.labels
    assert set(report.labels) == {key for key, _ in report.mentions} | {"no_finding"}


def test_labels_follow_the_ground_truth(samples):
    for findings, report in samples:
        labels = report.labels
        assert set(labels) == set(DEFAULT_FINDINGS)
        expected: dict[str, int] = {}
        for f in findings:
            for key in KIND_LABELS[f.kind]:
                value = 1 if f.certainty == "definite" else -1
                expected[key] = max(expected.get(key, value), value)
        for key in {key for keys in KIND_LABELS.values() for key in keys}:
            assert labels[key] == expected.get(key, 0), (key, report.text)
        opacity = [expected.get(k, 0) for k in ("consolidation", "edema", "atelectasis", "nodule", "mass")]
        assert labels["lung_opacity"] == (1 if 1 in opacity else -1 if -1 in opacity else 0)
        assert labels["enlarged_cardiomediastinum"] == labels["cardiomegaly"]
        pathology = any(f.kind != "support_device" for f in findings)
        assert labels["no_finding"] == (0 if pathology else 1)
        assert labels["fracture"] == labels["pleural_other"] == 0
        if "consolidation" not in expected:
            assert labels["pneumonia"] == 0
        elif expected["consolidation"] == -1:
            assert labels["pneumonia"] in (0, -1)


def test_every_sentence_says_what_its_labels_claim(samples):
    for _, report in samples:
        for sentence in report.sentences:
            for key, value in sentence.mentions:
                assert re.search(KEY_WORDS[key], sentence.text, re.I), (key, sentence.text)
                if value == 1:
                    # "consolidation ..., possibly pneumonia": a hedge may follow, about another key
                    before_hedge = UNCERTAIN.split(sentence.text)[0]
                    assert re.search(KEY_WORDS[key], before_hedge, re.I), sentence.text
                    assert not NEGATED.search(sentence.text), sentence.text
                elif value == -1:
                    assert UNCERTAIN.search(sentence.text), sentence.text
                else:
                    assert (
                        NEGATED.search(sentence.text)
                        or NORMAL.search(sentence.text)
                        or LUNGS_CLEAR.search(sentence.text)
                    ), sentence.text


def test_positive_findings_are_reported_on_the_right_side(samples):
    for findings, report in samples:
        for f in findings:
            about = [
                s.text
                for s in report.sentences
                if s.section == "FINDINGS" and any(k == KIND_LABELS[f.kind][0] and v != 0 for k, v in s.mentions)
            ]
            assert about, (f, report.text)
            sides = {g.side for g in findings if g.kind == f.kind}
            for text in about:
                words = {w.lower() for w in SIDE_WORDS.findall(text)}
                if f.side in ("left", "right") and sides == {f.side}:
                    assert f.side in words and not words - {f.side}, (f, text)
                if f.side == "bilateral" and f.kind != "edema":  # edema is bilateral without saying so
                    assert words & {"bilateral", "bilaterally", "both"} and not words & {"left", "right"}, (f, text)
                if f.side is None:
                    assert not words & {"left", "right"}, (f, text)
            if f.side in ("left", "right"):
                assert any(f.side in text.lower() for text in about), (f, report.text)
            if all(g.certainty == "uncertain" for g in findings if g.kind == f.kind):
                assert all(UNCERTAIN.search(text) for text in about), (f, about)


def test_no_self_contradiction(samples):
    """Whatever the text denies or calls normal is absent; a 'clear lungs' report has no lung or pleural finding."""
    checked = Counter()
    for findings, report in samples:
        present = {f.kind for f in findings}
        for sentence in report.sentences:
            text = sentence.text
            if NEGATED.search(text) or (NORMAL.search(text) and not UNCERTAIN.search(text)):
                denied = kinds_in(text)
                assert not denied & present, (text, present)
                checked["negation"] += 1
            if LUNGS_CLEAR.search(text) and "otherwise" not in text.lower():
                assert not present & {*T.PARENCHYMA, *T.PLEURA}, (text, present)
                checked["lungs clear"] += 1
            if sentence.section == "IMPRESSION" and NORMAL_IMPRESSION.search(text):
                assert present <= {"support_device"}, (text, present)
                checked["normal impression"] += 1
        for key in {k for k, v in report.mentions if v == 0}:
            assert all(v == 0 for k, v in report.mentions if k == key)
    print(f"checked sentences: {dict(checked)}")
    assert checked["negation"] > N_SAMPLES and checked["lungs clear"] > 100 and checked["normal impression"] > 300


def test_phrasing_is_varied(samples):
    sentences = Counter(s.text for _, report in samples for s in report.sentences)
    reports = {report.text for _, report in samples}
    print(f"{len(sentences)} distinct sentences, {len(reports)} distinct reports in {N_SAMPLES} samples")
    assert len(sentences) >= 300
    assert len(reports) >= 0.9 * N_SAMPLES
    assert not any("XXXX" in s or "{" in s or "  " in s for s in sentences)
    assert all(s[0].isupper() for s in sentences)  # a digit after "cm." would not start a sentence for parsers
    assert not any(re.search(r"\ba (8|11|18)\b|\ba [aeiou]", s, re.I) for s in sentences)


def test_templates_keep_their_rules():
    for table in (T.FINDING_SENTENCES, T.IMPRESSION_SENTENCES):
        for by_certainty in table.values():
            for certainty, templates in by_certainty.items():
                for template in templates:
                    if certainty == "definite":
                        assert not UNCERTAIN.search(template) and not re.search(
                            r"\b(no|not|without|negative)\b", template, re.I
                        ), template
                    else:
                        assert UNCERTAIN.search(template), template
                    assert not re.search(r"\b(left|right)\b", template), template  # sides come from placeholders


def test_findings_without_size_or_severity_still_render():
    findings = [
        Finding("nodule", location="right_upper"),
        Finding("nodule", location="left_lower", certainty="uncertain"),
        Finding("mass", location="left_upper"),
        Finding("consolidation", location="right_middle"),
        Finding("pleural_effusion", "bilateral", "basal", certainty="uncertain"),
        Finding("pneumothorax", "left", "apical", certainty="uncertain"),
        Finding("cardiomegaly", location="heart"),
        Finding("edema", location="perihilar"),
        Finding("support_device", device="endotracheal tube"),
    ]
    for seed in range(200):
        report = write_report(findings, np.random.default_rng(seed))
        assert report.labels["nodule"] == 1 and report.labels["pleural_effusion"] == -1


def test_text_parses_into_the_same_sentences(samples):
    reports = pytest.importorskip("radalign.data.reports")
    for _, report in samples[:300]:
        parsed = reports.parse_report(report.text)
        assert parsed.sentences == [s.text for s in report.sentences], report.text
        assert parsed.sentence_sections == [s.section for s in report.sentences]
