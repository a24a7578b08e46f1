"""Manifests: one row per image-report-label record, as CSV or Parquet.

Columns (see docs/data.md for an example):

=============  ========  ==================================================================================
column         required  meaning
=============  ========  ==================================================================================
``image``      yes       image path(s), relative to the manifest's folder or absolute; several images of one
                         record separated by ``|`` (CSV) or a list (Parquet). A folder = a DICOM series.
``modality``   yes       ``xray``, ``ct``, ``mr`` (or DICOM codes CR/DX/DR/CT/MR)
``id``         no        stable record id; derived from the first image path when absent
``split``      no        ``train`` / ``val`` / ``test`` (default ``train``)
``view``       no        PA / AP / LATERAL / AXIAL
``report``     no        report text; or ``report_path``: a UTF-8 text file relative to the manifest
``label_X``    no        one column per finding X: 1, 0, -1 (uncertain) or empty (missing)
``label_source`` no      where a row's labels come from: ``dataset``, ``labeler`` (``radalign label``) or empty
``regions``    no        a JSON file of boxes/masks per finding (format in docs/data.md)
anything else  no        kept as metadata
=============  ========  ==================================================================================

Validation names every bad row and why; the caller chooses to fail on the first report or to skip bad rows.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from radalign.data.schema import (
    CHEXPERT_FINDINGS,
    DEFAULT_FINDINGS,
    Modality,
    Record,
    Region,
    View,
    check_vocabulary,
    finding_key,
    parse_label_value,
    stable_id,
)
from radalign.errors import DataError

LABEL_PREFIX = "label_"
SPLITS = ("train", "val", "test")
# label_source: "dataset" / "labeler" (radalign label), which a label_ prefix must not make a finding
KNOWN_COLUMNS = ("id", "image", "modality", "split", "view", "report", "report_path", "regions", "label_source")
IMAGE_SEPARATOR = "|"

OnError = Literal["fail", "skip"]


@dataclass(frozen=True)
class Problem:
    """One bad manifest row: which row (1-based, as in a spreadsheet with a header), which record, and why."""

    row: int
    record_id: str
    kind: str  # short category for summaries: "missing file", "bad label", "duplicate id", ...
    reason: str
    column: str = ""

    def __str__(self) -> str:
        where = f" [{self.column}]" if self.column else ""
        return f"row {self.row} (id {self.record_id}){where}: {self.reason}"


@dataclass
class Manifest:
    """Validated records plus the problems met while reading them."""

    path: Path
    records: list[Record]
    vocabulary: tuple[str, ...]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about columns: likely misspellings, labels read by spelling

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def __len__(self) -> int:
        return len(self.records)


# A spreadsheet opening a CSV runs a cell that starts with one of these as a formula (CSV injection): such text
# cells are written with a leading ' (what spreadsheets show as text) and read back without it.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _escape_cell(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip("'").startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def _unescape_cell(value: str) -> str:
    if value.startswith("'") and value.lstrip("'").startswith(_FORMULA_START):
        return value[1:]
    return value


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest into a DataFrame of strings, with a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; pass the path of a .csv or .parquet manifest")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".csv.gz", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            # keep_default_na=False so that an empty report stays "" and "NA" text is not turned into NaN
            table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
            if suffix != ".csv.gz":
                _refuse_cut_file(path, sep, len(table.columns))
            for column in table.columns:  # only the few quoted cells pay a Python call
                quoted = table[column].str.startswith("'")
                if quoted.any():
                    table.loc[quoted, column] = table.loc[quoted, column].map(_unescape_cell)
            return table
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(
            f"manifest {path} is not valid UTF-8 ({err.reason} at byte {err.start}); re-save as UTF-8"
        ) from err
    except Exception as err:  # pandas/pyarrow raise many types for a malformed file
        raise DataError(f"manifest {path} could not be parsed: {err}") from err
    raise DataError(f"manifest {path} has suffix {suffix!r}; use .csv, .tsv, .csv.gz or .parquet")


def _refuse_cut_file(path: Path, sep: str, columns: int) -> None:
    """A CSV cut mid-row (a copy or download that stopped) parses without error, its last row's missing cells read
    as empty labels; writers end files with a newline, so only a file without one is parsed again to check."""
    import csv

    with path.open("rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return
        handle.seek(-1, 2)
        if handle.read(1) in (b"\n", b"\r"):
            return
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines(keepends=True), delimiter=sep))
    if len(rows) > 1 and len(rows[-1]) < columns:
        raise DataError(
            f"manifest {path} ends in the middle of a row (row {len(rows)} has {len(rows[-1])} of {columns} cells and "
            "the file has no final newline): it looks cut short; copy or export it again"
        )


def _cell(value: Any) -> Any:
    """Normalise a pandas cell: NaN/None -> None, strings stripped."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value if value else None
    return value


