"""Streaming inference gives bit for bit what preparing and predicting the whole volume at once gives.

The reference here is the whole-volume path the predictor had before it streamed: ``preprocessing.prepare_volume``
on every slice, one ``predict_in_batches`` over all of them, float32 probabilities of the whole volume, then
``masks_from_probabilities``; the 3D component filter on full 32-bit labels with ``np.isin``; the left/right rule on
relabelled pieces of the whole grid. Real volumes (the shipped sample with the shipped model, slicerio's CTChest4
in HU) and a synthetic odd-sized oblique volume with every guard rail on (tiny network) go through both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from COVIDLesionSegLib import components as components_module
from COVIDLesionSegLib import io
from COVIDLesionSegLib import predictor as predictor_module
from COVIDLesionSegLib.backends import TorchBackend
from COVIDLesionSegLib.components import ChunkedComponents
from COVIDLesionSegLib.predictor import GuardRails, Predictor, masks_from_probabilities, predict_in_batches
from COVIDLesionSegLib.preprocessing import prepare_volume, to_network_input, uncrop_probabilities
from COVIDLesionSegLib.resources import resources_dir
from COVIDLesionSegLib.statistics import MIN_SECOND_LUNG_FRACTION, SideRule, VoxelGrid, lesion_statistics, right_side

SAMPLE = resources_dir() / "Samples" / "radiopaedia_27_86410_0.nii.gz"
EVERY_GUARD_RAIL = GuardRails(lung_min_ml=0.05, lesion_min_ml=0.01, flip_tta=True, hu_lung_prior=True)


def whole_volume_probabilities(predictor: Predictor, volume: np.ndarray, preprocessed: bool = False) -> dict[str, np.ndarray]:
    slices, box = prepare_volume(volume, predictor.preprocessing, preprocessed)
    probabilities = np.zeros((len(predictor.channels), *volume.shape), dtype=np.float32)

    def store(start, batch):
        for offset, slice_probabilities in enumerate(batch):
            probabilities[:, start + offset] = uncrop_probabilities(slice_probabilities, box, *volume.shape[1:])

    network = single = predictor.backend.network
    if predictor.guard_rails.flip_tta:
        network = lambda batch: (single(batch) + torch.flip(single(torch.flip(batch, (3,))), (3,))) / 2  # noqa: E731
    predict_in_batches(network, to_network_input(slices, predictor.preprocessing), predictor.batch_size, store)
    return dict(zip(predictor.channels, probabilities))  # noqa: B905 (no strict= on Python 3.9, which the oldest-deps run uses)


def whole_volume_components_at_least(mask, voxel_ml, min_ml):
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    sizes = np.bincount(labels.ravel())
    keep = np.flatnonzero(sizes * voxel_ml >= min_ml)
    return np.isin(labels, keep[keep > 0]).astype(np.uint8)


def whole_volume_right_side(lung, grid):
    pieces = sitk.RelabelComponent(sitk.ConnectedComponent(grid.image_of(lung.astype(np.uint8)), False))
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(pieces)
    two_lungs = len(shapes.GetLabels()) >= 2 and shapes.GetNumberOfPixels(2) >= MIN_SECOND_LUNG_FRACTION * shapes.GetNumberOfPixels(1)
    if two_lungs:
        centroid_x = {label: shapes.GetCentroid(label)[0] for label in (1, 2)}
        midline = (centroid_x[1] + centroid_x[2]) / 2
    else:
        whole = sitk.LabelShapeStatisticsImageFilter()
        whole.Execute(pieces > 0)
        midline = whole.GetCentroid(1)[0]
    right = np.stack([grid.x_mm_of_slice(lung.shape[1:], z) < midline for z in range(lung.shape[0])])
    if two_lungs:
        labels = sitk.GetArrayViewFromImage(pieces)
        right_label = min(centroid_x, key=centroid_x.get)
        right[labels == right_label] = True
        right[labels == 3 - right_label] = False
    return right


def whole_volume_segmentation(predictor: Predictor, image: sitk.Image, monkeypatch) -> tuple[dict, object]:
    """Masks (on the input grid) and statistics the whole-volume way."""
    oriented = sitk.DICOMOrient(image, "LPS")
    ct = sitk.GetArrayFromImage(oriented)
    grid = VoxelGrid.of_image(oriented)
    masks = masks_from_probabilities(whole_volume_probabilities(predictor, ct), predictor.guard_rails.lesion_threshold)
    with monkeypatch.context() as patch:
        patch.setattr(predictor_module, "components_at_least", whole_volume_components_at_least)
        masks = predictor.guarded(masks, ct, grid)
    lung = masks.get("lung")
    right = whole_volume_right_side(lung > 0, grid) if lung is not None and lung.any() else None
    statistics = lesion_statistics(masks["lesion"], grid, masks.get("lung"), ct if ct.min() < -500 else None)
    if right is not None:  # the sides of the whole-volume rule, counted directly
        lesion = masks["lesion"] > 0
        assert statistics.right_lesion_ml == pytest.approx(np.count_nonzero(lesion & right) * grid.voxel_ml, abs=0)
        assert statistics.right_lung_ml == pytest.approx(np.count_nonzero((lung > 0) & right) * grid.voxel_ml, abs=0)
    restored = {}
    for channel, mask in masks.items():
        image_mask = sitk.GetImageFromArray(mask)
        image_mask.CopyInformation(oriented)
        back = sitk.DICOMOrient(image_mask, io.orientation_code(image))
        back.CopyInformation(image)
        restored[channel] = sitk.GetArrayFromImage(back)
    return restored, statistics


def assert_same_segmentation(predictor: Predictor, image: sitk.Image, monkeypatch) -> None:
    expected_masks, expected_statistics = whole_volume_segmentation(predictor, image, monkeypatch)
    result = predictor.segment_image(image)
    assert list(result.masks) == list(expected_masks)
    for channel, mask in result.masks.items():
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mask), expected_masks[channel], err_msg=channel)
        assert mask.GetOrigin() == image.GetOrigin() and mask.GetDirection() == image.GetDirection()
    assert result.statistics == expected_statistics
    assert expected_masks["lesion"].any() and expected_masks["lung"].any()


@pytest.fixture(scope="module")
def shipped():
    return Predictor.default(device="cpu", batch_size=4)  # 4 slices a batch: several chunks on a short volume


def test_shipped_sample_streams_to_the_whole_volume_result(shipped, monkeypatch):
    assert_same_segmentation(shipped, io.read_image(SAMPLE), monkeypatch)


def test_real_hu_chest_streams_to_the_whole_volume_result(shipped, monkeypatch):
    data_helper = pytest.importorskip("slicerio.data_helper")
    image = io.read_image(Path(data_helper.get_testdata_file("CTChest4.nrrd")))[:, :, 10:22]  # 12 of its 34 slices (time)
    assert_same_segmentation(shipped, image, monkeypatch)


def odd_oblique_ct() -> sitk.Image:
    """37 slices of 203 × 187, HU, stored head first and tilted 10° (DICOMOrient has to permute and flip)."""
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:37, :187, :203]
    volume = np.full(z.shape, -1000.0)
    volume[((x - 101) / 85) ** 2 + ((y - 93) / 70) ** 2 < 1] = 30
    for centre in (60, 142):
        volume[((x - centre) / 32) ** 2 + ((y - 93) / 48) ** 2 + ((z - 18) / 22) ** 2 < 1] = -850
    volume[((x - 60) / 8) ** 2 + ((y - 80) / 8) ** 2 + ((z - 15) / 5) ** 2 < 1] = -350
    image = sitk.GetImageFromArray((volume + rng.normal(0, 25, volume.shape)).astype(np.int16))
    angle = np.deg2rad(10)
    image.SetDirection((-1, 0, 0, 0, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle)))
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((12.5, -40.0, 300.0))
    return image


class BrightIsLesion(torch.nn.Module):
    """A stand-in network: lesion logit grows with the input's brightness, lung logit constant (lung everywhere)."""

    def forward(self, batch):
        return torch.cat([(batch[:, :1] - 0.5) * 10, torch.full_like(batch[:, :1], 5.0)], dim=1)


