"""Model v2's core pieces: the body field-of-view crop, the classical lung mask and the inference guard rails."""

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from COVIDLesionSegLib import preprocessing
from COVIDLesionSegLib.backends import TorchBackend
from COVIDLesionSegLib.classical_lung import classical_lung_mask
from COVIDLesionSegLib.predictor import (
    CONTRAST_RING_MM,
    NO_GUARD_RAILS,
    GuardRails,
    Predictor,
    apply_guard_rails,
    coarsest_trained_share,
    components_at_least,
    contrasted_enough,
    smoothed_plane,
)
from COVIDLesionSegLib.preprocessing import (
    BODY_BOX_MAX_SLICES,
    LOW_RESOLUTION_SCALES,
    CropBox,
    PreprocessingConfig,
    body_crop_box,
    crop_slice,
    network_grid_share,
    prepare_volume,
    resize_mask,
    uncrop_probabilities,
)
from COVIDLesionSegLib.statistics import VoxelGrid

BODY = PreprocessingConfig(field_of_view="body")
OFF = NO_GUARD_RAILS
REPOSITORY = Path(__file__).resolve().parents[2]


def test_default_guard_rails_are_the_ones_recommended_on_the_fold_models():
    results = json.loads((REPOSITORY / "Training" / "results" / "guard-rails-v5-5folds" / "guard_rails.json").read_text(encoding="utf-8"))
    recommended = results["pooled"][results["recommended"]]["guard_rails"]
    assert GuardRails(**recommended) == GuardRails()


def ellipse(shape, centre, radii) -> np.ndarray:
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((columns - centre[1]) / radii[1]) ** 2 <= 1


