"""Slice augmentation: shapes and types kept, masks binary and aligned, deterministic given a seed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from COVIDLesionSegLib.preprocessing import PreprocessingConfig, to_network_input
from COVIDLesionSegTraining.augment import ROBUST, augment_slice
from COVIDLesionSegTraining.data import read_manifest, read_png

CONFIG = PreprocessingConfig()


@pytest.fixture(scope="module")
def real_slice(shared_data):
    """A real 256² slice of coronacases_003 with its lesion and lung masks ``[2, 256, 256]`` bool."""
    record = next(r for r in read_manifest(shared_data) if r.volume_id == "coronacases_003" and r.position == 60)
    lesion = read_png(record.lesion_mask) > 0
    return read_png(record.image), np.stack([lesion, lesion | (read_png(record.lung_mask) > 0)])


@pytest.mark.parametrize("mode", ["none", "flip", "robust"])
def test_shapes_types_and_binary_masks(real_slice, mode):
    image, masks = real_slice
    for seed in range(8):
        out_image, out_masks = augment_slice(image, masks, np.random.default_rng(seed), mode, CONFIG)
        assert out_image.shape == image.shape and out_image.dtype == np.uint8
        assert out_masks.shape == masks.shape and out_masks.dtype == bool
        assert out_image.flags.c_contiguous and out_masks.flags.c_contiguous


def test_none_returns_the_input(real_slice):
    image, masks = real_slice
    out_image, out_masks = augment_slice(image, masks, np.random.default_rng(0), "none", CONFIG)
    assert out_image is image and out_masks is masks


def test_flip_mirrors_image_and_masks_together(real_slice):
    image, masks = real_slice
    results = [augment_slice(image, masks, np.random.default_rng(seed), "flip", CONFIG) for seed in range(10)]
    flipped = [(i, m) for i, m in results if not np.array_equal(i, image)]
    assert 0 < len(flipped) < 10  # p = 0.5
    for out_image, out_masks in flipped:
        np.testing.assert_array_equal(out_image, image[:, ::-1])
        np.testing.assert_array_equal(out_masks, masks[:, :, ::-1])


@pytest.mark.parametrize("mode", ["flip", "robust"])
def test_same_seed_same_result_other_seed_other_result(real_slice, mode):
    image, masks = real_slice
    first = augment_slice(image, masks, np.random.default_rng((7, 0, 3)), mode, CONFIG)
    again = augment_slice(image, masks, np.random.default_rng((7, 0, 3)), mode, CONFIG)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    others = [augment_slice(image, masks, np.random.default_rng((8, 0, seed)), mode, CONFIG)[0] for seed in range(4)]
    assert any(not np.array_equal(first[0], other) for other in others)


def test_robust_geometry_moves_masks_with_the_image():
    """With only geometric steps on, an image drawn from the mask still matches the warped mask."""
    geometry_only = replace(
        ROBUST,
        gamma_probability=0,
        contrast_probability=0,
        noise_probability=0,
        blur_probability=0,
        sharpen_probability=0,
        reclahe_probability=0,
        affine_probability=1,
    )
    masks = np.zeros((1, 128, 128), bool)
    masks[0, 30:70, 40:100] = True
    image = np.where(masks[0], 200, 20).astype(np.uint8)
    for seed in range(10):
        out_image, out_masks = augment_slice(image, masks, np.random.default_rng(seed), "robust", CONFIG, geometry_only)
        agreement = ((out_image > 110) == out_masks[0]).mean()
        assert agreement > 0.99, (seed, agreement)
        assert out_masks.sum() > 0


def test_robust_changes_intensities_and_fields_of_view(real_slice):
    image, masks = real_slice
    outputs = [augment_slice(image, masks, np.random.default_rng(seed), "robust", CONFIG)[0] for seed in range(20)]
    assert sum(not np.array_equal(output, image) for output in outputs) >= 18
    corners = [output[:8, :8].max() == 0 and output[-8:, -8:].max() == 0 for output in outputs]
    assert any(corners)  # a zoom-out or a circular field of view blacks out the corners


def test_unknown_mode_is_refused(real_slice):
    with pytest.raises(ValueError, match="robust"):
        augment_slice(*real_slice, np.random.default_rng(0), "strong", CONFIG)


def test_lower_resolution_blurs_the_image_and_keeps_its_size(real_slice):
    from COVIDLesionSegTraining.augment import lower_resolution

    image, _ = real_slice
    coarse = lower_resolution(image, 0.6)
    assert coarse.shape == image.shape and coarse.dtype == np.uint8
    detail = lambda values: np.abs(np.diff(values.astype(np.float64), axis=1)).mean()  # noqa: E731
    assert detail(coarse) < 0.8 * detail(image)  # fine detail lost
    assert abs(float(coarse.mean()) - float(image.mean())) < 2.0  # intensities kept
    assert detail(lower_resolution(image, 0.9)) > detail(coarse)  # a milder scale loses less


def test_low_resolution_items_keep_their_targets_and_the_other_draws(shared_data):
    from COVIDLesionSegLib.preprocessing import LOW_RESOLUTION_SCALES
    from COVIDLesionSegTraining.augment import LOW_RESOLUTION_STREAM, lower_resolution
    from COVIDLesionSegTraining.data import ManifestSliceDataset

    records = [r for r in read_manifest(shared_data) if r.volume_id == "coronacases_003"][:6]
    plain = ManifestSliceDataset(records, augment="robust", seed=3)
    coarse = ManifestSliceDataset(records, augment="robust", seed=3, low_resolution=1.0)
    unaugmented = ManifestSliceDataset(records, seed=3, low_resolution=1.0)
    for index in range(len(records)):
        assert not np.array_equal(plain[index]["image"].numpy(), coarse[index]["image"].numpy())
        assert np.array_equal(plain[index]["target"].numpy(), coarse[index]["target"].numpy())  # same geometry draws
        rng = np.random.default_rng((3, 0, index, LOW_RESOLUTION_STREAM))
        rng.random()
        expected = lower_resolution(read_png(records[index].image), rng.uniform(*LOW_RESOLUTION_SCALES))
        assert np.array_equal(unaugmented[index]["image"].numpy(), to_network_input(expected[None], CONFIG)[0])
    with pytest.raises(ValueError, match="low_resolution"):
        ManifestSliceDataset(records, low_resolution=1.5)
    with pytest.raises(ValueError, match="native_targets"):
        ManifestSliceDataset(records, low_resolution=0.5, native_targets=True)


def test_low_resolution_is_a_recipe_option_of_training_and_cross_validation():
    from COVIDLesionSegTraining.config import TrainConfig
    from COVIDLesionSegTraining.crossval import build_parser as crossval_parser
    from COVIDLesionSegTraining.train import build_parser, config_from_arguments

    arguments = vars(build_parser().parse_args(["--data", "d", "--output", "o", "--low-resolution", "0.3"]))
    config = config_from_arguments({key: arguments[key] for key in ("data_dir", "output_dir", "low_resolution")})
    assert config.low_resolution == 0.3 and TrainConfig.from_dict(config.to_dict()).low_resolution == 0.3
    assert any(line.startswith("low_resolution: 30%") for line in config.differences_from_paper())
    with pytest.raises(ValueError, match="low_resolution"):
        TrainConfig(data_dir="d", output_dir="o", low_resolution=-0.1)
    cv = crossval_parser().parse_args(["--recipe", "r", "--data", "d", "--runs", "x", "--output", "y", "--low-resolution", "0.3"])
    assert cv.low_resolution == 0.3


def test_low_resolution_min_scale_reaches_coarser_renderings_and_defaults_to_the_v4_range(shared_data):
    from COVIDLesionSegLib.preprocessing import LOW_RESOLUTION_SCALES
    from COVIDLesionSegTraining.augment import LOW_RESOLUTION_STREAM, lower_resolution
    from COVIDLesionSegTraining.config import TrainConfig
    from COVIDLesionSegTraining.crossval import build_parser as crossval_parser
    from COVIDLesionSegTraining.data import ManifestSliceDataset
    from COVIDLesionSegTraining.train import build_parser, config_from_arguments

    assert TrainConfig(data_dir="d", output_dir="o").low_resolution_scales() == LOW_RESOLUTION_SCALES  # v4 and v5 checkpoints
    records = [r for r in read_manifest(shared_data) if r.volume_id == "coronacases_003"][:3]
    coarse = ManifestSliceDataset(records, seed=3, low_resolution=1.0, low_resolution_scales=(0.35, 0.35))
    for index in range(len(records)):
        expected = lower_resolution(read_png(records[index].image), 0.35)
        assert np.array_equal(coarse[index]["image"].numpy(), to_network_input(expected[None], CONFIG)[0])
    wide = ManifestSliceDataset(records * 16, seed=3, low_resolution=1.0, low_resolution_scales=(0.35, 0.9))
    scales = []
    for index in range(len(wide)):
        rng = np.random.default_rng((3, 0, index, LOW_RESOLUTION_STREAM))
        rng.random()
        scales.append(rng.uniform(*wide.low_resolution_scales))
    assert min(scales) < 0.6 <= max(scales) <= 0.9  # below the v4 range as well as in it
    with pytest.raises(ValueError, match="low_resolution_scales"):
        ManifestSliceDataset(records, low_resolution=0.3, low_resolution_scales=(0.9, 0.6))

    arguments = vars(build_parser().parse_args(["--data", "d", "--output", "o", "--low-resolution", "0.3",
                                                "--low-resolution-min-scale", "0.35"]))
    config = config_from_arguments({key: arguments[key]
                                    for key in ("data_dir", "output_dir", "low_resolution", "low_resolution_min_scale")})
    assert config.low_resolution_scales() == (0.35, 0.9) and TrainConfig.from_dict(config.to_dict()).low_resolution_min_scale == 0.35
    assert "low_resolution: 30% of training slices shown at 0.35–0.9 of their resolution" in config.differences_from_paper()
    for wrong in (0.0, 0.95):
        with pytest.raises(ValueError, match="low_resolution_min_scale"):
            TrainConfig(data_dir="d", output_dir="o", low_resolution_min_scale=wrong)
    cv = crossval_parser().parse_args(["--recipe", "r", "--data", "d", "--runs", "x", "--output", "y",
                                       "--low-resolution-min-scale", "0.35"])
    assert cv.low_resolution_min_scale == 0.35


def test_vertical_flip_turns_image_and_masks_upside_down_apart_from_the_other_draws(shared_data):
    from COVIDLesionSegTraining.config import TrainConfig
    from COVIDLesionSegTraining.crossval import build_parser as crossval_parser
    from COVIDLesionSegTraining.data import ManifestSliceDataset
    from COVIDLesionSegTraining.train import build_parser, config_from_arguments

    records = [r for r in read_manifest(shared_data) if r.volume_id == "coronacases_003"][:4]
    plain, flipped = (ManifestSliceDataset(records, augment="robust", seed=3, vertical_flip=p) for p in (0.0, 1.0))
    for index in range(len(records)):
        for key in ("image", "target"):  # the same augmentation draws, then upside down
            assert np.array_equal(flipped[index][key].numpy(), plain[index][key].numpy()[..., ::-1, :])
        assert plain[index]["target"].numpy()[0].any()  # real lesion, so the flip of the target is seen
    half = ManifestSliceDataset(records * 8, vertical_flip=0.5, seed=3)
    unflipped = ManifestSliceDataset(records * 8, seed=3)
    turned = [not np.array_equal(half[i]["image"].numpy(), unflipped[i]["image"].numpy()) for i in range(len(half))]
    assert 0 < sum(turned) < len(turned)
    with pytest.raises(ValueError, match="native_targets"):
        ManifestSliceDataset(records, vertical_flip=0.5, native_targets=True)
    with pytest.raises(ValueError, match="vertical_flip"):
        ManifestSliceDataset(records, vertical_flip=-0.5)
    arguments = vars(build_parser().parse_args(["--data", "d", "--output", "o", "--vertical-flip", "0.5"]))
    config = config_from_arguments({key: arguments[key] for key in ("data_dir", "output_dir", "vertical_flip")})
    assert config.vertical_flip == 0.5 and any(line.startswith("vertical_flip: 50%") for line in config.differences_from_paper())
    with pytest.raises(ValueError, match="vertical_flip"):
        TrainConfig(data_dir="d", output_dir="o", vertical_flip=1.5)
    cv = crossval_parser().parse_args(["--recipe", "r", "--data", "d", "--runs", "x", "--output", "y", "--vertical-flip", "0.5"])
    assert cv.vertical_flip == 0.5


def test_heavy_disease_repeat_shows_heavy_slices_more_often_each_with_its_own_draws(shared_data):
    from COVIDLesionSegTraining.config import TrainConfig
    from COVIDLesionSegTraining.crossval import build_parser as crossval_parser
    from COVIDLesionSegTraining.data import (
        HEAVY_DISEASE_SHARE,
        ManifestSliceDataset,
        lesion_share_of_lung,
        with_heavy_disease_repeated,
    )
    from COVIDLesionSegTraining.train import build_parser, config_from_arguments

    # radiopaedia_40 (61 % opacity) has heavy slices, radiopaedia_36 (a few small lesions) none
    records = [r for r in read_manifest(shared_data) if r.volume_id in ("radiopaedia_40_86625_0", "radiopaedia_36_86526_0")]
    shares = {record: lesion_share_of_lung(record) for record in records}
    heavy = {record for record, share in shares.items() if share >= HEAVY_DISEASE_SHARE}
    assert 0 < len(heavy) < len(records) and all(r.volume_id == "radiopaedia_40_86625_0" for r in heavy)
    assert with_heavy_disease_repeated(records, 1) == records
    repeated = with_heavy_disease_repeated(records, 3)
    assert repeated[: len(records)] == records
    assert all(repeated.count(record) == (3 if record in heavy else 1) for record in records)
    with pytest.raises(ValueError, match="at least 1"):
        with_heavy_disease_repeated(records, 0)

    # the copies of a slice are drawn apart; the body box of each volume is the one of its distinct slices
    once, thrice = (ManifestSliceDataset(r, augment="robust", seed=3, orientation="radiological") for r in (records, repeated))
    assert thrice.boxes == once.boxes
    copies = [index for index, record in enumerate(repeated) if record == repeated[len(records)]]
    assert len(copies) == 3 and not np.array_equal(thrice[copies[0]]["image"].numpy(), thrice[copies[1]]["image"].numpy())

    arguments = vars(build_parser().parse_args(["--data", "d", "--output", "o", "--heavy-disease-repeat", "3"]))
    config = config_from_arguments({key: arguments[key] for key in ("data_dir", "output_dir", "heavy_disease_repeat")})
    assert config.heavy_disease_repeat == 3
    assert any(line.startswith("heavy_disease_repeat: lesion slices with ≥ 25%") for line in config.differences_from_paper())
    assert TrainConfig(data_dir="d", output_dir="o").heavy_disease_repeat == 1  # checkpoints saved before the field keep their meaning
    for wrong in (0, 1.5):
        with pytest.raises(ValueError, match="heavy_disease_repeat"):
            TrainConfig(data_dir="d", output_dir="o", heavy_disease_repeat=wrong)
    cv = crossval_parser().parse_args(["--recipe", "r", "--data", "d", "--runs", "x", "--output", "y", "--heavy-disease-repeat", "3"])
    assert cv.heavy_disease_repeat == 3