def test_odd_oblique_volume_with_every_guard_rail(tiny_checkpoint, monkeypatch):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=3, guard_rails=EVERY_GUARD_RAIL)
    predictor.preprocessing = predictor.preprocessing.__class__(**{**predictor.preprocessing.to_dict(), "field_of_view": "body"})
    predictor.backend = TorchBackend(BrightIsLesion(), "cpu")
    assert_same_segmentation(predictor, odd_oblique_ct(), monkeypatch)


def test_probabilities_and_preprocessed_slices_stream_unchanged(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=2)
    volume = sitk.GetArrayFromImage(odd_oblique_ct())[:11]
    expected = whole_volume_probabilities(predictor, volume)
    streamed = predictor.predict_probabilities(volume)
    for channel in expected:
        np.testing.assert_array_equal(streamed[channel], expected[channel])
    slices = np.random.default_rng(0).integers(0, 256, (5, 64, 48)).astype(np.uint8)
    np.testing.assert_array_equal(predictor.predict_masks(slices, preprocessed=True)["lesion"],
                                  masks_from_probabilities(whole_volume_probabilities(predictor, slices, True))["lesion"])


def test_uint8_probability_is_what_the_float_map_is_written_as(tiny_checkpoint, tmp_path):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=4)
    predictor.backend = TorchBackend(BrightIsLesion(), "cpu")
    image = odd_oblique_ct()
    as_float = predictor.segment_image(image, return_probabilities=True)
    as_uint8 = predictor.segment_image(image, return_probabilities=True, probability_dtype="uint8")
    assert as_uint8.lesion_probability.GetPixelID() == sitk.sitkUInt8
    written = [sitk.GetArrayFromImage(sitk.ReadImage(str(io.write_probability_map(tmp_path / f"{name}.nrrd", result.lesion_probability))))
               for name, result in (("float", as_float), ("uint8", as_uint8))]
    np.testing.assert_array_equal(written[0], written[1])
    assert written[0].any() and (written[0] < 255).any()


