"""The Slicer module's lesion probability overlay (re-thresholded into the lesion segment) and its DICOM SEG export into
Slicer's DICOM database, against the real MRML library of the slicer-core wheel.

What needs the Slicer application is replaced by recording stand-ins, and only there: Slicer's DICOM SEG plugin
(``slicer.modules.dicomPlugins["DICOMSegmentationPlugin"]``, which runs dcmqi's ``itkimage2segimage`` and writes into
the ctkDICOMDatabase) and ``DICOMUtils.importDicom``. The nodes, subject hierarchy, transforms, segment tags and the
terminology logic the plugin reads are the real ones."""

from __future__ import annotations

import ast
import math
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_support import (
    MODULE_FILE,
    REPOSITORY,
    add_volume,
    ijk_to_ras,
    new_scene,
    segment_array,
    slicer,
    synthetic_ct,
    update_segment,
    vtk,
)

import COVIDLesionSegMRML as mrml
from COVIDLesionSegLib import cli, io
from COVIDLesionSegLib.predictor import GuardRails
from COVIDLesionSegLib.segments import LESION, SEGMENTS

ANGLE = math.radians(25)
OBLIQUE = np.array([
    [math.cos(ANGLE) * 0.7, -math.sin(ANGLE) * 0.8, 0.0, 12.5],
    [math.sin(ANGLE) * 0.7, math.cos(ANGLE) * 0.8, 0.0, -30.0],
    [0.0, 0.0, 2.5, 41.0],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE = synthetic_ct().shape  # [z, y, x]


def probabilities() -> np.ndarray:
    """Probabilities 0…1 on the synthetic CT's grid: a ramp along x, so every threshold cuts at a known column."""
    ramp = np.linspace(0.0, 1.0, SHAPE[2])
    return np.broadcast_to(ramp, SHAPE).copy()


def quantized(p: np.ndarray) -> np.ndarray:
    """What the CLI stores (``io.write_probability_map``): round half up of 255 × p."""
    return np.clip(np.floor(p * 255.0 + 0.5), 0, 255).astype(np.uint8)


def write_on_grid(volume, folder: Path, name: str, array: np.ndarray) -> Path:
    """``array`` written as an image on the grid of ``volume``'s file, as the CLI writes its outputs."""
    image = sitk.ReadImage(str(mrml.write_volume(volume, folder / "input.nrrd")))
    output = sitk.GetImageFromArray(array)
    output.CopyInformation(image)
    if array.dtype == np.uint8 and name.endswith(mrml.PROBABILITY_SUFFIX):
        return io.write_probability_map(folder / name, sitk.Cast(output, sitk.sitkFloat32) / 255.0)
    sitk.WriteImage(output, str(folder / name))
    return folder / name


def model_result(scene, volume, folder: Path, lesion: np.ndarray, lung: np.ndarray, segmentation=None):
    """The segments as a volume run loads them (``.seg.nrrd`` → ``load_segmentation`` → ``mark_model_output``)."""
    image = sitk.ReadImage(str(mrml.write_volume(volume, folder / "input.nrrd")))
    masks = {}
    for channel, mask in (("lesion", lesion), ("lung", lung)):
        masks[channel] = sitk.GetImageFromArray(mask.astype(np.uint8))
        masks[channel].CopyInformation(image)
    segmentation = segmentation or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT chest lesion")
    mrml.load_segmentation(io.write_segmentation(folder / "input.seg.nrrd", masks), volume, segmentation)
    mrml.mark_model_output(segmentation, volume, "COVIDLesionSeg test-model")
    return segmentation


def tag(segment, name: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def volume(scene):
    volume = add_volume(scene, synthetic_ct(), OBLIQUE)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 7"), "Chest CT")
    hierarchy.CreateItem(study, volume)
    return volume


def masks() -> tuple[np.ndarray, np.ndarray]:
    lung = np.zeros(SHAPE, np.uint8)
    lung[:, 4:16, 2:14] = 1
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[1:5, 8:12, 3:7] = 1  # inside the lung: the segments overlap, as the CLI writes them
    return lesion, lung


# --- the probability map ------------------------------------------------------------------------------------------------

def test_probability_file_suffix_is_the_clis():
    assert mrml.PROBABILITY_SUFFIX == io.PROBABILITY_SUFFIX


def test_cli_options_ask_for_the_probability_map_only_when_wanted(tmp_path):
    options = mrml.CLIOptions(python="PythonSlicer", model="resattunet-lesion-lung-v2")
    assert "--probabilities" not in options.command([tmp_path / "ct.nrrd"], tmp_path / "out", overwrite=True)
    command = mrml.CLIOptions(python="PythonSlicer", model="resattunet-lesion-lung-v2", probabilities=True).command(
        [tmp_path / "ct.nrrd"], tmp_path / "out", overwrite=True)
    assert command.count("--probabilities") == 1
    assert cli.build_parser().parse_args(command[3:]).probabilities  # an option the CLI knows
    assert options.algorithm_name == "COVIDLesionSeg resattunet-lesion-lung-v2"
    weights = tmp_path / ("w" * 80 + ".safetensors")
    assert len(mrml.CLIOptions(python="p", weights=weights).algorithm_name) == 64  # a DICOM LO value


def test_the_clis_probability_map_loads_on_the_volumes_grid_in_its_study_and_transform(scene, volume, tmp_path):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    (tmp_path / mrml.VOLUME_RUN_OUTPUT).mkdir()
    assert mrml.load_probability_result(tmp_path, volume) is None  # a run without --probabilities
    expected = quantized(probabilities())
    write_on_grid(volume, tmp_path / mrml.VOLUME_RUN_OUTPUT, f"CT_chest{mrml.PROBABILITY_SUFFIX}", expected)

    node = mrml.load_probability_result(tmp_path, volume)

    assert node.GetName() == "CT chest lesion probability"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected)
    np.testing.assert_allclose(ijk_to_ras(node), OBLIQUE, atol=1e-6)
    assert node.GetTransformNodeID() == transform.GetID()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume))
    assert node.GetStorageNode() is None  # no link to the temporary file, which the Logic removes

    again = mrml.load_probability_result(tmp_path, volume, node)  # a second run refills the same node
    assert again is node and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2


