"""DICOM reading: single files, multi-frame files and series folders (re-exported by :mod:`radalign.data.io`).

Pixel pipeline, in the order the standard defines: decode (pydicom, with the pylibjpeg plugins for JPEG,
JPEG 2000 and JPEG-LS; RLE natively) -> colour to grey luminance (BT.601) -> Modality LUT (rescale slope and
intercept, or a Modality LUT sequence; CT becomes HU) -> for radiographs only: VOI LUT, else window
centre/width, else min-max, scaled to [0, 1] and inverted when MONOCHROME1, so that bright = dense.
Volumes (multi-frame files and series) are ordered by slice position along the slice normal and returned in
the RAS+ orientation of :mod:`radalign.data.schema`; DICOM's patient coordinates are LPS.

Privacy: the metadata returned by :func:`read_dicom_with_meta` is built from an allowlist
(:data:`SAFE_TAGS`: acquisition and pixel-format attributes such as Modality, ViewPosition,
PhotometricInterpretation, Rows, Columns, BitsStored, PixelSpacing, SliceThickness, BodyPartExamined,
Manufacturer, ManufacturerModelName) plus values radalign derives (transfer syntax name, SOP class name, which
intensity transform and which spacing source were used). Nothing else is read: no names, identifiers, dates,
times, addresses, institutions, physicians, accession numbers, free-text descriptions or instance UIDs, and
none of these ever appear in a log or an error message (series are told apart by count, not by UID).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

from radalign.data.schema import Image, Modality, View
from radalign.errors import ConfigError, DataError

log = logging.getLogger("radalign.data.io")

SAFE_TAGS: tuple[str, ...] = (
    "Modality", "ViewPosition", "ImageLaterality", "Laterality", "BodyPartExamined", "PatientPosition",
    "ImageType", "PresentationIntentType", "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames",
    "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "PixelSpacing",
    "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept",
    "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction", "Manufacturer", "ManufacturerModelName",
    "KVP", "ConvolutionKernel", "MagneticFieldStrength",
)  # fmt: skip
RADIOGRAPHY_CODES = frozenset({"CR", "DX", "DR", "RG", "MG"})  # projection radiography: [0, 1] display values
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601, the weights DICOM's YBR_FULL uses
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# The decode limit (environment variable RADALIGN_MAX_PIXELS): 2**29 pixels is a 2 GiB float32 image, over 50 times
# a large radiograph (3000 x 3000) and twice a thin-slice CT (512 x 512 x 1000).
DEFAULT_MAX_PIXELS = 2**29


def data_error(path: Path | str, problem: str, fix: str) -> DataError:
    """The one message shape of every I/O error: which file, what is wrong, what to do (shared with io.py)."""
    return DataError(f"{path}: {problem}; {fix}")


def checked_array(array: np.ndarray, path: Path | str) -> np.ndarray:
    """Refuse empty and non-finite images here, so no caller trains on NaNs (shared with io.py)."""
    if array.size == 0:
        raise data_error(path, f"the image is empty (shape {tuple(array.shape)})", "re-export the image")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise data_error(path, f"{bad} pixels are NaN or infinite", "fix the file; radalign does not guess values")
    return array.astype(np.float32, copy=False)


def _max_pixels() -> int:
    value = os.environ.get("RADALIGN_MAX_PIXELS", "")
    try:
        return int(float(value)) if value else DEFAULT_MAX_PIXELS
    except ValueError:
        # a setting, not a bad file: one error for the command rather than one skipped record per image
        raise ConfigError(f"RADALIGN_MAX_PIXELS={value!r} is not a number; give a pixel count such as 1e9") from None


def check_decoded_size(path: Path | str, shape: tuple[int, ...]) -> None:
    """Refuse an image whose header promises more pixels than ``RADALIGN_MAX_PIXELS`` *before* decoding it, so
    a decompression bomb (a tiny file that decodes to gigabytes) is one skipped record, not a dead run."""
    pixels = int(np.prod([int(n) for n in shape], dtype=np.float64))
    limit = _max_pixels()
    if pixels > limit:
        raise data_error(
            path,
            f"its header declares {' x '.join(str(int(n)) for n in shape)} = {pixels:,} pixels, over the decode limit "
            f"of {limit:,}",
            "if the image is genuine, raise the limit with the environment variable RADALIGN_MAX_PIXELS",
        )


def canonical_volume(
    array: np.ndarray, affine_ras: np.ndarray, path: Path | str = "<volume>"
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Reorient an (i, j, k) array with a RAS affine to the closest RAS+ axes; spacing in mm per new axis."""
    axes = np.asarray(affine_ras, dtype=np.float64)[:3, :3]
    if not np.isfinite(axes).all():
        raise data_error(path, "its voxel-to-world affine holds NaN or infinite values", "re-export the volume")
    singular = np.linalg.svd(axes, compute_uv=False)
    if singular[-1] <= 1e-6 * max(singular[0], 1e-12):
        # a zero or rank-deficient affine has no orientation, and its "spacing" (e.g. sqrt(2)) means nothing
        raise data_error(
            path,
            f"its voxel-to-world affine is degenerate (axes {np.round(axes, 4).tolist()}): two axes coincide or one "
            "is zero, so orientation and spacing are unknown",
            "fix the header (NIfTI sform/qform, or the DICOM orientation and positions) and re-export",
        )
    image = nib.as_closest_canonical(nib.Nifti1Image(array, affine_ras))
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(image.affine))
    return np.ascontiguousarray(np.asanyarray(image.dataobj), dtype=np.float32), spacing


