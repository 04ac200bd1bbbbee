"""The four networks compared in the paper, built from two encoders and two skip fusions.

Every model maps a batch ``[N, in_channels, H, W]`` (float32, H and W any size; multiples of 32
avoid padding) to logits ``[N, out_channels, H, W]`` of the same height and width.

========================  ===============================  ===========================
model (registry key)      encoder                          skip connection
========================  ===============================  ===========================
``UNet`` (unet)           plain double-conv, 64…1024 ch    concatenate
``ResUNet`` (resunet)     torchvision ResNet34             concatenate
``AttentionUNet``         plain double-conv, 64…1024 ch    attention gate, then concat
``ResAttUNet``            torchvision ResNet34             attention gate, then concat
========================  ===============================  ===========================

Encoders return their feature maps shallow → deep and declare ``out_channels`` and ``stride`` of the
shallowest map; that is the only contract the decoder relies on. For a 256×256 input the ResNet34
encoder gives (worked example, paper Table 1)::

    stem  (Layer0)  64 × 128 × 128     stride 2
    layer1          64 ×  64 ×  64
    layer2         128 ×  32 ×  32
    layer3         256 ×  16 ×  16
    layer4         512 ×   8 ×   8

The decoder walks back up: each stage upsamples (bilinear ×2), optionally gates the encoder skip with
an attention gate (paper eq. 2–5), concatenates, and applies two 3×3 conv-BN-ReLU layers whose width
equals the skip's channel count (the paper: "each decoder stage matches its encoder stage"). The head
upsamples back to the input size where the shallowest skip is strided and applies a 1×1 conv.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_WEIGHTS_HELP = (
    "encoder_weights must be 'none', 'imagenet' (torchvision's ResNet34_Weights.IMAGENET1K_V1, "
    "downloaded once into torch's cache) or the path of a local torchvision resnet34 state-dict file"
)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 conv (padding 1, no bias) → BatchNorm → ReLU; keeps the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


class PlainEncoder(nn.Module):
    """The original U-Net encoder: double 3×3 convs, 2×2 max-pool between stages.

    ``widths`` default to (64, 128, 256, 512, 1024); the shallowest map has stride 1.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512, 1024)):
        super().__init__()
        channels = (in_channels, *widths)
        self.stages = nn.ModuleList(double_conv(channels[i], channels[i + 1]) for i in range(len(widths)))
        self.out_channels = tuple(widths)
        self.stride = 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, stage in enumerate(self.stages):
            x = stage(x if index == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (two 3×3 conv-BN, identity or 1×1 conv-BN shortcut), with its module names."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        downsample = None
        if stride != 1 or in_channels != channels:  # made before the convs, as torchvision does: same random draws
            downsample = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(channels))
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet34(nn.Module):
    """torchvision's ``resnet34(weights=None)`` without its pooling/fc head, built without importing torchvision (about
    160 MiB and seconds of start-up for every inference run). Same module names (its state dict loads here, and the
    encoder's keys stay those of the shipped checkpoints) and, under one random seed, the same initial weights:
    torchvision's init (He normal, fan-out, on every conv; BatchNorm 1 and 0), after the same random draws, those of
    its 1000-class ImageNet head included."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths, blocks = (64, 128, 256, 512), (3, 4, 6, 3)
        in_channels = 64
        for index, (channels, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layer = [BasicBlock(in_channels, channels, stride), *(BasicBlock(channels, channels) for _ in range(count - 1))]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
            in_channels = channels
        nn.Linear(512, 1000)  # torchvision's ImageNet head, not kept: only its random draws, so the convs below get its values
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)


class ResNet34Encoder(nn.Module):
    """ResNet34 (:class:`ResNet34`, torchvision's) without its pooling/fc head; the shallowest map (the stem) has stride 2."""

    def __init__(self, in_channels: int = 3, weights: str | Path | None = "none"):
        super().__init__()
        resnet = ResNet34()
        load_resnet34_weights(resnet, weights)
        if in_channels != 3:
            resnet.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)
        self.pool = resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = (64, 64, 128, 256, 512)
        self.stride = 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.stem(x)
        x1 = self.layer1(self.pool(x0))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x0, x1, x2, x3, x4]


