"""Image presets, the 3D CT pipeline and sentence augmentation: shapes, determinism, geometry, text invariants."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radalign.data.transforms import (
    IMAGE_MEAN,
    IMAGE_PRESETS,
    IMAGE_STD,
    TextAugment,
    build_image_transform,
    build_volume_transform,
)
from radalign.errors import ConfigError, DataError

LOW, HIGH = (0.0 - IMAGE_MEAN) / IMAGE_STD, (1.0 - IMAGE_MEAN) / IMAGE_STD  # where 0 and 1 land after normalising


def unit(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to the [0, 1] scale."""
    return x * IMAGE_STD + IMAGE_MEAN


def textured(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def centroid(mask: torch.Tensor) -> tuple[float, ...]:
    """Mean index of the True pixels, per axis."""
    idx = torch.nonzero(mask).float()
    return tuple(idx.mean(dim=0).tolist())


# ---------------------------------------------------------------- 2D


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("preset", sorted(IMAGE_PRESETS))
@pytest.mark.parametrize(("size", "expected"), [(32, (1, 32, 32)), ((24, 40), (1, 24, 40))])
def test_image_shape_and_dtype(preset: str, train: bool, size, expected) -> None:
    transform = build_image_transform(preset, size, train=train)
    out = transform(textured((1, 48, 36)))
    assert out.shape == expected
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_image_accepts_the_datasets_spacing_argument() -> None:
    transform = build_image_transform("none", 16, train=False)
    image = textured((1, 20, 20))
    assert torch.equal(transform(image, (0.14, 0.14)), transform(image))


@pytest.mark.parametrize("preset", sorted(IMAGE_PRESETS))
def test_eval_is_deterministic_and_ignores_the_preset(preset: str) -> None:
    image = textured((1, 50, 30))
    transform = build_image_transform(preset, 32, train=False)
    first = transform(image)
    torch.manual_seed(123)  # a different RNG state must not matter
    assert torch.equal(first, transform(image))
    assert torch.equal(first, build_image_transform("none", 32, train=False)(image))


@pytest.mark.parametrize("preset", ["convirt", "prior"])
def test_train_reproducible_under_seed_and_varies_across_seeds(preset: str) -> None:
    image = textured((1, 64, 56))
    transform = build_image_transform(preset, 32, train=True)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return transform(image)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_normalisation_constants() -> None:
    image = torch.zeros(1, 8, 8)
    image[:, :, 4:] = 1.0
    out = build_image_transform("none", 8, train=False)(image)
    assert out.min().item() == pytest.approx(LOW)
    assert out.max().item() == pytest.approx(HIGH)
    custom = build_image_transform("none", 8, train=False, mean=0.5, std=0.5)(image)
    assert custom.min().item() == pytest.approx(-1.0)


def left_blob() -> torch.Tensor:
    image = torch.zeros(1, 64, 64)
    image[:, 24:40, 4:20] = 1.0  # bright square on the image's left
    return image


@pytest.mark.parametrize("preset", ["convirt", "prior"])
def test_hflip_override_off_keeps_left_on_the_left(preset: str) -> None:
    transform = build_image_transform(preset, 32, train=True, hflip=False)
    for seed in range(12):
        torch.manual_seed(seed)
        out = unit(transform(left_blob()))[0]
        if (out > 0.5).any():  # the ConVIRT crop may cut the blob away
            assert centroid(out > 0.5)[1] < 16, f"seed {seed}: blob moved right without a flip"


def test_hflip_moves_the_blob_to_the_mirrored_side() -> None:
    transform = build_image_transform("prior", 32, train=True)  # flip p=0.5 by default
    assert IMAGE_PRESETS["prior"].hflip
    columns = []
    for seed in range(16):
        torch.manual_seed(seed)
        out = unit(transform(left_blob()))[0]
        columns.append(centroid(out > 0.5)[1])
    # blob centre column: 11.5 of 63 -> about 5.6 of 31 px, mirrored about 25.4; the 5-degree affine moves it little
    left = [c for c in columns if abs(c - 5.6) < 3]
    right = [c for c in columns if abs(c - 25.4) < 3]
    assert len(left) + len(right) == len(columns), columns
    assert left and right, f"16 seeds should flip some images and not others: {columns}"


def test_none_preset_flips_only_when_asked() -> None:
    assert not IMAGE_PRESETS["none"].hflip
    seen = set()
    for seed in range(10):
        torch.manual_seed(seed)
        out = unit(build_image_transform("none", 32, train=True, hflip=True)(left_blob()))[0]
        seen.add(centroid(out > 0.5)[1] > 16)
    assert seen == {False, True}


def test_eval_pads_to_square_keeping_the_aspect_ratio() -> None:
    image = torch.zeros(1, 40, 80)  # landscape, H=40, W=80
    image[:, 8:16, 56:64] = 1.0  # 8x8 marker, centre (11.5, 59.5)
    out = unit(build_image_transform("none", 40, train=False)(image))[0]
    mask = out > 0.5
    # padded to 80x80 (20 rows on top), halved: centre (31.5 + 0.5) / 2 - 0.5 = 15.5, (59.5 + 0.5) / 2 - 0.5 = 29.5
    row, col = centroid(mask)
    assert row == pytest.approx(15.5, abs=0.5)
    assert col == pytest.approx(29.5, abs=0.5)
    assert mask.any(dim=1).sum() == mask.any(dim=0).sum() == 4  # still a square, not stretched
    assert out[:10].max() < 0.01 and out[30:].max() < 0.01  # the zero bands above and below


def test_the_prior_preset_pads_a_landscape_film_as_evaluation_does() -> None:
    # an 8 x 8 marker on a 40 x 80 film: padded to 80 x 80 and halved it is 4 x 4 (the affine turns it 5 deg at most)
    image = torch.zeros(1, 40, 80)
    image[:, 8:16, 56:64] = 1.0
    torch.manual_seed(0)
    train = unit(build_image_transform("prior", 40, hflip=False)(image))[0] > 0.5
    rows, cols = train.any(dim=1).sum(), train.any(dim=0).sum()
    assert abs(int(rows) - int(cols)) <= 1 and rows <= 6  # square, halved (a stretch would make it 8 x 4)


def test_non_square_target_pads_to_its_aspect() -> None:
    image = torch.ones(1, 30, 30)
    out = unit(build_image_transform("none", (20, 40), train=False)(image))[0]
    assert out.shape == (20, 40)
    filled = (out > 0.5).any(dim=0)
    assert filled[10:30].all() and not filled[:10].any() and not filled[30:].any()  # the middle half, unstretched


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_image_transform("simclr", 224)
    for name in IMAGE_PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": (32, 32, 32)}, {"ndim": 3}, {"std": 0.0}])
def test_bad_image_config(kwargs) -> None:
    with pytest.raises(ConfigError):
        build_image_transform("convirt", **{"size": 32, **kwargs})


def test_wrong_image_shape_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"\(1, H, W\)"):
        build_image_transform("none", 16, train=False)(torch.zeros(3, 16, 16))


