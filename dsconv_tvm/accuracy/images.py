"""Image folders as model inputs: decode (Pillow), centre crop, seeded random crops, resize.

Every image gives its centre crop (the largest centred square scaled by ``crop_fraction``, the
usual 224/256 of ImageNet evaluation) and ``crops`` random crops drawn with a seeded generator
(area 25-100 % of the image, aspect 3/4-4/3, uniform position), each resized to the model's
input size with bilinear filtering, RGB in [0, 1], NCHW float32.  Grey-scale models (1 input
channel) get the luminance.  Same files + same seed -> the same array, bit for bit.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import DSConvError, ModelError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise DSConvError("--images needs Pillow: pip install pillow (or pip install 'dsconv-tvm[images]')") from exc
    return Image


def list_images(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ModelError(f"--images {directory}: no such directory")
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ModelError(f"--images {directory}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(directory, f) for f in files]


def label_from_name(path: str) -> int | None:
    """The class index written as the last ``_<int>`` of the file name (``imagenet_03_990.jpg`` -> 990)."""
    m = re.search(r"_(\d+)$", os.path.splitext(os.path.basename(path))[0])
    return int(m.group(1)) if m else None


def _to_array(img, size: tuple[int, int], channels: int) -> np.ndarray:
    Image = _pil()
    img = img.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
    a = np.asarray(img, np.float32) / np.float32(255.0)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def load_images(directory: str, shape, crops: int = 0, seed: int = 0, crop_fraction: float = 0.875):
    """(x (N, C, H, W) float32, names list[str], source index per sample) for the images of ``directory``;
    ``shape`` is the model's (C, H, W)."""
    Image = _pil()
    channels, h, w = (int(d) for d in shape)
    if channels not in (1, 3):
        raise ModelError(f"--images: the model takes {channels} channels; only 1 (grey) or 3 (RGB) are supported")
    rng = np.random.default_rng(seed)
    xs, names, src = [], [], []
    for i, path in enumerate(list_images(directory)):
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except Exception as exc:  # noqa: BLE001  (PIL raises many types)
            raise ModelError(f"{path}: cannot be read as an image ({exc})") from exc
        iw, ih = img.size
        side = crop_fraction * min(iw, ih)
        boxes = [("centre", ((iw - side) / 2, (ih - side) / 2, (iw + side) / 2, (ih + side) / 2))]
        for k in range(crops):
            area = rng.uniform(0.25, 1.0) * iw * ih
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw = min(iw, np.sqrt(area * aspect))
            ch = min(ih, np.sqrt(area / aspect))
            x0, y0 = rng.uniform(0, iw - cw), rng.uniform(0, ih - ch)
            boxes.append((f"crop{k}", (x0, y0, x0 + cw, y0 + ch)))
        for tag, box in boxes:
            xs.append(_to_array(img.crop(tuple(int(round(v)) for v in box)), (h, w), channels))
            names.append(f"{os.path.basename(path)}:{tag}")
            src.append(i)
    return np.stack(xs).astype(np.float32), names, np.asarray(src)