def test_an_unreadable_probability_map_raises(volume, tmp_path):
    broken = tmp_path / f"broken{mrml.PROBABILITY_SUFFIX}"
    broken.write_text("not an image")
    with pytest.raises(OSError, match="could not read the probability map"):
        mrml.load_probability_map(broken, volume)


def test_cutoff_of_the_uint8_map_is_where_the_clis_lesion_ends_and_brackets_other_thresholds(scene, volume, tmp_path):
    node = mrml.load_probability_map(write_on_grid(volume, tmp_path, f"a{mrml.PROBABILITY_SUFFIX}", quantized(probabilities())), volume)
    assert mrml.probability_scale(node) == 255.0
    assert mrml.probability_cutoff(node, 0.5) == 128.0  # io: "a voxel is >= 128 exactly where p >= 0.5"
    p = np.random.default_rng(3).random(100_000)
    np.testing.assert_array_equal(quantized(p) >= mrml.probability_cutoff(node, 0.5), p >= 0.5)
    for threshold in (0.05, 0.3, 0.77, 1.0):
        selected = quantized(p) >= mrml.probability_cutoff(node, threshold)
        assert selected[p >= threshold].all()  # never narrower than asked
        assert not selected[p < threshold - 1 / 255].any()  # wider by less than one step of the map
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="above 0 and at most 1"):
            mrml.probability_cutoff(node, bad)

    as_float = add_volume(scene, np.zeros(SHAPE, np.int16), OBLIQUE, name="float map")
    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    as_float.SetAndObserveImageData(image)
    assert mrml.probability_scale(as_float) == 1.0 and mrml.probability_cutoff(as_float, 0.3) == 0.3
    with pytest.raises(ValueError, match="no image data"):
        mrml.probability_scale(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


def test_overlay_is_the_foreground_of_every_slice_view_coloured_and_transparent_below_the_threshold(scene, volume, tmp_path):
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]  # Red, Yellow, Green
    node = mrml.load_probability_map(write_on_grid(volume, tmp_path, f"a{mrml.PROBABILITY_SUFFIX}", quantized(probabilities())), volume)

    mrml.show_probability_overlay(node, 0.5, opacity=0.4, background_node=volume)

    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == mrml.PROBABILITY_COLOR_NODE_ID == "vtkMRMLColorTableNodeFileInferno.txt"
    assert not display.GetAutoWindowLevel() and (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 255.0)
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert (display.GetLowerThreshold(), display.GetUpperThreshold()) == (128.0, 255.0)
    for view in views:
        assert view.GetForegroundVolumeID() == node.GetID() and view.GetBackgroundVolumeID() == volume.GetID()
        assert view.GetForegroundOpacity() == pytest.approx(0.4)

    mrml.set_overlay_threshold(node, 0.3)  # the slider widens the lesion
    assert display.GetLowerThreshold() == math.floor(0.3 * 255 + 0.5) == 77


