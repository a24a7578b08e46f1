"""Read radiology images into :class:`radalign.data.schema.Image`, and write the files the simulator makes.

Formats: DICOM files and series folders (:mod:`radalign.data.dicom`), PNG / JPEG / TIFF rasters (8 or 16 bit,
colour -> grey luminance, scaled by the bit-depth maximum to [0, 1]) and NIfTI volumes (reoriented to RAS+).
:func:`read_image` picks the reader from the file's magic bytes, else its suffix; a folder is a DICOM series.
Every failure is a :class:`~radalign.errors.DataError` that names the file, what is wrong and what to do; the
library error that caused it stays attached as ``__cause__``. See :mod:`radalign.data.dicom` for what DICOM
metadata is kept (an allowlist; never patient identity).

Raster pixel spacing is 1.0 mm unless the PNG was written by :func:`write_png16` with ``spacing``: DPI fields of
PNG/JPEG/TIFF headers describe printing, not the patient, so they are ignored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radalign.data.dicom import (
    LUMA,
    SAFE_TAGS,
    canonical_volume,
    check_decoded_size,
    checked_array,
    data_error,
    read_dicom,
    read_dicom_series,
    read_dicom_with_meta,
)
from radalign.data.schema import Image, Modality, View
from radalign.errors import DataError

__all__ = [
    "SAFE_TAGS",
    "read_dicom",
    "read_dicom_series",
    "read_dicom_with_meta",
    "read_image",
    "read_nifti",
    "read_raster",
    "write_dicom_2d",
    "write_nifti",
    "write_png16",
]

SUFFIX_KINDS = {
    **dict.fromkeys((".dcm", ".dicom", ".dic", ".ima"), "dicom"),
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".tif", ".tiff"), "raster"),
    **dict.fromkeys((".nii", ".nii.gz"), "nifti"),
}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
SPACING_KEY = "radalign:spacing_mm"  # PNG text chunk "row,col" written by write_png16
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(352)
    except OSError as err:
        raise data_error(path, f"the file cannot be read ({err.strerror})", "check its permissions") from err


def _sniff(path: Path) -> str | None:
    """The format from the first bytes, which beat a missing or wrong suffix (PACS exports often have none)."""
    head = _head(path)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", *TIFF_MAGIC)):
        return "raster"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "nifti"
    return None


def _require_file(path: Path) -> None:
    if not path.exists():
        raise data_error(path, "the file does not exist", "check the path (relative paths start at the manifest)")
    if not path.is_file():
        raise data_error(path, "is not a file", "give the path of an image file (a folder is read as a DICOM series)")


def read_image(path: Path | str, *, expect: Modality | str | None = None, **kw: Any) -> Image:
    """Any supported image (file or DICOM series folder) -> Image; ``kw`` goes to the chosen reader.

    ``expect`` is the modality a manifest row declares: a file that holds something else (a CT DICOM in an
    ``xray`` row, a 2D PNG in a ``ct`` row) is refused, since training on it would silently mix HU with [0, 1]."""
    path = Path(path)
    image, kind = _read_any(path, **kw)
    if expect is not None:
        # only DICOM says what it holds; a raster's or NIfTI's modality is the reader's default, not the file's
        check_modality(image, Modality.parse(expect), path, tagged=kind == "dicom")
    return image


def check_modality(image: Image, declared: Modality, path: Path, *, tagged: bool) -> None:
    """Refuse a file whose DICOM Modality tag (``tagged``) or dimensions contradict the declared modality."""
    if tagged and image.modality not in (Modality.OTHER, declared):
        raise data_error(
            path,
            f"the manifest row says {declared.value}, and the file's DICOM Modality tag says {image.modality.value}",
            f"correct the row's modality, or point it at the {declared.value} image",
        )
    dims = {Modality.XRAY: 2, Modality.CT: 3}.get(declared)  # MR is read as it comes (slices or volumes)
    if dims is not None and image.array.ndim != dims:
        raise data_error(
            path,
            f"the manifest row says {declared.value}, which radalign reads as one {dims}D image, and the file holds "
            f"a {image.array.ndim}D image of shape {tuple(image.array.shape)}",
            "correct the row's modality, or point it at a "
            + ("single radiograph" if dims == 2 else "volume (a NIfTI file or a folder of DICOM slices)"),
        )


def _read_any(path: Path, **kw: Any) -> tuple[Image, str]:
    if path.is_dir():
        return read_dicom_series(path, **kw), "dicom"
    _require_file(path)
    kind = _sniff(path) or SUFFIX_KINDS.get(_suffix(path))
    if kind == "dicom":
        return read_dicom(path, **kw), kind
    if kind == "raster":
        return read_raster(path, **kw), kind
    if kind == "nifti":
        return read_nifti(path, **kw), kind
    raise data_error(
        path,
        f"unsupported file type (suffix {_suffix(path) or 'none'!r}, no known magic bytes)",
        "use DICOM, PNG, JPEG, TIFF or NIfTI (.nii, .nii.gz), or a folder of DICOM slices",
    )


def _to_unit(array: np.ndarray, bits: int, path: Path) -> np.ndarray:
    """Stored raster values -> [0, 1] grey: colour by luminance, integers by the bit-depth maximum."""
    integer = np.issubdtype(array.dtype, np.integer)
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # drop alpha
        array = array[..., : array.shape[-1] - 1]
    if array.ndim == 3 and array.shape[-1] == 3:
        array = array.astype(np.float64) @ LUMA
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise data_error(path, f"holds an image of shape {array.shape}, not one 2D image", "save one image per file")
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if integer:
        return checked_array(array / float(2**bits - 1), path)
    array = checked_array(array, path)
    if array.size and (array.min() < 0 or array.max() > 1):
        raise data_error(
            path,
            f"floating-point pixels span [{array.min():.4g}, {array.max():.4g}], and rasters are read as [0, 1]",
            "save radiographs as 8/16-bit integers or floats in [0, 1]; volumes in HU as NIfTI",
        )
    return array


def _read_pillow(path: Path) -> tuple[np.ndarray, int, tuple[float, float]]:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 M pixels and refuses twice that (caught below); our limit is checked on the
            # header before any pixel is decoded
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            img = PILImage.open(path)
        with img:
            check_decoded_size(path, (img.size[1], img.size[0], len(img.getbands())))
            img.load()
            text = dict(getattr(img, "text", {}) or {})
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            bits = 16 if img.mode.startswith("I") else 8
            array = np.asarray(img)
    except PILImage.DecompressionBombError as err:
        raise data_error(path, f"Pillow refuses to decode it: {err}", "save images this large as TIFF or DICOM") from (
            err
        )
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise data_error(
            path, f"not a readable PNG/JPEG image, corrupt or truncated ({type(err).__name__})", "re-export it"
        ) from err
    spacing = (1.0, 1.0)
    try:
        row_mm, col_mm = (float(v) for v in str(text[SPACING_KEY]).split(","))
        if min(row_mm, col_mm) > 0 and np.isfinite([row_mm, col_mm]).all():
            spacing = (row_mm, col_mm)
    except (KeyError, ValueError):
        pass
    return array, bits, spacing


def _read_tiff(path: Path) -> tuple[np.ndarray, int]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            bits = int(series.keyframe.bitspersample)
            check_decoded_size(path, series.shape)
            array = series.asarray()
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as err:
        raise data_error(
            path, f"not a readable TIFF, corrupt or truncated ({type(err).__name__})", "re-export it"
        ) from err
    return array, bits


def read_raster(path: Path | str, *, modality: Modality | str = Modality.XRAY) -> Image:
    """PNG / JPEG / TIFF (8 or 16 bit, grey or colour) -> (H, W) in [0, 1]; rasters are already display-ready."""
    path = Path(path)
    _require_file(path)
    head = _head(path)
    if head.startswith(TIFF_MAGIC) or (_suffix(path) in (".tif", ".tiff") and _sniff(path) is None):
        array, bits = _read_tiff(path)
        spacing = (1.0, 1.0)
    else:
        array, bits, spacing = _read_pillow(path)
    return Image(_to_unit(array, bits, path), spacing, Modality.parse(modality), "unit")


def read_nifti(path: Path | str, *, modality: Modality | str = Modality.CT, intensity: str = "hu") -> Image:
    """A NIfTI volume -> RAS+ (X, Y, Z) Image; NIfTI cannot say what it holds, so the caller does (CT, HU)."""
    path = Path(path)
    _require_file(path)
    try:
        img = nib.load(path)
        shape = tuple(int(n) for n in img.shape)
        check_decoded_size(path, shape)
        if len(shape) > 3 and int(np.prod(shape[3:])) != 1:
            raise data_error(
                path,
                f"a {len(shape)}D NIfTI of shape {shape}, and radalign reads one 3D volume per record",
                "split it into 3D files (e.g. nibabel.funcs.four_to_three) and list each in the manifest",
            )
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape((*shape[:3], 1, 1)[:3])
        affine = img.affine
    except DataError:
        raise
    except Exception as err:  # nibabel, gzip and zlib each have their own errors for a bad file
        raise data_error(
            path, f"not a readable NIfTI file, corrupt or truncated ({type(err).__name__})", "re-export it"
        ) from err
    array, spacing = canonical_volume(checked_array(data, path), affine, path)
    return Image(array, spacing, Modality.parse(modality), intensity, "RAS")


def unit_to_uint16(array: np.ndarray, path: Path | str) -> np.ndarray:
    """[0, 1] float (H, W) -> uint16 0..65535; out-of-range values mean a caller bug, so they are refused."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise data_error(path, f"expected a 2D (H, W) image, got shape {array.shape}", "write volumes as NIfTI")
    checked_array(array, path)
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise data_error(path, f"values span [{low:.4g}, {high:.4g}], not [0, 1]", "scale to [0, 1] before writing")
    return np.rint(np.clip(array, 0.0, 1.0) * 65535).astype(np.uint16)