# ---------------------------------------------------------------- 3D


@pytest.mark.parametrize("train", [True, False])
def test_volume_shape_dtype_and_plain_tensor(train: bool) -> None:
    volume = textured((1, 30, 24, 10)) * 2000 - 1000
    out = build_volume_transform((16, 16, 12), (2.0, 2.0, 2.0), train=train)(volume, (1.5, 1.5, 3.0))
    assert out.shape == (1, 16, 16, 12)
    assert out.dtype == torch.float32
    assert type(out) is torch.Tensor  # not a MONAI MetaTensor: collates and pickles like any tensor


def test_volume_eval_deterministic_train_seeded() -> None:
    volume = textured((1, 40, 40, 40)) * 2000 - 1000
    evaluate = build_volume_transform((24, 24, 24), (1.0, 1.0, 1.0), train=False)
    first = evaluate(volume, (1.0, 1.0, 1.0))
    torch.manual_seed(5)
    assert torch.equal(first, evaluate(volume, (1.0, 1.0, 1.0)))

    train = build_volume_transform((24, 24, 24), (1.0, 1.0, 1.0), train=True)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return train(volume, (1.0, 1.0, 1.0))

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_volume_spacing_scales_the_extent() -> None:
    volume = torch.full((1, 16, 16, 8), -500.0)  # 32 x 32 x 32 mm of soft-ish tissue
    volume[:, 4:8, 4:8, 2:4] = 1000.0  # an 8 mm cube: 4 x 4 x 2 voxels at (2, 2, 4) mm
    out = build_volume_transform((40, 40, 40), (1.0, 1.0, 1.0), train=False)(volume, (2.0, 2.0, 4.0))[0]
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        cube = (out > 0.5).any(dim=others).sum().item()  # cube (+2) vs tissue (-1) at the midpoint 0.5
        body = (out > -1.5).any(dim=others).sum().item()  # tissue (-1) vs zero padding (-2)
        assert cube == 8, f"axis {axis}: cube spans {cube} voxels at 1 mm, expected 8"
        assert body == 32, f"axis {axis}: volume spans {body} voxels at 1 mm, expected 32"


