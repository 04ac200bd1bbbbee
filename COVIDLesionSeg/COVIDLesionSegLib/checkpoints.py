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
import inspect
import json
import math
import os
import re
import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .preprocessing import PreprocessingConfig
from .resources import RegistryEntry, load_registry, resources_dir

if TYPE_CHECKING:  # torch is imported where a network is built or read: the CLI's measure and io need none
    import torch

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
        from .models import build_model

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

    checkpoint = read_checkpoint_metadata(path)
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a valid safetensors checkpoint ({error})") from error
    checkpoint.state_dict = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}
    return checkpoint


def read_checkpoint_metadata(path: str | Path, check_model: bool = True) -> Checkpoint:
    """The checkpoint of ``path`` without its tensors (``state_dict`` empty), read from the safetensors header alone: no
    torch import, no unpickling. ``check_model=False`` leaves out the check of the model's constructor arguments (it
    needs ``models``, hence torch): for a file whose network was built before (the ONNX export cache of ``backends``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if not has_safetensors_header(path):
        with open(path, "rb") as stream:
            head = stream.read(2)
        kind = "a pickle/zip torch checkpoint" if head[:1] == b"\x80" or head == b"PK" else "not a safetensors file"
        raise ValueError(f"{path}: {kind}; only .safetensors checkpoints are accepted (pickles can run code)")
    try:
        with open(path, "rb") as stream:
            header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not an object")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid safetensors checkpoint (header: {error})") from error
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path}: checkpoint format version {version!r}, this program reads version {FORMAT_VERSION}")
    fields = {name: parse_metadata_field(path, metadata, name)
              for name in ("model", "channels", "preprocessing", "train_config", "metrics")}
    validate_metadata(path, fields, check_model)
    return Checkpoint(
        model_name=fields["model"]["name"],
        model_kwargs=fields["model"]["kwargs"],
        state_dict={},
        channels=fields["channels"],
        preprocessing=preprocessing_config(path, fields["preprocessing"]),
        train_config=fields["train_config"],
        metrics=fields["metrics"],
    )


def preprocessing_config(path: Path, values: dict) -> PreprocessingConfig:
    try:
        return PreprocessingConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: checkpoint metadata field 'preprocessing' is invalid ({error})") from None


def parse_metadata_field(path: Path, metadata: dict, name: str):
    """The JSON value of metadata field ``name`` (``{}`` for the optional train_config and metrics)."""
    if name not in metadata and name in ("train_config", "metrics"):
        return {}
    if name not in metadata:
        raise ValueError(f"{path}: checkpoint metadata lacks the field '{name}'")
    try:
        return json.loads(metadata[name])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: checkpoint metadata field '{name}' is not valid JSON ({error})") from None


def validate_metadata(path: Path, fields: dict, check_model: bool = True) -> None:
    """Check the metadata against the schema of :func:`save_checkpoint`; ValueError names the first bad field.
    ``check_model``: also the model's name and constructor arguments, against ``models.MODELS`` (imports torch)."""

    def fail(field_name: str, expected: str, value) -> None:
        raise ValueError(f"{path}: checkpoint metadata field '{field_name}' must be {expected} (got {value!r})")

    model = fields["model"]
    if not isinstance(model, dict) or set(model) != {"name", "kwargs"}:
        fail("model", "an object with exactly 'name' and 'kwargs'", model)
    if not isinstance(model["kwargs"], dict):
        fail("model.kwargs", "an object", model["kwargs"])
    channels = fields["channels"]
    if not (isinstance(channels, list) and channels and all(isinstance(c, str) for c in channels)
            and len(set(channels)) == len(channels) and "lesion" in channels):
        fail("channels", "a list of distinct channel names including 'lesion'", channels)
    if check_model:
        from .models import MODELS

        if not isinstance(model["name"], str) or model["name"].lower() not in MODELS:
            fail("model.name", f"one of {', '.join(MODELS)}", model["name"])
        parameters = inspect.signature(MODELS[model["name"].lower()]).parameters
        for key in model["kwargs"]:
            if key not in parameters:
                fail(f"model.kwargs.{key}", f"a known argument ({', '.join(parameters)})", model["kwargs"][key])
        out_channels = model["kwargs"].get("out_channels", parameters["out_channels"].default if "out_channels" in parameters else 1)
        if out_channels != len(channels):
            fail("model.kwargs.out_channels", f"the number of channels ({len(channels)})", out_channels)
    preprocessing = fields["preprocessing"]
    if not isinstance(preprocessing, dict):
        fail("preprocessing", "an object", preprocessing)
    known = PreprocessingConfig.__dataclass_fields__
    for key, value in preprocessing.items():
        if key not in known:
            fail(f"preprocessing.{key}", f"absent: unknown field (known: {', '.join(known)})", value)
        test, expected = PREPROCESSING_SCHEMA.get(key, (lambda _: True, ""))
        if not test(value):
            fail(f"preprocessing.{key}", expected, value)
    for name in ("train_config", "metrics"):
        if not isinstance(fields[name], dict):
            fail(name, "an object", fields[name])


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def numbers(count: int, test=is_number):
    return lambda value: isinstance(value, (list, tuple)) and len(value) == count and all(map(test, value))


