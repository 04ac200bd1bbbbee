"""DICOM outputs for PACS: the DICOM SEG and the TID 1500 SR written and read back (highdicom, pydicom), checked with
dciodvfy (dicom3tools) where it is installed; the lesion probability map; the CLI end to end on a DICOM series."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import cli, io
from COVIDLesionSegLib.checkpoints import load_checkpoint, save_checkpoint
from COVIDLesionSegLib.predictor import NO_GUARD_RAILS, GuardRails, Predictor, masks_from_probabilities
from COVIDLesionSegLib.statistics import VoxelGrid, lesion_statistics

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
from COVIDLesionSegLib import dicom_outputs  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.2.1125.13"
PROVENANCE = dicom_outputs.Provenance("tiny-unet", "0123456789abcdef" * 4)


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


GEOMETRIES = {  # spacing (x, y, z), origin, direction (columns: the image axes in LPS)
    "axial": ((0.75, 0.8, 2.5), (-12.0, 20.0, 30.0), np.eye(3)),
    "oblique": ((0.7, 0.9, 3.0), (5.0, -8.0, 12.5), rotation(0, 25) @ rotation(2, 15)),  # tilted slices, turned in-plane
}


def chest(depth: int = 6) -> np.ndarray:
    """A small synthetic chest CT in HU ``[z, y, x]``: body, two lungs, a lesion with a dense core in the right lung."""
    ct = np.full((depth, 20, 24), -1000, np.int16)
    ct[:, 2:18, 1:23] = 40
    ct[:, 4:16, 3:11] = -850
    ct[:, 4:16, 13:21] = -850
    ct[1:4, 6:10, 4:8] = -450
    ct[2, 7:9, 5:7] = -100
    return ct


def ct_image(geometry: str) -> sitk.Image:
    spacing, origin, direction = GEOMETRIES[geometry]
    image = sitk.GetImageFromArray(chest())
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    return image


def write_series(folder: Path, image: sitk.Image, slice_thickness: bool = True) -> Path:
    """``image`` as a DICOM CT series, one file per slice, written in reverse slice order so that file order is not
    slice order; the oblique series is written without Slice Thickness (type 2 in CT, often empty)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for k in reversed(range(image.GetDepth())):
        piece = image[:, :, k]
        tags = [("0020|000d", f"{UID_ROOT}.1"), ("0020|000e", f"{UID_ROOT}.2"), ("0020|0052", f"{UID_ROOT}.3"),
                ("0008|0018", f"{UID_ROOT}.4.{k + 1}"), ("0008|0060", "CT"), ("0010|0020", "P1"), ("0010|0010", "Phantom^Chest"),
                ("0020|0010", "1"), ("0020|0037", "\\".join(f"{v:.8f}" for v in d[0::3] + d[1::3])),
                ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                ("0020|0013", str(k + 1)), ("0028|1052", "0"), ("0028|1053", "1")]
        if slice_thickness:
            tags.append(("0018|0050", f"{image.GetSpacing()[2]:g}"))
        for tag, value in tags:
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"file{image.GetDepth() - k:03d}.dcm"))
        with io.preserved_locale():
            writer.Execute(piece)
    return folder


@pytest.fixture(params=list(GEOMETRIES))
def series(request, tmp_path):
    """(folder, CT as read back by the tool, lesion and lung masks on its grid)."""
    folder = write_series(tmp_path / request.param, ct_image(request.param), slice_thickness=request.param == "axial")
    image = io.read_image(folder)
    ct = sitk.GetArrayFromImage(image)
    lesion = (ct > -600) & (ct < 0)
    masks = {"lesion": lesion, "lung": ((ct > -950) & (ct < -600)) | lesion}
    return folder, image, {channel: mask_image(mask, image) for channel, mask in masks.items()}


