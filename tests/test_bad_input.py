"""Bad files and manifests (issue 14, defects 5-7): one bad file is one skipped record, never a dead run, never
silently wrong pixels; paths stay under the data root; leaks between splits and cut manifests are caught."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from radalign.data.io import read_image
from radalign.data.manifest import load_manifest
from radalign.errors import ConfigError, DataError
from tests.conftest import write_png16

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 grey PNG whose header then claims ``width`` x ``height``: tiny on disk, a bomb to decode."""
    write_png16(path, seed=0, shape=(1, 1))
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _tiff_bomb(path: Path, side: int = 24576) -> Path:
    """~1 MB on disk, ``side`` squared bytes (604 M pixels) decoded: zlib-compressed tiles of zeros."""
    import tifffile

    tile = np.zeros((512, 512), np.uint8)
    tifffile.imwrite(path, (tile for _ in range((side // 512) ** 2)), shape=(side, side), dtype=np.uint8,
                     tile=(512, 512), compression="zlib")  # fmt: skip
    return path


def _nifti_with_affine(path: Path, affine: np.ndarray) -> Path:
    image = nib.load(NIBABEL_FILES / "anatomical.nii")
    out = nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header.copy())
    out.header.set_sform(affine, code=1)  # the sform wins over the qform when its code is set
    out.header.set_qform(None, code=0)
    nib.save(out, path)
    return path


def test_a_png_claiming_60000_squared_pixels_is_refused_before_decoding(tmp_path):
    bomb = _png_claiming(tmp_path / "bomb.png", 60000, 60000)
    assert bomb.stat().st_size < 200
    with pytest.raises(DataError, match=r"bomb\.png: Pillow refuses to decode it"):
        read_image(bomb)


def test_an_image_over_the_decode_limit_is_refused_and_the_limit_is_configurable(tmp_path, monkeypatch):
    png = tmp_path / "big.png"
    write_png16(png, seed=0, shape=(100, 120))
    monkeypatch.setenv("RADALIGN_MAX_PIXELS", "10000")
    with pytest.raises(DataError, match=r"100 x 120 x 1 = 12,000 pixels, over the decode limit of 10,000.*"
                                         r"RADALIGN_MAX_PIXELS"):  # fmt: skip
        read_image(png)
    monkeypatch.setenv("RADALIGN_MAX_PIXELS", "12000")
    assert read_image(png).array.shape == (100, 120)
    monkeypatch.setenv("RADALIGN_MAX_PIXELS", "abc")  # a bad setting stops the command, not one file per image
    with pytest.raises(ConfigError, match=r"RADALIGN_MAX_PIXELS='abc' is not a number"):
        read_image(png)


def test_a_tiled_tiff_that_decodes_to_600_million_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    import tifffile

    bomb = _tiff_bomb(tmp_path / "bomb.tif")
    assert bomb.stat().st_size < 3_000_000

    def never(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", never)
    with pytest.raises(DataError, match=r"24576 x 24576 = 603,979,776 pixels, over the decode limit"):
        read_image(bomb)


def test_a_dicom_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(DataError, match=r"declares 1 x 60000 x 60000 x 1 = 3,600,000,000 pixels"):
        read_image(tmp_path / "huge.dcm")


@pytest.mark.parametrize(
    ("name", "affine", "message"),
    [
        ("zero", np.zeros((4, 4)), "degenerate"),
        ("nan", np.diag([np.nan, 1.0, 1.0, 1.0]), "NaN or infinite"),
        # two voxel axes along the same world direction: the review's case, read before as spacing sqrt(2)
        ("rank-deficient", np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "degenerate"),
    ],
)
def test_a_nifti_with_a_broken_affine_is_a_data_error_not_a_crash(tmp_path, name, affine, message):
    path = _nifti_with_affine(tmp_path / f"{name}.nii", affine)
    with pytest.raises(DataError, match=rf"{name}\.nii: its voxel-to-world affine .*{message}"):
        read_image(path)


def _mr_j2k() -> pydicom.Dataset:
    return pydicom.dcmread(PYDICOM_FILES / "MR_small_jp2klossless.dcm")


def _codestream_bounds(data: bytes) -> tuple[int, int]:
    start = data.find(b"\xff\x4f\xff\x51")
    return start, len(data.rstrip(b"\x00"))


@pytest.mark.parametrize("damage", ["end-overwritten", "cut-after-a-third"])
def test_a_damaged_jpeg2000_stream_is_refused_not_decoded_to_garbage(tmp_path, damage):
    ds = _mr_j2k()
    data = bytearray(ds.PixelData)
    start, end = _codestream_bounds(bytes(data))
    third = start + (end - start) // 3
    if damage == "end-overwritten":  # what an overwrite from a third on does; one decoder returned garbage for it
        data[third:] = np.random.default_rng(0).integers(0, 256, len(data) - third, dtype=np.uint8).tobytes()
    else:
        data = data[: third + (third % 2)]
    ds.PixelData = bytes(data)
    ds.save_as(tmp_path / "damaged.dcm")
    with pytest.raises(DataError, match=r"damaged\.dcm: the (JPEG 2000 stream of frame 1 is damaged|pixel data)"):
        read_image(tmp_path / "damaged.dcm")
    assert read_image(PYDICOM_FILES / "MR_small_jp2klossless.dcm").array.shape == (64, 64)  # intact: still reads
    # a valid stream padded with 0xFF after its end-of-codestream marker (pydicom's colour example) reads too
    assert read_image(PYDICOM_FILES / "examples_jpeg2k.dcm", modality="xray").array.shape == (480, 640)


def _manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _row(i: int, image: str, **cells) -> dict:
    return {"id": f"r{i}", "image": image, "modality": "xray", "split": "train", "report": "No effusion.", **cells}


def test_a_file_that_contradicts_its_declared_modality_is_refused(tmp_path, ct_small):
    import shutil

    shutil.copy(ct_small, tmp_path / "ct.dcm")
    write_png16(tmp_path / "cxr.png", seed=1)
    with pytest.raises(DataError, match=r"row says xray, and the file's DICOM Modality tag says ct"):
        read_image(tmp_path / "ct.dcm", expect="xray")
    with pytest.raises(DataError, match=r"row says ct, which radalign reads as one 3D image.*2D image"):
        read_image(tmp_path / "cxr.png", expect="ct")
    manifest = _manifest(tmp_path, [_row(0, "ct.dcm"), _row(1, "cxr.png"), _row(2, "cxr.png", modality="ct", id="r9")])
    loaded = load_manifest(manifest, decode=True, on_error="skip")
    assert [r.id for r in loaded.records] == ["r1"]
    assert sorted(p.record_id for p in loaded.problems) == ["r0", "r9"]


def test_prepare_refuses_a_png_in_a_ct_row(tmp_path):
    from radalign.data.cache import prepare_cache

    write_png16(tmp_path / "cxr.png", seed=1)
    manifest = _manifest(tmp_path, [_row(0, "cxr.png", modality="ct")])
    report = prepare_cache(load_manifest(manifest).records, tmp_path / "cache", workers=1, progress=False)
    assert report.written == 0 and "row says ct" in report.failed["r0#0"]


def test_one_bomb_in_a_manifest_is_one_skipped_item(tmp_path):
    from radalign.data.dataset import RadDataset, Skipped

    write_png16(tmp_path / "good.png", seed=2)
    _png_claiming(tmp_path / "bomb.png", 60000, 60000)
    _tiff_bomb(tmp_path / "bomb.tif")
    _nifti_with_affine(tmp_path / "zero.nii", np.zeros((4, 4)))
    rows = [_row(0, "good.png"), _row(1, "bomb.png"), _row(2, "bomb.tif"), _row(3, "zero.nii", modality="ct")]
    manifest = load_manifest(_manifest(tmp_path, rows))
    items = [RadDataset(manifest.records, vocabulary=())[i] for i in range(4)]
    assert not isinstance(items[0], Skipped)
    assert [type(item).__name__ for item in items[1:]] == ["Skipped"] * 3
    checked = load_manifest(_manifest(tmp_path, rows), decode=True, on_error="skip")
    assert [r.id for r in checked.records] == ["r0"] and len(checked.problems) == 3


def test_paths_outside_the_data_root_are_bad_rows_unless_the_root_is_widened(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir(), outside.mkdir()
    write_png16(data / "in.png", seed=0)
    write_png16(outside / "out.png", seed=1)
    (outside / "secret.txt").write_text("Findings: the words of someone else's file.")
    (data / "link.png").symlink_to(outside / "out.png")
    rows = [
        _row(0, "in.png"),
        _row(1, "../elsewhere/out.png"),
        _row(2, "in.png", report="", report_path="../elsewhere/secret.txt"),
        _row(3, str(outside / "out.png")),
        _row(4, "link.png"),  # a link inside the root to a file outside it
    ]
    manifest = _manifest(data, rows)
    loaded = load_manifest(manifest, on_error="skip")
    assert [r.id for r in loaded.records] == ["r0"]
    assert {p.kind for p in loaded.problems} == {"outside data root"}
    assert "resolves to" in str(loaded.problems[0]) and "--data-root" in str(loaded.problems[0])
    widened = load_manifest(manifest, on_error="skip", data_root=tmp_path)
    assert [r.id for r in widened.records] == ["r0", "r1", "r2", "r3", "r4"]
    assert "someone else" in widened.records[2].report


def test_the_cli_checks_paths_against_data_root(tmp_path, capsys):
    from radalign.cli import main

    (tmp_path / "data").mkdir()
    write_png16(tmp_path / "data" / "in.png", seed=0)
    write_png16(tmp_path / "out.png", seed=1)
    manifest = _manifest(tmp_path / "data", [_row(0, "in.png"), _row(1, "../out.png")])
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", str(manifest)])
    assert exit_info.value.code == 1 and "outside the data root" in " ".join(capsys.readouterr().out.split())
    main(["data", "check", str(manifest), "--data-root", str(tmp_path)])  # no exit: every row is good


def test_data_check_exit_codes_tell_bad_rows_from_unusable_input_from_a_crash(tmp_path, monkeypatch, capsys):
    from radalign.cli import main

    write_png16(tmp_path / "in.png", seed=0)
    good = _manifest(tmp_path, [_row(0, "in.png")])
    main(["data", "check", str(good)])  # 0

    def code(argv):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        return exit_info.value.code

    bad = tmp_path / "bad.csv"
    pd.DataFrame([_row(0, "in.png"), _row(1, "missing.png")]).to_csv(bad, index=False)
    assert code(["data", "check", str(bad)]) == 1
    assert code(["data", "check", str(tmp_path / "nothing.csv")]) == 2
    import radalign.data.manifest

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(radalign.data.manifest, "load_manifest", crash)
    assert code(["data", "check", str(good)]) == 3
    assert "internal error" in capsys.readouterr().err


def test_a_manifest_cut_in_the_middle_of_a_row_is_refused(tmp_path):
    write_png16(tmp_path / "in.png", seed=0)
    rows = [_row(i, "in.png", id=f"r{i}", label_cardiomegaly="1", label_edema="0") for i in range(3)]
    manifest = _manifest(tmp_path, rows)
    text = manifest.read_text()
    manifest.write_text(text[: text.rindex(",1,")])  # the copy stopped inside the last row
    with pytest.raises(DataError, match=r"ends in the middle of a row \(row 4 has 5 of 7 cells"):
        load_manifest(manifest, check_files=False)
    manifest.write_text(text.rstrip("\n"))  # complete rows without a final newline are fine
    assert len(load_manifest(manifest, check_files=False).records) == 3


def test_a_patient_or_an_image_in_train_and_test_is_a_leak(tmp_path):
    for i in range(4):
        write_png16(tmp_path / f"{i}.png", seed=i)
    rows = [
        _row(0, "0.png", patient="p0"),
        _row(1, "1.png", patient="p1"),
        _row(2, "0.png", patient="p9", split="test"),  # the same image file
        _row(3, "2.png", patient="p1", split="val"),  # the same patient
        _row(4, "3.png", patient="p4", split="test"),
    ]
    loaded = load_manifest(_manifest(tmp_path, rows), on_error="skip")
    assert [r.id for r in loaded.records] == ["r0", "r1", "r4"]
    reasons = {p.record_id: p.reason for p in loaded.problems}
    assert "0.png is also in train row 2" in reasons["r2"] and "patient p1 is also in train row 3" in reasons["r3"]
    with pytest.raises(DataError, match="must not share an image or a patient"):
        load_manifest(_manifest(tmp_path, rows), on_error="fail")


def test_pretrain_names_the_rows_it_leaves_out(tiny_manifest, caplog):
    from radalign.data.datamodule import DataConfig, RadDataModule

    table = pd.read_csv(tiny_manifest, dtype=str, keep_default_na=False)
    table = pd.concat([table, table.iloc[[0]]])  # a duplicate id
    table.to_csv(tiny_manifest, index=False)
    caplog.set_level("WARNING")
    RadDataModule(DataConfig(manifest=tiny_manifest, tokenizer=None, require_report=False)).setup("fit")
    assert "1 rows left out as bad (1 duplicate id)" in caplog.text and "id already used in row 2" in caplog.text


@pytest.mark.parametrize("suffix", [".dcm", ".png", ".tif", ".nii.gz", ".nii"])
def test_a_zero_byte_file_is_a_data_error_that_names_it(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"empty{suffix.replace('.', '[.]')}: "):
        read_image(empty)
