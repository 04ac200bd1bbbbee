"""Helpers for the ``test_slicer_*`` tests: the Slicer module folder on ``sys.path``, the MRML library of the
``slicer-core`` wheel set up as Slicer's Segmentations module sets it up, and small real inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE_DIR = REPOSITORY / "COVIDLesionSeg"
MODULE_FILE = MODULE_DIR / "COVIDLesionSeg.py"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))  # Slicer puts the module folder on sys.path the same way

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel (Slicer's MRML libraries) is not installed")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (slicer-core missing)", allow_module_level=True)

# The Slicer releases the module supports and the Python, numpy and SimpleITK each ships (Slicer's
# SuperBuild/External_python.cmake, External_python-numpy.cmake and the SimpleITK project at tags v5.6.2, v5.8.1, v5.10.0
# and v5.12.3). The README's "Supported Slicer versions" table states the same.
SUPPORTED_SLICERS = {
    "5.6": {"python": "3.9.10", "numpy": "1.26.1", "SimpleITK": "2.2.1"},
    "5.8": {"python": "3.9.10", "numpy": "1.26.4", "SimpleITK": "2.3.1"},
    "5.10": {"python": "3.12.10", "numpy": "2.0.2", "SimpleITK": "2.5.2"},
    "5.12": {"python": "3.12.10", "numpy": "2.4.6", "SimpleITK": "2.5.5"},
}

_converters_registered = False


def new_scene():
    """A real ``vtkMRMLScene``, with the segmentation converter rules that Slicer registers at start-up."""
    global _converters_registered
    if not _converters_registered:
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
        _converters_registered = True
    return slicer.vtkMRMLScene()


def synthetic_ct(shape=(6, 20, 16)) -> np.ndarray:
    """A small CT-like int16 volume ``[z, y, x]``: air, a body, two darker lungs, a brighter lesion."""
    ct = np.full(shape, -1000, dtype=np.int16)
    z, y, x = shape
    ct[:, 2 : y - 2, 1 : x - 1] = 40
    ct[:, 4 : y - 4, 2 : x // 2 - 1] = ct[:, 4 : y - 4, x // 2 + 1 : x - 2] = -850
    ct[1 : z - 1, y // 2 - 2 : y // 2 + 2, 3:6] = -300
    return ct


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "CT chest"):
    """A ``vtkMRMLScalarVolumeNode`` in ``scene`` holding ``array`` ([z, y, x]) with the 4×4 ``ijk_to_ras`` geometry."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    slicer.util.arrayFromVolume(volume)[:] = array
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    return volume


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def segment_array(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """A segment as a uint8 array ``[z, y, x]`` on ``reference_volume``'s grid (what Slicer's
    ``slicer.util.arrayFromSegmentBinaryLabelmap`` does, with an explicit scene)."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__segment__")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, [segment_id], labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)


def update_segment(segmentation_node, segment_id: str, array: np.ndarray, reference_volume) -> None:
    """Replace a segment by ``array`` ([z, y, x] on ``reference_volume``'s grid), as an edit in the Segment Editor does
    (``slicer.util.updateSegmentBinaryLabelmapFromArray`` with an explicit scene)."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__edit__")
    try:
        image = vtk.vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        labelmap.SetAndObserveImageData(image)
        slicer.util.arrayFromVolume(labelmap)[:] = array > 0
        labelmap.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(reference_volume)))
        labelmap.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
        segment_ids = vtk.vtkStringArray()
        segment_ids.InsertNextValue(segment_id)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, segment_ids)
    finally:
        scene.RemoveNode(labelmap)


def save_saturated_checkpoint(path: Path) -> Path:
    """A tiny two-channel U-Net whose head outputs +10 everywhere: every voxel becomes lesion and lung (the same
    model as the module's self-test), so the expected statistics are exact."""
    import torch

    from COVIDLesionSegLib.checkpoints import Checkpoint, save_checkpoint
    from COVIDLesionSegLib.models import build_model

    kwargs = {"widths": [4, 8, 16, 32, 64], "out_channels": 2}
    state = build_model("unet", **kwargs).state_dict()
    state["head.weight"] = torch.zeros_like(state["head.weight"])
    state["head.bias"] = torch.full_like(state["head.bias"], 10.0)
    return save_checkpoint(Checkpoint("unet", kwargs, state, ["lesion", "lung"]), path)