def chest_phantom(size: int = 200, depth: int = 12, body_fraction: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """HU ``[z, y, x]``: an elliptic body (40 HU) of width ``body_fraction`` of the slice, two lungs (−850 HU with
    vessels of 40 HU), a trachea (−1000 HU) in the top four slices, bowel gas (−1000 HU) in the bottom three,
    a table below the body, −3024 outside a circular field of view. Returns (hu, true lungs)."""
    shape = (size, size)
    half_width = body_fraction * size / 2
    centre = (size / 2, size / 2)
    body = ellipse(shape, centre, (0.7 * half_width, half_width))
    hu = np.full((depth, size, size), -1000.0, dtype=np.float32)
    lungs = np.zeros((depth, size, size), dtype=bool)
    for z in range(depth):
        plane = hu[z]
        plane[body] = 40
        plane[round(size / 2 + 0.75 * half_width) : round(size / 2 + 0.75 * half_width) + 3, 5:-5] = 200  # table
        if z >= 3:
            for side in (-1, 1):
                lung = ellipse(shape, (size / 2, size / 2 + side * 0.48 * half_width), (0.45 * half_width, 0.3 * half_width))
                plane[lung] = -850
                lungs[z] |= lung
            vessels = ellipse(shape, (size / 2, size / 2 + 0.48 * half_width), (2, 2))
            plane[vessels] = 40
        else:
            plane[ellipse(shape, (size / 2 + 0.2 * half_width, size / 2), (0.15 * half_width, 0.2 * half_width))] = -1000  # gas
        if z >= depth - 4:
            plane[ellipse(shape, (size / 2 - 0.3 * half_width, size / 2), (4, 4))] = -1000  # trachea
        plane[~ellipse(shape, centre, (0.49 * size, 0.49 * size))] = -3024
    return hu, lungs


def test_body_box_is_square_holds_the_body_with_a_margin_and_ignores_the_table():
    hu, _ = chest_phantom()
    box = body_crop_box(hu, BODY)
    body_width = 0.6 * 200  # the table is wider than the body but must not widen the box
    assert box.side == pytest.approx(body_width * (1 + 2 * BODY.body_margin), abs=4)
    assert box.left == pytest.approx(100 - box.side / 2, abs=2) and box.top == pytest.approx(100 - box.side / 2, abs=2)
    assert body_crop_box(hu, PreprocessingConfig()) is None  # "full": v1 checkpoints
    assert body_crop_box(np.zeros((2, 40, 40)), BODY) is None  # no body: whole slice


@pytest.mark.parametrize("size", [512, 515, 1024])
def test_a_large_slice_is_boxed_shrunk_to_within_the_shrink_factor_of_its_full_resolution_box(size, monkeypatch):
    """512² and larger slices are judged shrunk by a whole factor (2 for 512–767, 4 for 1024; a remainder is left out)."""
    hu, _ = chest_phantom(size=size, depth=3)
    shrunk = body_crop_box(hu, BODY)
    monkeypatch.setattr(preprocessing, "BODY_BOX_JUDGED_SIDE", size)  # judged at full resolution, as before
    full = body_crop_box(hu, BODY)
    factor = size // 256
    assert abs(shrunk.top - full.top) <= factor and abs(shrunk.left - full.left) <= factor and abs(shrunk.side - full.side) <= 2 * factor
    assert shrunk.side == pytest.approx(0.6 * size * (1 + 2 * BODY.body_margin), rel=0.03)


@pytest.mark.parametrize("depth, wide_slice, counted", [(200, 1, True), (401, 1, False), (401, 400, True), (401, 0, True)])
def test_a_thin_section_volume_is_boxed_from_evenly_spaced_slices_the_first_and_last_among_them(depth, wide_slice, counted):
    """Up to BODY_BOX_MAX_SLICES slices all count; beyond, that many evenly spaced ones do (401 slices: every other)."""
    assert BODY_BOX_MAX_SLICES == 200
    hu = np.full((depth, 60, 60), -1000, np.int16)
    hu[:] = np.where(ellipse((60, 60), (30, 30), (10, 10)), 40, -1000)
    hu[wide_slice] = np.where(ellipse((60, 60), (30, 30), (10, 25)), 40, -1000)
    narrow, wide = body_crop_box(hu[100:101], BODY), body_crop_box(hu[wide_slice : wide_slice + 1], BODY)
    assert narrow != wide
    assert body_crop_box(hu, BODY) == (wide if counted else narrow)


def test_body_crop_shows_a_wide_and_a_narrow_field_of_view_at_the_same_scale():
    lung_share = {}
    for body_fraction in (0.45, 0.8):
        hu, lungs = chest_phantom(body_fraction=body_fraction)
        for config in (BODY, PreprocessingConfig()):
            _, box = prepare_volume(hu, config)
            lung_share[body_fraction, config.field_of_view] = resize_mask(crop_slice(lungs[6], box), config).mean()
    assert lung_share[0.45, "body"] == pytest.approx(lung_share[0.8, "body"], rel=0.1)  # the same once cropped…
    assert lung_share[0.8, "full"] > 2.5 * lung_share[0.45, "full"]  # …though 3× apart in area as reconstructed


def test_uncrop_puts_the_output_back_where_the_crop_took_it():
    image = np.zeros((60, 80), np.float32)
    image[10:20, 30:50] = 1
    for box in (CropBox(top=5, left=25, side=30), CropBox(top=-10, left=-5, side=100)):  # inside, and beyond the edges
        cropped = crop_slice(image, box, fill=0)
        assert cropped.shape == (box.side, box.side)
        back = uncrop_probabilities(cropped[None], box, 60, 80)[0]
        np.testing.assert_allclose(back, image, atol=1e-6)
    np.testing.assert_array_equal(crop_slice(image, None), image)


def test_field_of_view_is_a_checked_recipe_field_and_v1_metadata_means_full():
    v1_fields = {key: value for key, value in PreprocessingConfig().to_dict().items() if key not in ("field_of_view", "body_margin")}
    assert PreprocessingConfig.from_dict(v1_fields).field_of_view == "full"
    assert PreprocessingConfig.from_dict(BODY.to_dict()) == BODY
    with pytest.raises(ValueError, match="field_of_view"):
        PreprocessingConfig(field_of_view="lungs")


def test_classical_lung_mask_finds_the_lungs_without_trachea_gas_or_outside_air():
    hu, truth = chest_phantom()
    lung = classical_lung_mask(hu, (1.5, 1.5, 5.0))
    dice = 2 * (lung & truth).sum() / (lung.sum() + truth.sum())
    assert dice > 0.97  # vessels (holes) filled
    assert not lung[:3].any()  # bowel gas: pure air, rejected
    trachea = np.zeros_like(truth)
    trachea[-4:] = ellipse(truth.shape[1:], (100 - 0.3 * 60, 100), (4, 4))
    assert not (lung & trachea).any()


def test_guard_rails_drop_small_lesions_and_lesions_outside_a_plausible_lung():
    grid = VoxelGrid((1.0, 1.0, 1.0))  # 1 mm³ voxels: 1,000 voxels = 1 mL
    lung = np.zeros((20, 40, 40), np.uint8)
    lung[:, 5:35, 5:20] = 1  # 9 mL
    lung[2:4, 30:34, 30:34] = 1  # 0.032 mL of "lung" elsewhere
    lesion = np.zeros_like(lung)
    lesion[5:15, 10:20, 10:15] = 1  # 0.5 mL inside the lung
    lesion[10, 10:12, 16:18] = 1  # 4 voxels: a speck
    lesion[2:4, 31:33, 31:33] = 1  # inside the stray lung
    masks = {"lesion": lesion & lung, "lung": lung}
    np.testing.assert_array_equal(apply_guard_rails(masks, OFF, grid, None)["lesion"], masks["lesion"])
    cleaned = apply_guard_rails(masks, GuardRails(lung_min_ml=1.0, lesion_min_ml=0.01), grid, None)
    expected = np.zeros_like(lesion)
    expected[5:15, 10:20, 10:15] = 1
    np.testing.assert_array_equal(cleaned["lesion"], expected)
    assert not cleaned["lung"][2:4, 30:34, 30:34].any()
    assert components_at_least(lesion, 0.001, 0.0).sum() == lesion.sum()
    with pytest.raises(ValueError, match="lesion_min_ml"):
        GuardRails(lesion_min_ml=float("nan"))


def test_hu_lung_prior_keeps_lesion_only_near_the_classical_lung():
    hu, truth = chest_phantom()
    grid = VoxelGrid((1.5, 1.5, 5.0))
    lesion = np.zeros(hu.shape, np.uint8)
    lesion[6, 95:105, 125:135] = 1  # in the right-hand lung
    lesion[6, 10:20, 95:105] = 1  # outside the body
    masks = {"lesion": lesion, "lung": np.ones_like(lesion)}
    kept = apply_guard_rails(masks, replace(OFF, hu_lung_prior=True), grid, hu)["lesion"]
    assert kept[6, 95:105, 125:135].all() and not kept[6, 10:20, 95:105].any()
    assert apply_guard_rails(masks, replace(OFF, hu_lung_prior=True), grid, None)["lesion"].sum() == lesion.sum()  # not HU: no prior


def test_lesion_min_hu_keeps_ground_glass_and_drops_lesion_painted_on_aerated_lung():
    rng = np.random.default_rng(0)
    hu = rng.normal(-860.0, 60.0, (4, 64, 64)).astype(np.float32)  # aerated lung with a sharp kernel's noise
    hu[1:3, 10:30, 10:30] += 250.0  # ground glass, about -610 HU
    lesion = np.zeros(hu.shape, np.uint8)
    lesion[1:3, 10:30, 10:30] = 1  # the real lesion
    lesion[1:3, 40:60, 40:60] = 1  # painted on aerated lung
    grid = VoxelGrid((0.7, 0.7, 5.0))
    masks = {"lesion": lesion, "lung": np.ones_like(lesion)}
    kept = apply_guard_rails(masks, GuardRails(lesion_min_hu=-750.0, lesion_min_ml=0.0), grid, hu)["lesion"]
    assert kept[1:3, 12:28, 12:28].all()  # the noise (σ 60 HU) punches no holes: the CT is smoothed first
    assert not kept[:, 40:60, 40:60].any()
    assert apply_guard_rails(masks, GuardRails(lesion_min_hu=-750.0), grid, None)["lesion"].sum() == lesion.sum()  # not HU: off
    np.testing.assert_array_equal(apply_guard_rails(masks, OFF, grid, hu)["lesion"], lesion)
    with pytest.raises(ValueError, match="lesion_min_hu"):
        GuardRails(lesion_min_hu=200.0)


def test_lesion_min_contrast_hu_drops_lesion_on_dependent_density_and_keeps_ground_glass():
    rng = np.random.default_rng(1)
    rows = np.arange(80, dtype=np.float32)[None, :, None]
    hu = (-880.0 + 3.0 * rows + rng.normal(0.0, 40.0, (40, 80, 80))).astype(np.float32)  # denser towards the back (rows), smoothly
    lung = np.zeros(hu.shape, np.uint8)
    lung[:, 2:78, 2:78] = 1
    lesion = np.zeros(hu.shape, np.uint8)
    lesion[28:36, 62:74, 10:30] = 1  # painted on the dependent lung: no denser than the lung beside it; across a chunk face (z 32)
    hu[5:12, 10:25, 45:60] += 250.0  # ground glass near the front, far denser than the lung around it
    lesion[5:12, 10:25, 45:60] = 1
    full = np.zeros(hu.shape, np.uint8)
    full[20:24, 2:78, 2:78] = 1  # a lesion filling its lung: no ring to compare with, kept
    grid = VoxelGrid((1.0, 1.0, 5.0))
    masks = {"lesion": lesion | full, "lung": lung}
    kept = apply_guard_rails(masks, replace(OFF, lesion_min_contrast_hu=100.0), grid, hu)["lesion"]
    np.testing.assert_array_equal(kept[5:12], (lesion | full)[5:12])
    np.testing.assert_array_equal(kept[20:24], full[20:24])
    assert not kept[28:36].any()
    not_hu = apply_guard_rails(masks, replace(OFF, lesion_min_contrast_hu=100.0), grid, None)["lesion"]
    assert not_hu.sum() == masks["lesion"].sum()  # not HU: off
    with pytest.raises(ValueError, match="lesion_min_contrast_hu"):
        GuardRails(lesion_min_contrast_hu=-50.0)


def test_contrasted_enough_measures_each_component_against_its_own_ring():
    """Components far apart (rings apart), against a brute-force contrast of each one, on an anisotropic grid whose
    components touch the image border and cross the labelling chunks' faces."""
    rng = np.random.default_rng(2)
    shape = (70, 90, 120)
    hu = rng.normal(-800.0, 120.0, shape).astype(np.float32)
    lung = (rng.random(shape) < 0.9).astype(np.uint8)
    spacing = (0.8, 1.6, 2.5)  # x, y, z mm: the ring is 12.5 columns by 6.25 rows
    lesion = np.zeros(shape, np.uint8)
    boxes = [(slice(0, 5), slice(0, 10), slice(0, 15)), (slice(28, 40), slice(40, 50), slice(50, 70)),
             (slice(60, 70), slice(80, 90), slice(100, 120)), (slice(10, 20), slice(70, 85), slice(10, 30))]
    for number, box in enumerate(boxes):
        lesion[box] = rng.random(lesion[box].shape) < 0.97
        hu[box] += 60.0 * number  # contrasts of about 0, 60, 120 and 180 HU
    smoothed = np.stack([smoothed_plane(plane, spacing) for plane in hu])
    radius_x, radius_y = round(CONTRAST_RING_MM / spacing[0]), round(CONTRAST_RING_MM / spacing[1])
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_x + 1, 2 * radius_y + 1))  # the ring's definition
    expected = np.zeros(shape, np.uint8)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(lesion), True))
    contrasts = []
    for number in range(1, labels.max() + 1):
        component = (labels == number).astype(np.uint8)
        grown = np.stack([cv2.dilate(plane, kernel) for plane in component]) > 0
        ring = grown & (lung > 0) & (lesion == 0)
        contrast = smoothed[component > 0].mean() - smoothed[ring].mean()
        contrasts.append(contrast)
        if contrast >= 90.0:
            expected |= component
    assert min(contrasts) < 90.0 < max(contrasts)  # some dropped, some kept
    np.testing.assert_array_equal(contrasted_enough(lesion, lung, hu, spacing, 90.0), expected)


