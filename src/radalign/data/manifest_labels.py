"""Label a manifest's reports with the rule-based labeler: ``label_<finding>`` columns and a ``label_source``.

``radalign label MANIFEST --out LABELED`` (and :func:`label_manifest`) keeps every column and row of the input and
fills the labels of rows that have a report and no labels of their own: ``label_source`` is ``labeler`` there,
``dataset`` where the manifest already had labels (left as they are unless ``overwrite``), and empty for a row
with neither. Cells follow the manifest convention: 1 positive, 0 negative, -1 uncertain, empty not mentioned.
Label columns spelled as CheXpert spells them (``Pleural Effusion``) count as the dataset's labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radalign.data.labeler import NO_FINDING, Labeler
from radalign.data.manifest import LABEL_PREFIX, label_columns_of, read_report_file, read_table, write_table
from radalign.errors import DataError

SOURCE_COLUMN = "label_source"  # one of manifest.KNOWN_COLUMNS


@dataclass
class LabelSummary:
    out: Path
    rows: int = 0
    labelled: int = 0  # rows the labeler filled
    kept: int = 0  # rows whose dataset labels were kept
    without_report: int = 0  # rows with no report and no labels
    positives: Counter = field(default_factory=Counter)  # observation -> labeller-written positives

    def lines(self) -> list[str]:
        top = ", ".join(f"{k} {v}" for k, v in self.positives.most_common(6))
        return [
            f"wrote {self.out}: {self.rows} rows, {self.labelled} labelled from their reports, {self.kept} kept "
            f"their dataset labels, {self.without_report} have neither",
            f"positives written: {top or 'none'}",
        ]


def label_manifest(
    manifest: str | Path,
    out: str | Path,
    *,
    labeler: Labeler | None = None,
    sections: tuple[str, ...] = ("FINDINGS", "IMPRESSION"),
    overwrite: bool = False,
    sentences_out: str | Path | None = None,
    progress: bool = True,
) -> LabelSummary:
    """Write ``out``: ``manifest`` with the labeler's labels for its reports (see the module docstring).

    ``sentences_out`` also writes one row per sentence (record id, sentence number, text, labels), for reading
    what the labeler decided. ``overwrite`` replaces labels the manifest already has.
    """
    manifest, out = Path(manifest), Path(out)
    if out.resolve() == manifest.resolve():
        raise DataError(f"label: --out {out} is the input manifest; write the labelled copy to another file")
    labeler = labeler or Labeler.from_yaml()
    table = read_table(manifest)
    if "report" not in table.columns and "report_path" not in table.columns:
        raise DataError(f"manifest {manifest} has no report or report_path column: there is nothing to label")
    existing, _ = label_columns_of(list(table.columns))
    columns = {finding: column for column, finding in existing.items()}  # finding -> its column in this table
    for name in (*labeler.observations, NO_FINDING):
        columns.setdefault(name, LABEL_PREFIX + name)
        if columns[name] not in table.columns:
            table[columns[name]] = ""
    table = table.astype(object)
    if SOURCE_COLUMN not in table.columns:
        table[SOURCE_COLUMN] = ""
    summary = LabelSummary(out, rows=len(table))
    sentence_rows: list[dict[str, Any]] = []
    label_cells = list(existing)
    for index in _progress(range(len(table)), progress and len(table) > 2000):
        row = table.iloc[index]
        has_labels = any(_filled(row[c]) for c in label_cells)
        text = _report_text(row, manifest.parent)
        if has_labels and not overwrite:
            table.iat[index, table.columns.get_loc(SOURCE_COLUMN)] = "dataset"
            summary.kept += 1
            continue
        if not text.strip():
            summary.without_report += not has_labels
            table.iat[index, table.columns.get_loc(SOURCE_COLUMN)] = "dataset" if has_labels else ""
            continue
        result = labeler.label_report(text, sections=sections)
        for name, column in columns.items():
            value = result.labels.get(name)
            table.iat[index, table.columns.get_loc(column)] = "" if value is None else str(value)
            summary.positives[name] += value == 1
        table.iat[index, table.columns.get_loc(SOURCE_COLUMN)] = "labeler"
        summary.labelled += 1
        if sentences_out is not None:
            record = str(row["id"]) if "id" in table.columns else str(index)
            for number, sentence in enumerate(result.sentences):
                sentence_rows.append({"id": record, "sentence": number, "text": sentence.text,
                                      **{LABEL_PREFIX + k: str(v) for k, v in sentence.labels.items()}})  # fmt: skip
    summary.positives = +summary.positives
    write_table(table, out)
    if sentences_out is not None:
        import pandas as pd

        write_table(pd.DataFrame(sentence_rows).astype(object).fillna(""), sentences_out)
    return summary


def _filled(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "None")


def _report_text(row: Any, base: Path) -> str:
    text = row.get("report")
    if isinstance(text, str) and text.strip():
        return text
    path = row.get("report_path")
    if not isinstance(path, str) or not path.strip():
        return ""
    file = Path(path) if Path(path).is_absolute() else base / path
    if not file.is_file():
        raise DataError(f"report file {file} (row id {row.get('id', '?')}) does not exist; fix its report_path")
    if file.suffix.lower() == ".xml":  # an IU X-ray (Open-i) report file
        from radalign.data.sources.iu_xray import parse_iu_xml

        return parse_iu_xml(file.read_bytes(), source=str(file)).raw_text()
    return read_report_file(file)


def _progress(items: range, enabled: bool) -> Any:
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description="labelling reports", transient=True)
