"""The v2 data recipe: radiological orientation, body field of view and lesion-free HU slices (issues 14, 16)."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.io import read_image, to_radiological
from COVIDLesionSegLib.preprocessing import PreprocessingConfig, crop_slice, prepare_volume, resize_mask, to_network_input
from COVIDLesionSegTraining.config import TrainConfig
from COVIDLesionSegTraining.data import ManifestSliceDataset, read_manifest
from COVIDLesionSegTraining.negatives import (
    MixedSliceDataset,
    NegativeVolumeDataset,
    add_dependent_density,
    coarse_hu,
    read_negative_cases,
    slab_hu,
    tumour_free_slices,
)

NEGATIVES = Path(__file__).resolve().parents[3] / "shared" / "data" / "chest-ct-hu-no-covid"
BODY = PreprocessingConfig(field_of_view="body")


@pytest.fixture(scope="module")
def negatives_dir() -> Path:
    if not (NEGATIVES / "manifest.csv").is_file():
        pytest.skip(f"lesion-free HU volumes not present at {NEGATIVES}")
    return NEGATIVES


def test_radiological_orientation_turns_posterior_up_slices_with_their_masks(tiny_data):
    records = read_manifest(tiny_data)
    assert {record.orientation for record in records} == {"radiological", "posterior-up"}
    stored = ManifestSliceDataset(records, orientation="as-stored", channels=("lesion", "lung"))
    turned = ManifestSliceDataset(records, orientation="radiological", channels=("lesion", "lung"))
    for index, record in enumerate(records):
        expected = [array[::-1] if record.orientation == "posterior-up" else array for array in stored.load_slice(index)]
        for got, want in zip(turned.load_slice(index), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="orientation"):
        ManifestSliceDataset(records, orientation="upside-down")


def test_body_field_of_view_is_one_box_per_volume_and_evaluation_keeps_native_targets(tiny_data):
    records = read_manifest(tiny_data)
    dataset = ManifestSliceDataset(records, orientation="radiological", channels=("lesion", "lung"), preprocessing=BODY)
    assert set(dataset.boxes) == {record.volume_id for record in records}
    index = 0
    box = dataset.crop_box(index)
    image, lesion, lung = dataset.load_slice(index)
    item = dataset[index]
    volume = np.stack([dataset.load_slice(i)[0] for i, record in enumerate(records) if record.volume_id == records[index].volume_id])
    slices, volume_box = prepare_volume(volume, BODY, preprocessed=True)  # what inference makes of the stacked volume
    assert volume_box == box
    np.testing.assert_allclose(item["image"].numpy(), to_network_input(slices[:1], BODY)[0], atol=1e-6)
    np.testing.assert_array_equal(item["target"][0].numpy() > 0, resize_mask(crop_slice(lesion, box), BODY))
    native = ManifestSliceDataset(records, orientation="radiological", channels=("lesion",), preprocessing=BODY, native_targets=True)
    assert native[index]["box"] == box and native[index]["target"].shape[-2:] == lesion.shape


def test_train_config_records_the_v2_recipe_and_v1_configs_keep_their_meaning(tmp_path):
    v1_values = TrainConfig(data_dir="d", output_dir="o").to_dict()
    for name in ("orientation", "field_of_view", "negatives_dir", "negative_fraction", "negative_holdout"):
        v1_values.pop(name)
    v1 = TrainConfig.from_dict(v1_values)
    assert (v1.orientation, v1.preprocessing().field_of_view, v1.negatives_dir) == ("as-stored", "full", None)
    v2 = TrainConfig(data_dir="d", output_dir="o", orientation="radiological", field_of_view="body",
                     negatives_dir="n", negative_fraction=0.25, negative_holdout=("p",))
    assert TrainConfig.from_dict(v2.to_dict()) == v2 and v2.preprocessing().field_of_view == "body"
    differences = "\n".join(v2.differences_from_paper())
    assert "orientation" in differences and "field_of_view" in differences and "25%" in differences
    with pytest.raises(ValueError, match="negative"):
        TrainConfig(data_dir="d", output_dir="o", negatives_dir="n")  # a folder without a share


def test_negative_slices_are_the_inference_preprocessing_with_empty_lesions(negatives_dir):
    dataset = NegativeVolumeDataset(negatives_dir, ["pyradiomics_lung2"], channels=("lesion", "lung"), preprocessing=BODY)
    assert "pyradiomics_lung2" not in dataset.cases and len(dataset.cases) == 5
    case = next(case for case in read_negative_cases(negatives_dir) if case.case == "pyradiomics_lung1")
    kept = tumour_free_slices(case, 48)
    assert not kept[31:36].any() and kept[:30].all()  # tumour on z 32–34, one slice either side
    assert [z for name, z in dataset.slices if name == "pyradiomics_lung1"] == list(np.flatnonzero(kept))
    index = dataset.slices.index(("pyradiomics_lung1", 20))
    volume = sitk.GetArrayFromImage(to_radiological(read_image(case.volume)))
    expected = to_network_input(prepare_volume(volume, BODY)[0][20:21], BODY)[0]
    item = dataset[index]
    np.testing.assert_allclose(item["image"].numpy(), expected, atol=1e-6)
    assert item["target"][0].sum() == 0 and item["target"][1].mean() > 0.1  # mid-chest: no lesion, lungs
    no_lung = [i for i, (name, _) in enumerate(dataset.slices) if name == "totalsegmentator_example_ct_dicom"]
    assert no_lung and all(dataset[i]["target"][1].sum() == 0 for i in no_lung[:3])  # upper abdomen only


def test_dependent_density_is_densest_at_the_dependent_pleura_inside_the_lung_only():
    hu = np.full((40, 30), 40.0, dtype=np.float32)  # soft tissue
    lung = np.zeros((40, 30), dtype=bool)
    lung[5:35, 3:27] = True  # one lung, its dependent (posterior) edge at row 34
    hu[lung] = -850.0
    hu[20, 10] = 30.0  # a vessel inside the lung
    added = add_dependent_density(hu, lung, row_mm=1.0, rng=np.random.default_rng(0))
    assert added.dtype == np.float32 and added.shape == hu.shape
    assert (added[~lung] == 0).all() and added[20, 10] == 0  # nothing outside the lung or on dense tissue
    column = added[5:35, 15]
    assert (np.diff(column) > 0).all()  # rising towards the back in every column…
    assert 0 < column[0] < column[-1] <= 450 + 80  # at most the band's amplitude plus the gradient
    again = add_dependent_density(hu, lung, row_mm=1.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(added, again)  # reproducible from its generator
    assert not np.array_equal(added, add_dependent_density(hu, lung, row_mm=1.0, rng=np.random.default_rng(1)))


def test_dependent_density_renders_lung_slices_anew_and_keeps_their_targets(negatives_dir):
    options = {"channels": ("lesion", "lung"), "preprocessing": BODY, "only_patients": ["pyradiomics_lung1", "totalsegmentator_example"]}
    plain = NegativeVolumeDataset(negatives_dir, **options)
    dense = NegativeVolumeDataset(negatives_dir, dependent_density=1.0, **options)
    assert plain.volumes == {} and dense.slices == plain.slices  # HU kept only when it is used
    with_lung = dense.slices.index(("pyradiomics_lung1", 20))
    image, lesion, lung = dense.load_slice(with_lung)
    plain_image, _, plain_lung = plain.load_slice(with_lung)
    assert not np.array_equal(image, plain_image) and not lesion.any()
    np.testing.assert_array_equal(lung, plain_lung)
    lung_rows = np.flatnonzero(lung.any(axis=1))
    back = slice(lung_rows[-1] - 15, lung_rows[-1])  # the dependent lung became brighter than it was
    assert image[back][lung[back]].mean() > plain_image[back][lung[back]].mean()
    no_lung = next(i for i, _ in enumerate(dense.slices) if not dense.lungs[i].any())
    np.testing.assert_array_equal(dense.load_slice(no_lung)[0], plain.load_slice(no_lung)[0])
    with pytest.raises(ValueError, match="probability"):
        NegativeVolumeDataset(negatives_dir, dependent_density=1.5, **options)
    with pytest.raises(ValueError, match="dependent_density"):
        TrainConfig(data_dir="d", output_dir="o", dependent_density=0.5)  # no lesion-free slices to apply it to
    config = TrainConfig(data_dir="d", output_dir="o", negatives_dir="n", negative_fraction=0.25, dependent_density=0.5)
    assert "dependent density" in "\n".join(config.differences_from_paper())


def brute_force_slab(hu: np.ndarray, z: int, slice_mm: float, thickness_mm: float, usable: np.ndarray) -> np.ndarray:
    """The slab of :func:`slab_hu` by sampling it finely along z: each sample takes the slice it falls in."""
    low = z
    while low > 0 and usable[low - 1]:
        low -= 1
    high = z
    while high < len(hu) - 1 and usable[high + 1]:
        high += 1
    positions = np.linspace(z * slice_mm - thickness_mm / 2, z * slice_mm + thickness_mm / 2, 200001)
    indices = np.rint(positions / slice_mm).astype(int)
    indices = indices[(indices >= low) & (indices <= high)]
    return hu[indices].astype(np.float64).mean(axis=0)


@pytest.mark.parametrize(
    ("z", "slice_mm", "thickness_mm", "unusable"),
    [(5, 5.0, 10.0, ()), (5, 2.5, 7.3, ()), (0, 2.5, 10.0, ()), (11, 1.5, 9.0, ()), (5, 2.5, 10.0, (3,)), (5, 1.0, 8.0, (4, 9))],
)
def test_slab_hu_weighs_slices_by_their_overlap_and_stops_at_unusable_slices(z, slice_mm, thickness_mm, unusable):
    hu = np.random.default_rng(z).normal(-800, 100, size=(12, 6, 5)).astype(np.float32)
    usable = np.ones(12, dtype=bool)
    usable[list(unusable)] = False
    slab = slab_hu(hu, z, slice_mm, thickness_mm, usable)
    assert slab.dtype == np.float32 and slab.shape == hu.shape[1:]
    np.testing.assert_allclose(slab, brute_force_slab(hu, z, slice_mm, thickness_mm, usable), atol=0.2)
    assert not np.array_equal(slab, hu[z])


def test_slab_no_thicker_than_a_slice_is_the_slice_itself():
    hu = np.random.default_rng(0).normal(-800, 100, size=(5, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(slab_hu(hu, 2, 5.0, 4.0, np.ones(5, dtype=bool)), hu[2])
    np.testing.assert_array_equal(slab_hu(hu, 2, 1.0, 10.0, np.array([True, False, True, False, True])), hu[2])  # no neighbour usable


def test_thick_slices_render_lesion_free_slices_as_slabs_and_keep_their_targets(negatives_dir):
    options = {"channels": ("lesion", "lung"), "preprocessing": BODY, "only_patients": ["pyradiomics_lung1"]}
    plain = NegativeVolumeDataset(negatives_dir, **options)
    thick = NegativeVolumeDataset(negatives_dir, thick_slices=1.0, **options)
    assert plain.volumes == {} and thick.slices == plain.slices
    index = thick.slices.index(("pyradiomics_lung1", 20))
    image, lesion, lung = thick.load_slice(index)
    plain_image, _, plain_lung = plain.load_slice(index)
    assert not np.array_equal(image, plain_image) and not lesion.any()
    np.testing.assert_array_equal(lung, plain_lung)
    np.testing.assert_array_equal(image, thick.load_slice(index)[0])  # the same draw within an epoch
    volume, usable = thick.volumes["pyradiomics_lung1"]
    assert volume.slice_mm == 5.0 and not usable[31:36].any()  # tumour slices 32–34 and one either side: no slab reaches them
    thick.set_epoch(1)
    assert not np.array_equal(thick.load_slice(index)[0], image)  # another thickness next epoch
    with pytest.raises(ValueError, match="probability"):
        NegativeVolumeDataset(negatives_dir, thick_slices=-0.1, **options)
    with pytest.raises(ValueError, match="thick_slices"):
        TrainConfig(data_dir="d", output_dir="o", thick_slices=0.5)  # no lesion-free slices to apply it to
    from COVIDLesionSegTraining.train import build_parser, config_from_arguments

    command = ["--data", "d", "--output", "o", "--negatives", "n", "--negative-fraction", "0.25", "--thick-slices", "0.5"]
    arguments = vars(build_parser().parse_args(command))
    config = config_from_arguments({key: arguments[key] for key in ("data_dir", "output_dir", "negatives_dir", "negative_fraction",
                                                                    "thick_slices")})
    assert config.thick_slices == 0.5
    assert "thick_slices: 50% of lesion-free slices shown as 5–10 mm slabs" in config.differences_from_paper()


def test_coarse_hu_averages_the_area_of_each_coarser_pixel():
    plane = np.arange(12 * 12, dtype=np.float32).reshape(12, 12)
    coarse = coarse_hu(plane, 1.0, 3.0)  # 1 mm pixels → 3 mm: 4 × 4, each the mean of a 3 × 3 block
    assert coarse.shape == (4, 4) and coarse.dtype == np.float32
    np.testing.assert_allclose(coarse, plane.reshape(4, 3, 4, 3).mean(axis=(1, 3)))
    assert coarse_hu(plane, 3.0, 2.5) is plane  # already coarser than asked: unchanged


def test_coarse_reconstructions_render_lesion_free_slices_as_coarse_thick_scans_and_keep_their_targets(negatives_dir):
    import COVIDLesionSegTraining.negatives as negatives

    options = {"channels": ("lesion", "lung"), "preprocessing": BODY, "only_patients": ["pyradiomics_lung1"]}
    plain = NegativeVolumeDataset(negatives_dir, **options)
    coarse = NegativeVolumeDataset(negatives_dir, coarse_reconstructions=1.0, **options)
    index = coarse.slices.index(("pyradiomics_lung1", 20))
    image, lesion, lung = coarse.load_slice(index)
    plain_image, _, plain_lung = plain.load_slice(index)
    assert image.shape == plain_image.shape and not lesion.any()
    np.testing.assert_array_equal(lung, plain_lung)
    volume, usable = coarse.volumes["pyradiomics_lung1"]
    rng = np.random.default_rng((0, 0, index, negatives.COARSE_RECONSTRUCTIONS_STREAM))  # the dataset's draws, in its order
    assert rng.random() < 1.0
    pixel_mm, thickness_mm = rng.uniform(*negatives.COARSE_PIXEL_MM), rng.uniform(*negatives.THICK_SLICE_MM)
    expected = coarse_hu(slab_hu(volume.hu, 20, volume.slice_mm, thickness_mm, usable), volume.row_mm, pixel_mm)
    assert expected.shape[0] == round(volume.hu.shape[1] * volume.row_mm / pixel_mm) < volume.hu.shape[1] / 2
    np.testing.assert_array_equal(image, volume.render(20, expected)[0])
    with pytest.raises(ValueError, match="probability"):
        NegativeVolumeDataset(negatives_dir, coarse_reconstructions=2.0, **options)
    with pytest.raises(ValueError, match="coarse_reconstructions"):
        TrainConfig(data_dir="d", output_dir="o", coarse_reconstructions=0.5)  # no lesion-free slices to apply it to
    config = TrainConfig(data_dir="d", output_dir="o", negatives_dir="n", negative_fraction=0.25, coarse_reconstructions=0.5)
    expected_text = "coarse_reconstructions: 50% of lesion-free slices shown as 5–10 mm slabs with 2.5–4 mm pixels"
    assert expected_text in config.differences_from_paper()


def test_montage_shows_the_lesion_free_slices_and_their_dependent_density(tiny_data, negatives_dir, tmp_path):
    import cv2

    from COVIDLesionSegTraining.montage import main as montage_main

    assert montage_main(["--data", str(tiny_data), "--negatives", str(negatives_dir), "--output", str(tmp_path)]) == 0
    names = ("orientation.png", "negatives.png", "dependent-density.png", "coarse-reconstructions.png")
    pictures = {name: cv2.imread(str(tmp_path / name)) for name in names}
    assert all(picture is not None and picture.std() > 10 for picture in pictures.values())
    assert pictures["dependent-density.png"].shape[1] == pictures["coarse-reconstructions.png"].shape[1] == 8 * 128  # four pairs
    assert pictures["coarse-reconstructions.png"].shape == pictures["dependent-density.png"].shape  # the same slices
    left_tiles = [pictures[name][:, :128] for name in ("dependent-density.png", "coarse-reconstructions.png")]
    np.testing.assert_array_equal(*left_tiles)  # each pair's plain slice
    assert not np.array_equal(pictures["coarse-reconstructions.png"], pictures["dependent-density.png"])


def test_mixed_epochs_hold_the_chosen_share_of_negatives_drawn_anew_each_epoch(tiny_data, negatives_dir):
    positives = ManifestSliceDataset(read_manifest(tiny_data), channels=("lesion", "lung"))
    negatives = NegativeVolumeDataset(negatives_dir, ["pyradiomics_lung2", "lung_pet_ct_dx_A0001"], channels=("lesion", "lung"))
    mixed = MixedSliceDataset(positives, negatives, 0.25, seed=3)
    assert len(mixed) == len(positives) + 4 and mixed.negative_count == 4  # 12 positives → 4 negatives = 25 %
    first = mixed.negative_order.copy()
    assert len(set(first)) == 4
    mixed.set_epoch(1)
    assert not np.array_equal(first, mixed.negative_order)
    mixed.set_epoch(0)
    np.testing.assert_array_equal(first, mixed.negative_order)
    assert mixed[len(positives)]["target"][0].sum() == 0 and mixed[len(positives)]["index"] == len(positives)
    with pytest.raises(ValueError, match="negative_fraction"):
        MixedSliceDataset(positives, negatives, 1.0)


def test_lesion_free_validation_patients_fine_tuning_and_the_run_comparison(tiny_data, negatives_dir, tmp_path):
    import json

    import torch

    from COVIDLesionSegLib.checkpoints import load_checkpoint
    from COVIDLesionSegTraining.compare_runs import main as compare_main
    from COVIDLesionSegTraining.splits import SplitSpec
    from COVIDLesionSegTraining.train import train

    recipe = {"model": "unet", "model_widths": (4, 8, 16, 32, 64), "channels": ("lesion", "lung"), "image_size": 64, "device": "cpu",
              "split": SplitSpec("holdout", holdout_groups=("radiopaedia_7_85703_0",)), "negatives_dir": str(negatives_dir),
              "negative_fraction": 0.25, "negative_holdout": ("pyradiomics_lung2", "lung_pet_ct_dx_A0001", "pyradiomics_lung1"),
              "negative_validation": ("totalsegmentator_example",), "encoder_weights": "none"}
    with pytest.raises(ValueError, match="both held out and validated"):
        TrainConfig(data_dir="d", output_dir="o", **{**recipe, "negative_validation": ("pyradiomics_lung2",)})
    with pytest.raises(ValueError, match="needs negatives_dir"):
        TrainConfig(data_dir="d", output_dir="o", negative_validation=("p",))
    base = TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path / "base"), max_steps=2, **recipe)
    train(base)
    trained_negatives = NegativeVolumeDataset(negatives_dir, exclude_patients=(*base.negative_holdout, *base.negative_validation))
    assert trained_negatives.cases == ["totalsegmentator_example_ct_dicom"]  # the validation patient's volume is not trained on
    validation = NegativeVolumeDataset(negatives_dir, only_patients=base.negative_validation)
    assert validation.cases == ["totalsegmentator_example_ct"]

    # fine-tuning starts from the base run's weights (a learning rate of 1e-12 leaves them where they were)
    tuned = TrainConfig(data_dir=str(tiny_data), output_dir=str(tmp_path / "tuned"), max_steps=1, learning_rate=1e-12,
                        init_from=str(tmp_path / "base" / "last.safetensors"), **recipe)
    train(tuned)
    before = load_checkpoint(tmp_path / "base" / "last.safetensors").state_dict
    after = load_checkpoint(tmp_path / "tuned" / "last.safetensors").state_dict
    for name, tensor in before.items():
        if tensor.is_floating_point() and "running" not in name:
            torch.testing.assert_close(after[name], tensor, atol=1e-6, rtol=0)
    other = TrainConfig.from_dict({**tuned.to_dict(), "model_widths": (8, 16, 32, 64, 128), "output_dir": str(tmp_path / "other")})
    with pytest.raises(ValueError, match="cannot start from this checkpoint.*model arguments"):
        train(other)

    assert compare_main(["--runs", str(tmp_path / "base"), str(tmp_path / "tuned"), "--checkpoint", "last",
                         "--output", str(tmp_path / "compare"), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert results["differing_settings"] == ["learning_rate", "max_steps", "init_from"]
    for run in results["runs"]:
        assert 0.0 <= run["validation_groups"]["lesion_dice"] <= 1.0
        assert [entry["file"] for entry in run["lesion_free_validation"]] == ["totalsegmentator_example_ct.nii.gz"]
        assert run["lesion_free_validation"][0]["false_lesion_ml"] >= 0.0
    with pytest.raises(ValueError, match="trained on the lesion-free patients"):
        compare_main(["--runs", str(tmp_path / "base"), "--lesion-free-patients", "totalsegmentator_example_dicom",
                      "--output", str(tmp_path / "refused"), "--device", "cpu"])
    markdown = (tmp_path / "compare" / "compare.md").read_text()
    assert "totalsegmentator_example_ct.nii.gz false lesion mL" in markdown and "`1e-12`" in markdown
    assert results["lesion_free_patients"] is None and "each run's lesion-free validation patients" in markdown