def test_component_filter_and_side_rule_match_the_whole_grid_versions():
    rng = np.random.default_rng(1)
    mask = (rng.random((23, 31, 29)) > 0.8).astype(np.uint8)
    mask[:3] = 0
    mask[:, :, -4:] = 0
    for min_ml in (0.0005, 0.002, 0.01):
        np.testing.assert_array_equal(predictor_module.components_at_least(mask, 0.001, min_ml),
                                      whole_volume_components_at_least(mask, 0.001, min_ml))
    assert not predictor_module.components_at_least(np.zeros((3, 4, 5), np.uint8), 1.0, 0.5).any()
    lung = np.zeros((9, 20, 30), bool)
    lung[2:7, 4:12, 3:9] = True  # two equal pieces (a tie for the largest) and a stray third
    lung[2:7, 4:12, 18:24] = True
    lung[4, 15, 13] = True
    for direction in ((1, 0, 0, 0, 1, 0, 0, 0, 1), (1, 0, 0.1, 0, 1, 0, -0.1, 0, 1)):
        grid = VoxelGrid((0.7, 0.8, 2.0), (-10.0, 5.0, 3.0), direction)
        np.testing.assert_array_equal(right_side(lung, grid), whole_volume_right_side(lung, grid))
        one_piece = lung.copy()
        one_piece[4, 8, 9:18] = True
        np.testing.assert_array_equal(right_side(one_piece, grid), whole_volume_right_side(one_piece, grid))


@pytest.mark.parametrize("fully_connected", [True, False])
def test_chunked_components_are_the_whole_grid_components(fully_connected):
    """Labelled a chunk of slices at a time and joined across the chunks' faces, the components are sitk's on the whole
    grid: the same voxel sets, ranked in the same order (size, ties to the one a raster scan reaches first), with exact
    voxel counts and centroids."""
    rng = np.random.default_rng(5)
    mask = rng.random((13, 17, 19)) > 0.72
    mask[:2] = False  # an empty margin: the bounding box is not the grid
    mask[:, :, -3:] = False
    whole = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), fully_connected))
    labels = sitk.GetArrayFromImage(whole)
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(whole)
    for chunk_slices in (1, 2, 5, 32):
        components = ChunkedComponents(mask, fully_connected, chunk_slices)
        roots = np.full(mask.shape, -1)
        _, rows, columns = components.box
        for start, chunk in components.component_values(np.arange(1, len(components.sums) + 1)):  # root + 1; 0 outside
            roots[start : start + len(chunk), rows, columns] = chunk - 1
        sums = components.sums
        ranked = sorted(components.roots, key=lambda root: (-sums[root, 0], root))
        assert len(ranked) == labels.max()
        for label, root in enumerate(ranked, 1):
            np.testing.assert_array_equal(roots == root, labels == label, err_msg=f"chunks of {chunk_slices}, label {label}")
            assert sums[root, 0] == shapes.GetNumberOfPixels(label)
            assert tuple(sums[root, 1:] / sums[root, 0]) == pytest.approx(shapes.GetCentroid(label), abs=1e-12)
    with pytest.raises(ValueError, match="empty"):
        ChunkedComponents(np.zeros((2, 3, 4), bool), True)


