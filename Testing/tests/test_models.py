import subprocess
import sys

import pytest
import torch

from COVIDLesionSegLib.models import MODELS, build_model, count_parameters

# Pinned so an accidental architecture change is caught; ResAttUNet matches the 24.6 M of compute.md.
EXPECTED_PARAMETERS = {"unet": 31_384_833, "resunet": 24_493_953, "attunet": 31_908_517, "resattunet": 24_627_845}


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_is_pinned(name):
    assert count_parameters(build_model(name)) == EXPECTED_PARAMETERS[name]


def small_kwargs(name, **extra):
    return {"widths": (4, 8, 16, 32, 64), **extra} if name in ("unet", "attunet") else extra


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(64, 64), (37, 53)])
def test_forward_backward_keeps_size(name, size):
    torch.manual_seed(0)
    model = build_model(name, **small_kwargs(name, out_channels=2))
    image = torch.randn(2, 3, *size, requires_grad=True)
    logits = model(image)
    assert logits.shape == (2, 2, *size)
    logits.mean().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()


@pytest.mark.parametrize("name", ["unet", "resattunet"])
def test_one_input_channel(name):
    model = build_model(name, **small_kwargs(name, in_channels=1)).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unet, resunet, attunet, resattunet"):
        build_model("vnet")


def test_attention_gate_scales_skip_between_zero_and_one():
    from COVIDLesionSegLib.models import AttentionGate

    gate = AttentionGate(gate_channels=8, skip_channels=4, inter_channels=2)
    skip = torch.rand(1, 4, 5, 5) + 1
    gated = gate(torch.randn(1, 8, 5, 5), skip)
    ratio = gated / skip
    assert gated.shape == skip.shape and (ratio > 0).all() and (ratio < 1).all()
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one α per pixel, shared by all channels


def test_encoder_weights_from_local_file(tmp_path):
    from torchvision.models import resnet34

    torch.manual_seed(1)
    reference = resnet34(weights=None)
    path = tmp_path / "resnet34.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resattunet", encoder_weights=str(path))
    assert torch.equal(model.encoder.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)


def test_resnet34_is_torchvisions_built_without_it():
    """Same module names, same seeded initial weights (the random draws after it too) and the same features."""
    from torchvision.models import resnet34

    from COVIDLesionSegLib.models import ResNet34, ResNet34Encoder

    torch.manual_seed(3)
    ours, after_ours = ResNet34().state_dict(), torch.rand(4)
    torch.manual_seed(3)
    reference = resnet34(weights=None).eval()
    theirs, after_theirs = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, torch.rand(4)
    assert list(ours) == list(theirs) and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert torch.equal(after_ours, after_theirs)
    encoder = ResNet34Encoder().eval()
    encoder.load_state_dict({f"stem.{index}.{name}" if key.startswith(("conv1", "bn1")) else key: value
                             for key, value in reference.state_dict().items() if not key.startswith("fc.")
                             for index, name in [(0 if key.startswith("conv1") else 1, key.split(".", 1)[1])]})
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = reference.relu(reference.bn1(reference.conv1(image)))
        expected = [x]
        x = reference.maxpool(x)
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            x = layer(x)
            expected.append(x)
        features = encoder(image)
    assert len(features) == len(expected) and all(torch.equal(features[index], wanted) for index, wanted in enumerate(expected))


def test_inference_code_does_not_import_torchvision():
    """torchvision (about 160 MiB and a second of start-up) is imported for ImageNet encoder weights only."""
    code = ("import sys; from COVIDLesionSegLib import cli, predictor; from COVIDLesionSegLib.models import build_model; "
            "build_model('resattunet'); sys.exit('torchvision' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_encoder_weights_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth: encoder weights file not found"):
        build_model("resunet", encoder_weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"not": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a ResNet34 state dict"):
        build_model("resunet", encoder_weights=str(wrong))


def test_imagenet_weights_offline_error_says_how_to_use_a_local_file(monkeypatch):
    from torchvision.models import ResNet34_Weights

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(ResNet34_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="pass its local path"):
        build_model("resattunet", encoder_weights="imagenet")
