"""Image, volume and report-text augmentation, picked by name from the data config.

**2D presets** (``build_image_transform(preset, size, train=..., hflip=...)``): input (1, H, W) float32 in [0, 1]
(radiograph convention, see ``schema.py``), output (1, *size) float32, normalised. ``train=False`` always gives
the evaluation pipeline, whatever the preset.

- ``convirt`` (ConVIRT, used by LoVT; LoVT's ``scan_transforms.py`` order): RandomResizedCrop(size, scale
  (0.6, 1), default aspect range 3/4-4/3), horizontal flip p=0.5, RandomAffine(20 deg, translate 0.1, scale
  0.95-1.05, bilinear, zero fill), brightness and contrast jitter factors in (0.6, 1.4) (contrast blends with the
  image mean, which is well defined for one channel), GaussianBlur sigma (0.1, 3.0) px.
- ``prior`` (PRIOR): pad to square and resize to size (PRIOR's code stretches instead; padding keeps the geometry
  evaluation uses), RandomAffine(5 deg, bilinear), horizontal flip p=0.5.
- ``none``: the evaluation pipeline; no flip unless ``hflip=True`` is asked for.
- evaluation (``train=False``): zero-pad evenly to the target aspect ratio (square for an int size; LoVT's
  validation), then resize. Padding rather than stretching keeps the anatomy's proportions.

Decisions:

- **Normalisation**: ``(x - 0.5) / 0.25`` (``IMAGE_MEAN``, ``IMAGE_STD``; ``mean=``/``std=`` to change), fixed
  and dataset-agnostic so that a checkpoint means the same on every dataset. Radiographs in [0, 1] have a mean
  near 0.5 and a std near 0.25-0.3, so [0, 1] maps to [-2, 2] with roughly unit spread. LoVT uses 0.5/0.5 and
  PRIOR its own constants; the difference is a fixed affine rescaling that the first conv and BatchNorm absorb.
- **Blur kernel**: 19 px = 2 * ceil(3 * sigma_max) + 1, so the largest sigma is truncated at 3 sigma; sigma is in
  output pixels (the papers' 224 px). LoVT uses 10% of the side (23 px at 224): the extra taps weigh < 0.3%.
  For outputs smaller than 19 px the kernel shrinks to the largest odd size that fits.
- **Horizontal flip** is on by default in ``convirt`` and ``prior``, as in the papers, and switchable with
  ``hflip=False``. Trade-off: a flipped chest film no longer matches its report ("left effusion" is now on the
  right, the heart points the wrong way), so flipping teaches the model that laterality is noise; it helps
  global retrieval and classification a little and hurts grounding and any task that reads laterality. Turn
  it off for grounding/localisation work, or when reports are matched sentence by sentence to regions.
- **RNG**: every random draw comes from torch's global RNG (torchvision v2 draws from it; MONAI's numpy state
  is re-seeded from it on each call; the text augmentation uses it or a given ``torch.Generator``), so
  ``torch.manual_seed`` makes augmentation reproducible; with loader workers the training dataset seeds it per
  item (``EpochSampler``'s per-item ``mixed_seed``), inside a fork of the generator.

**3D** (``build_volume_transform``): the returned callable is ``f(volume, spacing)`` with volume (1, X, Y, Z)
in HU, RAS+ (``schema.py``), and spacing in mm per array axis: the spacing travels with the sample
(``Image.spacing``) and the dataset already calls transforms as ``f(tensor, spacing)``, so no MetaTensor has to
be built by the caller. Pipeline (MONAI): Spacing to ``spacing_mm`` (bilinear; ``scale_extent`` so the physical
extent is kept: 16 voxels at 2 mm become exactly 32 at 1 mm) -> ScaleIntensityRange(HU window -> [0, 1], clipped)
-> train: zero-pad to at least ``size`` (0 = the window minimum, i.e. air) + random crop of ``size`` + intensity
shift of +-0.1 (+-10% of the window) with p=0.5; eval: center pad/crop (ResizeWithPadOrCrop) to ``size`` -> the
same normalisation as 2D. Output (1, *size) plain float32 tensor; ``size`` is in array axis order (X, Y, Z).

**Text** (``TextAugment``): sentence-level only, never invents text (the output is a permutation or a subset of
the input sentences). ``shuffle`` = PRIOR's shuffle on every access; ``swap_p`` = LoVT's random swaps: the number
of swaps is Geometric(swap_p) counted from 0 (torch's convention, as in LoVT's ``RandomIndexSwapper`` with
``swap_prob=0.6``), mean (1 - p) / p = 1.5 for p = 0.4, each swapping two uniformly drawn positions (possibly the
same one, as in LoVT); ``one_sentence`` = ConVIRT's one random sentence. ``min_sentences``: reports with fewer
sentences are returned unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from radalign.errors import ConfigError, DataError

IMAGE_MEAN = 0.5
IMAGE_STD = 0.25
BLUR_SIGMA = (0.1, 3.0)  # px, ConVIRT
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # 19 px: the largest sigma truncated at 3 sigma
VOLUME_SHIFT = 0.1  # intensity shift in window units ([0, 1] scale before normalisation)

_BILINEAR = v2.InterpolationMode.BILINEAR
Step = Callable[[torch.Tensor], torch.Tensor]


class PadToAspect:
    """Zero-pad (C, H, W) evenly on both sides to the aspect ratio of ``size`` (H, W), so a resize keeps shapes."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.aspect = size[1] / size[0]  # W / H

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        if w > h * self.aspect:
            pad_h, pad_w = round(w / self.aspect) - h, 0
        else:
            pad_h, pad_w = 0, round(h * self.aspect) - w
        if pad_h <= 0 and pad_w <= 0:
            return image
        # odd remainders go to the right/bottom, like torchvision's center crop
        return F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))

    def __repr__(self) -> str:
        return f"PadToAspect(w/h={self.aspect:g})"


