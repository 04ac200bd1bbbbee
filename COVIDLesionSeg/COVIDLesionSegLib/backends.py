"""Where the network runs: PyTorch, or ONNX Runtime on an ONNX export of the checkpoint (CPU).

A backend turns the network's inputs (float32 ``[N, C, size, size]``, :func:`preprocessing.to_network_input`) into
sigmoid probabilities (float32 ``[N, K, size, size]``) batch by batch (``run``); with ``flip_tta`` it averages the
logits of each slice and of its left–right mirror first. :func:`open_backend` picks one by name:

- ``"torch"``: the checkpoint's network in PyTorch (fp16 autocast on CUDA, ``channels_last`` on the CPU);
- ``"torch-bf16"``: the same on the CPU under bfloat16 autocast (convolutions and matrix products in bf16, the sigmoid in
  fp32). About twice as fast as fp32 on CPUs that compute bf16 natively (:func:`cpu_has_native_bf16`: x86 AVX512-BF16 or
  AMX), with the masks of fp32 (the probabilities differ by a few hundredths at most; ``test_backends``); elsewhere the
  bf16 arithmetic is emulated and slower than fp32;
- ``"onnxruntime"``: an ONNX Runtime CPU session on the network exported to ONNX, with the same outputs (fp32; the
  probabilities differ from PyTorch's by about 1e-6). Once the export is cached, torch is never imported;
- ``"onnxruntime-int8"``: the same export quantized to int8 (ONNX Runtime's static post-training quantization: QDQ,
  uint8 activations, int8 weights per channel; activation ranges from the calibration slices
  ``Resources/Models/int8-calibration.npz``, :func:`calibration_inputs`, by the percentile method). Several times
  faster on CPUs with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI); its masks come close to PyTorch's (lesion
  Dice 0.996–0.997 on the held-out volumes, ``test_backends``) but nearer than bf16's to the 0.995 that a faster path
  must keep, and below it on some trained-on volumes, so it is only used when asked for. A quantized
  export whose masks on the calibration slices differ from the fp32 export's by more (a Dice below
  :data:`INT8_MIN_DICE`) is refused;
- ``"auto"``: on a GPU, PyTorch; on a CPU with native bf16, ``"torch-bf16"``; on other CPUs ONNX Runtime when it is
  installed, else PyTorch. When ONNX Runtime is missing or the export fails, PyTorch is used with a warning saying why
  (an explicit ``"onnxruntime"`` without the package installed is an error).

**The export cache.** The network is exported (and quantized) once (this needs torch and the ``onnx`` package) to
``<checkpoint stem>.<key>.onnx`` beside the checkpoint, or in ``checkpoints.cache_dir()/onnx`` where that folder cannot be
written (a read-only install), next to a record ``<same name>.json``: the checkpoint's SHA-256, the export settings
(:func:`export_settings`: :data:`EXPORT_SETTINGS`, and for int8 :data:`INT8_SETTINGS` with the calibration file's
SHA-256), the ONNX file's SHA-256 and size. ``key`` is derived from the checkpoint's SHA-256 and the export settings.
A cached file is used only when its record matches and its bytes hash to the recorded SHA-256; anything else (stale,
truncated, edited) is exported again. Both files are written atomically (temporary file, then
rename), the ONNX file first, so that a record never vouches for a partial file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import io as bytes_io
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoints import Checkpoint, atomic_output, cache_dir, load_checkpoint, read_checkpoint_metadata, sha256_of

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "torch-bf16", "onnxruntime", "onnxruntime-int8")
EXPORT_SETTINGS = {"exporter": "torchscript", "opset": 17, "input": "float32 [batch, C, size, size]", "output": "logits"}
EXPORT_TOLERANCE = 1e-3  # largest |logit difference| to PyTorch allowed on the export's check batch (seen: ~1e-5)
INT8_SETTINGS = {"format": "QDQ", "activations": "uint8", "weights": "int8 per channel", "calibration": "Percentile"}
INT8_MIN_DICE = 0.97  # least Dice of each channel's mask, int8 against fp32, on the calibration slices: catches a broken quantization
CALIBRATION_FILE = "int8-calibration.npz"  # in Resources/Models: uint8 slices [N, size, size] as the network sees them
ProgressCallback = Callable[[int, int], None]  # (slices done, slices total)
BatchConsumer = Callable[[int, np.ndarray], None]  # (first slice, probabilities[B, K, H, W] float32)


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here (package missing, wrong device); the message says what to do."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU raises with what to do."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but PyTorch sees no CUDA GPU (CPU-only torch build or no driver); use --device cpu")
    return torch.device(device)


def device_name(device: str = "auto") -> str:
    """:func:`resolve_device` as a string ("cpu", "cuda", …), without importing torch where no GPU can be used."""
    if device == "cpu" or (device == "auto" and not gpu_may_be_present()):
        return "cpu"
    return str(resolve_device(device))


def gpu_may_be_present() -> bool:
    """False where PyTorch could not see a GPU anyway: CUDA hidden by ``CUDA_VISIBLE_DEVICES``, macOS, or no NVIDIA or
    AMD (ROCm) driver. True means: ask torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1") or sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):  # the NVIDIA driver, WSL's GPU device, ROCm's kernel driver
        return any(Path(path).exists() for path in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))
    if os.name == "nt":
        return (Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32" / "nvcuda.dll").exists()
    return True


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where the CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16), so that bf16 autocast beats fp32.
    Read from the ``flags`` of ``cpuinfo`` on Linux (torch is not imported); elsewhere from torch's own CPU checks."""
    if cpuinfo.is_file():
        with open(cpuinfo) as lines:
            flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        return not {"avx512_bf16", "amx_bf16"}.isdisjoint(flags)
    import torch

    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)  # torch before 2.2 has neither: fp32