def mask_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dciodvfy (dicom3tools) on ``path``; skips when dciodvfy is not installed."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    run = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_dicom_seg_round_trips_voxel_for_voxel_with_source_references(series, tmp_path):
    folder, image, masks = series
    sources = dicom_outputs.read_series_headers(folder)
    path = dicom_outputs.write_dataset(tmp_path / "case.seg.dcm", dicom_outputs.build_segmentation(masks, sources, PROVENANCE))

    seg = hd.seg.segread(str(path))
    uids = [source.SOPInstanceUID for source in sources]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    for source, frame in zip(sources, pixels, strict=True):  # each frame against the mask slice at that source slice's position
        k = int(round(image.TransformPhysicalPointToContinuousIndex([float(v) for v in source.ImagePositionPatient])[2]))
        for number, channel in ((1, "lesion"), (2, "lung")):
            np.testing.assert_array_equal(frame[:, :, number - 1], sitk.GetArrayViewFromImage(masks[channel])[k])
    assert pixels[..., 0].sum() == sitk.GetArrayViewFromImage(masks["lesion"]).sum() > 0  # nothing lost, not empty

    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == f"{UID_ROOT}.1" and seg.FrameOfReferenceUID == f"{UID_ROOT}.3"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == f"{UID_ROOT}.2"
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame lies where its source slice lies
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[uids.index(source_uid)]
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-4)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [float(v) for v in sources[0].ImageOrientationPatient], atol=1e-6)

    lesion, lung = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (lesion.segment_label, lung.segment_label) == ("COVID-19 lesion", "Lung")
    assert (lesion.segmented_property_category.value, lesion.segmented_property_type.value) == ("49755003", "47351003")
    assert lesion.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "840539006"
    assert lesion.anatomic_regions[0].value == "39607008"
    assert (lung.segmented_property_category.value, lung.segmented_property_type.value) == ("123037004", "39607008")
    algorithm = lesion.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny-unet", PROVENANCE.model_sha256)
    assert seg.ManufacturerModelName == "tiny-unet" and seg.SoftwareVersions.startswith("covidlesionseg")
    assert dciodvfy_errors(path) == []


def content_items(sequence):
    """Every SR content item below ``sequence``, depth first."""
    for item in sequence:
        yield item
        yield from content_items(getattr(item, "ContentSequence", []))


def test_measurement_report_round_trips_the_measures(series, tmp_path):
    folder, image, masks = series
    sources = dicom_outputs.read_series_headers(folder)
    segmentation = dicom_outputs.build_segmentation(masks, sources, PROVENANCE)
    oriented = [sitk.GetArrayFromImage(io.to_radiological(item)) for item in (masks["lesion"], masks["lung"], image)]
    statistics = lesion_statistics(oriented[0], VoxelGrid.of_image(io.to_radiological(image)), oriented[1], oriented[2])
    assert statistics.percent_high_opacity > 0 and statistics.severity == "CT-1"  # every kind of measure is there
    path = dicom_outputs.write_dataset(tmp_path / "case.sr.dcm",
                                       dicom_outputs.build_measurement_report(statistics, segmentation, sources, PROVENANCE))

    values = dicom_outputs.read_measurement_report(path)
    expected = {name: value for name, value in statistics.to_dict().items() if name in dicom_outputs.REPORTED}
    assert set(values) == {*expected, "severity"}
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert values["severity"] == "CT-1"

    sr = hd.sr.srread(str(path))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    # each group references its segment of the SEG (read with pydicom: highdicom 0.28's group.referenced_segment fails)
    references = [item.ReferencedSOPSequence[0] for item in content_items(pydicom.dcmread(str(path)).ContentSequence)
                  if item.ConceptNameCodeSequence[0].get("CodeValue") == "121191"]  # DCM Referenced Segment
    assert [(ref.ReferencedSOPInstanceUID, ref.ReferencedSegmentNumber) for ref in references] == [
        (segmentation.SOPInstanceUID, 1), (segmentation.SOPInstanceUID, 2)]
    lesion_volume = groups[0].get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
    assert [m.unit.value for m in lesion_volume] == ["mL"] * 3  # both lungs, right, left
    units = {m.name.meaning: m.unit.value for group in groups for m in group.get_measurements()}
    assert units["Mean"] == "[hnsf'U]" and units["Percentage of lung volume with opacity (PO)"] == "%"
    assert dciodvfy_errors(path) == []