def _flip(on: bool) -> list[Step]:
    return [v2.RandomHorizontalFlip(p=0.5)] if on else []


def _eval_steps(size: tuple[int, int]) -> list[Step]:
    return [PadToAspect(size), v2.Resize(size, antialias=True)]


def _convirt(size: tuple[int, int], hflip: bool) -> list[Step]:
    kernel = min(BLUR_KERNEL, _largest_odd(min(size)))
    return [
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
        *_flip(hflip),
        # bilinear rather than torchvision's default nearest: nearest leaves jagged edges on rotated anatomy
        v2.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.95, 1.05), interpolation=_BILINEAR),
        v2.ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4)),
        v2.GaussianBlur(kernel, sigma=BLUR_SIGMA),
    ]


def _prior(size: tuple[int, int], hflip: bool) -> list[Step]:
    # PRIOR's code resizes without keeping the aspect; evaluation pads to square first, so training does too:
    # one geometry for a film in training and evaluation (docs/methods/prior.md)
    return [*_eval_steps(size), v2.RandomAffine(degrees=5, interpolation=_BILINEAR), *_flip(hflip)]


def _none(size: tuple[int, int], hflip: bool) -> list[Step]:
    return [*_eval_steps(size), *_flip(hflip)]


def _largest_odd(n: int) -> int:
    return max(1, n if n % 2 else n - 1)


@dataclass(frozen=True)
class ImagePreset:
    """A named 2D training augmentation: ``build(size (H, W), hflip)`` -> steps ending at ``size``."""

    build: Callable[[tuple[int, int], bool], list[Step]]
    hflip: bool  # the paper's default
    description: str


IMAGE_PRESETS: dict[str, ImagePreset] = {
    "convirt": ImagePreset(_convirt, True, "ConVIRT/LoVT: resized crop, flip, affine, jitter, blur"),
    "prior": ImagePreset(_prior, True, "PRIOR: pad to square, resize, affine 5 deg, flip"),
    "none": ImagePreset(_none, False, "no augmentation: pad to square, resize"),
}


