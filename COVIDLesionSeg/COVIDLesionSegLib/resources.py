"""Files shipped in ``Resources/`` and the model registry ``Resources/models.json``.

Imports neither torch nor slicer, so the Slicer module can list models before any dependency is installed.
The registry is ``{"models": [{"name", "file" (relative to Resources/) or "url", "sha256", "description",
"default"}]}``; exactly one entry is the default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REGISTRY_FILE_NAME = "models.json"


def resources_dir() -> Path:
    """``Resources`` beside the package inside an installed Slicer module, else the repository's top-level one."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parent / "Resources", package_dir.parent.parent / "Resources"):
        if (candidate / REGISTRY_FILE_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"no Resources/{REGISTRY_FILE_NAME} beside {package_dir.parent} or its parent; the installation is incomplete")


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    sha256: str
    description: str
    file: str | None = None
    url: str | None = None
    default: bool = False


def load_registry(path: str | Path | None = None) -> dict[str, RegistryEntry]:
    """Named models from ``Resources/models.json`` (or ``path``), in file order."""
    path = Path(path) if path else resources_dir() / REGISTRY_FILE_NAME
    entries = json.loads(path.read_text(encoding="utf-8"))["models"]
    return {entry["name"]: RegistryEntry(**entry) for entry in entries}


def default_model_name(registry: dict[str, RegistryEntry] | None = None) -> str:
    registry = registry if registry is not None else load_registry()
    defaults = [entry.name for entry in registry.values() if entry.default]
    if len(defaults) != 1:
        raise ValueError(f"the model registry must mark exactly one default model, found {defaults}")
    return defaults[0]