def is_dicom_file(path: Path) -> bool:
    """Part 10 files carry b'DICM' after a 128-byte preamble; suffixes are unreliable (many have none)."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _dcmread(path: Path) -> Dataset:
    if not path.exists():
        raise data_error(path, "the file does not exist", "check the path (relative paths start at the manifest)")
    if path.is_dir():
        raise data_error(path, "is a folder, not a DICOM file", "read a series folder with read_dicom_series")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise data_error(
            path,
            "not a DICOM file (no 'DICM' marker at byte 128)",
            "check that it is a DICOM Part 10 file; re-save headerless datasets with a DICOM tool (e.g. dcmconv)",
        ) from err
    except OSError as err:
        raise data_error(path, f"the file cannot be read ({err.strerror})", "check its permissions") from err
    except Exception as err:  # any parser failure deep in pydicom is a property of this file
        # the parser's own message is left in the chained traceback only: it may quote tag values
        raise data_error(
            path, f"corrupt or truncated DICOM ({type(err).__name__} while parsing)", "re-export it from the source"
        ) from err


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """Stored pixel values as (frames, rows, columns, samples), with a precise error for each failure."""
    if not any(tag in ds for tag in PIXEL_TAGS):
        sop = ds.get("SOPClassUID")
        kind = sop.name if sop is not None and not sop.is_private else "unknown"
        raise data_error(
            path,
            f"the DICOM file has no pixel data (SOP class: {kind}): it is not an image, or it was cut short",
            "point radalign at the image files of the study, or re-export a truncated file",
        )
    if ds.get("Rows") == 0 or ds.get("Columns") == 0:
        raise data_error(path, "the image is empty (0 rows or columns)", "re-export the image")
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = (frames, int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), int(ds.get("SamplesPerPixel") or 1))
    check_decoded_size(path, expected)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise data_error(path, "the DICOM file meta header has no Transfer Syntax UID", "re-export the file")
    try:
        compressed = syntax.is_compressed
    except ValueError:  # a transfer syntax newer than this pydicom (e.g. JPEG XL): get_decoder refuses it below
        compressed = True
    if compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as err:
            raise data_error(
                path,
                f"the pixel data uses transfer syntax {syntax.name}, which pydicom cannot decode",
                "convert it to an uncompressed or JPEG 2000 transfer syntax (e.g. gdcmconv --raw)",
            ) from err
        if not decoder.is_available:
            raise data_error(
                path,
                f"the pixel data is compressed as {syntax.name} and no decoder for it is installed",
                f"install one of: {'; '.join(decoder.missing_dependencies)}",
            )
    if syntax in J2K_SYNTAXES:
        _check_j2k_frames(ds, frames, path)
    try:
        array = np.asarray(ds.pixel_array)
    except Exception as err:  # decoder messages describe the pixel stream only, never tag values
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise data_error(
            path,
            f"the pixel data ({syntax.name}) cannot be decoded: {reason}",
            "the file is probably truncated or corrupt; re-export it from the source",
        ) from err
    if array.size == 0:
        raise data_error(path, f"the image is empty (shape {array.shape})", "re-export the image")
    if array.size != int(np.prod(expected)):
        raise data_error(
            path,
            f"the pixel data decoded to shape {array.shape}, and its header declares {frames} frame(s) of "
            f"{expected[1]} x {expected[2]} x {expected[3]}",
            "the file is probably truncated or corrupt; re-export it from the source",
        )
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
    if frames == 1:
        array = array[None]
    return array if array.ndim == 4 else array[..., None]


J2K_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossless only), JPEG 2000
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
})  # fmt: skip


def _j2k_codestream_problem(frame: bytes) -> str | None:
    """What is structurally wrong with one JPEG 2000 codestream, or None. Decoders accept a stream whose
    tile-parts are cut or whose end is overwritten and return plausible-looking garbage; the markers say so."""
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC + SIZ (after a JP2 box header, if any)
    if start < 0:
        return "it has no JPEG 2000 start-of-codestream marker"
    end = len(frame.rstrip(b"\x00\xff"))  # fragments are padded to an even length: 0x00 as DICOM says, 0xFF by some
    if frame[end - 2 : end] != b"\xff\xd9":
        return "it does not end with the end-of-codestream marker (cut short or overwritten)"
    position = start + 2  # walk the main header's marker segments by their lengths to the first tile-part (SOT):
    while frame[position : position + 2] not in (b"\xff\x90", b""):  # searching for its bytes could hit header data
        if frame[position] != 0xFF or position + 4 > end:
            return f"its main header is broken at byte {position}"
        position += 2 + int.from_bytes(frame[position + 2 : position + 4], "big")
    while position < end - 2:  # each tile-part says how long it is
        if frame[position : position + 2] != b"\xff\x90" or position + 10 > end:
            return f"a tile-part at byte {position} is missing or cut"
        length = int.from_bytes(frame[position + 6 : position + 10], "big")
        if length == 0:  # "until the end of the codestream": allowed for the last tile-part only
            return None
        position += length
    if position != end - 2:
        return f"its tile-parts end at byte {position}, not at the end-of-codestream marker (byte {end - 2})"
    return None


def _check_j2k_frames(ds: Dataset, frames: int, path: Path) -> None:
    from pydicom.encaps import generate_frames

    try:
        encoded = list(generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception as err:  # pydicom's encapsulation parser raises several kinds on a cut item
        raise data_error(
            path, f"its encapsulated pixel data cannot be split into frames ({type(err).__name__})", "re-export it"
        ) from err
    if len(encoded) < frames:
        raise data_error(path, f"it declares {frames} frames and holds {len(encoded)}", "re-export it")
    for index, frame in enumerate(encoded[:frames]):
        problem = _j2k_codestream_problem(frame)
        if problem:
            raise data_error(
                path,
                f"the JPEG 2000 stream of frame {index + 1} is damaged: {problem}",
                "the file is probably truncated or corrupt; re-export it from the source",
            )


def _group_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """An enhanced multi-frame functional-group value: the frame's own, else the shared one, else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index:
            inner = items[index].get(sequence)
            if inner and keyword in inner[0]:
                return inner[0][keyword].value
    return None