def test_measurement_report_leaves_out_what_is_not_available(series, tmp_path):
    """8-bit input (no HU measures) and no lung segment written (--no-lung): the lung measures are image-level."""
    folder, image, masks = series
    sources = dicom_outputs.read_series_headers(folder)
    segmentation = dicom_outputs.build_segmentation({"lesion": masks["lesion"]}, sources, PROVENANCE)
    lesion, lung = (sitk.GetArrayFromImage(masks[channel]) for channel in ("lesion", "lung"))
    statistics = lesion_statistics(lesion, VoxelGrid.of_image(image), lung)
    path = dicom_outputs.write_dataset(tmp_path / "case.sr.dcm",
                                       dicom_outputs.build_measurement_report(statistics, segmentation, sources, PROVENANCE))
    values = dicom_outputs.read_measurement_report(path)
    assert "lung_mean_hu" not in values and "percent_high_opacity" not in values
    assert values["lung_ml"] == pytest.approx(statistics.lung_ml) and values["lesion_ml"] == pytest.approx(statistics.lesion_ml)
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(str(path)).content)
    assert len(report.get_volumetric_roi_measurement_groups()) == 1 and len(report.get_image_measurement_groups()) == 1


def test_masks_off_the_source_grid_are_refused(series):
    folder, image, masks = series
    shifted = sitk.Image(masks["lesion"])
    shifted.SetOrigin(tuple(np.asarray(image.GetOrigin()) + 1.0))
    with pytest.raises(dicom_outputs.DicomOutputError, match="not a slice of the segmented image"):
        dicom_outputs.build_segmentation({"lesion": shifted}, dicom_outputs.read_series_headers(folder), PROVENANCE)


@pytest.fixture(scope="module")
def balanced_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny random network with its lung output made +10 (all lung) and its lesion output centred on the median
    logit of the synthetic chest: about half the voxels are lesion, many probabilities near 0.5."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    state = checkpoint.state_dict
    state["head.weight"][1] = 0.0
    state["head.bias"][1] = 10.0
    probabilities = Predictor(checkpoint, "cpu", guard_rails=NO_GUARD_RAILS).predict_probabilities(chest())["lesion"]
    median = float(np.median(probabilities))
    state["head.bias"][0] -= math.log(median / (1 - median))
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("balanced") / "balanced.safetensors")


def test_probability_map_thresholded_at_128_is_the_lesion_before_guard_rails(tmp_path, balanced_checkpoint):
    image = ct_image("oblique")
    predictor = Predictor.from_checkpoint(balanced_checkpoint, "cpu", guard_rails=NO_GUARD_RAILS)
    result = predictor.segment_image(image, return_probabilities=True)
    path = io.write_probability_map(tmp_path / f"case{io.PROBABILITY_SUFFIX}", result.lesion_probability)
    written = sitk.ReadImage(str(path))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-6)
    probabilities = predictor.predict_probabilities(sitk.GetArrayFromImage(io.to_radiological(image)))
    before_guard_rails = io.from_radiological(masks_from_probabilities(probabilities)["lesion"], image)
    above = sitk.GetArrayFromImage(written) >= 128
    np.testing.assert_array_equal(above, sitk.GetArrayFromImage(before_guard_rails) > 0)
    assert 0.2 < above.mean() < 0.8  # voxels on both sides of 0.5
    np.testing.assert_array_equal(above, sitk.GetArrayFromImage(result.masks["lesion"]) > 0)  # no guard rails: the lesion mask
    plain = predictor.segment_image(image)  # the option changes nothing else
    for channel, mask in plain.masks.items():
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(result.masks[channel]))
    assert plain.statistics == result.statistics and plain.lesion_probability is None
    predictor.guard_rails = GuardRails(lesion_min_ml=1e6)  # a guard rail that drops every lesion leaves the map as it was
    guarded = predictor.segment_image(image, return_probabilities=True)
    assert sitk.GetArrayFromImage(guarded.masks["lesion"]).sum() == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(guarded.lesion_probability), sitk.GetArrayFromImage(result.lesion_probability))


def test_probability_quantisation_is_exact_at_one_half(tmp_path):
    p = np.array([[[0.0, np.nextafter(np.float32(0.5), np.float32(0)), 0.5, np.nextafter(np.float32(0.5), np.float32(1)), 1.0]]],
                 dtype=np.float32)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(io.write_probability_map(tmp_path / "p.nrrd", sitk.GetImageFromArray(p)))))
    assert written.ravel().tolist() == [0, 127, 128, 128, 255]


