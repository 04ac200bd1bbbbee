"""Ship a trained checkpoint: fp16 copy under ``Resources/Models/`` and an entry in ``Resources/models.json``.

    covidlesionseg-export-model runs/shipped-resattunet/best.safetensors --name resattunet-lesion-lung-v1 \
        --description "…" --default

The fp16 file is half the size (ResAttUnet: ≈ 49 MB); the predictor loads it back as float32. The registry
entry gets the file's SHA-256, which the core verifies before every use.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from COVIDLesionSegLib.checkpoints import atomic_output, load_checkpoint, save_checkpoint, sha256_of
from COVIDLesionSegLib.resources import REGISTRY_FILE_NAME


def export_model(checkpoint_path: Path, name: str, description: str, resources: Path, default: bool) -> dict:
    """Write ``resources/Models/<name>.safetensors`` (fp16) and add/replace ``name`` in the registry."""
    relative = f"Models/{name}.safetensors"
    shipped = save_checkpoint(load_checkpoint(checkpoint_path), resources / relative, half=True)
    entry = {"name": name, "file": relative, "sha256": sha256_of(shipped), "description": description, "default": default}
    registry_path = resources / REGISTRY_FILE_NAME
    models = json.loads(registry_path.read_text(encoding="utf-8"))["models"] if registry_path.is_file() else []
    models = [dict(model, default=model.get("default", False) and not default) for model in models if model["name"] != name]
    with atomic_output(registry_path) as temporary:
        temporary.write_text(json.dumps({"models": [*models, entry]}, indent=2) + "\n", encoding="utf-8")
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (.safetensors)")
    parser.add_argument("--name", required=True, help="registry name, also the file name")
    parser.add_argument("--description", required=True)
    parser.add_argument("--resources", type=Path, default=Path("Resources"), help="the Resources folder (default ./Resources)")
    parser.add_argument("--default", action="store_true", help="make it the default model of the CLI, API and Slicer module")
    args = parser.parse_args(argv)
    print(json.dumps(export_model(args.checkpoint, args.name, args.description, args.resources, args.default), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
