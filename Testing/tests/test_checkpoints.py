import json
import pickle

import pytest
import torch

from COVIDLesionSegLib.checkpoints import (
    Checkpoint,
    load_checkpoint,
    resolve_model_file,
    save_checkpoint,
    sha256_of,
)
from COVIDLesionSegLib.models import build_model
from COVIDLesionSegLib.preprocessing import PreprocessingConfig
from COVIDLesionSegLib.resources import RegistryEntry, load_registry


def tiny_checkpoint_object():
    torch.manual_seed(0)
    kwargs = {"widths": [4, 8, 16, 32, 64], "out_channels": 2}
    return Checkpoint("attunet", kwargs, build_model("attunet", **kwargs).state_dict(), ["lesion", "lung"],
                      PreprocessingConfig(size=128), {"epochs": 3}, {"dice": 0.5})


@pytest.mark.parametrize("half", [False, True])
def test_round_trip_rebuilds_the_same_network(tmp_path, half):
    original = tiny_checkpoint_object()
    path = save_checkpoint(original, tmp_path / "model.safetensors", half=half)
    loaded = load_checkpoint(path)
    assert (loaded.model_name, loaded.model_kwargs, loaded.channels) == ("attunet", original.model_kwargs, ["lesion", "lung"])
    assert loaded.preprocessing == PreprocessingConfig(size=128)
    assert loaded.train_config == {"epochs": 3} and loaded.metrics == {"dice": 0.5}
    image = torch.randn(1, 3, 32, 32)
    reference = build_model("attunet", **original.model_kwargs)
    reference.load_state_dict(original.state_dict)
    expected, actual = reference.eval()(image), loaded.build()(image)
    assert torch.allclose(expected, actual, atol=1e-2 if half else 1e-6)
    assert not list(tmp_path.glob(".*part*"))  # the atomic write left no temporary file


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for path, writer in [(tmp_path / "raw.pkl", lambda p: p.write_bytes(pickle.dumps(Exploit()))),
                         (tmp_path / "torch.pt", lambda p: torch.save({"x": Exploit()}, p))]:
        writer(path)
        with pytest.raises(ValueError, match="pickle"):
            load_checkpoint(path)
    assert not marker.exists()


def test_garbage_and_incomplete_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.safetensors: not a safetensors file"):
        load_checkpoint(garbage)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(ValueError, match="bare.safetensors: checkpoint format version None"):
        load_checkpoint(bare)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_registry_file_entry_is_verified(tmp_path):
    path = save_checkpoint(tiny_checkpoint_object(), tmp_path / "m.safetensors")
    good = RegistryEntry("m", sha256_of(path), "test", file="m.safetensors")
    assert resolve_model_file(good, resources=tmp_path) == path
    bad = RegistryEntry("m", "0" * 64, "test", file="m.safetensors")
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        resolve_model_file(bad, resources=tmp_path)


def test_url_entry_downloads_once_into_the_cache(tmp_path):
    source = save_checkpoint(tiny_checkpoint_object(), tmp_path / "remote.safetensors")
    entry = RegistryEntry("remote", sha256_of(source), "test", url=source.as_uri())
    cache = tmp_path / "cache"
    first = resolve_model_file(entry, cache=cache)
    assert first.parent == cache and sha256_of(first) == entry.sha256
    source.unlink()  # a second call must use the cached copy, not the network
    assert resolve_model_file(entry, cache=cache) == first


def test_download_with_wrong_hash_keeps_nothing(tmp_path):
    source = save_checkpoint(tiny_checkpoint_object(), tmp_path / "remote.safetensors")
    entry = RegistryEntry("remote", "f" * 64, "test", url=source.as_uri())
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        resolve_model_file(entry, cache=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_offline_download_says_what_to_do(tmp_path):
    entry = RegistryEntry("remote", "f" * 64, "test", url=(tmp_path / "absent.safetensors").as_uri())
    with pytest.raises(ConnectionError, match="--weights FILE"):
        resolve_model_file(entry, cache=tmp_path / "cache")


def test_shipped_registry_entries_are_complete():
    registry = load_registry()
    assert sum(entry.default for entry in registry.values()) == 1
    for entry in registry.values():
        assert len(entry.sha256) == 64 and (entry.file or entry.url) and entry.description


def test_registry_json_is_well_formed(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"name": "a", "sha256": "0" * 64, "description": "d", "file": "a.safetensors"}]}))
    assert load_registry(path)["a"].file == "a.safetensors"


def test_valid_file_whose_header_length_starts_with_0x80_loads(tmp_path):
    """A safetensors header length can have 0x80 as its low byte; that is not a pickle."""
    checkpoint = tiny_checkpoint_object()
    path = tmp_path / "m.safetensors"
    for padding in range(300):
        checkpoint.metrics = {"pad": "x" * padding}
        save_checkpoint(checkpoint, path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert load_checkpoint(path).metrics["pad"] == checkpoint.metrics["pad"]


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tiny_checkpoint_object(), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