def test_cli_writes_seg_sr_and_probabilities_for_a_dicom_series(tmp_path, balanced_checkpoint):
    folder = write_series(tmp_path / "in" / "chest", ct_image("oblique"))
    (tmp_path / "in" / "ct.nrrd").parent.mkdir(exist_ok=True)
    sitk.WriteImage(ct_image("axial"), str(tmp_path / "in" / "ct.nrrd"))
    out = tmp_path / "out"
    arguments = ["segment", str(folder), str(tmp_path / "in" / "ct.nrrd"), "-o", str(out), "--weights", str(balanced_checkpoint),
                 "--device", "cpu", "--lesion-threshold", "0.5", "--progress", "none", "--format", "dicom-seg", "--sr", "--probabilities"]
    assert cli.main(arguments) == 1  # the NRRD case fails, the DICOM case is done
    rows = {Path(row["input"]).name: row for row in cli.read_summary(out / "summary.csv").values()}
    assert rows["ct.nrrd"]["status"] == "failed" and "needs a DICOM series as input" in rows["ct.nrrd"]["error"]
    assert "\n" not in rows["ct.nrrd"]["error"] and not (out / "ct.seg.dcm").exists()
    assert rows["chest"]["status"] == "ok" and rows["chest"]["output"] == str(out / "chest.seg.dcm")

    image = io.read_image(folder)
    predictor = Predictor.from_checkpoint(balanced_checkpoint, "cpu", guard_rails=GuardRails(lesion_threshold=0.5),
                                          backend="auto")  # as the CLI's
    expected = predictor.segment_image(image, return_probabilities=True)
    seg = hd.seg.segread(str(out / "chest.seg.dcm"))
    sources = dicom_outputs.read_series_headers(folder)
    indices = dicom_outputs.source_slice_indices(sources, image)
    pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], segment_numbers=[1, 2])
    for number, channel in ((1, "lesion"), (2, "lung")):
        np.testing.assert_array_equal(pixels[..., number - 1], sitk.GetArrayFromImage(expected.masks[channel])[indices])
    assert seg.ManufacturerModelName == "balanced.safetensors"
    assert seg.DeviceSerialNumber == json.loads((out / "summary.json").read_text())["model"]["sha256"]

    values = dicom_outputs.read_measurement_report(out / "chest.sr.dcm")
    assert values["lesion_ml"] == pytest.approx(expected.statistics.lesion_ml)
    assert values["percent_opacity"] == pytest.approx(expected.statistics.percent_opacity)
    probability = sitk.ReadImage(str(out / f"chest{io.PROBABILITY_SUFFIX}"))
    expected_probability = sitk.GetArrayFromImage(expected.lesion_probability).astype(np.float64)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(probability), np.floor(expected_probability * 255 + 0.5))
    assert 0 < pixels[..., 0].sum() < pixels[..., 1].sum()

    assert cli.main(arguments) == 1  # run again: the DICOM case is done (skipped), the NRRD case fails again
    rows = {Path(row["input"]).name: row for row in cli.read_summary(out / "summary.csv").values()}
    assert rows["chest"]["status"] == "skipped"
    (out / "chest.sr.dcm").unlink()  # an output of the case is missing: the case is redone
    assert cli.main(arguments[:-2] + ["--sr"]) == 1
    rows = {Path(row["input"]).name: row for row in cli.read_summary(out / "summary.csv").values()}
    assert rows["chest"]["status"] == "ok" and (out / "chest.sr.dcm").is_file()


def test_sr_needs_dicom_seg(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", str(tmp_path), "-o", str(tmp_path / "o"), "--sr"])
    assert "--sr needs --format dicom-seg" in capsys.readouterr().err


def test_core_works_without_highdicom_and_dicom_seg_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    imported = subprocess.run([sys.executable, "-c", "import sys, COVIDLesionSegLib.cli, COVIDLesionSegLib.predictor, "
                               "COVIDLesionSegLib.dicom_outputs; print('highdicom' in sys.modules)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"  # imported lazily, only when a DICOM output is written
    folder = write_series(tmp_path / "chest", ct_image("axial"))
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if not installed
    assert cli.main(["segment", str(folder), "-o", str(tmp_path / "out"), "--format", "dicom-seg", "--progress", "none"]) == 1
    assert 'pip install "covidlesionseg[dicom]"' in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.json").exists()  # refused before the model is loaded