def write_png16(path: Path | str, array_unit_2d: np.ndarray, spacing: tuple[float, float] | None = None) -> Path:
    """A [0, 1] (H, W) image as a 16-bit grey PNG (0..65535); ``spacing`` (mm) is kept in a text chunk."""
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    pixels = unit_to_uint16(array_unit_2d, path)
    info = PngInfo()
    if spacing is not None:
        info.add_text(SPACING_KEY, f"{float(spacing[0]):.9g},{float(spacing[1]):.9g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(pixels).save(path, format="PNG", pnginfo=info)
    return path


def write_nifti(path: Path | str, image: Image) -> Path:
    """A 3D RAS Image as NIfTI (.nii or .nii.gz) with a RAS affine from its spacing, centred on the origin."""
    path = Path(path)
    if image.ndim != 3 or image.orientation != "RAS":
        raise data_error(
            path,
            f"write_nifti writes 3D RAS volumes, got a {image.ndim}D image with orientation {image.orientation!r}",
            "write 2D images with write_png16; read volumes with radalign.data.io so they are RAS",
        )
    array = checked_array(image.array, path)
    spacing = np.asarray(image.spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(array.shape) - 1) / 2 * spacing  # no scanner position is known
    if np.array_equal(array, np.rint(array)) and array.min() >= -32768 and array.max() <= 32767:
        # label maps and HU volumes are integers: store them compactly and exactly
        array = array.astype(np.uint8 if array.min() >= 0 and array.max() <= 255 else np.int16)
    nifti = nib.Nifti1Image(array, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nifti.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti, path)
    return path


def write_dicom_2d(
    path: Path | str, array_unit_2d: np.ndarray, spacing: tuple[float, float], view: View | str | None = View.PA
) -> Path:
    """A minimal valid DX DICOM (16 bit, no patient identity, fresh UIDs) of a [0, 1] bright = dense image."""
    path = Path(path)
    pixels = unit_to_uint16(array_unit_2d, path)
    view = View.parse(view) if isinstance(view, str) else view
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.SOPClassUID = DX_STORAGE
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        setattr(ds, keyword, generate_uid())
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer"):  # fmt: skip
        setattr(ds, keyword, "")  # type 2: present and empty
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic image written by radalign, no patient data"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = {View.PA: "PA", View.AP: "AP", View.LATERAL: "LL"}.get(view, "")
    # as a frontal film is viewed: columns run to the patient's left, rows to the feet
    ds.PatientOrientation = ["L", "F"] if view in (View.PA, View.AP) else ""
    ds.BodyPartExamined = "CHEST"
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{float(s):.6g}" for s in spacing]
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 32768, 65536  # the identity window: reading gives back stored / 65535
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
