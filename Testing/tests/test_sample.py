"""The shipped sample is the right way up in patient coordinates (issue 14) and matches the slice set."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.io import read_image, to_radiological

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Samples" / "radiopaedia_27_86410_0.nii.gz"
DATA = ROOT.parent / "shared" / "data" / "covid19-ct-seg-20cases-png256"


def spine_row_fraction(volume: np.ndarray) -> float:
    """Median over slices of the spine's row, as a fraction of the image height from the top.

    The spine is taken as the densest compact structure near the midline: the maximum of the slice smoothed
    over 2 % of its width (thin bright edges such as the table's fade), within the central fifth of the columns."""
    fractions = []
    for plane in volume.astype(np.float32):
        height, width = plane.shape
        smoothed = cv2.GaussianBlur(plane, (0, 0), 0.02 * width)[:, 2 * width // 5 : 3 * width // 5]
        fractions.append(np.unravel_index(np.argmax(smoothed), smoothed.shape)[0] / height)
    return float(np.median(fractions))


def test_sample_spine_lies_posterior_on_the_inference_path():
    """Through the reader and the orientation inference uses, anterior is up: the spine is in the lower half."""
    volume = sitk.GetArrayFromImage(to_radiological(read_image(SAMPLE)))
    assert spine_row_fraction(volume) > 0.55


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared slice set not found at {DATA}")
def test_sample_is_the_radiological_stack_and_the_stored_slices_are_upside_down():
    from COVIDLesionSegTraining.sample import stack_volume

    sample = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE)))
    radiological, labels = stack_volume(DATA, "radiopaedia_27_86410_0")
    stored, _ = stack_volume(DATA, "radiopaedia_27_86410_0", orientation="as-stored")
    np.testing.assert_array_equal(sample, radiological)
    np.testing.assert_array_equal(stored, radiological[:, ::-1])
    assert spine_row_fraction(stored) < 0.45  # the check tells the two apart
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE.with_name("radiopaedia_27_86410_0-reference.nii.gz"))))
    np.testing.assert_array_equal(reference, labels)