class MirrorSensitiveNetwork(torch.nn.Module):
    """Lesion logit +10 on the image's left half, −10 on its right half; lung everywhere."""

    def forward(self, batch):
        width = batch.shape[-1]
        lesion = torch.full_like(batch[:, :1], -10.0)
        lesion[..., : width // 2] = 10.0
        return torch.cat([lesion, torch.full_like(lesion, 5.0)], dim=1)


def test_flip_tta_averages_a_slice_with_its_mirror(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", guard_rails=GuardRails(flip_tta=True))
    predictor.backend = TorchBackend(MirrorSensitiveNetwork(), "cpu")
    probabilities = predictor.predict_probabilities(np.random.default_rng(0).normal(0, 1, (1, 64, 64)))
    np.testing.assert_allclose(probabilities["lesion"], 0.5, atol=1e-6)  # +10 and −10 averaged
    plain = replace(predictor.guard_rails, flip_tta=False)
    predictor.guard_rails = plain
    assert predictor.predict_probabilities(np.zeros((1, 64, 64)))["lesion"][0, :, :20].min() > 0.99


class ColumnRampNetwork(torch.nn.Module):
    """Lesion logit rising from −4 to +4 across the image's columns; lung everywhere."""

    def forward(self, batch):
        ramp = torch.linspace(-4.0, 4.0, batch.shape[-1]).expand_as(batch[:, :1])
        return torch.cat([ramp, torch.full_like(ramp, 5.0)], dim=1)


def test_lesion_threshold_marks_lesion_where_the_probability_reaches_it(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", guard_rails=OFF)
    predictor.backend = TorchBackend(ColumnRampNetwork(), "cpu")
    volume = np.random.default_rng(2).normal(0, 50, (3, 40, 40)).astype(np.int16)
    probability = predictor.predict_probabilities(volume)["lesion"]
    grid = VoxelGrid((1.0, 1.0, 1.0))
    lesions = {}
    for threshold in (0.5, 0.8):
        predictor.guard_rails = replace(OFF, lesion_threshold=threshold)
        lesions[threshold] = predictor.predict_masks(volume, grid=grid)["lesion"]
        np.testing.assert_array_equal(lesions[threshold], probability >= threshold)
        image = sitk.GetImageFromArray(volume)
        result = predictor.segment_image(image, return_probabilities=True)  # the streamed path, with the map
        np.testing.assert_array_equal(sitk.GetArrayFromImage(result.masks["lesion"]), probability >= threshold)
    assert 0 < lesions[0.8].sum() < lesions[0.5].sum() < volume.size
    assert OFF.lesion_threshold == 0.5  # off: the network's own decision
    for wrong in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="lesion_threshold"):
            GuardRails(lesion_threshold=wrong)


def test_segment_image_applies_guard_rails_with_the_image_spacing(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", guard_rails=GuardRails(lesion_min_ml=1e6))
    predictor.backend = TorchBackend(MirrorSensitiveNetwork(), "cpu")
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(0, 50, (3, 32, 32)).astype(np.int16))
    result = predictor.segment_image(image)
    assert result.statistics.lesion_ml == 0  # every lesion component is below 10⁶ mL
    predictor.guard_rails = OFF
    assert predictor.segment_image(image).statistics.lesion_ml > 0


@pytest.mark.parametrize("size", [128, 512])
def test_network_grid_share_is_the_body_box_side_over_the_network_size(size):
    hu, _ = chest_phantom(size=size, depth=4)
    side, share = network_grid_share(hu, BODY)
    assert side == body_crop_box(hu, BODY).side and share == side / 256
    assert side == pytest.approx(0.6 * size * (1 + 2 * BODY.body_margin), rel=0.03)
    assert network_grid_share(hu, PreprocessingConfig()) == (size, size / 256)  # "full" (v1): the whole slice
    assert network_grid_share(hu[:, :, : size // 2], PreprocessingConfig()) == (size, size / 256)  # its longer side
    assert network_grid_share(np.zeros((2, 40, 30)), BODY) == (40, 40 / 256)  # no body: the whole slice


def test_coarsest_trained_share_is_the_recipes_smallest_low_resolution_scale():
    assert coarsest_trained_share({}) == 1.0  # v1-v3: the training slices as they are
    assert coarsest_trained_share({"low_resolution": 0.3}) == LOW_RESOLUTION_SCALES[0]  # v4, v5: the scale's default then
    assert coarsest_trained_share({"low_resolution": 0.3, "low_resolution_min_scale": 0.4}) == 0.4
    assert coarsest_trained_share({"low_resolution": 0.0, "low_resolution_min_scale": 0.4}) == 1.0


def test_segment_image_warns_on_a_volume_coarser_in_plane_than_any_training_slice(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    predictor.preprocessing = BODY
    predictor.checkpoint = replace(predictor.checkpoint, train_config={"low_resolution": 0.3})
    coarse, fine = (sitk.GetImageFromArray(chest_phantom(size=size, depth=2)[0].astype(np.int16)) for size in (200, 280))
    (warning,) = predictor.segment_image(coarse).warnings  # a 0.6 × 200 px body: a 132-pixel box, 0.52 of 256
    side, share = network_grid_share(sitk.GetArrayViewFromImage(coarse), BODY)
    assert share < 0.6 < network_grid_share(sitk.GetArrayViewFromImage(fine), BODY)[1]
    assert warning.startswith(f"coarse in plane: the {side} pixels across what the network sees fill its 256² grid at {share:.2f}")
    assert "coarser than any slice this model trained on (0.6)" in warning and warning.endswith("check each lesion by eye")
    assert predictor.segment_image(fine).warnings == []