def predict_in_batches(
    network: Callable[[torch.Tensor], torch.Tensor],
    inputs: np.ndarray,
    batch_size: int,
    consume: BatchConsumer,
    device: torch.device | str | None = None,
    on_progress: ProgressCallback | None = None,
    cpu_bf16: bool = False,
) -> int:
    """Run the torch ``network`` over ``inputs[N, C, H, W]`` in batches; ``consume(start, probabilities[B, K, H, W])``.

    fp16 autocast on CUDA; on the CPU bf16 autocast with ``cpu_bf16``, else fp32. On CUDA out-of-memory the batch is
    retried at half the size (down to 1). Returns the batch size that worked, so callers can keep it for the next volume.
    """
    import torch

    device = torch.device(device or "cpu")
    cpu_bf16 = cpu_bf16 and device.type == "cpu"
    start, total = 0, len(inputs)
    while start < total:
        batch = torch.from_numpy(inputs[start : start + batch_size]).to(device)
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
                probabilities = torch.sigmoid(network(batch).float()).cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise RuntimeError("CUDA out of memory even with batch size 1; use --device cpu") from None
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            logger.warning("CUDA out of memory; retrying with batch size %d", batch_size)
            continue
        consume(start, probabilities)
        start += len(probabilities)
        if on_progress:
            on_progress(start, total)
    return batch_size


class TorchBackend:
    """A torch network (logits ``[N, K, H, W]`` of a ``[N, C, H, W]`` batch) on ``device`` ("auto", "cpu", "cuda", …);
    ``cpu_bf16``: under bf16 autocast on the CPU (``name`` "torch-bf16")."""

    def __init__(self, network: torch.nn.Module, device: str = "auto", cpu_bf16: bool = False):
        import torch

        self.device = device_name(device)
        self.cpu_bf16 = cpu_bf16 and self.device == "cpu"
        self.name = "torch-bf16" if self.cpu_bf16 else "torch"
        self.network = network.to(self.device)
        if self.device == "cpu":
            self.network = self.network.to(memory_format=torch.channels_last)

    def run(self, inputs: np.ndarray, batch_size: int, consume: BatchConsumer, on_progress: ProgressCallback | None = None,
            flip_tta: bool = False) -> int:
        """:func:`predict_in_batches` of the network (averaged with its left–right mirror's logits with ``flip_tta``)."""
        import torch

        network = self.network
        if flip_tta:
            network = lambda batch: (self.network(batch) + torch.flip(self.network(torch.flip(batch, (3,))), (3,))) / 2  # noqa: E731
        return predict_in_batches(network, inputs, batch_size, consume, self.device, on_progress, self.cpu_bf16)


