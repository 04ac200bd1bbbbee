"""Quantification on synthetic volumes with known answers, through the Predictor, the CLI's CSV and the report.

The scene: two box lungs in soft tissue, a high-opacity lesion in the patient's right lung and a
low-opacity one in the left. A stand-in for the network reads the masks off the voxel values, so every
number below is counted by hand from the boxes.
"""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from COVIDLesionSegLib import cli
from COVIDLesionSegLib.backends import TorchBackend
from COVIDLesionSegLib.checkpoints import load_checkpoint
from COVIDLesionSegLib.predictor import Predictor
from COVIDLesionSegLib.preprocessing import to_network_input
from COVIDLesionSegLib.report import PNG_TEXT_KEY, montage_slices
from COVIDLesionSegLib.statistics import MEASURES, VoxelGrid, lesion_statistics
from COVIDLesionSegTraining import validate_po

SHAPE = (6, 20, 40)  # [z, y, x]
SPACING = (1.0, 1.0, 2.0)  # x, y, z mm → 0.002 mL per voxel
VOXEL_ML = 0.002
RIGHT_LUNG = np.s_[0:6, 4:16, 2:14]  # low columns: patient right in LPS (x grows toward the patient's left)
LEFT_LUNG = np.s_[0:6, 4:16, 24:32]
HIGH_LESION = np.s_[1:3, 6:10, 4:8]  # in the right lung
LOW_LESION = np.s_[2:3, 6:8, 26:28]  # in the left lung
HU_VALUES = {"tissue": 40, "lung": -850, "high": -100, "low": -500}
BYTE_VALUES = {"tissue": 120, "lung": 20, "high": 200, "low": 150}  # 8-bit windowed data: never HU

RIGHT_LUNG_VOXELS, LEFT_LUNG_VOXELS = 6 * 12 * 12, 6 * 12 * 8
HIGH_VOXELS, LOW_VOXELS = 2 * 4 * 4, 1 * 2 * 2
LUNG_VOXELS = RIGHT_LUNG_VOXELS + LEFT_LUNG_VOXELS
LESION_HU = np.repeat([HU_VALUES["high"], HU_VALUES["low"]], [HIGH_VOXELS, LOW_VOXELS]).astype(float)
LUNG_HU = np.concatenate([LESION_HU, np.full(LUNG_VOXELS - HIGH_VOXELS - LOW_VOXELS, float(HU_VALUES["lung"]))])


def scene(values: dict) -> np.ndarray:
    array = np.full(SHAPE, values["tissue"], np.int16 if values["lung"] < 0 else np.uint8)
    array[RIGHT_LUNG] = array[LEFT_LUNG] = values["lung"]
    array[HIGH_LESION], array[LOW_LESION] = values["high"], values["low"]
    return array


def expected(sides_swapped: bool = False, hu: bool = True) -> dict:
    """The scene's answers; ``sides_swapped`` when the geometry puts the high-column box on the patient's right."""
    right = (RIGHT_LUNG_VOXELS, HIGH_VOXELS)
    left = (LEFT_LUNG_VOXELS, LOW_VOXELS)
    right, left = (left, right) if sides_swapped else (right, left)
    answers = {
        "severity": "CT-1",
        "percent_opacity": 100 * (HIGH_VOXELS + LOW_VOXELS) / LUNG_VOXELS,
        "lesion_ml": (HIGH_VOXELS + LOW_VOXELS) * VOXEL_ML,
        "lung_ml": LUNG_VOXELS * VOXEL_ML,
        "right_lung_ml": right[0] * VOXEL_ML, "right_lesion_ml": right[1] * VOXEL_ML, "right_percent_opacity": 100 * right[1] / right[0],
        "left_lung_ml": left[0] * VOXEL_ML, "left_lesion_ml": left[1] * VOXEL_ML, "left_percent_opacity": 100 * left[1] / left[0],
        "lesion_slices": 2,
        "input_is_hu": hu,
    }
    hu_answers = {
        "high_opacity_ml": HIGH_VOXELS * VOXEL_ML,
        "percent_high_opacity": 100 * HIGH_VOXELS / LUNG_VOXELS,
        "lung_mean_hu": LUNG_HU.mean(), "lung_sd_hu": LUNG_HU.std(),
        "lesion_mean_hu": LESION_HU.mean(), "lesion_sd_hu": LESION_HU.std(),
    }
    return {**answers, **(hu_answers if hu else dict.fromkeys(hu_answers))}


def assert_measures(statistics, answers: dict):
    for name, value in answers.items():
        actual = getattr(statistics, name)
        assert actual == (pytest.approx(value) if isinstance(value, float) else value), name


def rotation_z(degrees: float) -> tuple:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (c, -s, 0, s, c, 0, 0, 0, 1)