def test_hu_window_maps_to_the_normalised_range() -> None:
    volume = torch.zeros(1, 8, 8, 8)
    volume[0, 1, 1, 1] = -1000.0
    volume[0, 2, 2, 2] = 1000.0
    volume[0, 3, 3, 3] = -3000.0  # outside the window: clipped
    volume[0, 4, 4, 4] = 3000.0
    out = build_volume_transform((8, 8, 8), (1.0, 1.0, 1.0), train=False)(volume, (1.0, 1.0, 1.0))[0]
    assert out[1, 1, 1].item() == pytest.approx(LOW)
    assert out[2, 2, 2].item() == pytest.approx(HIGH)
    assert out[3, 3, 3].item() == pytest.approx(LOW)
    assert out[4, 4, 4].item() == pytest.approx(HIGH)
    assert out[0, 0, 0].item() == pytest.approx((LOW + HIGH) / 2)  # 0 HU: the middle of the window
    assert out.min().item() == pytest.approx(LOW) and out.max().item() == pytest.approx(HIGH)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": (16, 16)},
        {"spacing_mm": (1.0, 0.0, 1.0)},
        {"hu_window": (1000.0, -1000.0)},
    ],
)
def test_bad_volume_config(kwargs) -> None:
    args = {"size": (16, 16, 16), "spacing_mm": (1.0, 1.0, 1.0), **kwargs}
    with pytest.raises(ConfigError):
        build_volume_transform(**args)


def test_bad_volume_input_is_a_data_error() -> None:
    transform = build_volume_transform((8, 8, 8), (1.0, 1.0, 1.0), train=False)
    with pytest.raises(DataError):
        transform(torch.zeros(1, 8, 8), (1.0, 1.0))
    with pytest.raises(DataError):
        transform(torch.zeros(1, 8, 8, 8), (1.0, 1.0))


# ---------------------------------------------------------------- text

reports = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=10)
configs = st.builds(
    TextAugment,
    shuffle=st.booleans(),
    swap_p=st.one_of(st.just(0.0), st.floats(0.05, 1.0)),
    one_sentence=st.booleans(),
    min_sentences=st.integers(1, 4),
)


@settings(max_examples=200, deadline=None)
@given(sentences=reports, augment=configs, seed=st.integers(0, 2**32 - 1))
def test_text_output_is_a_nonempty_sub_multiset(sentences: list[str], augment: TextAugment, seed: int) -> None:
    out = augment(sentences, torch.Generator().manual_seed(seed))
    assert out, "a non-empty report must never come back empty"
    assert not Counter(out) - Counter(sentences), "augmentation invented or duplicated text"
    if augment.one_sentence and len(sentences) >= augment.min_sentences:
        assert len(out) == 1
    else:
        assert Counter(out) == Counter(sentences)  # order augmentations only permute
    if len(sentences) < augment.min_sentences:
        assert out == sentences


@settings(max_examples=50, deadline=None)
@given(sentences=reports, augment=configs, seed=st.integers(0, 2**31))
def test_text_reproducible_under_seed(sentences: list[str], augment: TextAugment, seed: int) -> None:
    torch.manual_seed(seed)
    first = augment(sentences)  # the dataset's call: torch's global RNG
    torch.manual_seed(seed)
    assert augment(sentences) == first
    assert augment(sentences, torch.Generator().manual_seed(seed)) == augment(
        sentences, torch.Generator().manual_seed(seed)
    )


def test_text_does_not_mutate_the_input_and_handles_empty() -> None:
    sentences = [f"sentence {i}." for i in range(6)]
    kept = list(sentences)
    TextAugment(shuffle=True, swap_p=0.4)(sentences)
    assert sentences == kept
    assert TextAugment(one_sentence=True)([]) == []


def test_text_augmentation_varies_across_seeds() -> None:
    sentences = [f"sentence {i}." for i in range(8)]
    for augment in (TextAugment(shuffle=True), TextAugment(one_sentence=True), TextAugment(swap_p=0.4)):
        outputs = {tuple(augment(sentences, torch.Generator().manual_seed(s))) for s in range(30)}
        assert len(outputs) > 3, augment


def test_swap_count_is_geometric_from_zero() -> None:
    augment = TextAugment(swap_p=0.4)
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([augment.num_swaps(generator) for _ in range(4000)], dtype=torch.float64)
    # Geometric(0.4) on {0, 1, ...}: mean 0.6 / 0.4 = 1.5 (sd 1.94, so the mean of 4000 has sd 0.03)
    assert counts.mean().item() == pytest.approx(1.5, abs=0.15)
    assert (counts == 0).double().mean().item() == pytest.approx(0.4, abs=0.04)
    assert (counts == 1).double().mean().item() == pytest.approx(0.24, abs=0.04)


def test_swaps_end_to_end_on_two_sentences() -> None:
    # each swap picks two positions uniformly: half of them exchange the two sentences, so the order survives with
    # P(0 swaps) + P(>0 swaps) / 2 = 0.4 + 0.6 / 2 = 0.7
    augment = TextAugment(swap_p=0.4)
    generator = torch.Generator().manual_seed(1)
    same = sum(augment(["a.", "b."], generator) == ["a.", "b."] for _ in range(3000)) / 3000
    assert same == pytest.approx(0.7, abs=0.05)


def test_text_config_validation_and_active() -> None:
    assert not TextAugment().active
    assert TextAugment(swap_p=0.4).active and TextAugment(shuffle=True).active
    assert TextAugment(one_sentence=True).active
    with pytest.raises(ConfigError):
        TextAugment(swap_p=1.5)
    with pytest.raises(ConfigError):
        TextAugment(min_sentences=0)
