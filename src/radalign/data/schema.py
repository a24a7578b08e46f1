"""Record and sample types shared by the whole data layer.

A *record* is one manifest row: paths and text, nothing decoded. A *sample* is a record decoded into arrays.
Images are 2D radiographs or 3D volumes; reports, labels and regions may each be missing.

Conventions (see docs/data.md):
- 2D image arrays are (H, W) float32, row 0 at the top as displayed. Radiographs are scaled to [0, 1] with
  bright = dense (VOI LUT / window applied, MONOCHROME1 inverted); CT slices stay in HU.
- 3D volumes are (X, Y, Z) float32 in the RAS+ canonical orientation (nibabel's ``as_closest_canonical``,
  MONAI's ``Orientation("RAS")``): the index of axis 0 increases towards the patient's Right, of axis 1
  towards Anterior, of axis 2 towards Superior. CT stays in HU.
- Spacing is in mm per array axis, same order as the array axes.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from radalign.errors import DataError


class Modality(StrEnum):
    XRAY = "xray"  # CR, DX, DR: projection radiography
    CT = "ct"
    MR = "mr"
    OTHER = "other"

    @classmethod
    def parse(cls, value: str) -> Modality:
        """Accept radalign names and DICOM Modality codes (CR, DX, DR, CT, MR)."""
        key = str(value).strip().lower()
        aliases = {"cr": cls.XRAY, "dx": cls.XRAY, "dr": cls.XRAY, "x-ray": cls.XRAY, "cxr": cls.XRAY}
        if key in aliases:
            return aliases[key]
        try:
            return cls(key)
        except ValueError:
            raise DataError(
                f"unknown modality {value!r}; use one of {[m.value for m in cls]} "
                f"(DICOM codes CR/DX/DR/CT/MR are accepted too)"
            ) from None


class View(StrEnum):
    PA = "PA"
    AP = "AP"
    LATERAL = "LATERAL"
    AXIAL = "AXIAL"  # cross-sectional (CT/MR) volumes and slices
    OTHER = "OTHER"

    @classmethod
    def parse(cls, value: str | None) -> View | None:
        """Normalise view spellings found in MIMIC-CXR, CheXpert and DICOM ViewPosition."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        key = re.sub(r"[^a-z]", "", str(value).lower())
        if key == "":
            return None
        table = {
            "pa": cls.PA, "posteroanterior": cls.PA, "frontalpa": cls.PA,
            "ap": cls.AP, "anteroposterior": cls.AP, "frontalap": cls.AP, "apsupine": cls.AP, "apaxial": cls.AP,
            "lateral": cls.LATERAL, "lat": cls.LATERAL, "ll": cls.LATERAL, "rl": cls.LATERAL, "lr": cls.LATERAL,
            "rlat": cls.LATERAL, "llat": cls.LATERAL, "leftlateral": cls.LATERAL, "rightlateral": cls.LATERAL,
            "axial": cls.AXIAL, "other": cls.OTHER,
        }  # fmt: skip
        if key in table:
            return table[key]
        raise DataError(f"unknown view {value!r}; use one of {[v.value for v in cls]} or leave it empty")


# Label values over a finding vocabulary, CheXpert convention. Missing = key absent.
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
LABEL_VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)

# The default finding vocabulary: CheXpert's 14 observations plus the lesion subtypes the simulated data and
# many hospital labelers separate (nodule, mass). Datasets may use any vocabulary; the manifest declares it.
CHEXPERT_FINDINGS: tuple[str, ...] = (
    "no_finding", "enlarged_cardiomediastinum", "cardiomegaly", "lung_opacity", "lung_lesion", "edema",
    "consolidation", "pneumonia", "atelectasis", "pneumothorax", "pleural_effusion", "pleural_other",
    "fracture", "support_devices",
)  # fmt: skip
DEFAULT_FINDINGS: tuple[str, ...] = (*CHEXPERT_FINDINGS, "nodule", "mass")


def finding_key(name: str) -> str:
    """'Pleural Effusion' -> 'pleural_effusion': the identifier used in manifests and configs."""
    key = re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")
    if not key:
        raise DataError(f"empty finding name {name!r}")
    return key