def load_resnet34_weights(resnet: nn.Module, weights: str | Path | None) -> None:
    """Fill ``resnet`` from ``weights``: 'none' (leave random), 'imagenet' or a local state-dict file.

    Local files are read with ``torch.load(weights_only=True)`` (no pickle code runs) or safetensors.
    """
    if weights is None or str(weights).lower() == "none":
        return
    if str(weights).lower() == "imagenet":
        from torchvision.models import ResNet34_Weights

        entry = ResNet34_Weights.IMAGENET1K_V1
        try:
            state = entry.get_state_dict(progress=False)
        except Exception as error:  # urllib raises several types when offline
            raise RuntimeError(
                f"could not download the ImageNet ResNet34 weights from {entry.url} ({error}). "
                "Without network access, download that file elsewhere and pass its local path as the "
                "encoder weights (e.g. --encoder-weights /path/to/resnet34-b627a593.pth)."
            ) from error
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: encoder weights file not found; {ENCODER_WEIGHTS_HELP}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"{path}: not a plain tensor state dict ({error}); {ENCODER_WEIGHTS_HELP}") from error
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{weights}: not a ResNet34 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")


class AttentionGate(nn.Module):
    """Attention gate of Oktay et al. as written in the paper (eq. 2–5).

    ``g`` (decoder feature, gate_channels) and ``x`` (encoder skip, skip_channels) share H×W:
    A = W_g·g + W_x·x (1×1 convs to ``inter_channels``); B = ψ(ReLU(A)) (1×1 conv to 1 channel);
    α = sigmoid(B) ∈ (0, 1) per pixel; returns α·x, shape of ``x``.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int):
        super().__init__()
        self.gate_projection = nn.Conv2d(gate_channels, inter_channels, kernel_size=1)
        self.skip_projection = nn.Conv2d(skip_channels, inter_channels, kernel_size=1)
        self.psi = nn.Conv2d(inter_channels, 1, kernel_size=1)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.gate_projection(g) + self.skip_projection(x))))
        return alpha * x


class DecoderStage(nn.Module):
    """Upsample the deeper feature to the skip's size, fuse it with the skip, then two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, attention: bool):
        super().__init__()
        self.gate = AttentionGate(in_channels, skip_channels, max(skip_channels // 2, 1)) if attention else None
        self.convs = double_conv(in_channels + skip_channels, skip_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        if self.gate is not None:
            skip = self.gate(g, skip)
        return self.convs(torch.cat([g, skip], dim=1))


class EncoderDecoder(nn.Module):
    """U-Net shape: encoder features shallow→deep, decoder stages deep→shallow, 1×1 conv head."""

    def __init__(self, encoder: nn.Module, out_channels: int, attention: bool):
        super().__init__()
        self.encoder = encoder
        channels = encoder.out_channels
        self.decoder = nn.ModuleList(
            DecoderStage(channels[i + 1], channels[i], attention) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv2d(channels[0], out_channels, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        multiple = 2 ** (len(self.encoder.out_channels) - 1) * self.encoder.stride
        padded = pad_to_multiple(image, multiple)
        features = self.encoder(padded)
        x = features[-1]
        for stage, skip in zip(self.decoder, reversed(features[:-1])):  # one stage per skip; no strict=: Slicer 5.6/5.8 run Python 3.9
            x = stage(x, skip)
        if self.encoder.stride > 1:
            x = F.interpolate(x, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(x)[..., : size[0], : size[1]]


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad bottom/right so H and W are multiples of ``multiple`` (the total encoder stride)."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image


class UNet(EncoderDecoder):
    """Ronneberger et al.'s U-Net: plain encoder, concatenated skips."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, widths: tuple[int, ...] = (64, 128, 256, 512, 1024)):
        super().__init__(PlainEncoder(in_channels, tuple(widths)), out_channels, attention=False)


class AttentionUNet(EncoderDecoder):
    """Oktay et al.'s Attention U-Net: plain encoder, attention-gated skips."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, widths: tuple[int, ...] = (64, 128, 256, 512, 1024)):
        super().__init__(PlainEncoder(in_channels, tuple(widths)), out_channels, attention=True)


class ResUNet(EncoderDecoder):
    """U-Net with a ResNet34 encoder and concatenated skips (the paper's Res-Unet)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, encoder_weights: str | Path | None = "none"):
        super().__init__(ResNet34Encoder(in_channels, encoder_weights), out_channels, attention=False)


class ResAttUNet(EncoderDecoder):
    """The paper's ResAttUnet: ResNet34 encoder and attention-gated skips."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, encoder_weights: str | Path | None = "none"):
        super().__init__(ResNet34Encoder(in_channels, encoder_weights), out_channels, attention=True)


MODELS: dict[str, type[EncoderDecoder]] = {
    "unet": UNet,
    "resunet": ResUNet,
    "attunet": AttentionUNet,
    "resattunet": ResAttUNet,
}

DISPLAY_NAMES = {"unet": "Unet", "resunet": "Res-Unet", "attunet": "Attention-Unet", "resattunet": "ResAttUnet"}


def build_model(name: str, **kwargs) -> EncoderDecoder:
    """Build the model registered as ``name`` (one of ``MODELS``) with constructor ``kwargs``."""
    try:
        model_class = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}") from None
    return model_class(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
