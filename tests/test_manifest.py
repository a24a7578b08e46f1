"""Manifests: reading CSV/Parquet, validation that names every bad row, writing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from radalign.data.manifest import load_manifest, load_regions, write_manifest
from radalign.data.schema import Modality, View
from radalign.errors import DataError


@pytest.fixture
def folder(tmp_path: Path, ct_small: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        shutil.copy(ct_small, tmp_path / "img" / name)
    return tmp_path


def write_csv(folder: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def good_rows() -> list[dict]:
    return [
        {"id": "r1", "image": "img/a.dcm", "modality": "ct", "split": "train", "view": "axial",
         "report": "FINDINGS: No effusion. IMPRESSION: Normal.", "label_Pleural Effusion": "0", "label_edema": ""},
        {"id": "r2", "image": "img/b.dcm", "modality": "CT", "split": "val", "view": "",
         "report": "Small right effusion.", "label_Pleural Effusion": "1", "label_edema": "-1", "site": "H1"},
    ]  # fmt: skip


def test_reads_records_with_labels_views_and_metadata(folder):
    manifest = load_manifest(write_csv(folder, good_rows()))
    assert [r.id for r in manifest.records] == ["r1", "r2"]
    assert manifest.vocabulary == ("pleural_effusion", "edema")
    r1, r2 = manifest.records
    assert r1.modality is Modality.CT and r1.view is View.AXIAL and r2.view is None
    assert r1.labels == {"pleural_effusion": 0}  # missing edema is absent, not 0
    assert r2.labels == {"pleural_effusion": 1, "edema": -1}
    assert r1.image_path == folder / "img" / "a.dcm"
    assert r2.metadata == {"site": "H1"}
    assert [r.id for r in manifest.split("val")] == ["r2"]


def test_chexpert_named_columns_are_labels_and_a_near_miss_spelling_gets_a_note(folder):
    rows = good_rows()
    for row, (cardio, finding) in zip(rows, (("1.0", "0.0"), ("-1.0", "1.0")), strict=True):
        row.update({"Cardiomegaly": cardio, "No Finding": finding, "label_cardiomegally": "1", "Sex": "F"})
    manifest = load_manifest(write_csv(folder, rows))
    assert manifest.vocabulary == ("pleural_effusion", "edema", "cardiomegally", "cardiomegaly", "no_finding")
    r1, r2 = manifest.records
    assert r1.labels["cardiomegaly"] == 1 and r2.labels["cardiomegaly"] == -1 and r2.labels["no_finding"] == 1
    assert r1.metadata == {"Sex": "F"}  # not a CheXpert observation: metadata, as before
    notes = " ".join(manifest.notes)
    assert "'label_cardiomegally' is a finding of its own" in notes and "did you mean label_cardiomegaly?" in notes
    assert "'Cardiomegaly', 'No Finding' read as labels" in notes
    # a label_ column wins over the CheXpert spelling of the same finding, which then stays metadata
    for row in rows:
        row["label_cardiomegaly"] = "0"
    manifest = load_manifest(write_csv(folder, rows))
    assert manifest.records[1].labels["cardiomegaly"] == 0 and manifest.records[1].metadata["Cardiomegaly"] == "-1.0"


def test_parquet_round_trip_keeps_everything(folder):
    manifest = load_manifest(write_csv(folder, good_rows()))
    out = write_manifest(manifest.records, folder / "copy.parquet")
    again = load_manifest(out)
    assert [(r.id, r.labels, r.split, r.view, r.report) for r in again.records] == [
        (r.id, r.labels, r.split, r.view, r.report) for r in manifest.records
    ]


def test_csv_cells_a_spreadsheet_would_run_are_written_as_text_and_read_back_unchanged(folder):
    from dataclasses import replace

    manifest = load_manifest(write_csv(folder, good_rows()))
    texts = ['=HYPERLINK("http://x")', "+1+1", "@SUM(A1)", "-2+3", "'=already quoted", "'plain"]
    records = [replace(manifest.records[1], id=f"r{i}", report=text) for i, text in enumerate(texts)]
    out = write_manifest(records, folder / "copy.csv")
    import csv

    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    written = [row["report"] for row in rows]
    assert rows[0]["label_edema"] == "-1"  # a number is not a formula
    assert written[:5] == ["'" + t for t in texts[:5]] and written[5] == "'plain"
    assert all(not cell.startswith(("=", "+", "-", "@")) for cell in written)
    again = load_manifest(out)
    assert [r.report for r in again.records] == texts
    assert again.records[0].labels == manifest.records[1].labels == {"pleural_effusion": 1, "edema": -1}


def test_every_bad_row_is_named_with_its_reason(folder):
    rows = [
        *good_rows(),
        {"id": "r1", "image": "img/c.dcm", "modality": "ct"},  # duplicate id
        {"id": "r4", "image": "img/missing.dcm", "modality": "ct"},  # missing file
        {"id": "r5", "image": "img/c.dcm", "modality": "ct", "label_edema": "2"},  # bad label
        {"id": "r6", "image": "img/c.dcm", "modality": "ct", "split": "holdout"},  # bad split
        {"id": "r7", "image": "img/c.dcm", "modality": "ct", "report": "   "},  # empty report (required)
    ]
    manifest = load_manifest(write_csv(folder, rows), on_error="skip", require_report=True)
    by_id: dict[str, dict[str, object]] = {}
    for p in manifest.problems:
        by_id.setdefault(p.record_id, {})[p.kind] = p
    assert set(by_id) == {"r1", "r4", "r5", "r6", "r7"}
    assert by_id["r1"]["duplicate id"].row == 4 and "row 2" in by_id["r1"]["duplicate id"].reason
    assert "missing.dcm" in by_id["r4"]["missing file"].reason
    assert "'2'" in by_id["r5"]["bad label"].reason
    assert "holdout" in by_id["r6"]["bad value"].reason
    assert "empty report" in by_id["r7"]
    assert [r.id for r in manifest.records] == ["r1", "r2"]


def test_fail_mode_raises_naming_the_row(folder):
    rows = [*good_rows(), {"id": "r9", "image": "img/nope.dcm", "modality": "ct"}]
    with pytest.raises(DataError, match=r"(?s)row 4 \(id r9\).*nope.dcm.*on_error"):
        load_manifest(write_csv(folder, rows), on_error="fail")


def test_missing_required_columns_are_explained(folder):
    with pytest.raises(DataError, match="no 'image' column"):
        load_manifest(write_csv(folder, [{"id": "x", "modality": "ct"}]))
    with pytest.raises(DataError, match="no 'modality' column"):
        load_manifest(write_csv(folder, [{"id": "x", "image": "img/a.dcm"}]))


def test_missing_manifest_and_wrong_suffix(folder):
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(folder / "nope.csv")
    (folder / "m.xlsx").write_text("x")
    with pytest.raises(DataError, match="suffix"):
        load_manifest(folder / "m.xlsx")


def test_report_path_non_utf8_is_a_named_problem(folder):
    (folder / "r.txt").write_bytes("Épanchement pleural.".encode("latin-1"))
    rows = [{"id": "x", "image": "img/a.dcm", "modality": "ct", "report_path": "r.txt"}]
    manifest = load_manifest(write_csv(folder, rows), on_error="skip")
    assert manifest.problems[0].kind == "unreadable report"
    assert "UTF-8" in manifest.problems[0].reason and "offset 0" in manifest.problems[0].reason


def test_id_is_derived_from_the_image_path_when_absent(folder):
    rows = [{"image": "img/a.dcm", "modality": "ct"}, {"image": "img/b.dcm", "modality": "ct"}]
    ids = [r.id for r in load_manifest(write_csv(folder, rows)).records]
    again = [r.id for r in load_manifest(write_csv(folder, rows, "other.csv")).records]
    assert ids == again and len(set(ids)) == 2


def test_regions_file(folder):
    (folder / "reg.json").write_text(
        '{"regions": [{"finding": "Pleural Effusion", "box": [1, 2, 30, 40], "mask": "m.png", "phrase": "x"}]}'
    )
    regions = load_regions(folder / "reg.json")
    assert regions[0].finding == "pleural_effusion"
    assert regions[0].box == (1.0, 2.0, 30.0, 40.0)
    assert regions[0].mask_path == str(folder / "m.png")
    (folder / "bad.json").write_text('{"regions": [{"finding": "x", "box": [1, 2]}]}')
    with pytest.raises(DataError, match="4 \\(2D\\) or 6 \\(3D\\)"):
        load_regions(folder / "bad.json")
