from dataclasses import fields

import numpy as np
import pytest

from COVIDLesionSegLib.statistics import MEASURES, LesionStatistics, VoxelGrid, lesion_statistics, severity_category


def test_known_volumes_and_lung_share():
    lesion = np.zeros((5, 10, 10), np.uint8)
    lesion[1, :2, :5] = 1  # 10 voxels
    lesion[3, 0, 0] = 1  # 1 voxel
    lung = np.zeros_like(lesion)
    lung[:, :, :] = 1  # 500 voxels, includes the lesion
    stats = lesion_statistics(lesion, VoxelGrid((0.5, 2.0, 4.0)), lung)  # 4 mm³ per voxel
    assert stats.lesion_ml == pytest.approx(11 * 4 / 1000)
    assert stats.lesion_slices == 2
    assert stats.lung_ml == pytest.approx(500 * 4 / 1000)
    assert stats.percent_opacity == pytest.approx(100 * 11 / 500)
    assert stats.severity == "CT-1"


def test_without_or_with_empty_lung_the_share_is_not_available():
    lesion = np.ones((2, 3, 3), np.uint8)
    without = lesion_statistics(lesion, VoxelGrid((1, 1, 1)))
    assert without.percent_opacity is None and without.severity is None and without.right_lung_ml is None
    empty = lesion_statistics(lesion, VoxelGrid((1, 1, 1)), np.zeros_like(lesion))
    assert empty.lung_ml == 0 and empty.percent_opacity is None and empty.severity is None


def test_empty_lesion_is_zero():
    stats = lesion_statistics(np.zeros((3, 4, 4)), VoxelGrid((1, 1, 1)), np.ones((3, 4, 4)))
    assert (stats.lesion_ml, stats.lesion_slices, stats.percent_opacity, stats.severity) == (0.0, 0, 0.0, "CT-0")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="lung mask shape"):
        lesion_statistics(np.zeros((2, 2, 2)), VoxelGrid((1, 1, 1)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="CT shape"):
        lesion_statistics(np.zeros((2, 2, 2)), VoxelGrid((1, 1, 1)), ct_hu=np.zeros((1, 2, 2)))


@pytest.mark.parametrize(("percent_opacity", "category"), [
    (None, None), (0.0, "CT-0"), (1e-9, "CT-1"), (24.99, "CT-1"), (25.0, "CT-2"), (49.99, "CT-2"),
    (50.0, "CT-3"), (74.99, "CT-3"), (75.0, "CT-4"), (100.0, "CT-4"),
])
def test_mosmed_severity_limits(percent_opacity, category):
    assert severity_category(percent_opacity) == category


def test_every_result_field_has_one_definition_in_order():
    assert [field.name for field in fields(LesionStatistics)] == [measure.name for measure in MEASURES]
    assert all(measure.definition and measure.label for measure in MEASURES)