def _image_paths(value: Any, base: Path) -> tuple[Path, ...]:
    if value is None:
        return ()
    items = list(value) if isinstance(value, list | tuple) or hasattr(value, "tolist") else None
    if items is None:
        items = [p for p in str(value).split(IMAGE_SEPARATOR)]
    paths = []
    for item in items:
        text = str(item).strip()
        if text:
            p = Path(text).expanduser()
            paths.append(p if p.is_absolute() else base / p)
    return tuple(paths)


def read_report_file(path: Path) -> str:
    """A report text file as str; non-UTF-8 bytes are a DataError that says where and how to fix it."""
    from radalign.data.reports import decode_report_bytes

    return decode_report_bytes(path.read_bytes(), source=f"report file {path}")


def load_manifest(
    path: str | Path,
    *,
    require_report: bool = False,
    check_files: bool = True,
    decode: bool = False,
    on_error: OnError = "fail",
    splits: Sequence[str] | None = None,
    progress: bool = False,
    data_root: str | Path | None = None,
) -> Manifest:
    """Read and validate a manifest.

    Every image, report and regions path must resolve (symbolic links followed) inside ``data_root``, the
    manifest's folder by default: a row pointing elsewhere (``../../etc/passwd``) is a bad row, so a manifest from
    someone else cannot make radalign read, train on or cache files it was not meant to. Widen the root to allow
    more (CLI: ``--data-root``, training: ``loader.data_root``).

    ``check_files`` checks that every image (and report/regions file) exists; ``decode`` also decodes every
    image (slow, used by ``radalign data check``). With ``on_error="fail"`` the first bad row raises a
    DataError listing every problem found so far; with ``"skip"`` bad rows are dropped and listed in
    ``Manifest.problems``.
    """
    path = Path(path)
    table = read_table(path)
    base = path.parent
    root = Path(data_root).expanduser().resolve() if data_root is not None else base.resolve()
    if data_root is not None and not root.is_dir():
        raise DataError(f"data root {data_root} is not a folder; pass the folder that holds the manifest's files")
    if "image" not in table.columns:
        raise DataError(
            f"manifest {path} has no 'image' column (columns: {list(table.columns)}); "
            "every row needs the path of its image, see docs/data.md"
        )
    if "modality" not in table.columns:
        raise DataError(f"manifest {path} has no 'modality' column; add one with xray, ct or mr per row")
    label_columns, notes = label_columns_of(table.columns)
    vocabulary = check_vocabulary(label_columns.values())

    problems: list[Problem] = []
    records: list[Record] = []
    seen_ids: dict[str, int] = {}
    in_train: dict[tuple[str, str], int] = {}  # ("image", resolved path) / ("patient", id) -> first train row
    held_out: dict[str, list[tuple[str, str]]] = {}  # val/test record id -> its identity keys, resolved once
    rows = table.to_dict(orient="records")
    for index, row in enumerate(_progress(rows, progress, "checking manifest")):
        row_number = index + 2  # 1-based with the header as row 1, as a spreadsheet shows it
        row_problems: list[Problem] = []
        record = _parse_row(row, row_number, base, root, label_columns, row_problems)
        if record is not None:
            if record.id in seen_ids:
                row_problems.append(
                    Problem(
                        row_number,
                        record.id,
                        "duplicate id",
                        f"id already used in row {seen_ids[record.id]}",
                        "id",
                    )
                )
            else:
                seen_ids[record.id] = row_number
            keys = _identity_keys(record)
            if record.split == "train":
                for key in keys:
                    in_train.setdefault(key, row_number)
            else:
                held_out[record.id] = keys
            if splits is not None and record.split not in splits:
                continue
            row_problems += _check_record(record, row_number, require_report, check_files, decode)
        if row_problems:
            problems += row_problems
            if on_error == "fail":
                raise DataError(
                    f"manifest {path} has a bad row:\n  "
                    + "\n  ".join(str(p) for p in row_problems)
                    + "\nFix the row, or pass on_error='skip' (CLI: --on_error skip) to drop bad rows."
                )
            continue
        records.append(record)  # type: ignore[arg-type]
    records = _drop_leaks(path, records, seen_ids, held_out, in_train, problems, on_error)
    return Manifest(path=path, records=records, vocabulary=vocabulary, problems=problems, notes=notes)


