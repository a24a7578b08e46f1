"""The rule-based report labeler: each rule family on hand-written sentences, report aggregation and No Finding,
user rules, and agreement with the simulator's own labels (a sanity check: the simulator's phrasing is ours)."""

from __future__ import annotations

import pytest

from radalign.data.labeler import Labeler, merge_rules
from radalign.errors import ConfigError


@pytest.fixture(scope="module")
def labeler() -> Labeler:
    return Labeler.from_yaml()


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        # mentions, longest first: "pleural effusion" is one mention
        ("Small left pleural effusion.", {"pleural_effusion": 1}),
        ("Mild cardiomegaly.", {"cardiomegaly": 1}),
        ("A 1 cm nodule in the right upper lobe.", {"nodule": 1, "lung_lesion": 1}),  # `also`
        ("Right IJ catheter tip in the SVC.", {"support_devices": 1}),
        # an exclusion hides its own observation's mentions, not another observation's
        ("There is a small pericardial effusion.", {}),
        ("Mild pericardial effusion and small pleural effusion.", {"pleural_effusion": 1}),
        ("Old compression fracture of T12.", {"fracture": 1}),  # excluded from atelectasis ("collapse") only
        ("Nodular opacity in the left lung.", {"nodule": 1, "lung_lesion": 1, "lung_opacity": 1}),
        # negative mentions
        ("Heart size is normal.", {"cardiomegaly": 0}),
        ("The lungs are clear.", {"lung_opacity": 0}),
        # pre-negation, across a list joined by commas and "or"
        ("No evidence of focal consolidation, effusion, or pneumothorax.",
         {"consolidation": 0, "pleural_effusion": 0, "pneumothorax": 0}),
        ("Without pneumothorax.", {"pneumothorax": 0}),
        # post-negation
        ("The previously seen effusion has resolved.", {"pleural_effusion": 0}),
        ("A pneumothorax is not seen.", {"pneumothorax": 0}),
        # uncertainty, before and after; it wins over the negation inside "cannot be excluded"
        ("Possible right lower lobe consolidation.", {"consolidation": -1}),
        ("Pneumonia cannot be excluded.", {"pneumonia": -1}),
        ("Atelectasis versus pneumonia at the left base.", {"atelectasis": -1, "pneumonia": -1}),
        # a scope ends at "but": the negation does not reach the effusion
        ("No pneumothorax, but there is a small right effusion.", {"pneumothorax": 0, "pleural_effusion": 1}),
        ("Lungs without consolidation; small effusion.", {"consolidation": 0, "pleural_effusion": 1}),
    ],
)  # fmt: skip
def test_each_rule_family_on_a_sentence(labeler, sentence, expected):
    assert labeler.label_sentence(sentence) == expected


def test_a_trigger_reaches_only_words_near_it(labeler):
    far = "No acute osseous abnormality is seen in the visualised upper abdomen and the chest wall and a pneumothorax."
    assert labeler.label_sentence(far) == {"pneumothorax": 1}  # 8-word window: too far for the "no"


def test_report_labels_combine_sentences_and_derive_no_finding(labeler):
    normal = labeler.label_report("FINDINGS: Heart size is normal. No effusion. Lines and tubes unchanged.\n"
                                  "IMPRESSION: No acute process.")  # fmt: skip
    assert normal.labels == {"cardiomegaly": 0, "pleural_effusion": 0, "support_devices": 1, "no_finding": 1}
    assert [s.labels for s in normal.sentences] == [{"cardiomegaly": 0}, {"pleural_effusion": 0},
                                                    {"support_devices": 1}, {}]  # fmt: skip
    # positive over uncertain over negative across sentences; any pathology positive or uncertain: no No Finding
    sick = labeler.label_report("FINDINGS: No effusion. Possible small effusion. Small left effusion.")
    assert sick.labels == {"pleural_effusion": 1}
    hedged = labeler.label_report("IMPRESSION: Possible pneumonia. No effusion.")
    assert hedged.labels == {"pneumonia": -1, "pleural_effusion": 0}


def test_user_rules_replace_or_extend_the_shipped_ones_and_are_checked(tmp_path):
    own = tmp_path / "rules.yaml"
    own.write_text("observations:\n  pleural_effusion:\n    mentions: [fluid collection]\n")
    assert Labeler.from_yaml(own).label_sentence("Small pleural effusion.") == {}
    extended = Labeler.from_yaml(own, extend=True)
    assert extended.label_sentence("No fluid collection.") == {"pleural_effusion": 0}  # shipped negation + own phrase
    assert extended.label_sentence("Small pleural effusion.") == {"pleural_effusion": 1}
    merged = merge_rules(
        {"observations": {"a": {"mentions": ["x"]}}}, {"observations": {"a": {"mentions": ["x", "y"]}}}
    )
    assert merged["observations"]["a"]["mentions"] == ["x", "y"]
    own.write_text("observations:\n  edema:\n    mentionz: [wet lungs]\n")
    with pytest.raises(ConfigError, match="observation 'edema' has unknown key 'mentionz'"):
        Labeler.from_yaml(own)
    own.write_text("observations:\n  edema:\n    mentions: [edema]\nnegation:\n  pre: [no]\n")
    with pytest.raises(ConfigError, match="quote it"):
        Labeler.from_yaml(own)  # YAML reads an unquoted no as false


def test_agreement_with_the_simulator_s_own_sentence_labels(labeler):
    """A sanity check, not the measure (docs/labeler.md): the simulator's sentences say what they assert."""
    from radalign.data.labeler import simulated_agreement

    counts = simulated_agreement(labeler, 150)
    agree, total = sum(ok for ok, _ in counts.values()), sum(n for _, n in counts.values())
    assert total > 800 and agree / total > 0.9