def image_of(array: np.ndarray, layout: str) -> sitk.Image:
    """The scene stored in another layout; physical positions are kept except for the oblique rotations."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((-40.0, -10.0, 0.0))
    if layout in ("flipped", "permuted"):
        return sitk.DICOMOrient(image, {"flipped": "RAS", "permuted": "SAR"}[layout])
    if layout.startswith("oblique"):
        image.SetDirection(rotation_z(float(layout.removeprefix("oblique"))))
    return image


class MasksFromValues:
    """Stands in for the network: lesion and lung masks read off the scene's voxel values."""

    def __init__(self, values: dict):
        self.lesion_values = [values["high"], values["low"]]
        self.lung_values = [values["lung"], *self.lesion_values]

    def __call__(self, volume, on_progress=None, **options):  # options of Predictor.predict_masks (grid, …): not needed here
        return {"lesion": np.isin(volume, self.lesion_values).astype(np.uint8),
                "lung": np.isin(volume, self.lung_values).astype(np.uint8)}


@pytest.fixture()
def predictor(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    predictor.predict_masks = MasksFromValues(HU_VALUES)
    return predictor


# (layout, does the high-column box end up on the patient's right?) — a 160° rotation turns the image around
LAYOUTS = [("identity", False), ("flipped", False), ("permuted", False), ("oblique20", False), ("oblique160", True)]


@pytest.mark.parametrize(("layout", "sides_swapped"), LAYOUTS)
def test_measures_in_any_stored_orientation(predictor, layout, sides_swapped):
    result = predictor.segment_image(image_of(scene(HU_VALUES), layout))
    assert_measures(result.statistics, expected(sides_swapped))


@pytest.mark.parametrize(("layout", "sides_swapped"), [layout for layout in LAYOUTS if layout[0] != "permuted"])
def test_sides_come_from_patient_coordinates_not_image_columns(layout, sides_swapped):
    """The stored arrays as they are (not reoriented): in 'flipped' and 'oblique160' the patient's right is on the high columns."""
    image = image_of(scene(HU_VALUES), layout)
    ct = sitk.GetArrayFromImage(image)
    masks = MasksFromValues(HU_VALUES)(ct)
    statistics = lesion_statistics(masks["lesion"], VoxelGrid.of_image(image), masks["lung"], ct_hu=ct)
    assert_measures(statistics, expected(sides_swapped))


def test_eight_bit_input_has_no_hu_measures(predictor):
    predictor.predict_masks = MasksFromValues(BYTE_VALUES)
    statistics = predictor.segment_image(image_of(scene(BYTE_VALUES), "identity")).statistics
    assert_measures(statistics, expected(hu=False))
    assert statistics.formatted()["lung_mean_hu"] == "" and statistics.formatted()["input_is_hu"] == "no"


def test_empty_lung_has_volumes_but_no_percentages(predictor):
    predictor.predict_masks = MasksFromValues({"lung": 1, "high": 2, "low": 3})  # none of these values is in the scene
    statistics = predictor.segment_image(image_of(scene(HU_VALUES), "identity")).statistics
    assert (statistics.lung_ml, statistics.right_lung_ml, statistics.left_lung_ml, statistics.lesion_ml) == (0.0, 0.0, 0.0, 0.0)
    for name in ("percent_opacity", "right_percent_opacity", "left_percent_opacity", "severity", "percent_high_opacity",
                 "lung_mean_hu", "lesion_mean_hu"):
        assert getattr(statistics, name) is None, name
    assert statistics.input_is_hu and statistics.high_opacity_ml == 0.0


def test_high_opacity_threshold_is_a_parameter(predictor):
    image = image_of(scene(HU_VALUES), "identity")
    statistics = predictor.segment_image(image, high_opacity_threshold_hu=-600).statistics  # now both lesions count
    assert statistics.high_opacity_ml == pytest.approx((HIGH_VOXELS + LOW_VOXELS) * VOXEL_ML)


def test_lungs_of_very_different_size_each_go_whole_to_their_side():
    lung = np.zeros((2, 10, 40), np.uint8)
    lung[:, :, 1:25] = 1  # a wide right lung reaching past the halfway point between the centroids
    lung[:, :, 30:34] = 1  # a small left lung (1/6 of the right)
    lung[0, 0, 36] = 1  # a stray voxel beyond the left lung: left of the midline
    statistics = lesion_statistics(np.zeros_like(lung), VoxelGrid((1.0, 1.0, 1.0)), lung)
    assert statistics.right_lung_ml == pytest.approx(2 * 10 * 24 / 1000)
    assert statistics.left_lung_ml == pytest.approx((2 * 10 * 4 + 1) / 1000)


def test_touching_lungs_split_at_the_lung_centroid():
    lung = np.zeros((2, 10, 40), np.uint8)
    lung[:, :, 2:14] = lung[:, :, 24:36] = 1  # mirror images about x = 18.5
    lung[:, 4:6, 14:24] = 1  # a bridge: one connected piece; columns 14…18 lie right of the centroid, 19…23 left
    statistics = lesion_statistics(np.zeros_like(lung), VoxelGrid((1.0, 1.0, 1.0)), lung)
    side_voxels = 2 * 10 * 12 + 2 * 2 * 5
    assert statistics.right_lung_ml == pytest.approx(side_voxels / 1000) == statistics.left_lung_ml


def test_montage_picks_evenly_spaced_lesion_slices():
    lesion = np.zeros((30, 4, 4), bool)
    lesion[10:20, 1, 1] = True
    assert montage_slices(lesion, None, 4) == [10, 13, 16, 19]
    assert montage_slices(np.zeros_like(lesion), lesion, 2) == [10, 19]  # no lesion: lung slices
    assert montage_slices(np.zeros((3, 2, 2), bool), None, 12) == [0, 1, 2]


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_csv_sidecar_and_report_carry_the_same_numbers(tmp_path, predictor):
    case_file = tmp_path / "in" / "scene.nii.gz"
    case_file.parent.mkdir()
    sitk.WriteImage(image_of(scene(HU_VALUES), "flipped"), str(case_file))
    out = tmp_path / "out"
    cases = cli.find_cases([case_file])
    cli.segment_cases(cases, predictor, out, report=True, progress="none")

    [row] = read_rows(out / "summary.csv")
    assert list(row) == cli.SUMMARY_COLUMNS
    answers = expected()
    assert row["severity"] == "CT-1" and row["input_is_hu"] == "yes" and row["lesion_slices"] == "2"
    assert float(row["percent_opacity"]) == pytest.approx(answers["percent_opacity"], abs=0.005)
    assert float(row["right_percent_opacity"]) == pytest.approx(answers["right_percent_opacity"], abs=0.005)
    assert float(row["lesion_mean_hu"]) == pytest.approx(answers["lesion_mean_hu"], abs=0.05)

    sidecar = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sidecar["model"] == {"name": predictor.name, "sha256": predictor.sha256, "channels": ["lesion", "lung"]}
    assert len(predictor.sha256) == 64 and sidecar["parameters"]["high_opacity_threshold_hu"] == -200
    assert list(sidecar["columns"]) == cli.SUMMARY_COLUMNS
    assert sidecar["columns"]["percent_opacity"]["unit"] == "%" and set(sidecar["severity_categories"]) == {f"CT-{n}" for n in range(5)}

    assert row["report"] == str(out / "scene.report.png")
    with Image.open(row["report"]) as png:
        assert png.size == (1600, 900)
        stored = json.loads(png.text[PNG_TEXT_KEY])
    assert stored["measures"] == {measure.name: row[measure.name] for measure in MEASURES}
    assert stored["title"] == "scene" and predictor.sha256[:16] in stored["notes"][0]


def test_a_folder_of_another_threshold_is_refused_unless_overwrite(tmp_path, predictor):
    case_file = tmp_path / "scene.nii.gz"
    sitk.WriteImage(image_of(scene(HU_VALUES), "identity"), str(case_file))
    cases, out = cli.find_cases([case_file]), tmp_path / "out"
    cli.segment_cases(cases, predictor, out, progress="none")
    with pytest.raises(ValueError, match="high_opacity_threshold_hu.*--overwrite"):
        cli.segment_cases(cases, predictor, out, progress="none", high_opacity_threshold_hu=-300)
    [row] = cli.segment_cases(cases, predictor, out, progress="none", high_opacity_threshold_hu=-300, overwrite=True)
    sidecar = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert row["status"] == "ok" and sidecar["parameters"]["high_opacity_threshold_hu"] == -300


def test_cli_report_flag_and_threshold_option_end_to_end(tmp_path, tiny_checkpoint):
    case_file = tmp_path / "scene.nrrd"
    sitk.WriteImage(image_of(scene(BYTE_VALUES), "identity"), str(case_file))
    out = tmp_path / "out"
    assert cli.main(["segment", str(case_file), "-o", str(out), "--weights", str(tiny_checkpoint), "--progress", "none",
                     "--report", "--high-opacity-threshold", "-250", "--no-lung"]) == 0
    [row] = read_rows(out / "summary.csv")
    assert row["status"] == "ok" and row["input_is_hu"] == "no" and row["high_opacity_ml"] == ""
    assert (out / "scene.report.png").is_file() and row["report"].endswith("scene.report.png")
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["parameters"]["high_opacity_threshold_hu"] == -250


class RecordingNetwork(torch.nn.Module):
    """Records its inputs; answers lesion = lung = everywhere."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, batch):
        self.inputs.append(batch.clone())
        return torch.full((len(batch), 2, *batch.shape[2:]), 5.0)


def test_preprocessed_slices_reach_the_network_as_they_are(tiny_checkpoint):
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    predictor.backend = TorchBackend(RecordingNetwork(), "cpu")
    slices = np.random.default_rng(0).integers(0, 256, (2, 256, 256)).astype(np.uint8)
    predictor.predict_masks(slices, preprocessed=True)
    np.testing.assert_array_equal(torch.cat(predictor.backend.network.inputs).numpy(), to_network_input(slices, predictor.preprocessing))
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict_masks(slices.astype(np.float32), preprocessed=True)


def manifest_percent_opacity(data_dir, volume_id):
    """PO from manifest.csv's pixel counts (in these volumes the lung masks hold every lesion pixel)."""
    with open(data_dir / "manifest.csv", newline="", encoding="utf-8") as stream:
        rows = [row for row in csv.DictReader(stream) if row["volume_id"] == volume_id]
    return 100 * sum(int(row["lesion_pixels"]) for row in rows) / sum(int(row["lung_pixels"]) for row in rows)


def test_po_validation_over_two_folds(tmp_path, tiny_checkpoint, shared_data, capsys):
    out = tmp_path / "po"
    arguments = ["--data", str(shared_data), "--output-dir", str(out), "--device", "cpu",
                 "--checkpoint", str(tiny_checkpoint), "radiopaedia_29",  # a split group: its two volumes
                 "--checkpoint", str(tiny_checkpoint), "radiopaedia_10_85902_1"]
    assert validate_po.main(arguments) == 0
    report = json.loads((out / "po_validation.json").read_text(encoding="utf-8"))
    volumes = {row["volume_id"]: row for row in report["volumes"]}
    assert list(volumes) == ["radiopaedia_29_86490_1", "radiopaedia_29_86491_1", "radiopaedia_10_85902_1"]
    assert [row["slices"] for row in volumes.values()] == [2, 9, 11]
    for volume_id, row in volumes.items():
        assert row["reference_percent_opacity"] == pytest.approx(manifest_percent_opacity(shared_data, volume_id))
        assert row["model_percent_opacity"] is None or 0 <= row["model_percent_opacity"] <= 100
    assert report["summary"]["volumes"] == 3 and len(report["models"]) == 2
    assert [model["name"] for model in report["models"]] == [str(tiny_checkpoint)] * 2  # as given on the command line
    assert report["models"][0]["sha256"] == report["models"][1]["sha256"] and report["command"].startswith("covidlesionseg-validate-po")
    with Image.open(out / "po_bland_altman.png") as plot:
        assert plot.size[0] > 400
    assert "--checkpoint" in (out / "po_validation.md").read_text(encoding="utf-8")
    assert "of 3 volumes" in capsys.readouterr().out


def test_agreement_figures_on_known_values():
    results = [validate_po.VolumeResult(f"v{index}", "m", 1, reference, model)
               for index, (reference, model) in enumerate([(10.0, 12.0), (20.0, 19.0), (30.0, 33.0), (5.0, None)])]
    summary = validate_po.agreement(results)
    differences = np.array([2.0, -1.0, 3.0])
    assert summary["volumes"] == 4 and summary["volumes_compared"] == 3
    assert summary["mean_absolute_difference_pp"] == pytest.approx(2.0) and summary["bias_pp"] == pytest.approx(4 / 3)
    assert summary["limits_of_agreement_pp"][1] == pytest.approx(4 / 3 + 1.96 * differences.std(ddof=1))
    assert summary["pearson_r"] == pytest.approx(np.corrcoef([10, 20, 30], [12, 19, 33])[0, 1])
    assert validate_po.agreement(results[:2])["pearson_r"] is None  # two volumes give no meaningful r


def test_held_out_volumes_come_from_the_checkpoint_split_and_training_volumes_are_refused(tmp_path, tiny_checkpoint, shared_data):
    checkpoint = load_checkpoint(tiny_checkpoint)
    checkpoint.train_config = {"split": {"kind": "holdout", "holdout_groups": ["radiopaedia_29"]}}
    assert validate_po.held_out_volumes(checkpoint, "m", [], shared_data) == ["radiopaedia_29_86490_1", "radiopaedia_29_86491_1"]
    with pytest.raises(ValueError, match="trained or validated on"):
        validate_po.held_out_volumes(checkpoint, "m", ["coronacases_001"], shared_data)
    checkpoint.train_config = {}
    with pytest.raises(ValueError, match="no split recorded"):
        validate_po.held_out_volumes(checkpoint, "m", [], shared_data)
    with pytest.raises(ValueError, match="neither volume_id nor split_group"):
        validate_po.held_out_volumes(checkpoint, "m", ["nope"], shared_data)