# --- re-thresholding into the lesion segment ----------------------------------------------------------------------------

def test_rethreshold_replaces_the_lesion_by_the_voxels_over_the_threshold_and_keeps_the_rest(scene, volume, tmp_path):
    lesion, lung = masks()
    segmentation = model_result(scene, volume, tmp_path, lesion, lung)
    geometry_parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = segmentation.GetSegmentation().GetConversionParameter(geometry_parameter)
    stored = quantized(probabilities())
    node = mrml.load_probability_map(write_on_grid(volume, tmp_path, f"a{mrml.PROBABILITY_SUFFIX}", stored), volume)

    for threshold, cutoff in ((0.5, 128), (0.3, 77), (0.8, 204)):
        count = mrml.threshold_probability_into_segment(node, segmentation, threshold)
        expected = (stored >= cutoff).astype(np.uint8)
        assert 0 < count == int(expected.sum()) < expected.size
        np.testing.assert_array_equal(segment_array(segmentation, "lesion", volume), expected)

    np.testing.assert_array_equal(segment_array(segmentation, "lung", volume), lung)  # the lung is left alone
    segments = segmentation.GetSegmentation()
    assert sorted(segments.GetSegmentIDs()) == ["lesion", "lung"]
    assert segments.GetConversionParameter(geometry_parameter) == geometry
    segment = segments.GetSegment("lesion")
    assert (segment.GetName(), segment.GetColor()) == (LESION.name, pytest.approx(LESION.color))
    assert tag(segment, segment.GetTerminologyEntryTagName()) == LESION.terminology
    assert tag(segment, mrml.ALGORITHM_TYPE_TAG) == "SEMIAUTOMATIC"  # the reader chose the threshold
    assert tag(segment, mrml.ALGORITHM_NAME_TAG) == "COVIDLesionSeg test-model"
    assert tag(segment, mrml.MODEL_OUTPUT_DIGEST_TAG) is None
    assert tag(segments.GetSegment("lung"), mrml.ALGORITHM_TYPE_TAG) == "AUTOMATIC"


