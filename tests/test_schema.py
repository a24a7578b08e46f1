"""Sample schema: modality/view parsing, label values, vectors, ids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from radalign.data.schema import (
    Image,
    Modality,
    View,
    finding_key,
    labels_to_vector,
    parse_label_value,
    stable_id,
)
from radalign.errors import DataError


@pytest.mark.parametrize(("raw", "expected"), [("CR", Modality.XRAY), ("dx", Modality.XRAY), ("CT", Modality.CT)])
def test_modality_accepts_dicom_codes(raw, expected):
    assert Modality.parse(raw) is expected


def test_unknown_modality_names_the_value():
    with pytest.raises(DataError, match="'ultrasound-ish'"):
        Modality.parse("ultrasound-ish")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("PA", View.PA), ("postero-anterior", View.PA), ("AP Supine", View.AP), ("LL", View.LATERAL), ("", None)],
)
def test_view_spellings(raw, expected):
    assert View.parse(raw) is expected


def test_view_none_and_nan_are_missing():
    assert View.parse(None) is None
    assert View.parse(math.nan) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(1, 1), ("1.0", 1), ("0", 0), (-1, -1), ("-1.0", -1), ("", None), (None, None), (math.nan, None), (True, 1)],
)
def test_label_values(raw, expected):
    assert parse_label_value(raw) == expected


@pytest.mark.parametrize("raw", [2, "yes please", 0.5, "-2"])
def test_bad_label_values_name_the_finding_and_value(raw):
    with pytest.raises(DataError, match=r"'cardiomegaly'.*allowed"):
        parse_label_value(raw, finding="cardiomegaly")


def test_labels_to_vector_marks_missing_as_nan():
    vector = labels_to_vector({"edema": 1, "cardiomegaly": -1}, ["cardiomegaly", "edema", "fracture"])
    assert vector[0] == -1 and vector[1] == 1 and np.isnan(vector[2])


def test_finding_key_normalises_display_names():
    assert finding_key("Pleural Effusion") == "pleural_effusion"
    assert finding_key(" Support-Devices ") == "support_devices"


def test_stable_id_depends_only_on_inputs():
    assert stable_id("a/b.png") == stable_id("a/b.png")
    assert stable_id("a/b.png") != stable_id("a/c.png")
    assert len(stable_id("x")) == 16


def test_image_checks_spacing_and_dimensions():
    Image(np.zeros((4, 5), np.float32), (1.0, 1.0))
    with pytest.raises(DataError, match="spacing"):
        Image(np.zeros((4, 5), np.float32), (1.0,))
    with pytest.raises(DataError, match="2D or 3D"):
        Image(np.zeros((4,), np.float32), (1.0,))
