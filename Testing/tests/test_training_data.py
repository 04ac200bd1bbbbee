"""Training datasets: the shared PNG manifest (real data) and the NIfTI release layout (files written here)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from COVIDLesionSegLib.preprocessing import PreprocessingConfig, resize_mask, to_network_input, volume_to_uint8
from COVIDLesionSegTraining.data import (
    ManifestSliceDataset,
    NiftiVolumeDataset,
    read_manifest,
    read_png,
    volume_id_from_filename,
)


@pytest.fixture(scope="module")
def records(shared_data):
    return read_manifest(shared_data)


def test_manifest_lists_every_slice_with_existing_files(records):
    assert len(records) == 1614
    assert len({record.split_group for record in records}) == 18
    assert len({record.volume_id for record in records}) == 20
    first = records[0]
    assert (first.volume_id, first.position) == ("coronacases_001", 0)
    assert first.image.is_file() and first.lesion_mask.is_file() and first.lung_mask.is_file()


def test_manifest_error_names_the_expected_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="covid19-ct-seg-20cases-png256"):
        read_manifest(tmp_path)


def test_lesion_item_is_the_png_through_the_core_network_input(records):
    dataset = ManifestSliceDataset(records[:3])
    item = dataset[1]
    expected_image = to_network_input(read_png(records[1].image)[None], PreprocessingConfig())[0]
    assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.float32
    np.testing.assert_array_equal(item["image"].numpy(), expected_image)
    assert item["target"].shape == (1, 256, 256)
    np.testing.assert_array_equal(item["target"][0].numpy(), read_png(records[1].lesion_mask) > 0)
    assert item["index"] == 1 and dataset.volume_id(1) == "coronacases_001" and dataset.position(1) == 1


def test_lung_target_includes_the_lesions(records):
    # radiopaedia_4_85506_1 slice 1 has 18 lesion pixels outside its lung mask (data README: 42 such pixels).
    index = next(i for i, record in enumerate(records) if (record.volume_id, record.position) == ("radiopaedia_4_85506_1", 1))
    assert ((read_png(records[index].lesion_mask) > 0) & (read_png(records[index].lung_mask) == 0)).sum() == 18
    item = ManifestSliceDataset(records, channels=("lesion", "lung"))[index]
    lesion, lung = item["target"].bool()
    assert (lesion & ~lung).sum() == 0
    assert lung.sum() > lesion.sum()
    assert set(torch.unique(item["target"]).tolist()) == {0.0, 1.0}


def test_small_profile_resizes_image_bicubic_and_masks_with_the_core(records):
    config = PreprocessingConfig(size=128)
    item = ManifestSliceDataset(records[:1], channels=("lesion", "lung"), preprocessing=config)[0]
    assert item["image"].shape == (3, 128, 128) and item["target"].shape == (2, 128, 128)
    np.testing.assert_array_equal(item["target"][0].numpy(), resize_mask(read_png(records[0].lesion_mask), config))


def test_native_targets_keep_the_stored_resolution(records):
    item = ManifestSliceDataset(records[:1], preprocessing=PreprocessingConfig(size=128), native_targets=True)[0]
    assert item["image"].shape == (3, 128, 128) and item["target"].shape == (1, 256, 256)
    with pytest.raises(ValueError, match="augmentation"):
        ManifestSliceDataset(records[:1], native_targets=True, augment="flip")


def test_bad_channels_and_augment_modes_are_refused(records):
    with pytest.raises(ValueError, match="channels"):
        ManifestSliceDataset(records[:1], channels=("tumour",))
    with pytest.raises(ValueError, match="augment"):
        ManifestSliceDataset(records[:1], augment="heavy")


def test_augmented_items_are_reproducible_per_epoch(records):
    dataset = ManifestSliceDataset(records[:4], augment="robust", seed=3)
    first = dataset[2]["image"]
    assert torch.equal(first, ManifestSliceDataset(records[:4], augment="robust", seed=3)[2]["image"])
    changed = False
    for epoch in range(1, 6):  # some epoch draws a different augmentation for this item
        dataset.set_epoch(epoch)
        changed |= not torch.equal(first, dataset[2]["image"])
    assert changed


@pytest.mark.parametrize(
    ("name", "volume_id"),
    [
        ("coronacases_001.nii.gz", "coronacases_001"),
        ("radiopaedia_4_85506_1.nii.gz", "radiopaedia_4_85506_1"),
        ("coronacases_org_007.nii", "coronacases_007"),
        ("radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm.nii", "radiopaedia_14_85914_0"),
    ],
)
def test_release_file_names_map_to_zenodo_volume_ids(name, volume_id):
    assert volume_id_from_filename(name) == volume_id


def write_volume(path, array: np.ndarray, direction: tuple[float, ...]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetDirection(direction)
    image.SetSpacing((0.8, 0.8, 5.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def release_dir(tmp_path):
    """A two-volume release: one LPS volume, one stored RAS-flipped (x and y reversed), in HU."""
    rng = np.random.default_rng(0)
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    lps = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    for name, direction in (("coronacases_001", lps), ("radiopaedia_4_85506_1", ras)):
        ct = rng.normal(-700, 200, size=(3, 40, 48)).astype(np.int16)
        lesion = np.zeros(ct.shape, np.uint8)
        lesion[1, 5:10, 6:12] = 1  # in the first rows and columns of the stored array
        lung = np.zeros(ct.shape, np.uint8)
        lung[:, 2:30, 2:40] = 2  # release lung masks label left/right lungs 1/2
        write_volume(tmp_path / "ct_scans" / f"{name}.nii.gz", ct, direction)
        write_volume(tmp_path / "infection_mask" / f"{name}.nii.gz", lesion, direction)
        write_volume(tmp_path / "lung_mask" / f"{name}.nii.gz", lung, direction)
    return tmp_path


def test_nifti_dataset_preprocesses_like_inference(release_dir):
    config = PreprocessingConfig(size=32)
    dataset = NiftiVolumeDataset(release_dir, channels=("lesion", "lung"), preprocessing=config)
    assert len(dataset) == 6
    assert [dataset.volume_id(index) for index in range(6)] == ["coronacases_001"] * 3 + ["radiopaedia_4_85506_1"] * 3
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(release_dir / "ct_scans" / "coronacases_001.nii.gz")))
    expected = to_network_input(volume_to_uint8(ct, config), config)  # LPS already: no reorientation
    item = dataset[1]
    np.testing.assert_array_equal(item["image"].numpy(), expected[1])
    assert item["target"].shape == (2, 32, 32)
    assert item["target"][0].any() and (item["target"][0] <= item["target"][1]).all()  # lung includes the lesion


def test_nifti_dataset_orients_radiologically(release_dir):
    config = PreprocessingConfig(size=48)
    dataset = NiftiVolumeDataset(release_dir, preprocessing=config)
    lps_lesion = dataset[1]["target"][0]  # stored LPS: lesion near the top-left of the array stays there
    ras_lesion = dataset[4]["target"][0]  # stored RAS: rows and columns reversed to reach LPS
    rows, columns = torch.nonzero(lps_lesion, as_tuple=True)
    assert rows.float().mean() < 24 and columns.float().mean() < 24
    rows, columns = torch.nonzero(ras_lesion, as_tuple=True)
    assert rows.float().mean() > 24 and columns.float().mean() > 24


def test_nifti_dataset_selects_volumes_and_lesion_slices(release_dir):
    dataset = NiftiVolumeDataset(release_dir, volume_ids=["radiopaedia_4_85506_1"], only_lesion_slices=True)
    assert len(dataset) == 1 and dataset.volume_id(0) == "radiopaedia_4_85506_1" and dataset.position(0) == 1
    with pytest.raises(ValueError, match="coronacases_099"):
        NiftiVolumeDataset(release_dir, volume_ids=["coronacases_099"])
    with pytest.raises(FileNotFoundError, match="ct_scans"):
        NiftiVolumeDataset(release_dir / "missing")
