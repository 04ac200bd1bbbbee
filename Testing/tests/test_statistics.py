import numpy as np
import pytest

from COVIDLesionSegLib.statistics import lesion_statistics


def test_known_volumes_and_lung_share():
    lesion = np.zeros((5, 10, 10), np.uint8)
    lesion[1, :2, :5] = 1  # 10 voxels
    lesion[3, 0, 0] = 1  # 1 voxel
    lung = np.zeros_like(lesion)
    lung[:, :, :] = 1  # 500 voxels, includes the lesion
    stats = lesion_statistics(lesion, (0.5, 2.0, 4.0), lung)  # 4 mm³ per voxel
    assert stats.lesion_ml == pytest.approx(11 * 4 / 1000)
    assert stats.lesion_slices == 2
    assert stats.lung_ml == pytest.approx(500 * 4 / 1000)
    assert stats.lesion_percent_of_lung == pytest.approx(100 * 11 / 500)


def test_without_or_with_empty_lung_the_share_is_not_available():
    lesion = np.ones((2, 3, 3), np.uint8)
    assert lesion_statistics(lesion, (1, 1, 1)).lesion_percent_of_lung is None
    empty = lesion_statistics(lesion, (1, 1, 1), np.zeros_like(lesion))
    assert empty.lung_ml == 0 and empty.lesion_percent_of_lung is None


def test_empty_lesion_is_zero():
    stats = lesion_statistics(np.zeros((3, 4, 4)), (1, 1, 1), np.ones((3, 4, 4)))
    assert (stats.lesion_ml, stats.lesion_slices, stats.lesion_percent_of_lung) == (0.0, 0, 0.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="lung mask shape"):
        lesion_statistics(np.zeros((2, 2, 2)), (1, 1, 1), np.zeros((2, 2, 3)))