def _modality_lut(ds: Dataset, frames: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (HU for CT), per frame for enhanced files, whose rescale lives in groups."""
    out = np.empty(frames.shape, dtype=np.float64)
    for i, frame in enumerate(frames):
        source = ds
        slope = _group_value(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
        if slope is not None:
            source = Dataset()
            source.RescaleSlope = slope
            source.RescaleIntercept = _group_value(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
        out[i] = apply_modality_lut(frame, source)
    return out


def _voi_unit(ds: Dataset, values: np.ndarray, path: Path, meta: dict[str, Any]) -> np.ndarray:
    """Modality values -> [0, 1] with the file's VOI LUT or window (its full output range), else min-max."""
    has_lut = bool(ds.get("VOILUTSequence")) and "LUTData" in ds.VOILUTSequence[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut or has_window:
        if has_lut:  # a LUT indexes integers; the rescaled values are integral in practice
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            probe = np.arange(descriptor[1], descriptor[1] + (descriptor[0] or 65536), dtype=np.int64)
            values = np.rint(values).astype(np.int64)
        else:  # pydicom's windowing clips, so huge inputs give its output range
            probe = np.array([-1e15, 1e15])
        try:
            # the output range depends on bit depths and rescale: ask pydicom instead of re-deriving it
            low, high = (float(f(apply_voi_lut(probe, ds))) for f in (np.min, np.max))
            out = apply_voi_lut(values, ds).astype(np.float64)
        except (ValueError, NotImplementedError, AttributeError, IndexError) as err:
            log.warning("%s: unusable VOI LUT / window (%s); using min-max instead", path, type(err).__name__)
            meta["notes"].append(f"VOI LUT / window unusable ({type(err).__name__}); min-max used")
        else:
            if high > low:
                meta["intensity_transform"] = "voi_lut" if has_lut else "window"
                return np.clip((out - low) / (high - low), 0.0, 1.0)
            meta["notes"].append("VOI LUT / window maps every value to one level; min-max used")
    meta.setdefault("intensity_transform", "minmax")
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _pixel_spacing(ds: Dataset, meta: dict[str, Any]) -> tuple[float, float]:
    """(row, column) spacing in mm: at the patient when the file says so, else at the detector, else 1."""
    candidates = (
        ("PixelSpacing", ds.get("PixelSpacing")),
        ("PixelMeasuresSequence", _group_value(ds, 0, "PixelMeasuresSequence", "PixelSpacing")),
        ("ImagerPixelSpacing", ds.get("ImagerPixelSpacing")),
    )
    for source, value in candidates:
        try:
            spacing = (float(value[0]), float(value[1]))
        except (TypeError, ValueError, IndexError):
            continue
        if all(np.isfinite(s) and s > 0 for s in spacing):
            meta["pixel_spacing_source"] = source
            return spacing
    meta["pixel_spacing_source"] = "default"
    meta["notes"].append("no pixel spacing in the file; 1.0 mm assumed")
    return (1.0, 1.0)


def _geometry(ds: Dataset, frame: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Image orientation (6,) and position (3,) of one frame, from the plain or the functional-group tags."""
    orientation = ds.get("ImageOrientationPatient") or _group_value(
        ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"
    )
    position = _group_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    if position is None and ds.get("ImagePositionPatient") is not None:
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        offsets = ds.get("GridFrameOffsetVector")  # RT dose: offsets along the normal from the first frame
        if offsets is not None and orientation is not None and len(offsets) > frame:
            normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
            position = position + (float(offsets[frame]) - float(offsets[0])) * normal
        elif frame > 0:
            position = None
    return tuple(None if v is None else np.asarray(v, dtype=np.float64) for v in (orientation, position))


def _volume(
    frames: list[np.ndarray],
    orientations: list[np.ndarray | None],
    positions: list[np.ndarray | None],
    pixel: tuple[float, float],
    gap: float,
    where: Path,
) -> tuple[np.ndarray, tuple[float, ...], bool]:
    """Slices (rows, cols) + per-slice geometry -> RAS+ (X, Y, Z) volume, spacing, whether geometry was known."""
    known = all(o is not None and o.shape == (6,) for o in orientations) and all(
        p is not None and p.shape == (3,) for p in positions
    )
    orientation = orientations[0] if known else np.array([1.0, 0, 0, 0, 1, 0])  # assume axial, noted by caller
    if known and not all(np.allclose(o, orientation, atol=1e-3) for o in orientations):
        raise data_error(where, "the slices have different orientations", "remove localizer or reformatted slices")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not 0.9 < np.linalg.norm(normal) < 1.1:
        raise data_error(where, "ImageOrientationPatient is not two unit vectors", "re-export the series")
    order = np.arange(len(frames))
    if known and len(frames) > 1:
        along = np.array([p @ normal for p in positions])  # mm along the slice normal
        order = np.argsort(along, kind="stable")
        gaps = np.diff(along[order])
        gap = float(np.median(gaps))
        if gaps.min() < 1e-3:
            raise data_error(
                where,
                f"{int(np.sum(gaps < 1e-3)) + 1} slices share a position (duplicates or several acquisitions)",
                "keep one acquisition per folder",
            )
        if np.abs(gaps - gap).max() > 0.1 * gap:
            raise data_error(
                where,
                f"the slice gaps vary from {gaps.min():.3g} to {gaps.max():.3g} mm (missing slices?)",
                "export the complete series, or resample it to uniform slices first",
            )
    # (rows, cols) slices -> (cols, rows, slices): array index (i, j, k) follows (row dir, column dir, normal)
    stack = np.stack([frames[i] for i in order], axis=-1).transpose(1, 0, 2).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel[1]  # column index i moves along the row direction by the column spacing
    affine[:3, 1] = col_dir * pixel[0]
    affine[:3, 2] = normal * gap
    affine[:3, 3] = positions[order[0]] if known else 0.0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM LPS -> RAS
    array, spacing = canonical_volume(stack, affine, where)
    return array, spacing, known


def _safe_metadata(ds: Dataset) -> dict[str, Any]:
    meta: dict[str, Any] = {"notes": []}
    for keyword in SAFE_TAGS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, pydicom.multival.MultiValue | list | tuple):
            meta[keyword] = [_plain(v) for v in value]
        else:
            meta[keyword] = _plain(value)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    meta["transfer_syntax"] = syntax.name if syntax is not None else None
    sop = ds.get("SOPClassUID")
    meta["sop_class"] = sop.name if sop is not None and not sop.is_private else None  # standard names only
    try:
        meta["view"] = View.parse(str(ds.get("ViewPosition") or "")) or None
    except DataError:
        meta["view"] = None
    return meta


def _plain(value: Any) -> Any:
    """pydicom value types (DSfloat, IS, ...) -> plain JSON-friendly Python."""
    if isinstance(value, int):
        return int(value)
    return float(value) if isinstance(value, float) else str(value)


def _classify(ds: Dataset, modality: Modality | str | None) -> Modality:
    if modality is not None:
        return Modality.parse(modality)
    code = str(ds.get("Modality", "")).upper()
    if code in RADIOGRAPHY_CODES:
        return Modality.XRAY
    return {"CT": Modality.CT, "MR": Modality.MR}.get(code, Modality.OTHER)


def read_dicom_with_meta(path: Path | str, *, modality: Modality | str | None = None) -> tuple[Image, dict[str, Any]]:
    """One DICOM file -> (Image, allowlisted metadata); ``modality`` overrides the file's Modality tag."""
    path = Path(path)
    ds = _dcmread(path)
    meta = _safe_metadata(ds)
    kind = _classify(ds, modality)
    raw = _decode(ds, path)  # (F, H, W, S)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if raw.shape[-1] >= 3:  # RGB, YBR (pydicom converts to RGB) or palette colour; no Modality LUT applies
        values = raw[..., :3].astype(np.float64) @ LUMA
        if kind == Modality.XRAY:
            top = np.iinfo(raw.dtype).max if photometric == "PALETTE COLOR" else 2 ** int(ds.BitsStored) - 1
            values = values / top
        meta["intensity_transform"] = "luminance"
    else:
        values = _modality_lut(ds, raw[..., 0])
    row_mm, col_mm = _pixel_spacing(ds, meta)
    if values.shape[0] == 1:
        array = values[0]
        if kind == Modality.XRAY and raw.shape[-1] == 1:
            array = _voi_unit(ds, array, path, meta)
            if photometric == "MONOCHROME1":  # MONOCHROME1 displays low values bright: flip to bright = dense
                array = 1.0 - array
        meta.setdefault("intensity_transform", "modality_lut")
        intensity = "unit" if kind == Modality.XRAY else "hu" if kind == Modality.CT else "raw"
        return Image(checked_array(array, path), (row_mm, col_mm), kind, intensity), meta
    geometry = [_geometry(ds, i) for i in range(values.shape[0])]
    gap = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    volume, spacing, known = _volume(
        list(values), [g[0] for g in geometry], [g[1] for g in geometry], (row_mm, col_mm), gap, path
    )
    meta["geometry"] = "positions" if known else "assumed"
    if not known:
        meta["notes"].append("no per-frame positions: frames stacked in file order, axial orientation assumed")
    meta.setdefault("intensity_transform", "modality_lut")
    intensity = "hu" if kind == Modality.CT else "raw"
    return Image(checked_array(volume, path), spacing, kind, intensity, "RAS"), meta


def read_dicom(path: Path | str, *, modality: Modality | str | None = None) -> Image:
    """One DICOM file -> Image: 2D (H, W) for one frame, RAS+ volume for a multi-frame file."""
    return read_dicom_with_meta(path, modality=modality)[0]


def read_dicom_series(folder: Path | str, *, modality: Modality | str | None = None) -> Image:
    """A folder of one series' slices -> RAS+ (X, Y, Z) volume, ordered by position, spacing from positions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise data_error(folder, "the folder does not exist", "check the path of the DICOM series")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
    if not files:
        raise data_error(folder, "the folder holds no DICOM files", "point to the folder with the series' slices")
    slices = [(p, ds) for p in files if any(tag in (ds := _dcmread(p)) for tag in PIXEL_TAGS)]
    if not slices:
        raise data_error(folder, f"none of the {len(files)} DICOM files has pixel data", "point to the image series")
    counts = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in slices)
    if len(counts) > 1:  # UIDs are identifiers: report the sizes only
        sizes = ", ".join(str(n) for n in sorted(counts.values(), reverse=True))
        raise data_error(
            folder,
            f"the folder mixes {len(counts)} DICOM series ({sizes} files)",
            "put each series (SeriesInstanceUID) in its own folder",
        )
    first = slices[0][1]
    if len(slices) == 1 and int(first.get("NumberOfFrames") or 1) > 1:
        return read_dicom(slices[0][0], modality=modality)
    frames, orientations, positions = [], [], []
    for path, ds in slices:
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise data_error(path, "a multi-frame file inside a series folder", "read multi-frame files on their own")
        if (ds.get("Rows"), ds.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            raise data_error(path, "its size differs from the other slices of the series", "remove it (a localizer?)")
        raw = _decode(ds, path)
        frames.append(raw[0, ..., :3] @ LUMA if raw.shape[-1] >= 3 else _modality_lut(ds, raw[..., 0])[0])
        orientation, position = _geometry(ds, 0)
        if orientation is None or position is None:
            raise data_error(
                path,
                "the slice has no ImageOrientationPatient / ImagePositionPatient, needed to order slices",
                "re-export the series with its geometry tags",
            )
        orientations.append(orientation)
        positions.append(position)
    # one slice has no neighbour to measure the gap from: the header's nominal values are all there is
    gap = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    pixel = _pixel_spacing(first, {"notes": []})
    volume, spacing, _ = _volume(frames, orientations, positions, pixel, gap, folder)
    kind = _classify(first, modality)
    intensity = "hu" if kind == Modality.CT else "raw"
    return Image(checked_array(volume, folder), spacing, kind, intensity, "RAS")
