"""``covidlesionseg-int8-calibration``: the int8 calibration slices, made from real training slices and lesion-free HU
volumes through the inference preprocessing, and the shipped file it made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from COVIDLesionSegLib.backends import calibration_file
from COVIDLesionSegTraining.calibration import calibration_slices, evenly, main

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
DATA, NEGATIVES = SHARED / "covid19-ct-seg-20cases-png256", SHARED / "chest-ct-hu-no-covid"
CHECKED_ON = ("coronacases_004", "radiopaedia_27_86410_0")  # the shipped model's held-out volumes (test_backends)


def test_evenly_spreads_the_indices_over_the_whole_range():
    assert evenly(3, 9) == [0, 4, 8] and evenly(5, 3) == [0, 1, 2] and evenly(1, 7) == [0]


def test_the_shipped_calibration_slices_leave_out_the_volumes_int8_is_checked_on():
    with np.load(calibration_file()) as stored:
        slices, sources = stored["slices"], [str(source) for source in stored["sources"]]
    assert slices.dtype == np.uint8 and slices.shape[1:] == (256, 256) and len(sources) == len(slices) >= 32
    volumes = {source.split(":")[0] for source in sources}
    assert not volumes & set(CHECKED_ON) and "pyradiomics_lung2" not in volumes
    assert any(volume.startswith("pyradiomics") or volume.startswith("lpct") for volume in volumes)  # HU slices too
    assert all(plane.std() > 10 for plane in slices)  # images, not blank slices


def test_calibration_slices_are_the_network_slices_of_the_volumes_not_excluded(tmp_path):
    if not (DATA / "manifest.csv").is_file() or not (NEGATIVES / "manifest.csv").is_file():
        pytest.skip(f"the training slices or the lesion-free volumes are not present under {SHARED}")
    everyone_but_one = ["pyradiomics_lung1", "pyradiomics_lung2", "lung_pet_ct_dx_A0001", "totalsegmentator_example_dicom"]
    slices, sources = calibration_slices(DATA, NEGATIVES, CHECKED_ON, everyone_but_one, 5, 2, "resattunet-lesion-lung-v2")
    assert slices.shape == (7, 256, 256) and slices.dtype == np.uint8
    assert not {source.split(":")[0] for source in sources[:5]} & set(CHECKED_ON)
    assert [source.split(":")[0] for source in sources[5:]] == ["totalsegmentator_example_ct"] * 2
    output = tmp_path / "calibration.npz"
    assert main(["--data", str(DATA), "--negatives", str(NEGATIVES), "--exclude", *CHECKED_ON, "--exclude-patients",
                 *everyone_but_one, "--lesion-slices", "5", "--hu-slices", "2", "--output", str(output)]) == 0
    with np.load(output) as stored:
        np.testing.assert_array_equal(stored["slices"], slices)
        assert [str(source) for source in stored["sources"]] == sources