def label_columns_of(columns: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Column -> finding of every label column, and notes on the ones a user probably did not mean.

    ``label_<finding>`` columns are labels. So are columns spelled as CheXpert's and MIMIC-CXR's label files spell
    them (``Cardiomegaly``, ``Pleural Effusion``, ``No Finding``) when no ``label_`` column names that finding: a
    CheXpert table then works as it is. A ``label_`` finding that is not a known one but close to one
    (``label_cardiomegally``) is still a finding of its own, with a note asking whether the known one was meant.
    """
    import difflib

    labels = {
        c: finding_key(c[len(LABEL_PREFIX) :])
        for c in columns
        if str(c).startswith(LABEL_PREFIX) and c not in KNOWN_COLUMNS
    }
    notes: list[str] = []
    for column, name in labels.items():
        if name not in DEFAULT_FINDINGS:
            close = difflib.get_close_matches(name, DEFAULT_FINDINGS, n=1, cutoff=0.8)
            if close:
                notes.append(
                    f"column {column!r} is a finding of its own, {name!r}: did you mean {LABEL_PREFIX}{close[0]}? "
                    "(rename the column if so; zero-shot prompts and protocols know only the known spelling)"
                )
    taken = set(labels.values())
    chexpert = {}
    for column in columns:
        if str(column).startswith(LABEL_PREFIX) or column in KNOWN_COLUMNS:
            continue
        key = finding_key(column) if str(column).strip() else ""
        if key in CHEXPERT_FINDINGS and key not in taken:
            chexpert[column] = key
            taken.add(key)
    if chexpert:
        notes.append(
            f"columns {', '.join(repr(c) for c in chexpert)} read as labels (the CheXpert / MIMIC-CXR spelling of "
            f"{', '.join(LABEL_PREFIX + k for k in chexpert.values())})"
        )
    return {**labels, **chexpert}, notes


PATIENT_COLUMNS = ("patient", "patient_id", "subject_id")  # radalign's simulator, common exports, MIMIC


def _identity_keys(record: Record) -> list[tuple[str, str]]:
    keys = [("image", str(p.resolve())) for p in record.image_paths]
    patient = next((record.metadata[c] for c in PATIENT_COLUMNS if record.metadata.get(c) is not None), None)
    return keys + ([("patient", str(patient))] if patient is not None else [])


def _drop_leaks(
    path: Path,
    records: list[Record],
    rows: dict[str, int],
    held_out: dict[str, list[tuple[str, str]]],
    in_train: dict[tuple[str, str], int],
    problems: list[Problem],
    on_error: str,
) -> list[Record]:
    """A val/test row sharing an image file or a patient with a train row would score the model on what it trained
    on: it is a bad row (dropped and listed with ``skip``, an error with ``fail``)."""
    kept: list[Record] = []
    for record in records:
        shared = [(kind, value, in_train[(kind, value)]) for kind, value in held_out.get(record.id, [])
                  if (kind, value) in in_train]  # fmt: skip
        if not shared:
            kept.append(record)
            continue
        kind, value, train_row = shared[0]
        what = f"image file {value}" if kind == "image" else f"patient {value}"
        problem = Problem(
            rows.get(record.id, 0), record.id, "split leakage",
            f"its {what} is also in train row {train_row}; a {record.split} row must not share an image or a patient "
            "with training (move the patient's rows into one split)", "split",
        )  # fmt: skip
        if on_error == "fail":
            raise DataError(f"manifest {path} has a bad row:\n  {problem}")
        problems.append(problem)
    return kept


def _outside(path: Path, root: Path) -> bool:
    return not path.resolve().is_relative_to(root)


def _parse_row(
    row: dict[str, Any],
    row_number: int,
    base: Path,
    root: Path,
    label_columns: dict[str, str],
    problems: list[Problem],
) -> Record | None:
    cells = {k: _cell(v) for k, v in row.items()}
    images = _image_paths(row.get("image"), base)
    record_id = cells.get("id")
    if record_id is None:
        record_id = stable_id(str(row.get("image"))) if images else f"row{row_number}"
    record_id = str(record_id)

    def bad(kind: str, reason: str, column: str = "") -> None:
        problems.append(Problem(row_number, record_id, kind, reason, column))

    def contained(file: Path, column: str) -> bool:
        if not _outside(file, root):
            return True
        bad(
            "outside data root",
            f"{column} path {cells.get(column)!s} resolves to {file.resolve()}, outside the data root {root}; move "
            "the file under it, or widen the root (--data-root, loader.data_root) if it is meant to be read",
            column,
        )
        return False

    if not images:
        bad("missing file", "no image path", "image")
    elif not all([contained(image, "image") for image in images]):
        images = ()
    try:
        modality = Modality.parse(cells["modality"]) if cells.get("modality") else None
        if modality is None:
            bad("bad value", "empty modality; use xray, ct or mr", "modality")
    except DataError as err:
        bad("bad value", str(err), "modality")
        modality = None
    try:
        view = View.parse(cells.get("view"))
    except DataError as err:
        bad("bad value", str(err), "view")
        view = None
    split = str(cells.get("split") or "train").lower()
    if split not in SPLITS:
        bad("bad value", f"unknown split {split!r}; use one of {list(SPLITS)}", "split")
    labels: dict[str, int] = {}
    for column, name in label_columns.items():
        try:
            value = parse_label_value(row.get(column), finding=name)
        except DataError as err:
            bad("bad label", str(err), column)
            continue
        if value is not None:
            labels[name] = value
    report = row.get("report") if isinstance(row.get("report"), str) else None
    report_path = cells.get("report_path")
    if report_path is not None:
        file = Path(report_path) if Path(report_path).is_absolute() else base / report_path
        if contained(file, "report_path"):
            try:
                report = read_report_file(file)
            except FileNotFoundError:
                bad("missing file", f"report file {file} does not exist", "report_path")
            except DataError as err:
                bad("unreadable report", str(err), "report_path")
    regions = cells.get("regions")
    regions_path = None
    if regions is not None:
        regions_path = Path(regions) if Path(regions).is_absolute() else base / regions
        if not contained(regions_path, "regions"):
            regions_path = None
    metadata = {k: v for k, v in cells.items() if k not in KNOWN_COLUMNS and k not in label_columns}
    if problems and problems[-1].row == row_number:
        return None
    return Record(
        id=record_id,
        image_paths=images,
        modality=modality,  # type: ignore[arg-type]
        split=split,
        view=view,
        report=report,
        labels=labels,
        regions_path=regions_path,
        metadata={k: v for k, v in metadata.items() if v is not None},
    )


def _check_record(
    record: Record, row_number: int, require_report: bool, check_files: bool, decode: bool
) -> list[Problem]:
    problems: list[Problem] = []

    def bad(kind: str, reason: str, column: str) -> None:
        problems.append(Problem(row_number, record.id, kind, reason, column))

    if require_report:
        from radalign.data.reports import parse_report

        if record.report is None or parse_report(record.report).is_empty:
            bad("empty report", "empty report, and this use requires one", "report")
    if not check_files:
        return problems
    for image_path in record.image_paths:
        if not image_path.exists():
            bad("missing file", f"image file {image_path} does not exist", "image")
        elif decode:
            from radalign.data.io import read_image

            try:
                read_image(image_path, expect=record.modality)
            except (DataError, MemoryError) as err:
                bad("unreadable image", str(err), "image")
    if record.regions_path is not None:
        if not record.regions_path.exists():
            bad("missing file", f"regions file {record.regions_path} does not exist", "regions")
        elif decode:
            try:
                load_regions(record.regions_path)
            except DataError as err:
                bad("unreadable regions", str(err), "regions")
    return problems


def load_regions(path: Path) -> list[Region]:
    """Read a regions JSON file: ``{"regions": [{"finding", "box"?, "mask"?, "phrase"?}, ...]}``.

    Mask paths are relative to the JSON file; masks are loaded lazily by the dataset.
    """
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"regions file {path} is not readable JSON: {err}") from err
    items = payload.get("regions") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise DataError(f'regions file {path} must hold {{"regions": [...]}}, got {type(payload).__name__}')
    regions = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "finding" not in item:
            raise DataError(f"regions file {path}: entry {i} has no 'finding'")
        box = item.get("box")
        if box is not None and (len(box) not in (4, 6) or any(not isinstance(v, int | float) for v in box)):
            raise DataError(f"regions file {path}: entry {i} box {box!r} must be 4 (2D) or 6 (3D) numbers")
        mask = item.get("mask")
        regions.append(
            Region(
                finding=finding_key(item["finding"]),
                box=tuple(float(v) for v in box) if box is not None else None,
                mask_path=str(Path(path).parent / mask) if mask else None,
                phrase=item.get("phrase"),
            )
        )
    return regions


def write_manifest(records: Iterable[Record], path: str | Path, *, vocabulary: Sequence[str] | None = None) -> Path:
    """Write records as a CSV or Parquet manifest (by suffix) with paths relative to the manifest folder."""
    path = Path(path)
    records = list(records)
    if vocabulary is None:
        vocabulary = check_vocabulary(name for r in records for name in r.labels)
    base = path.parent.resolve()

    def rel(p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(base))
        except ValueError:
            return str(Path(p).resolve())

    rows = []
    for r in records:
        row: dict[str, Any] = {
            "id": r.id,
            "image": IMAGE_SEPARATOR.join(rel(p) for p in r.image_paths),
            "modality": r.modality.value,
            "split": r.split,
            "view": r.view.value if r.view is not None else "",
            "report": r.report if r.report is not None else "",
            "regions": rel(r.regions_path) if r.regions_path is not None else "",
        }
        for name in vocabulary:
            value = r.labels.get(name)
            row[LABEL_PREFIX + name] = "" if value is None else str(value)
        row.update({k: v for k, v in r.metadata.items() if k not in row})
        rows.append(row)
    return write_table(pd.DataFrame(rows), path)


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest table as CSV (cells a spreadsheet would run as formulas quoted, as ``read_table`` undoes)
    or Parquet, by suffix; written beside and renamed into place, so a failure leaves no half-written file."""
    import os

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise DataError(f"cannot write manifest {path}: use a .csv or .parquet suffix")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        if suffix == ".csv":
            table.map(_escape_cell).to_csv(partial, index=False)
        else:
            table.to_parquet(partial, index=False)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def problem_counts(problems: Sequence[Problem]) -> Counter[str]:
    """Problems grouped by kind, for summaries."""
    return Counter(p.kind for p in problems)


def _progress(items: Sequence[Any], enabled: bool, description: str) -> Iterable[Any]:
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)
