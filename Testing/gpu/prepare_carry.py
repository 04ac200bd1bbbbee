"""Before a GPU call: build the folder that travels with ``carry`` and check that everything fits the 64 MiB transfer.

The device machine has PyTorch (its own build), numpy, OpenCV, matplotlib, safetensors, tqdm and pytest, but no package
index and no SimpleITK/slicerio/pynrrd; nothing outside the checkout travels (``../shared`` does not). This script writes
``runs/gpu-carry/`` (ignored by git, so it travels only when named in ``carry``):

- ``data/``: the data set's ``manifest.csv`` and ``benchmark_task1_folds.json`` with the PNGs of the paper split's 234
  slices (the split is drawn from the whole manifest, so it is the same split); about 13 MB. The whole set (85 MB) does
  not fit, so benchmark fold 0 cannot run on that machine;
- ``site.tar.xz``: SimpleITK, slicerio and pynrrd as installed in this venv (SimpleITK's abi3 build runs on the device's
  Python 3.12), xz-compressed (the wheel is 52 MB, this about a third of it); ``--no-simpleitk`` leaves it out (the
  suite then uses a stand-in and skips the CLI stages).

The checkout itself travels too, and the shipped model (``Resources/Models/*.safetensors``, 49 MB) leaves too little
room: ``--hide-models`` replaces each tracked file over 5 MB by an empty placeholder for the call (flagged
``skip-worktree`` so no commit picks the change up; the files go to ``runs/gpu-hold/``) and ``--restore-models`` puts
them back (``git checkout -- PATH`` after ``git update-index --no-skip-worktree PATH`` also does). The GPU suite never
loads them.

    python Testing/gpu/prepare_carry.py --hide-models      # then the run call (Testing/gpu/README.md)
    python Testing/gpu/prepare_carry.py --restore-models   # after it
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64 * 1024 * 1024
HIDE_OVER = 5 * 1024 * 1024
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "covid19-ct-seg-20cases-png256"
PACKAGES = ("SimpleITK", "slicerio", "nrrd")


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def travelling_bytes(extra: Path | None = None) -> tuple[int, list[tuple[int, str]]]:
    """Bytes of what a call sends: tracked files as they are in the working tree, untracked files git does not
    ignore, and ``extra`` (the carried folder). Also the largest tracked files."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    sizes = [((ROOT / name).stat().st_size, name) for name in names if name and (ROOT / name).is_file()]
    total = sum(size for size, _ in sizes)
    if extra is not None and extra.exists():
        total += sum(path.stat().st_size for path in extra.rglob("*") if path.is_file())
    return total, sorted(sizes, reverse=True)[:5]


def copy_paper_split(data: Path, target: Path) -> int:
    sys.path[:0] = [str(ROOT / "COVIDLesionSeg"), str(ROOT / "Training")]
    from COVIDLesionSegTraining.splits import SplitSpec, make_split

    split = make_split(SplitSpec("paper"), data)
    records = split.train + split.val + split.test
    if target.exists():
        shutil.rmtree(target)
    for name in ("manifest.csv", "benchmark_task1_folds.json"):
        (target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(data / name, target / name)
    with open(data / "manifest.csv", newline="") as stream:
        by_image = {row["image"]: row for row in csv.DictReader(stream)}
    for record in records:
        row = by_image[str(record.image.relative_to(data))]
        for column in ("image", "mask", "lung_mask"):
            (target / row[column]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data / row[column], target / row[column])
    return len(records)


def pack_site(target: Path) -> None:
    """``site.tar.xz`` of the packages SimpleITK needs on the device, from this interpreter's site-packages."""
    import importlib

    folders = [Path(importlib.import_module(name).__file__).parent for name in PACKAGES]
    temporary = target.with_suffix(".part")
    xz = shutil.which("xz")
    if xz:  # multi-threaded, same format as tarfile's
        with open(temporary, "wb") as output:
            tar = subprocess.Popen(["tar", "-cf", "-", *(f.name for f in folders)], cwd=folders[0].parent, stdout=subprocess.PIPE)
            subprocess.run([xz, "-6", "-T0"], stdin=tar.stdout, stdout=output, check=True)
            if tar.wait() != 0:
                raise RuntimeError("tar failed")
    else:
        with tarfile.open(temporary, "w:xz") as archive:
            for folder in folders:
                archive.add(folder, arcname=folder.name)
    os.replace(temporary, target)


def hide_models(restore: bool) -> None:
    hold = ROOT / "runs" / "gpu-hold"
    if restore:
        for held in sorted(hold.rglob("*")) if hold.exists() else []:
            if held.is_file():
                name = str(held.relative_to(hold))
                os.replace(held, ROOT / name)
                git("update-index", "--no-skip-worktree", name)
                print(f"restored {name}")
        return
    for name in git("ls-files", "-z").split("\0"):
        path = ROOT / name
        if name and path.is_file() and path.stat().st_size > HIDE_OVER:
            git("update-index", "--skip-worktree", name)
            (hold / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, hold / name)
            path.touch()
            print(f"hid {name} ({(hold / name).stat().st_size / 1e6:.1f} MB) in {hold / name}; an empty placeholder stands in")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the png256 data set (default {DEFAULT_DATA})")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "gpu-carry", help="the carried folder (default runs/gpu-carry)")
    parser.add_argument("--no-simpleitk", action="store_true", help="leave SimpleITK out (CLI stages are then skipped there)")
    parser.add_argument("--hide-models", action="store_true", help="replace tracked files over 5 MB by placeholders for the call")
    parser.add_argument("--restore-models", action="store_true", help="put the hidden files back, then stop")
    args = parser.parse_args(argv)
    if args.restore_models:
        hide_models(restore=True)
        return 0
    slices = copy_paper_split(args.data, args.output / "data")
    print(f"data: the paper split's {slices} slices of {args.data} in {args.output / 'data'}")
    site = args.output / "site.tar.xz"
    if args.no_simpleitk:
        site.unlink(missing_ok=True)
    elif not site.is_file():
        print("packing SimpleITK, slicerio, pynrrd (xz; a few minutes on 2 cores) ...", flush=True)
        pack_site(site)
    if args.hide_models:
        hide_models(restore=False)
    total, largest = travelling_bytes(args.output)
    print(f"what travels (checkout + {args.output.relative_to(ROOT)}): {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB")
    for size, name in largest:
        print(f"  {size / 2**20:6.1f} MiB  {name}")
    if total > LIMIT:
        print("too large: add --hide-models, or --no-simpleitk, or ignore untracked files", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
