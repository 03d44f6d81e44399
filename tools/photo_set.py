#!/usr/bin/env python3
"""Collect the natural photos shipped inside PyPI packages into one folder (for ``eval --images``).

* ``photos``: the colour photographs of scikit-image's data folder (astronaut, chelsea, coffee,
  hubble_deep_field, ihc, motorcycle_left/right, retina, rocket) and matplotlib's grace_hopper;
  none carries an ImageNet label (agreement fp32 vs DSConv only).
* ``imagenet20``: the 20 ImageNet validation images of foolbox 3.3.4 (``imagenet_<i>_<label>.jpg``,
  torchvision class index): a sanity check of the fp32 model, never a statistic.
* ``agreement``: both of the above (30 photos), the set the ImageNet agreement is measured on
  (with seeded random crops: ``eval --images DIR --crops 4``); labels are not used there.

scikit-image and foolbox are installed with ``pip install --no-deps`` when missing and never
imported (only their data files are read).  Default folder: ``~/.cache/dsconv-tvm/photos/<set>``.

Usage::

    python tools/photo_set.py [photos|imagenet20|agreement] [--out DIR]     # prints the folder
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from dsconv_tvm.deploy.runtime import cache_root  # noqa: E402

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
PACKAGES = {"skimage": "scikit-image==0.26.0", "foolbox": "foolbox==3.3.4", "matplotlib": "matplotlib"}


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        req = PACKAGES[module]
        print(f"installing {req} (--no-deps, data files only)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", req], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    return Path(spec.submodule_search_locations[0])


def _sources(name: str) -> list[Path]:
    if name == "photos":
        sk = _package_dir("skimage") / "data"
        mpl = _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        return [sk / f for f in SKIMAGE_PHOTOS] + [mpl]
    if name == "imagenet20":
        return sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg"))
    if name == "agreement":
        return _sources("photos") + _sources("imagenet20")
    raise SystemExit(f"unknown set {name!r}: photos or imagenet20")


def ensure_photo_set(name: str = "photos", out: str | None = None) -> Path:
    folder = Path(out) if out else cache_root() / "photos" / name
    sources = _sources(name)
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise SystemExit(f"missing photo files: {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for src in sources:
        dst = folder / src.name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", nargs="?", default="photos", choices=["photos", "imagenet20", "agreement"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(ensure_photo_set(args.set, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
