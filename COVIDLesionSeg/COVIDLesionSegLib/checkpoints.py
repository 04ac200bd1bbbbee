"""Self-describing checkpoints, the model registry and verified downloads.

A checkpoint is one ``.safetensors`` file: the tensors (fp32 or fp16) plus a JSON metadata header with
``format_version``, ``model`` (registry name + constructor kwargs), ``channels`` (what each output
channel means, e.g. ``["lesion", "lung"]``), ``preprocessing`` (:class:`PreprocessingConfig`),
``train_config`` and ``metrics``. Reading it never executes pickled code: a file that is not safetensors
(for example a ``torch.save`` pickle) is refused with an error that says so.

The registry ``Resources/models.json`` lists named models, each with a ``file`` (relative to
``Resources/``) or a ``url``, its ``sha256`` and a description. Files are verified against the
SHA-256 before they are used; URLs are downloaded once into a cache folder (``COVIDLESIONSEG_CACHE``,
default ``~/.cache/covidlesionseg``), also verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import build_model
from .preprocessing import PreprocessingConfig
from .resources import RegistryEntry, load_registry, resources_dir

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Everything needed to rebuild a trained network; ``state_dict`` holds float32 tensors."""

    model_name: str
    model_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    channels: list[str] = field(default_factory=lambda: ["lesion"])
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        """The network with these weights loaded, in eval mode, on the CPU."""
        model = build_model(self.model_name, **self.model_kwargs)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(checkpoint: Checkpoint, path: str | Path, half: bool = False) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; ``half`` stores floating tensors as fp16 (½ the size)."""
    from safetensors.torch import save_file

    tensors = {
        name: (tensor.half() if half and tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        for name, tensor in checkpoint.state_dict.items()
    }
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "model": json.dumps({"name": checkpoint.model_name, "kwargs": checkpoint.model_kwargs}),
        "channels": json.dumps(checkpoint.channels),
        "preprocessing": json.dumps(checkpoint.preprocessing.to_dict()),
        "train_config": json.dumps(checkpoint.train_config),
        "metrics": json.dumps(checkpoint.metrics),
    }
    path = Path(path)
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def has_safetensors_header(path: Path) -> bool:
    """True when ``path`` starts like a safetensors file: an 8-byte little-endian header length that fits
    in the file, followed by a JSON object. (A leading 0x80 byte is not proof of a pickle: it is also the
    low byte of some header lengths.)"""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        length_bytes, first = stream.read(8), stream.read(1)
    return len(length_bytes) == 8 and 8 + int.from_bytes(length_bytes, "little") <= size and first == b"{"


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if not has_safetensors_header(path):
        with open(path, "rb") as stream:
            head = stream.read(2)
        kind = "a pickle/zip torch checkpoint" if head[:1] == b"\x80" or head == b"PK" else "not a safetensors file"
        raise ValueError(f"{path}: {kind}; only .safetensors checkpoints are accepted (pickles can run code)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a valid safetensors checkpoint ({error})") from error
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path}: checkpoint format version {version!r}, this program reads version {FORMAT_VERSION}")
    try:
        model = json.loads(metadata["model"])
        return Checkpoint(
            model_name=model["name"],
            model_kwargs=model["kwargs"],
            state_dict={name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()},
            channels=json.loads(metadata["channels"]),
            preprocessing=PreprocessingConfig.from_dict(json.loads(metadata["preprocessing"])),
            train_config=json.loads(metadata.get("train_config", "{}")),
            metrics=json.loads(metadata.get("metrics", "{}")),
        )
    except (KeyError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path}: checkpoint metadata is incomplete or invalid ({error!r})") from error


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes, so writers pick the format); it replaces
    ``path`` only when the block finishes without an exception, otherwise it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part{''.join(path.suffixes)}")
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())  # some writers (safetensors) create files as 0600
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("COVIDLESIONSEG_CACHE", Path.home() / ".cache" / "covidlesionseg"))


def resolve_model_file(entry: RegistryEntry, resources: Path | None = None, cache: Path | None = None) -> Path:
    """The verified local file for a registry entry: shipped file, cached download, or a fresh download.

    Raises ``ValueError`` on a checksum mismatch and ``ConnectionError`` (with what to do) when offline.
    """
    if entry.file:
        path = (resources or resources_dir()) / entry.file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file of registry entry {entry.name!r} is missing")
        verify_sha256(path, entry.sha256)
        return path
    if not entry.url:
        raise ValueError(f"registry entry {entry.name!r} has neither a file nor a url")
    target = (cache or cache_dir()) / f"{entry.name}-{entry.sha256[:12]}.safetensors"
    if target.is_file():
        verify_sha256(target, entry.sha256)
        return target
    download(entry.url, target, entry.sha256)
    return target


def locate_model(source: str | Path) -> tuple[Path, str]:
    """``source`` (a checkpoint file, or a registry name) → (verified local file, display name)."""
    path = Path(source)
    if path.is_file():
        return path, path.name
    registry = load_registry()
    if str(source) not in registry:
        raise FileNotFoundError(f"{source}: neither a checkpoint file nor a registered model ({', '.join(registry)})")
    return resolve_model_file(registry[str(source)]), str(source)  # verifies the SHA-256


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected.lower():
        raise ValueError(f"{path}: SHA-256 mismatch (expected {expected}, got {actual}); the file is corrupt or not the registered model")


def download(url: str, target: Path, expected_sha256: str) -> None:
    """Download ``url`` to ``target`` through a temporary file, keeping it only if the SHA-256 matches."""
    try:
        with atomic_output(target) as temporary:
            with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as stream:
                shutil.copyfileobj(response, stream)
            verify_sha256(temporary, expected_sha256)
    except OSError as error:
        raise ConnectionError(
            f"could not download {url} ({error}). Without network access, download the file elsewhere and "
            f"pass it with --weights FILE, or place it at {target}"
        ) from error
