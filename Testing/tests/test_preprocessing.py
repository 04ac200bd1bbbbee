import cv2
import numpy as np
import pytest

from COVIDLesionSegLib.preprocessing import (
    PreprocessingConfig,
    is_hounsfield,
    resize_mask,
    resize_probabilities,
    slice_to_uint8,
    to_network_input,
    volume_to_uint8,
)

CONFIG = PreprocessingConfig()


def read_slice(shared_data, name):
    return cv2.imread(str(shared_data / "images" / name), cv2.IMREAD_UNCHANGED)


def readme_recipe(image_u8_or_float):
    """The shared data's README, steps 2–3, typed independently: bicubic 256², min–max, ×255 → uint8, CLAHE 7."""
    image = cv2.resize(np.float32(image_u8_or_float), (256, 256), interpolation=cv2.INTER_CUBIC)
    image = (image - image.min()) / (image.max() - image.min())
    return cv2.createCLAHE(clipLimit=7).apply((image * 255).astype(np.uint8))


def test_matches_the_shared_data_recipe_on_real_slices(shared_data):
    for name in ("coronacases_001_050.png", "radiopaedia_4_85506_1_010.png"):
        upsampled = cv2.resize(read_slice(shared_data, name), (512, 512), interpolation=cv2.INTER_CUBIC)
        np.testing.assert_array_equal(slice_to_uint8(upsampled, CONFIG), readme_recipe(upsampled))


def test_hu_and_lung_window_export_of_the_same_slice_give_the_same_input(shared_data):
    """An 8-bit lung-window export (0–255) and the HU slice it came from look identical to the network."""
    exported = read_slice(shared_data, "radiopaedia_4_85506_1_010.png").astype(np.float32)
    hounsfield = exported / 255 * 1500 - 1250  # the lung window [-1250, 250] the Radiopaedia data were exported in
    padded = hounsfield.copy()
    padded[:8] = -3024  # scanner padding outside the field of view is clipped away by the window
    assert is_hounsfield(hounsfield, CONFIG) and not is_hounsfield(exported, CONFIG)
    reference = slice_to_uint8(exported, CONFIG).astype(int)
    # the same up to uint8 truncation differences that CLAHE spreads a little (≈1 grey level on average)
    assert np.abs(slice_to_uint8(hounsfield, CONFIG) - reference).mean() < 2
    assert np.abs(slice_to_uint8(padded, CONFIG)[8:] - reference[8:]).mean() < 2
    unwindowed = PreprocessingConfig(hu_detect_below=-1e9)  # what the padding does without the HU window
    assert np.abs(slice_to_uint8(padded, unwindowed)[8:] - reference[8:]).mean() > 10


def test_volume_decides_hounsfield_once():
    volume = np.full((2, 40, 40), -1000.0)
    volume[0, 10:20, 10:20] = 40
    volume[1] = np.linspace(0, 200, 1600).reshape(40, 40)  # no air on this slice, still HU
    out = volume_to_uint8(volume, CONFIG)
    assert out.shape == (2, 256, 256) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1], slice_to_uint8(volume[1], CONFIG, hounsfield=True))


def test_blank_slice_stays_blank():
    out = slice_to_uint8(np.full((30, 30), 5.0), CONFIG)
    assert out.shape == (256, 256) and out.max() == 0


def test_network_input_is_imagenet_normalised():
    batch = to_network_input(np.array([[[0, 255]]], dtype=np.uint8), CONFIG)
    assert batch.shape == (1, 3, 1, 2) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], -np.array(CONFIG.mean) / np.array(CONFIG.std), rtol=1e-6)


def test_mask_resize_and_back():
    mask = np.zeros((100, 120), dtype=np.uint8)
    mask[20:60, 30:90] = 255
    small = resize_mask(mask, CONFIG)
    assert small.shape == (256, 256) and small.dtype == bool
    back = resize_probabilities(small[None].astype(np.float32), 100, 120)[0] >= 0.5
    assert (back == (mask > 0)).mean() > 0.99


def test_config_round_trips_through_json_types():
    restored = PreprocessingConfig.from_dict({**CONFIG.to_dict(), "hu_window": [-1000, 400]})
    assert restored.hu_window == (-1000, 400)
    with pytest.raises(ValueError, match="unknown preprocessing fields"):
        PreprocessingConfig.from_dict({"gamma": 2})