PREPROCESSING_SCHEMA = {  # field: (test, what it must be)
    "size": (is_positive_int, "a positive integer"),
    "hu_window": (lambda v: numbers(2)(v) and v[0] < v[1], "[low, high] HU with low < high"),
    "hu_detect_below": (is_number, "a finite number"),
    "clahe_clip_limit": (lambda v: is_number(v) and v > 0, "a positive number"),
    "clahe_tile_grid": (numbers(2, is_positive_int), "two positive integers"),
    "input_channels": (lambda v: is_positive_int(v) and v <= 3, "1, 2 or 3"),
    "mean": (numbers(3), "three finite numbers"),
    "std": (lambda v: numbers(3)(v) and min(v) > 0, "three positive numbers"),
    "mask_threshold": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
}


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes, so writers pick the format); it replaces
    ``path`` only when the block finishes without an exception, otherwise it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part{''.join(path.suffixes)}")
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())  # some writers (safetensors) create files as 0600
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.part")
STALE_AFTER_SECONDS = 3600.0


def sweep_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_output` in ``folder`` left by killed runs: their process is gone
    (on this machine) or they are older than an hour. Returns the deleted paths."""
    swept = []
    for path in Path(folder).glob(".*.part*"):
        match = TEMPORARY_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        try:
            if not process_alive(int(match["pid"])) or time.time() - path.stat().st_mtime > STALE_AFTER_SECONDS:
                path.unlink()
                swept.append(path)
        except FileNotFoundError:  # renamed or removed by its writer meanwhile
            continue
    return swept


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; True where that cannot be probed safely (Windows)."""
    if pid == os.getpid() or os.name == "nt":  # os.kill on Windows would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    return cached_download(entry.url, (cache or cache_dir()) / f"{entry.name}-{entry.sha256[:12]}.safetensors", entry.sha256)


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


def cached_download(url: str, target: Path, expected_sha256: str, offline_option: str = "--weights FILE") -> Path:
    """``target``, verified: the cached copy when there is one, else :func:`download` of ``url``."""
    if target.is_file():
        verify_sha256(target, expected_sha256)
    else:
        download(url, target, expected_sha256, offline_option)
    return target


def download(url: str, target: Path, expected_sha256: str, offline_option: str = "--weights FILE") -> None:
    """Download ``url`` to ``target`` through a temporary file, keeping it only if the SHA-256 matches. Offline,
    the error says to pass the file with ``offline_option`` or to place it at ``target``."""
    try:
        with atomic_output(target) as temporary:
            with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as stream:
                shutil.copyfileobj(response, stream)
            verify_sha256(temporary, expected_sha256)
    except OSError as error:
        raise ConnectionError(
            f"could not download {url} ({error}). Without network access, download the file elsewhere and "
            f"pass it with {offline_option}, or place it at {target}"
        ) from error
