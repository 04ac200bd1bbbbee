import numpy as np
import pytest
import SimpleITK as sitk
import torch

from COVIDLesionSegLib.backends import TorchBackend
from COVIDLesionSegLib.predictor import GuardRails, Predictor, predict_in_batches, resolve_device


class ThresholdNetwork(torch.nn.Module):
    """A stand-in network: channel 0 logit = first input channel, channel 1 = constant 'lung'."""

    def forward(self, batch):
        return torch.cat([batch[:, :1] * 10, torch.full_like(batch[:, :1], 5.0)], dim=1)


def test_batches_cover_every_slice_in_order():
    inputs = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
    seen, progress = [], []
    predict_in_batches(lambda batch: batch, inputs, 3, lambda start, out: seen.append((start, len(out))),
                       on_progress=lambda done, total: progress.append((done, total)))
    assert seen == [(0, 3), (3, 3), (6, 1)] and progress[-1] == (7, 7)


def test_cuda_out_of_memory_retries_with_smaller_batches():
    calls = []

    def network(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return batch

    chunks = []
    final = predict_in_batches(network, np.zeros((5, 1, 2, 2), np.float32), 8, lambda start, out: chunks.append(len(out)))
    assert final == 2 and calls[:2] == [5, 4] and sum(chunks) == 5


def test_out_of_memory_at_batch_one_gives_advice():
    def network(batch):
        raise torch.cuda.OutOfMemoryError("simulated")

    with pytest.raises(RuntimeError, match="--device cpu"):
        predict_in_batches(network, np.zeros((2, 1, 2, 2), np.float32), 1, lambda start, out: None)


def test_cuda_request_without_gpu_is_explained():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.fixture()
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu", batch_size=4)


def test_predict_volume_returns_uint8_mask_of_input_shape(predictor):
    volume = np.random.default_rng(0).normal(-500, 300, (3, 50, 70)).astype(np.float32)
    mask = predictor.predict_volume(volume)
    assert mask.shape == volume.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    mask2, probabilities = predictor.predict_volume(volume, return_probabilities=True)
    np.testing.assert_array_equal(mask, mask2)
    assert probabilities.shape == volume.shape and probabilities.dtype == np.float32
    assert predictor.predict_volume(volume[0]).shape == (50, 70)  # a 2D array is a one-slice volume


def test_lesion_is_kept_inside_the_lung(predictor):
    predictor.backend = TorchBackend(ThresholdNetwork(), "cpu")
    volume = np.zeros((1, 64, 64), np.float32)
    volume[0, 10:30, 10:30] = 100
    masks = predictor.predict_masks(volume)
    assert masks["lesion"].any() and not (masks["lesion"] & (1 - masks["lung"])).any()


def test_segment_image_keeps_grid_and_reports_statistics(predictor):
    predictor.backend = TorchBackend(ThresholdNetwork(), "cpu")
    predictor.guard_rails = GuardRails(lesion_min_ml=0.0)  # the 0.12 mL lesion would fall under the default minimum
    array = np.zeros((4, 30, 20), np.int16) - 1000
    array[1:3, 5:15, 5:10] = 0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.8, 3.0))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    result = predictor.segment_image(image)
    lesion = result.masks["lesion"]
    assert lesion.GetSize() == image.GetSize() and lesion.GetDirection() == image.GetDirection()
    assert result.statistics.lesion_slices == 2
    assert result.statistics.lesion_ml == pytest.approx(sitk.GetArrayFromImage(lesion).sum() * 0.5 * 0.8 * 3.0 / 1000)
    assert result.statistics.lung_ml == pytest.approx(4 * 30 * 20 * 1.2 / 1000)
    no_lung = predictor.segment_image(image, include_lung=False)
    assert list(no_lung.masks) == ["lesion"] and no_lung.statistics == result.statistics