def test_component_filter_in_chunks_matches_the_whole_grid(monkeypatch):
    rng = np.random.default_rng(2)
    mask = (rng.random((15, 21, 18)) > 0.75).astype(np.uint8)
    monkeypatch.setattr(components_module, "CHUNK_SLICES", 2)
    for min_ml in (0.0005, 0.002, 0.01):
        np.testing.assert_array_equal(predictor_module.components_at_least(mask, 0.001, min_ml),
                                      whole_volume_components_at_least(mask, 0.001, min_ml))


def test_side_rule_in_chunks_matches_the_whole_grid():
    """SideRule labels the lung a few slices at a time: pieces joined only in a later chunk (a U open towards the first
    slices), pieces tied in size, and oblique grids come out as the whole grid's rule, for any chunk height."""
    lung = np.zeros((11, 18, 40), bool)
    lung[1:10, 3:12, 2:8] = True  # the right lung: a U whose arms meet in slices 8-9 only
    lung[1:8, 3:12, 4:6] = False
    lung[1:10, 3:12, 24:30] = True  # the left lung: another U, as large as the right one (a tie)
    lung[1:8, 3:12, 26:28] = False
    lung[5, 14, 14:22] = True  # a stray piece near the midline
    lung[0, 0, 0] = True  # a piece reached first, alone in the first slice
    rng = np.random.default_rng(3)
    speckled = lung | (rng.random(lung.shape) > 0.97)
    for direction in ((1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, 1), (0.99, 0.1, 0.05, -0.1, 0.99, 0, -0.05, 0, 1)):
        grid = VoxelGrid((0.7, 0.8, 2.0), (-10.0, 5.0, 3.0), direction)
        for mask in (lung, speckled):
            expected = whole_volume_right_side(mask, grid)
            for chunk_slices in (1, 2, 3, 32):
                rule = SideRule(mask, grid, chunk_slices)
                found = np.stack([rule.right_of_slice(z) for z in range(mask.shape[0])])
                np.testing.assert_array_equal(found, expected, err_msg=f"direction {direction}, chunk of {chunk_slices} slices")


def test_seg_nrrd_is_byte_identical_to_slicerio_layering(tmp_path):
    import slicerio

    from COVIDLesionSegLib.segments import SEGMENTS

    image = io.read_image(SAMPLE)
    array = sitk.GetArrayFromImage(image)
    lung = (array > 20).astype(np.uint8)
    for lesion in ((array > 120).astype(np.uint8) & lung, np.zeros_like(lung)):  # overlapping (two layers); an empty segment
        masks = {}
        for channel, values in (("lesion", lesion), ("lung", lung)):
            masks[channel] = sitk.GetImageFromArray(values)
            masks[channel].CopyInformation(image)
        streamed = io.write_segmentation(tmp_path / "streamed.seg.nrrd", masks)
        segmentation = slicerio.create_segmentation(image.GetSize(), io.ijk_to_lps(image))
        for channel, mask in masks.items():
            voxels = sitk.GetArrayViewFromImage(mask).transpose(2, 1, 0) > 0
            slicerio.add_segment(segmentation, voxels, SEGMENTS[channel].slicerio_segment())
        slicerio.write_segmentation(str(tmp_path / "slicerio.seg.nrrd"), segmentation)
        assert without_write_time(streamed.read_bytes()) == without_write_time((tmp_path / "slicerio.seg.nrrd").read_bytes())


def without_write_time(nrrd: bytes) -> bytes:
    """An NRRD file without the comment line pynrrd dates it with (``# on 2026-01-01 10:00:00(GMT).``)."""
    return b"\n".join(line for line in nrrd.split(b"\n") if not line.startswith(b"# on "))