class OnnxRuntimeBackend:
    """An ONNX Runtime CPU session of the exported network (input ``[N, C, H, W]`` float32 → logits ``[N, K, H, W]``);
    ``name`` is "onnxruntime" or, for a quantized export, "onnxruntime-int8"."""

    device = "cpu"

    def __init__(self, session, name: str = "onnxruntime"):
        self.session = session
        self.name = name
        self.input_name = session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def run(self, inputs: np.ndarray, batch_size: int, consume: BatchConsumer, on_progress: ProgressCallback | None = None,
            flip_tta: bool = False) -> int:
        """As :meth:`TorchBackend.run`: ``consume(start, probabilities[B, K, H, W])`` for each batch; returns ``batch_size``."""
        total = len(inputs)
        for start in range(0, total, batch_size):
            batch = inputs[start : start + batch_size]
            logits = self.logits(batch)
            if flip_tta:
                logits = (logits + self.logits(batch[..., ::-1])[..., ::-1]) / 2
            with np.errstate(over="ignore"):  # exp(-logit) → inf below about -88: probability 0, as torch.sigmoid gives
                consume(start, (1 / (1 + np.exp(-logits))).astype(np.float32, copy=False))
            if on_progress:
                on_progress(min(start + batch_size, total), total)
        return batch_size


def session_threads() -> int:
    """ONNX Runtime's intra-op threads: ``OMP_NUM_THREADS`` as PyTorch reads it, else 0 (ONNX Runtime's default, one per
    physical core, which is PyTorch's default too)."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def onnxruntime_session(model: str | bytes, threads: int | None = None):
    """A CPU ``onnxruntime.InferenceSession`` of ``model`` (a file path or the model's bytes)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = session_threads() if threads is None else threads
    options.log_severity_level = 3  # errors only: no notes on graph optimisations
    options.enable_mem_pattern = False  # its pre-planned block raised the peak RSS (benchmark_memory_speed), not the speed
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def export_settings(int8: bool = False) -> dict:
    """What an export is made with: :data:`EXPORT_SETTINGS`, and for int8 :data:`INT8_SETTINGS` with the SHA-256 of the
    calibration file (FileNotFoundError when it is missing)."""
    if not int8:
        return EXPORT_SETTINGS
    return {**EXPORT_SETTINGS, "int8": {**INT8_SETTINGS, "calibration_sha256": sha256_of(calibration_file())}}


def export_key(sha256: str, settings: dict) -> str:
    """16 hex characters naming the export of the checkpoint with SHA-256 ``sha256`` made with ``settings``."""
    return hashlib.sha256(json.dumps({"checkpoint_sha256": sha256, "export": settings}, sort_keys=True).encode()).hexdigest()[:16]


def cache_candidates(path: Path, sha256: str, settings: dict) -> list[Path]:
    """Where the ONNX export of checkpoint ``path`` is looked for and written, in order: beside it, then the user cache."""
    name = f"{path.stem}.{export_key(sha256, settings)}.onnx"
    return [path.resolve().parent / name, cache_dir() / "onnx" / name]


def record_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".json")


def cached_session(onnx_path: Path, sha256: str, settings: dict, threads: int | None = None):
    """The session of a cached export when its record matches checkpoint ``sha256`` and ``settings`` and the file's bytes
    hash to the recorded SHA-256; None when absent. A stale or corrupt cache raises ValueError saying why."""
    record_file = record_path(onnx_path)
    if not record_file.is_file() and not onnx_path.is_file():
        return None
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("checkpoint_sha256") != sha256 or record.get("export") != settings:
            raise ValueError("made from another checkpoint or with other export settings")
        if onnx_path.stat().st_size != record.get("onnx_bytes") or sha256_of(onnx_path) != record.get("onnx_sha256"):
            raise ValueError("its bytes do not match its record (truncated or changed)")
        return onnxruntime_session(str(onnx_path), threads)
    except Exception as error:  # unreadable record, missing file, a file ONNX Runtime refuses: export again
        raise ValueError(f"{onnx_path}: cached ONNX export not usable ({type(error).__name__}: {error})") from error


def calibration_file() -> Path:
    from .resources import resources_dir

    return resources_dir() / "Models" / CALIBRATION_FILE


def calibration_inputs(config) -> np.ndarray:
    """The calibration slices as the network's float32 input ``[N, C, size, size]`` for preprocessing ``config``
    (resized when the checkpoint's size differs from the file's)."""
    from .preprocessing import resize_slice, to_network_input

    with np.load(calibration_file()) as stored:
        slices = stored["slices"]
    if slices.shape[-1] != config.size:
        slices = np.stack([resize_slice(plane, config.size) for plane in slices])
    return to_network_input(slices, config)