class ImageTransform:
    """A 2D pipeline: (1, H, W) in [0, 1] -> (1, *size) float32, normalised.

    ``spacing`` is accepted and ignored so 2D and 3D transforms share the dataset's ``f(tensor, spacing)`` call.
    """

    def __init__(self, steps: Sequence[Step], mean: float, std: float) -> None:
        self.pipeline = v2.Compose([*steps, v2.Normalize([mean], [std])])

    def __call__(self, image: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
        if image.ndim != 3 or image.shape[0] != 1:
            raise DataError(
                f"2D image transform got a tensor of shape {tuple(image.shape)}; it expects (1, H, W) "
                "(3D volumes need data.modality: ct and build_volume_transform)"
            )
        return self.pipeline(image.float()).contiguous()

    def __repr__(self) -> str:
        return f"ImageTransform({self.pipeline})"


def build_image_transform(
    preset: str,
    size: int | tuple[int, int],
    *,
    ndim: int = 2,
    train: bool = True,
    hflip: bool | None = None,
    mean: float = IMAGE_MEAN,
    std: float = IMAGE_STD,
) -> ImageTransform:
    """The 2D transform for ``preset`` (a key of ``IMAGE_PRESETS``); ``train=False`` gives pad-to-square + resize.

    ``hflip``: None keeps the preset's default, True/False forces the random horizontal flip on/off.
    """
    if preset not in IMAGE_PRESETS:
        raise ConfigError(f"unknown image augmentation preset {preset!r}; use one of {sorted(IMAGE_PRESETS)}")
    if ndim != 2:
        raise ConfigError(
            f"build_image_transform builds 2D transforms (ndim=2), got ndim={ndim}; "
            "use build_volume_transform for 3D volumes"
        )
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ConfigError(f"image size must be a positive int or (H, W), got {size!r}")
    if std <= 0:
        raise ConfigError(f"normalisation std must be positive, got {std}")
    target = (hw[0], hw[1])
    spec = IMAGE_PRESETS[preset]
    flip = spec.hflip if hflip is None else hflip
    steps = spec.build(target, flip) if train else _eval_steps(target)
    return ImageTransform(steps, mean, std)


class VolumeTransform:
    """A 3D pipeline: ``f(volume (1, X, Y, Z) in HU, spacing mm)`` -> (1, *size) float32, normalised."""

    def __init__(
        self,
        size: tuple[int, int, int],
        spacing_mm: tuple[float, float, float],
        hu_window: tuple[float, float],
        train: bool,
        mean: float,
        std: float,
    ) -> None:
        # imported here: MONAI takes seconds to import and 2D-only runs never need it
        from monai.transforms import (
            Compose,
            RandShiftIntensity,
            RandSpatialCrop,
            ResizeWithPadOrCrop,
            ScaleIntensityRange,
            Spacing,
            SpatialPad,
        )

        self.train, self.mean, self.std = train, mean, std
        steps: list[Callable] = [
            Spacing(pixdim=spacing_mm, mode="bilinear", padding_mode="border", scale_extent=True),
            ScaleIntensityRange(a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True),
        ]
        if train:
            steps += [
                SpatialPad(size),  # volumes smaller than size: pad with 0 = air, then the crop always fits
                RandSpatialCrop(size, random_size=False),
                RandShiftIntensity(offsets=VOLUME_SHIFT, prob=0.5),
            ]
        else:
            steps.append(ResizeWithPadOrCrop(size))
        self.pipeline = Compose(steps)

    def __call__(self, volume: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
        from monai.data import MetaTensor

        if volume.ndim != 4 or volume.shape[0] != 1:
            raise DataError(f"volume transform got a tensor of shape {tuple(volume.shape)}; it expects (1, X, Y, Z)")
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise DataError(f"volume spacing must be 3 positive numbers (mm per axis), got {tuple(spacing)}")
        if self.train:
            # MONAI draws from its own numpy state: re-seed it from torch so torch seeding governs the crop too
            self.pipeline.set_random_state(seed=int(torch.randint(2**31 - 1, ()).item()))
        # RAS+ arrays (schema.py) have a diagonal affine: the spacing is all MONAI needs
        affine = torch.diag(torch.tensor([*map(float, spacing), 1.0], dtype=torch.float64))
        out = self.pipeline(MetaTensor(volume.float(), affine=affine))
        out = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
        return ((out.float() - self.mean) / self.std).contiguous()


def build_volume_transform(
    size: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    train: bool = True,
    *,
    mean: float = IMAGE_MEAN,
    std: float = IMAGE_STD,
) -> VolumeTransform:
    """The 3D CT transform: resample to ``spacing_mm``, window ``hu_window`` to [0, 1], crop/pad to ``size``."""
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"volume size must be 3 positive ints (X, Y, Z), got {size!r}")
    if len(spacing_mm) != 3 or not all(s > 0 for s in spacing_mm):
        raise ConfigError(f"volume spacing_mm must be 3 positive numbers, got {spacing_mm!r}")
    if len(hu_window) != 2 or not hu_window[0] < hu_window[1]:
        raise ConfigError(f"hu_window must be (low, high) with low < high, got {hu_window!r}")
    if std <= 0:
        raise ConfigError(f"normalisation std must be positive, got {std}")
    shape = (size[0], size[1], size[2])
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    window = (float(hu_window[0]), float(hu_window[1]))
    return VolumeTransform(shape, spacing, window, train, mean, std)


@dataclass(frozen=True)
class TextAugment:
    """Sentence-level report augmentation; ``augment(sentences)`` draws from torch's RNG (or ``generator``)."""

    shuffle: bool = False  # PRIOR: a new sentence order on every access
    swap_p: float = 0.0  # LoVT: number of random pair swaps ~ Geometric(swap_p) from 0; 0 = off, LoVT 0.4
    one_sentence: bool = False  # ConVIRT: one random sentence
    min_sentences: int = 1  # reports with fewer sentences are returned unchanged

    def __post_init__(self) -> None:
        if not 0.0 <= self.swap_p <= 1.0:
            raise ConfigError(f"text swap_p must be in [0, 1] (0 = off, LoVT uses 0.4), got {self.swap_p}")
        if self.min_sentences < 1:
            raise ConfigError(f"text min_sentences must be >= 1, got {self.min_sentences}")

    @property
    def active(self) -> bool:
        """Whether this config changes anything (the datamodule skips inactive augmentations)."""
        return self.shuffle or self.swap_p > 0 or self.one_sentence

    def num_swaps(self, generator: torch.Generator | None = None) -> int:
        """One draw of the swap count: P(k) = (1 - p)^k p for k = 0, 1, ...; mean (1 - p) / p."""
        if self.swap_p <= 0.0 or self.swap_p >= 1.0:
            return 0
        # inverse CDF; torch.distributions.Geometric cannot take a generator
        u = 1.0 - torch.rand((), dtype=torch.float64, generator=generator).item()  # (0, 1]
        return math.floor(math.log(u) / math.log1p(-self.swap_p))

    def __call__(self, sentences: Sequence[str], generator: torch.Generator | None = None) -> list[str]:
        out = list(sentences)
        if len(out) < max(2, self.min_sentences):
            return out
        if self.one_sentence:
            # the order augmentations cannot matter for a single sentence: skip them
            return [out[int(torch.randint(len(out), (), generator=generator).item())]]
        if self.shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
        count = self.num_swaps(generator)
        if count:
            for i, j in torch.randint(len(out), (count, 2), generator=generator).tolist():
                out[i], out[j] = out[j], out[i]
        return out