def parse_label_value(value: Any, *, finding: str = "?", where: str = "") -> int | None:
    """One label cell -> 1 / 0 / -1, or None for missing (empty, NaN). Anything else is a DataError."""
    original = value

    def bad() -> DataError:
        return DataError(
            f"{where}label {finding!r} has value {original!r}; allowed: 1, 0, -1 (uncertain) or empty (missing)"
        )

    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "nan", "na", "none", "missing"):
            return None
        words = {"positive": 1, "pos": 1, "true": 1, "negative": 0, "neg": 0, "false": 0, "uncertain": -1}
        if text in words:
            return words[text]
        try:
            value = float(text)
        except ValueError:
            raise bad() from None
    if isinstance(value, bool):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad() from None
    if math.isnan(number):
        return None
    if number not in LABEL_VALUES:
        raise bad()
    return int(number)


def labels_to_vector(labels: Mapping[str, int], vocabulary: Sequence[str]) -> np.ndarray:
    """(F,) float32 over ``vocabulary``: 1 / 0 / -1, NaN where missing."""
    out = np.full(len(vocabulary), np.nan, dtype=np.float32)
    for i, name in enumerate(vocabulary):
        if name in labels:
            out[i] = labels[name]
    return out


def stable_id(*parts: str | Path) -> str:
    """A short id that depends only on its inputs (e.g. a relative image path), stable across machines."""
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return digest[:16]


@dataclass
class Image:
    """A decoded image: 2D (H, W) or 3D (X, Y, Z, RAS+) float32 with spacing in mm per axis."""

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: Modality = Modality.OTHER
    # "unit": [0, 1], bright = dense (radiographs); "hu": Hounsfield units (CT); "raw": scanner units (MR...)
    intensity: str = "unit"
    # 3D: axis codes of the array axes (always "RAS" after io.read_*); 2D: None
    orientation: str | None = None

    def __post_init__(self) -> None:
        if self.array.ndim not in (2, 3):
            raise DataError(f"image array must be 2D or 3D, got shape {self.array.shape}")
        if len(self.spacing) != self.array.ndim:
            raise DataError(f"spacing {self.spacing} does not match image shape {self.array.shape}")
        if self.intensity not in ("unit", "hu", "raw"):
            raise DataError(f"unknown intensity convention {self.intensity!r}; use 'unit', 'hu' or 'raw'")

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass
class Region:
    """Where one finding is: a box and/or a mask over the image (pixels, same axes as the image array)."""

    finding: str
    # 2D: (x0, y0, x1, y1) with x = column, y = row; 3D: (x0, y0, z0, x1, y1, z1) in array indices.
    box: tuple[float, ...] | None = None
    mask: np.ndarray | None = None  # bool, same shape as the image; loaded lazily from mask_path
    mask_path: str | None = None
    phrase: str | None = None  # the report phrase that describes it (phrase grounding)


@dataclass
class Report:
    """A radiology report: the raw text, its sections and its sentences (cleaned, in reading order)."""

    raw: str
    sections: dict[str, str] = field(default_factory=dict)  # canonical header (e.g. "FINDINGS") -> text
    sentences: list[str] = field(default_factory=list)
    sentence_sections: list[str] = field(default_factory=list)  # the section each sentence came from

    @property
    def text(self) -> str:
        """The sentences joined with single spaces: the string that is tokenised."""
        return " ".join(self.sentences)

    @property
    def is_empty(self) -> bool:
        return not self.sentences


@dataclass(frozen=True)
class Record:
    """One manifest row: an image-report-label record, nothing decoded yet."""

    id: str
    image_paths: tuple[Path, ...]
    modality: Modality
    split: str = "train"
    view: View | None = None
    report: str | None = None
    labels: Mapping[str, int] = field(default_factory=dict)
    regions_path: Path | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def image_path(self) -> Path:
        return self.image_paths[0]


@dataclass
class Sample:
    """A decoded record: what the dataset hands to transforms and the tokenizer."""

    id: str
    image: Image
    modality: Modality
    view: View | None = None
    report: Report | None = None
    labels: dict[str, int] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def check_vocabulary(names: Iterable[str]) -> tuple[str, ...]:
    """Normalise and de-duplicate a finding vocabulary, keeping order."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(finding_key(name), None)
    return tuple(seen)