def masks_dice(expected: np.ndarray, found: np.ndarray) -> list[float]:
    """Per channel, the Dice of ``found``'s mask (logit > 0) against ``expected``'s; logits ``[N, K, H, W]``; 1 when
    both are empty."""
    dices = []
    for channel in range(expected.shape[1]):
        a, b = expected[:, channel] > 0, found[:, channel] > 0
        total = int(a.sum()) + int(b.sum())
        dices.append(1.0 if total == 0 else 2 * int((a & b).sum()) / total)
    return dices


def quantize_int8(model: bytes, config, batch_size: int = 4, calibration: str = INT8_SETTINGS["calibration"],
                  op_types: Sequence[str] | None = None, fp32_nodes: Sequence[str] = ()) -> bytes:
    """The fp32 ONNX ``model`` quantized as :data:`INT8_SETTINGS` say, calibrated on :func:`calibration_inputs`;
    RuntimeError when a channel's mask on those slices has a Dice below :data:`INT8_MIN_DICE` against fp32's.
    The export cache uses the defaults; ``calibration`` (an ONNX Runtime ``CalibrationMethod``: MinMax, Percentile,
    Entropy), ``op_types`` (the operator types quantized; None: all) and ``fp32_nodes`` (nodes left in fp32) are for
    comparing other quantizations (``Testing/benchmarks/backend_agreement.py --int8-variants``)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    inputs = calibration_inputs(config)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": inputs[start : start + batch_size]} for start in range(0, len(inputs), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="covidlesionseg-int8-") as folder:
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        fp32_path.write_bytes(model)
        quantize_static(str(fp32_path), str(int8_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, calibration), op_types_to_quantize=op_types,
                        nodes_to_exclude=list(fp32_nodes))
        quantized = int8_path.read_bytes()
    fp32, int8 = OnnxRuntimeBackend(onnxruntime_session(model)), OnnxRuntimeBackend(onnxruntime_session(quantized))
    batches = range(0, len(inputs), 8)
    dices = masks_dice(np.concatenate([fp32.logits(inputs[i : i + 8]) for i in batches]),
                       np.concatenate([int8.logits(inputs[i : i + 8]) for i in batches]))
    if min(dices) < INT8_MIN_DICE:
        raise RuntimeError(f"the int8 export's masks on the calibration slices differ from fp32's (Dice per channel "
                           f"{', '.join(f'{dice:.4f}' for dice in dices)}; at least {INT8_MIN_DICE} needed)")
    return quantized


def export_onnx(checkpoint: Checkpoint) -> bytes:
    """The checkpoint's network as ONNX bytes (TorchScript exporter, dynamic batch axis), checked against PyTorch on a
    random batch of two (``RuntimeError`` when a logit differs by more than :data:`EXPORT_TOLERANCE`)."""
    import torch

    network = checkpoint.build()
    config = checkpoint.preprocessing
    example = torch.randn(2, config.input_channels, config.size, config.size, generator=torch.Generator().manual_seed(0))
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    stream = bytes_io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation and tracer notes are not the user's concern
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (example,), stream, input_names=["input"], output_names=["logits"],
                          opset_version=EXPORT_SETTINGS["opset"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **options)
    model = stream.getvalue()
    with torch.inference_mode():
        expected = network(example).numpy()
    difference = float(np.max(np.abs(OnnxRuntimeBackend(onnxruntime_session(model)).logits(example.numpy()) - expected)))
    if not difference <= EXPORT_TOLERANCE:
        raise RuntimeError(f"the ONNX export's logits differ from PyTorch's by {difference:.3g} (> {EXPORT_TOLERANCE:g})")
    return model


def write_export(onnx_path: Path, model: bytes, sha256: str, settings: dict) -> None:
    """Write the export and then its record, each atomically (OSError when the folder cannot be written)."""
    import torch

    with atomic_output(onnx_path) as temporary:
        temporary.write_bytes(model)
    record = {"checkpoint_sha256": sha256, "export": settings, "onnx_sha256": hashlib.sha256(model).hexdigest(),
              "onnx_bytes": len(model), "torch": torch.__version__}
    with atomic_output(record_path(onnx_path)) as temporary:
        temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def onnxruntime_backend(path: Path, sha256: str, threads: int | None = None,
                        int8: bool = False) -> tuple[OnnxRuntimeBackend, Checkpoint]:
    """The ONNX Runtime backend of checkpoint ``path`` (SHA-256 ``sha256``; ``int8``: the quantized export) and the
    checkpoint: from the cache without torch when a valid export is there, else exported (torch), quantized, cached
    where a folder can be written, and used."""
    settings = export_settings(int8)
    name = "onnxruntime-int8" if int8 else "onnxruntime"
    candidates = cache_candidates(path, sha256, settings)
    for onnx_path in candidates:
        try:
            session = cached_session(onnx_path, sha256, settings, threads)
        except ValueError as error:
            logger.warning("%s; not used", error)
            continue
        if session is not None:
            return OnnxRuntimeBackend(session, name), read_checkpoint_metadata(path, check_model=False)
    checkpoint = load_checkpoint(path)
    model = export_onnx(checkpoint)
    if int8:
        model = quantize_int8(model, checkpoint.preprocessing)
    for onnx_path in candidates:
        try:
            write_export(onnx_path, model, sha256, settings)
            break
        except OSError as error:
            logger.debug("cannot cache the ONNX export at %s (%s)", onnx_path, error)
    else:
        logger.warning("the ONNX export of %s could not be cached (%s and %s not writable); it is made again next time",
                       path, candidates[0].parent, candidates[1].parent)
    return OnnxRuntimeBackend(onnxruntime_session(model, threads), name), checkpoint


def open_backend(path: str | Path, sha256: str, backend: str = "auto", device: str = "auto",
                 threads: int | None = None) -> tuple[TorchBackend | OnnxRuntimeBackend, Checkpoint]:
    """The backend named ``backend`` (:data:`BACKENDS`) for checkpoint ``path`` with SHA-256 ``sha256``, and the checkpoint
    (without tensors when they were not needed). ``threads``: ONNX Runtime's (default :func:`session_threads`)."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend.startswith("onnxruntime"):
        require_onnxruntime(device, backend)
    elif backend == "torch-bf16":
        require_cpu(device, backend)
        device = "cpu"
        if not cpu_has_native_bf16():
            logger.warning("this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX), so torch-bf16 runs slower than fp32 here")
    elif backend == "auto":
        device = device_name(device)
        if device != "cpu":
            backend = "torch"
        elif cpu_has_native_bf16():
            backend = "torch-bf16"
        elif onnxruntime_installed():
            backend = "onnxruntime"
        else:
            logger.warning("onnxruntime is not installed, so the network runs in PyTorch (pip install onnxruntime onnx: faster on the CPU)")
            backend = "torch"
    if backend.startswith("onnxruntime"):
        try:
            return onnxruntime_backend(path, sha256, threads, int8=backend == "onnxruntime-int8")
        except Exception as error:  # the export needs torch's exporter, the onnx package and a network it can trace
            reason = "the onnx package is not installed (pip install onnx)" if importlib.util.find_spec("onnx") is None else str(error)
            logger.debug("ONNX Runtime backend failed", exc_info=True)
            logger.warning("the network runs in PyTorch: the ONNX export for ONNX Runtime failed (%s)", reason)
            device = "cpu"
    checkpoint = load_checkpoint(path)
    return TorchBackend(checkpoint.build(), device, cpu_bf16=backend == "torch-bf16"), checkpoint


def require_cpu(device: str, backend: str) -> None:
    """BackendUnavailableError saying what to do when the CPU-only ``backend`` is asked for with another ``device``."""
    if device not in ("auto", "cpu"):
        raise BackendUnavailableError(f"the {backend} backend runs on the CPU; use --device cpu (or auto), or --backend torch "
                                      f"for {device}")


def require_onnxruntime(device: str = "auto", backend: str = "onnxruntime") -> None:
    """BackendUnavailableError saying what to do when the ONNX Runtime ``backend`` cannot run with ``device``."""
    require_cpu(device, backend)
    if not onnxruntime_installed():
        raise BackendUnavailableError(f"--backend {backend} needs the onnxruntime package, which is not installed: pip install "
                                      "onnxruntime onnx (or pip install 'covidlesionseg[fast]'), or use --backend auto or torch")
