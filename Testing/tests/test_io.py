import math

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from COVIDLesionSegLib import io

COS, SIN = math.cos(math.radians(20)), math.sin(math.radians(20))
GEOMETRIES = {
    "identity-odd": ((1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "anisotropic": ((0.61, 0.83, 5.0), (-120.5, 33.25, -7.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "flipped": ((0.7, 0.7, 2.0), (10, 20, 30), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
    "permuted-sagittal": ((0.9, 1.1, 1.3), (5, 6, 7), (0, 0, -1, 1, 0, 0, 0, -1, 0)),
    "oblique": ((0.8, 0.8, 2.5), (-3, 4, -5), (COS, -SIN, 0, SIN, COS, 0, 0, 0, 1)),
}


def make_volume(geometry, seed=0, size=(37, 29, 7)) -> sitk.Image:
    spacing, origin, direction = GEOMETRIES[geometry]
    array = np.random.default_rng(seed).integers(-1000, 400, size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def assert_same_grid(image: sitk.Image, reference: sitk.Image):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_radiological_round_trip_restores_grid_and_voxels(geometry):
    image = make_volume(geometry)
    oriented = io.to_radiological(image)
    np.testing.assert_allclose(np.abs(np.asarray(oriented.GetDirection()).reshape(3, 3)).diagonal() > 0.9, True)
    restored = io.from_radiological(sitk.GetArrayFromImage(oriented), image)
    assert_same_grid(restored, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(image))


def test_flipped_volume_is_shown_radiologically():
    """Patient right must end up on the image left whatever the stored axis direction."""
    array = np.zeros((1, 4, 6), dtype=np.int16)
    array[0, :, 0] = 100  # first stored column
    image = sitk.GetImageFromArray(array)
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # x runs toward patient right: column 0 is the leftmost (L) side
    oriented = sitk.GetArrayFromImage(io.to_radiological(image))
    assert oriented[0, :, -1].min() == 100  # the patient-left column is shown on the image right


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("output_format", io.OUTPUT_FORMATS)
def test_written_segmentation_keeps_input_geometry(tmp_path, geometry, output_format):
    image = make_volume(geometry)
    lesion = sitk.Cast(image > 200, sitk.sitkUInt8)
    lung = sitk.Cast(image > -200, sitk.sitkUInt8)
    path = io.write_segmentation(io.output_path(tmp_path, "case", output_format), {"lesion": lesion, "lung": lung})
    if output_format == "nii.gz":
        labels = sitk.ReadImage(str(path))
        assert_same_grid(labels, image)
        values = sitk.GetArrayFromImage(labels)
        np.testing.assert_array_equal(values == 1, sitk.GetArrayFromImage(lesion) > 0)
        np.testing.assert_array_equal(values > 0, sitk.GetArrayFromImage(lesion | lung) > 0)
    else:
        segmentation = slicerio.read_segmentation(str(path))
        np.testing.assert_allclose(segmentation["ijkToLPS"], io.ijk_to_lps(image), atol=1e-5)
        names = [segment["name"] for segment in segmentation["segments"]]
        assert names == ["COVID-19 lesion", "Lung"]
        lesion_voxels = slicerio.segment_mask(segmentation, slicerio.segment_from_name(segmentation, "COVID-19 lesion"))
        np.testing.assert_array_equal(lesion_voxels.transpose(2, 1, 0), sitk.GetArrayFromImage(lesion) > 0)
        lesion_segment = segmentation["segments"][0]
        assert lesion_segment["terminology"]["type"][1] == "47351003"  # SCT Infiltrate
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_reads_volume_formats(tmp_path, suffix):
    image = make_volume("anisotropic")
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    read = io.read_image(path)
    assert_same_grid(read, image)
    assert io.case_name(path) == "ct"


def write_dicom_series(folder, image: sitk.Image, series_uid="1.2.826.0.1.3680043.2.1125.1"):
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for index in range(image.GetDepth()):
        piece = image[:, :, index]
        for tag, value in [("0020|000e", series_uid), ("0008|0060", "CT"),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in direction[0::3] + direction[1::3])),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, index)))),
                           ("0020|0013", str(index + 1)), ("0028|1052", "0"), ("0028|1053", "1")]:
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{index:03d}.dcm"))
        with io.preserved_locale():  # GDCM writes change the process locale as its reads do
            writer.Execute(piece)


def test_reads_a_dicom_series_folder(tmp_path):
    image = make_volume("anisotropic", size=(16, 12, 4))
    write_dicom_series(tmp_path / "series", image)
    read = io.read_image(tmp_path / "series")
    assert read.GetSize() == image.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_png_slice_is_a_one_slice_volume(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (40, 50)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "slice.png"))
    read = io.read_image(tmp_path / "slice.png")
    assert read.GetSize() == (50, 40, 1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read)[0], array)


BAD_INPUTS = {
    "missing": (lambda d: d / "absent.nii.gz", "no such file or folder"),
    "not an image": (lambda d: write_bytes(d / "notes.txt", b"hello"), "not a readable image"),
    "corrupt": (lambda d: write_bytes(d / "broken.nii.gz", b"\x1f\x8b garbage"), "corrupt compressed data"),
    "empty folder": (lambda d: mkdir(d / "empty"), "no DICOM series"),
    "rgb": (lambda d: write(d / "rgb.png", sitk.GetImageFromArray(np.zeros((8, 8, 3), np.uint8), isVector=True)), "RGB"),
    "4d": (lambda d: write(d / "four.nii.gz", sitk.JoinSeries([make_volume("identity-odd"), make_volume("identity-odd", 1)])), "4D"),
    "constant": (lambda d: write(d / "flat.nrrd", sitk.GetImageFromArray(np.full((3, 4, 5), -1000, np.int16))), "constant image"),
    "nan": (lambda d: write(d / "nan.nrrd", sitk.GetImageFromArray(np.array([[[0.0, np.nan], [1.0, 2.0]]], np.float32))), "NaN"),
}


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def mkdir(path):
    path.mkdir()
    return path


def write(path, image):
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path, kind):
    make, message = BAD_INPUTS[kind]
    path = make(tmp_path)
    with pytest.raises(io.InputError, match=message) as error:
        io.read_image(path)
    text = str(error.value)
    assert text.startswith(str(path)) and "\n" not in text


def test_reading_dicom_keeps_the_text_encoding(tmp_path):
    """GDCM changes the process locale; after a DICOM read Python must still write UTF-8 text by default."""
    import locale

    write_dicom_series(tmp_path / "series", make_volume("anisotropic", size=(8, 8, 2)))
    before = locale.getpreferredencoding(False)
    io.read_image(tmp_path / "series")
    assert locale.getpreferredencoding(False) == before


def test_voxels_are_counted_a_few_slices_at_a_time_exactly():
    volume = np.random.default_rng(0).integers(-1100, 300, (37, 20, 24)).astype(np.int16)  # 37 = 2 × 16 + 5: a short last chunk
    for condition in (lambda chunk: chunk < io.AIR_BELOW_HU, lambda chunk: chunk > io.BODY_ABOVE_HU):
        assert io.count_voxels(volume, condition) == np.count_nonzero(condition(volume))
        assert io.count_voxels(volume, condition, slices_at_a_time=1) == np.count_nonzero(condition(volume))
