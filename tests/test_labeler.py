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


# -- labelling a manifest ----------------------------------------------------------------------------------------
def _manifest(tmp_path):
    import pandas as pd

    rows = [
        {"id": "a", "image": "a.png", "modality": "xray",
         "report": "FINDINGS: Small left pleural effusion. No pneumothorax.\nIMPRESSION: Possible pneumonia."},
        {"id": "b", "image": "b.png", "modality": "xray", "report": "Cardiomegaly.", "Cardiomegaly": "0"},
        {"id": "c", "image": "c.png", "modality": "xray", "report": "", "Cardiomegaly": ""},
        {"id": "d", "image": "d.png", "modality": "xray", "report_path": "d.txt", "Cardiomegaly": ""},
    ]  # fmt: skip
    (tmp_path / "d.txt").write_text("IMPRESSION: Heart size is normal. The lungs are clear.", encoding="utf-8")
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_label_manifest_fills_rows_without_labels_and_keeps_the_datasets(tmp_path):
    from radalign.data.manifest import read_table
    from radalign.data.manifest_labels import label_manifest

    summary = label_manifest(_manifest(tmp_path), tmp_path / "out.csv", progress=False)
    table = read_table(tmp_path / "out.csv").set_index("id")
    assert table["label_source"].to_dict() == {"a": "labeler", "b": "dataset", "c": "", "d": "labeler"}
    assert table.loc["a", ["label_pleural_effusion", "label_pneumothorax", "label_pneumonia"]].tolist() == [
        "1",
        "0",
        "-1",
    ]
    assert table.loc["a", "label_no_finding"] == ""  # a positive finding
    assert table.loc["b", "Cardiomegaly"] == "0"  # the dataset's label stays, though the report says otherwise
    assert table.loc["d", "Cardiomegaly"] == "0" and table.loc["d", "label_no_finding"] == "1"  # from report_path
    assert "label_cardiomegaly" not in table.columns  # the CheXpert-spelled column is the cardiomegaly column
    assert (summary.labelled, summary.kept, summary.without_report) == (2, 1, 1)


def test_label_manifest_overwrites_only_when_asked_and_writes_sentences(tmp_path):
    from radalign.data.manifest import load_manifest, read_table
    from radalign.data.manifest_labels import label_manifest

    label_manifest(_manifest(tmp_path), tmp_path / "out.csv", overwrite=True, sentences_out=tmp_path / "s.csv",
                   progress=False)  # fmt: skip
    table = read_table(tmp_path / "out.csv").set_index("id")
    assert table.loc["b", "Cardiomegaly"] == "1" and table.loc["b", "label_source"] == "labeler"
    sentences = read_table(tmp_path / "s.csv")
    assert sentences[sentences["id"] == "a"]["text"].tolist() == [
        "Small left pleural effusion.", "No pneumothorax.", "Possible pneumonia."
    ]  # fmt: skip
    manifest = load_manifest(tmp_path / "out.csv", check_files=False)
    assert "source" not in manifest.vocabulary and "pleural_effusion" in manifest.vocabulary
    assert manifest.records[0].labels["pneumonia"] == -1


def test_radalign_label_refuses_to_overwrite_its_input(tmp_path, capsys):
    from radalign.cli import main

    path = _manifest(tmp_path)
    before = path.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["label", str(path), "--out", str(path)])
    assert exit_info.value.code == 2 and "is the input manifest" in capsys.readouterr().err
    assert path.read_bytes() == before
    main(["label", str(path), "--out", str(tmp_path / "l.parquet")])
    import pandas as pd

    assert pd.read_parquet(tmp_path / "l.parquet")["label_source"].tolist() == ["labeler", "dataset", "", "labeler"]


def test_uncertain_phrases_and_pseudo_triggers():
    labeler = Labeler.from_yaml()
    assert labeler.label_sentence("Heart size borderline enlarged.") == {"cardiomegaly": -1}
    assert labeler.label_sentence("No significant change in the right pleural effusion.") == {"pleural_effusion": 1}
    assert labeler.label_sentence("No right pleural effusion.") == {"pleural_effusion": 0}  # a real "no" still works
    rules = {"observations": {"x": {"mentions": ["thing"], "uncertain": ["maybe a thing"]}},
             "negation": {"pre": ["no"]}, "pseudo": ["no doubt"]}  # fmt: skip
    own = Labeler(rules)
    assert own.label_sentence("maybe a thing") == {"x": -1}
    assert own.label_sentence("no doubt a thing") == {"x": 1} and own.label_sentence("no thing") == {"x": 0}