def test_rethreshold_covers_the_same_anatomy_whatever_the_nodes_transforms(scene, volume, tmp_path):
    """The probability map follows the CT's transform; a segmentation chosen by the user keeps its own."""
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.array(
        [[1.0, 0, 0, 7.0 * 0.7], [0, 1.0, 0, 0], [0, 0, 1.0, 2 * 2.5], [0, 0, 0, 1.0]])))
    volume.SetAndObserveTransformNodeID(shift.GetID())
    lesion, lung = masks()
    segmentation = model_result(scene, volume, tmp_path, lesion, lung, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen"))
    stored = quantized(probabilities())
    (tmp_path / mrml.VOLUME_RUN_OUTPUT).mkdir()
    write_on_grid(volume, tmp_path / mrml.VOLUME_RUN_OUTPUT, f"case{mrml.PROBABILITY_SUFFIX}", stored)
    node = mrml.load_probability_result(tmp_path, volume)
    assert node.GetTransformNodeID() == shift.GetID() and segmentation.GetTransformNodeID() is None

    mrml.threshold_probability_into_segment(node, segmentation, 0.5)

    np.testing.assert_array_equal(segment_array(segmentation, "lesion", volume), stored >= 128)
    np.testing.assert_array_equal(segment_array(segmentation, "lung", volume), lung)


def test_rethreshold_creates_the_lesion_segment_when_the_segmentation_has_none(scene, volume, tmp_path):
    node = mrml.load_probability_map(write_on_grid(volume, tmp_path, f"a{mrml.PROBABILITY_SUFFIX}", quantized(probabilities())), volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "new")
    segmentation.GetSegmentation().AddEmptySegment("tumour", "My tumour", [0.0, 1.0, 0.0])

    count = mrml.threshold_probability_into_segment(node, segmentation, 0.9)

    segment = segmentation.GetSegmentation().GetSegment(LESION.channel)
    assert (segment.GetName(), segment.GetColor()) == (LESION.name, pytest.approx(LESION.color))
    assert tag(segment, segment.GetTerminologyEntryTagName()) == LESION.terminology
    assert count == int((quantized(probabilities()) >= 230).sum()) > 0
    np.testing.assert_array_equal(segment_array(segmentation, LESION.channel, volume), quantized(probabilities()) >= 230)
    assert segmentation.GetSegmentation().GetSegment("tumour").GetName() == "My tumour"


@pytest.fixture(scope="module")
def balanced_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny random network with its lung output made +10 (all lung) and its lesion output centred on the median logit
    of the synthetic CT: about half the voxels are lesion, many probabilities near 0.5 (as test_dicom_outputs makes it)."""
    from COVIDLesionSegLib.checkpoints import load_checkpoint, save_checkpoint
    from COVIDLesionSegLib.predictor import NO_GUARD_RAILS, Predictor

    checkpoint = load_checkpoint(tiny_checkpoint)
    state = checkpoint.state_dict
    state["head.weight"][1] = 0.0
    state["head.bias"][1] = 10.0
    median = float(np.median(Predictor(checkpoint, "cpu", guard_rails=NO_GUARD_RAILS).predict_probabilities(synthetic_ct())["lesion"]))
    state["head.bias"][0] -= math.log(median / (1 - median))
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("balanced") / "balanced.safetensors")


def test_module_path_end_to_end_the_clis_map_at_one_half_gives_back_the_clis_lesion(scene, volume, tmp_path, balanced_checkpoint):
    """A tiny model with lesion probabilities spread around 0.5, guard rails off: the CLI run as the Logic builds it, its
    outputs loaded as the Logic loads them, then Apply threshold at 0.5 changes no voxel of the lesion; 0.3 widens it."""
    options = mrml.CLIOptions(python=sys.executable, weights=balanced_checkpoint, device="cpu", batch_size=4, probabilities=True)
    command = mrml.volume_run_command(volume, tmp_path, options)
    guard_rails_off = ["--lung-min-ml=0", "--lesion-min-ml=0", "--no-flip-tta", "--no-hu-lung-prior", "--lesion-min-hu=off",
                       "--lesion-min-contrast-hu=off"]
    guard_rails_off += ["--lesion-threshold=0.5", "--progress", "none"]
    assert cli.main(command[3:] + guard_rails_off) == 0

    segmentation, _, row = mrml.load_volume_result(tmp_path, volume, algorithm_name=options.algorithm_name)
    node = mrml.load_probability_result(tmp_path, volume)
    lesion = segment_array(segmentation, "lesion", volume)
    assert 0 < lesion.sum() < lesion.size and row["status"] == "ok"
    assert tag(segmentation.GetSegmentation().GetSegment("lesion"), mrml.ALGORITHM_NAME_TAG) == "COVIDLesionSeg balanced.safetensors"

    assert mrml.threshold_probability_into_segment(node, segmentation, 0.5) == int(lesion.sum())
    np.testing.assert_array_equal(segment_array(segmentation, "lesion", volume), lesion)
    mrml.threshold_probability_into_segment(node, segmentation, 0.3)
    widened = segment_array(segmentation, "lesion", volume)
    assert widened.sum() > lesion.sum() and (widened >= lesion).all()


# --- DICOM SEG export ---------------------------------------------------------------------------------------------------

def test_model_output_is_automatic_until_the_reader_edits_it(scene, volume, tmp_path):
    lesion, lung = masks()
    segmentation = model_result(scene, volume, tmp_path, lesion, lung)
    for segment_id in ("lesion", "lung"):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        assert (tag(segment, mrml.ALGORITHM_TYPE_TAG), tag(segment, mrml.ALGORITHM_NAME_TAG)) == ("AUTOMATIC", "COVIDLesionSeg test-model")
    assert mrml.update_algorithm_types(segmentation, volume) == {"lesion": "AUTOMATIC", "lung": "AUTOMATIC"}

    edited = lesion.copy()
    edited[1] = 0  # the reader erases one slice of the lesion in the Segment Editor
    update_segment(segmentation, "lesion", edited, volume)
    segmentation.GetSegmentation().AddEmptySegment("nodule", "Nodule drawn by the reader", [0.0, 1.0, 0.0])

    assert mrml.update_algorithm_types(segmentation, volume) == {"lesion": "SEMIAUTOMATIC", "lung": "AUTOMATIC"}
    update_segment(segmentation, "lesion", lesion, volume)  # undone by hand: still the reader's work
    assert mrml.update_algorithm_types(segmentation, volume)["lesion"] == "SEMIAUTOMATIC"


def test_segment_terminology_is_what_the_dicom_seg_plugin_reads(scene, volume, tmp_path):
    """The plugin codes each segment from its terminology tag with the terminology logic; with the shipped terminology
    loaded (as the module does at start-up) the lesion becomes SNOMED CT Infiltrate / COVID-19 in the lung."""
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    mrml.load_terminology(terminologies)
    segmentation = model_result(scene, volume, tmp_path, *masks())
    expected = {
        "lesion": {"category": ("SCT", "49755003"), "type": ("SCT", "47351003"), "modifier": ("SCT", "840539006"),
                   "region": ("SCT", "39607008")},
        "lung": {"category": ("SCT", "123037004"), "type": ("SCT", "39607008"), "modifier": None, "region": None},
    }
    for segment_id, codes in expected.items():
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(tag(segment, segment.GetTerminologyEntryTagName()), entry)
        objects = {"category": entry.GetCategoryObject(), "type": entry.GetTypeObject(), "modifier": entry.GetTypeModifierObject(),
                   "region": entry.GetRegionObject() if hasattr(entry, "GetRegionObject") else entry.GetAnatomicRegionObject()}
        found = {key: (item.GetCodingSchemeDesignator(), item.GetCodeValue()) if item is not None and item.GetCodeValue() else None
                 for key, item in objects.items()}
        assert found == codes, segment_id
        assert SEGMENTS[segment_id].name == segment.GetName()


class RecordingExportable:
    """Stands in for ``slicer.qSlicerDICOMExportable``: a directory and DICOM tags."""

    def __init__(self):
        self.directory, self.tags = "", {"Modality": "SEG"}

    def setTag(self, name, value):  # noqa: N802 (Qt's name)
        self.tags[name] = value

    def tag(self, name):
        return self.tags.get(name, "")


def recording_plugin(scene, calls: list, exportables: int = 1, error: str = "", write: bool = True):
    """A stand-in for Slicer's DICOMSegmentationPluginClass that records what it is asked (and the algorithm types of
    the segments at export time) and writes a file per exportable."""

    class Plugin:
        def __init__(self):
            calls.append(("created",))

        def examineForExport(self, item):  # noqa: N802 (Slicer's name)
            calls.append(("examineForExport", item))
            found = []
            for _ in range(exportables):
                found.append(RecordingExportable())
                found[-1].subjectHierarchyItemID = item  # as the real plugin's _setupExportable
            return found

        def export(self, given):
            hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
            segments = hierarchy.GetItemDataNode(given[0].subjectHierarchyItemID).GetSegmentation()
            seen = {segment_id: tag(segments.GetSegment(segment_id), mrml.ALGORITHM_TYPE_TAG) for segment_id in segments.GetSegmentIDs()}
            calls.append(("export", [exportable.directory for exportable in given], seen))
            if write:
                for index, exportable in enumerate(given):
                    (Path(exportable.directory) / f"subject_hierarchy_export.SEG{index}.dcm").write_bytes(b"DICM")
            return error

    return Plugin


def test_export_asks_the_dicom_seg_plugin_as_the_dicom_modules_export_dialog_does(scene, volume, tmp_path):
    lesion, lung = masks()
    volume.SetAttribute(mrml.DICOM_INSTANCE_UIDS_ATTRIBUTE, "1.2.3.1 1.2.3.2 1.2.3.3 1.2.3.4 1.2.3.5 1.2.3.6")
    segmentation = model_result(scene, volume, tmp_path, lesion, lung)
    edited = lesion.copy()
    edited[4] = 0
    update_segment(segmentation, "lesion", edited, volume)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(segmentation), hierarchy.GetSceneItemID())  # moved out of the study
    calls, imported = [], []
    export_dir = tmp_path / "DICOMExportTemp_20260101_120000"

    files = mrml.export_segmentation_to_dicom_database(segmentation, {mrml.DICOM_SEG_PLUGIN: recording_plugin(scene, calls)},
                                                       lambda folder: imported.append(folder) or True, export_dir)

    item = hierarchy.GetItemByDataNode(segmentation)
    assert [call[0] for call in calls] == ["created", "examineForExport", "export"]
    assert calls[1] == ("examineForExport", item)
    assert calls[2][1] == [str(export_dir)]
    assert calls[2][2] == {"lesion": "SEMIAUTOMATIC", "lung": "AUTOMATIC"}  # the plugin sees the edit
    assert imported == [str(export_dir)]
    assert files == [export_dir / "subject_hierarchy_export.SEG0.dcm"]
    assert hierarchy.GetItemParent(item) == hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume))  # back in the CT's study


@pytest.mark.parametrize("case, message", [
    ("no plugin", "QuantitativeReporting extension"),
    ("not exportable", "not all in the DICOM database"),
    ("plugin error", "failed: Referenced volume files were not found"),
    ("no file", "wrote no file"),
    ("import fails", "could not be added to the DICOM database"),
])
def test_export_failures_say_what_went_wrong(scene, volume, tmp_path, case, message):
    volume.SetAttribute(mrml.DICOM_INSTANCE_UIDS_ATTRIBUTE, "1.2.3.1")
    segmentation = model_result(scene, volume, tmp_path, *masks())
    calls = []
    plugin = {
        "no plugin": None,
        "not exportable": recording_plugin(scene, calls, exportables=0),
        "plugin error": recording_plugin(scene, calls, error="Referenced volume files were not found in the DICOM database"),
        "no file": recording_plugin(scene, calls, write=False),
        "import fails": recording_plugin(scene, calls),
    }[case]
    plugins = {"DICOMScalarVolumePlugin": object} | ({mrml.DICOM_SEG_PLUGIN: plugin} if plugin else {})
    with pytest.raises(RuntimeError, match=re.escape(message)):
        mrml.export_segmentation_to_dicom_database(segmentation, plugins, lambda folder: case != "import fails", tmp_path / "export")


def test_export_refuses_a_segmentation_whose_ct_is_not_from_the_dicom_database_before_calling_the_plugin(scene, volume, tmp_path):
    calls = []
    plugins = {mrml.DICOM_SEG_PLUGIN: recording_plugin(scene, calls)}
    segmentation = model_result(scene, volume, tmp_path, *masks())
    with pytest.raises(ValueError, match="was not loaded from Slicer's DICOM database.*--format dicom-seg"):
        mrml.export_segmentation_to_dicom_database(segmentation, plugins, lambda folder: True, tmp_path / "export")
    assert mrml.dicom_seg_export_problem(None) == "Select the segmentation to export."
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    assert mrml.dicom_seg_export_problem(empty) == "'empty' has no segments to export."
    empty.GetSegmentation().AddEmptySegment("a")
    assert "has no reference volume" in mrml.dicom_seg_export_problem(empty)
    volume.SetAttribute(mrml.DICOM_INSTANCE_UIDS_ATTRIBUTE, "1.2.3.1")
    assert mrml.dicom_seg_export_problem(segmentation) is None
    assert calls == []  # the plugin was never asked


# --- the module file: the GUI and the Logic use the functions tested above ----------------------------------------------

MODULE_SOURCE = MODULE_FILE.read_text(encoding="utf-8")
MODULE_TREE = ast.parse(MODULE_SOURCE)


def method_source(class_name: str, name: str) -> str:
    cls = next(node for node in MODULE_TREE.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    return ast.unparse(next(item for item in cls.body if isinstance(item, ast.FunctionDef) and item.name == name))


def test_logic_exports_through_slicers_dicom_plugins_and_imports_with_copies_then_cleans_up():
    export = method_source("COVIDLesionSegLogic", "exportToDicomDatabase")
    assert "mrml.export_segmentation_to_dicom_database(" in export
    assert "slicer.modules, 'dicomPlugins'" in export  # the plugins the DICOM module registered (5.12+, or QuantitativeReporting)
    assert re.search(r"DICOMUtils\.importDicom\(\w+, copyFiles=True\)", export)  # as the export dialog's indexer: files copied
    assert export.index("shutil.rmtree(") > export.index("export_segmentation_to_dicom_database(")
    assert "slicer.dicomDatabase" in export and "isOpen" in export


def test_gui_contrast_guard_rail_defaults_to_the_clis_and_reaches_the_cli_options():
    widgets = {widget.get("name"): widget for widget in ElementTree.parse(REPOSITORY / "Resources" / mrml.UI_FILE).iter("widget")}
    properties = {prop.get("name"): prop for prop in widgets["lesionMinContrastSpinBox"].findall("property")}
    assert float(properties["value"].find("double").text) == mrml.DEFAULT_LESION_MIN_CONTRAST_HU == GuardRails().lesion_min_contrast_hu
    assert float(properties["minimum"].find("double").text) == 0.0  # 0: off
    assert properties["SlicerParameterName"].find("string").text == "lesionMinContrast"
    assert "lesion_min_contrast_hu=parameters.lesionMinContrast" in method_source("COVIDLesionSegLogic", "_cliOptions")


def test_logic_loads_the_probability_map_of_a_run_and_rethresholds_with_the_tested_functions():
    start = method_source("COVIDLesionSegLogic", "startSegmentation")
    assert "mrml.load_probability_result(" in start and "algorithm_name=" in start
    assert "mrml.warnings_text(row, workDir)" in start  # a coarse input's warning reaches the status line
    assert "probabilities=parameters.probabilityMap" in method_source("COVIDLesionSegLogic", "_cliOptions")
    assert "mrml.threshold_probability_into_segment(" in method_source("COVIDLesionSegLogic", "applyProbabilityThreshold")
    assert "mrml.show_probability_overlay(" in method_source("COVIDLesionSegLogic", "showProbabilityOverlay")


def test_gui_has_the_overlay_threshold_slider_and_the_two_buttons():
    widgets = {widget.get("name"): widget for widget in ElementTree.parse(REPOSITORY / "Resources" / mrml.UI_FILE).iter("widget")}
    slider = widgets["probabilityThresholdSlider"]
    assert slider.get("class") == "ctkSliderWidget"
    properties = {prop.get("name"): prop for prop in slider.findall("property")}
    assert float(properties["value"].find("double").text) == mrml.DEFAULT_PROBABILITY_THRESHOLD == GuardRails().lesion_threshold
    assert properties["SlicerParameterName"].find("string").text == "probabilityThreshold"
    assert widgets["applyThresholdButton"].find("property[@name='text']/string").text == "Apply threshold to lesion segment"
    assert widgets["exportDicomButton"].get("class") == "QPushButton"
    setup = method_source("COVIDLesionSegWidget", "setup")
    for connection in ("applyThresholdButton.clicked.connect", "exportDicomButton.clicked.connect",
                       "probabilityThresholdSlider.valueChanged.connect"):
        assert connection in setup
