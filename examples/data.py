"""Real test material that works offline, numpy-only (no torch / TensorFlow import).

- Fashion-MNIST (60k train + 10k test, labelled) from the Debian package `dataset-fashion-mnist`; where that is
  absent (macOS, a non-root user without it) from `fashion_mnist_subset.npz` shipped beside this file: the first
  6000 training and 2000 test images of the same real dataset (3.5 MB; Fashion-MNIST is MIT-licensed, (c) Zalando
  SE). No PyPI package ships the images themselves (keras, torchvision and tfds download them at run time).
- ImageNet preprocessing of RGB photos, and hundreds of real 224x224 inputs made from scikit-image's bundled
  colour photos with random crops and flips (for fp32-vs-int8 top-1 agreement on a real classifier).
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_CLASSES",
    "FASHION_DIR",
    "FASHION_SUBSET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTO_NAMES",
    "fashion_tensors",
    "imagenet_normalize",
    "imagenet_preprocess",
    "load_fashion_mnist",
    "load_photo",
    "photo_crops",
]

FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
"""Directory of the IDX .gz files (override with env FASHION_MNIST_DIR)."""

FASHION_SUBSET = Path(__file__).resolve().parent / "fashion_mnist_subset.npz"
"""The shipped real subset (6000 train + 2000 test), used when `FASHION_DIR` holds no IDX files."""

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

PHOTO_NAMES = (
    "chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "hubble_deep_field",
    "immunohistochemistry", "retina",
)  # fmt: skip
"""Colour photos bundled in the scikit-image wheel (nothing is downloaded)."""


def _read_idx(path: Path) -> np.ndarray:
    """Decode one gzipped IDX file (ubyte data) into an array of its declared shape."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file: reinstall dataset-fashion-mnist")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated ({data.size} of {int(np.prod(shape))} bytes): reinstall it")
    return data.reshape(shape)


@lru_cache(maxsize=2)
def _fashion_cached(split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = _FASHION_FILES[split]
    images_path, labels_path = FASHION_DIR / images_name, FASHION_DIR / labels_name
    if not FASHION_DIR.is_dir() and FASHION_SUBSET.is_file():  # no Debian package here: the shipped real subset
        with np.load(FASHION_SUBSET) as npz:
            x, y = npz[f"{split}_images"], npz[f"{split}_labels"]
    else:
        for path in (images_path, labels_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {path} not found: apt-get install -y dataset-fashion-mnist "
                    "(or set FASHION_MNIST_DIR to a folder holding the IDX .gz files)"
                )
        x, y = _read_idx(images_path), _read_idx(labels_path)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels uint8 (N,)) of split "train" (60000) or "test" (10000).

    Without the Debian package the shipped subset answers: 6000 train and 2000 test images (see module doc).

    The arrays are cached and read-only; copy them before modifying.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    return _fashion_cached(split)


def fashion_tensors(
    split: str = "test", layout: str = "NCHW", n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (float32 images scaled to [0, 1], int64 labels), images (N,1,28,28) for NCHW or (N,28,28,1) NHWC.

    `n` keeps the first n examples (the split's order is already shuffled across classes).
    """
    x, y = load_fashion_mnist(split)
    if n is not None:
        x, y = x[:n], y[:n]
    x = x.astype(np.float32) / 255.0
    if layout == "NCHW":
        x = x[:, None, :, :]
    elif layout == "NHWC":
        x = x[:, :, :, None]
    else:
        raise ValueError(f"unknown layout {layout!r}: use 'NCHW' or 'NHWC'")
    return np.ascontiguousarray(x), y.astype(np.int64)


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an HxWx3 uint8/float image with OpenCV (area filter when shrinking, bilinear when enlarging)."""
    import cv2

    shrinking = width * height < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def imagenet_normalize(rgb_224: np.ndarray) -> np.ndarray:
    """Turn an HxWx3 uint8 RGB image into a 1x3xHxW float32 tensor: /255, ImageNet mean/std, NCHW."""
    x = (rgb_224.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def imagenet_preprocess(rgb_uint8: np.ndarray, size: int = 224, resize_to: int = 256) -> np.ndarray:
    """Standard ImageNet evaluation preprocessing -> 1x3x224x224 float32 (NCHW).

    Resize the short side to 256, center-crop 224, RGB/255, normalise with ImageNet mean and std.
    """
    if rgb_uint8.ndim != 3 or rgb_uint8.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {rgb_uint8.shape}")
    rgb = rgb_uint8[:, :, :3]
    h, w = rgb.shape[:2]
    scale = resize_to / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = _resize(rgb, new_w, new_h)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return imagenet_normalize(resized[top : top + size, left : left + size])


@lru_cache(maxsize=len(PHOTO_NAMES))
def load_photo(name: str) -> np.ndarray:
    """Return one bundled scikit-image colour photo as HxWx3 uint8 RGB (read-only)."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}: choose one of {', '.join(PHOTO_NAMES)}")
    import skimage.data
    import skimage.io

    if name == "motorcycle_left":  # stereo_motorcycle() also loads a disparity map; read the left image only
        image = skimage.io.imread(Path(skimage.data.data_dir) / "motorcycle_left.png")
    else:
        image = getattr(skimage.data, name)()
    image = np.ascontiguousarray(image[:, :, :3])
    image.flags.writeable = False
    return image


def photo_crops(n: int = 240, seed: int = 0, size: int = 224) -> np.ndarray:
    """Return (n, 3, size, size) float32 ImageNet-normalised inputs made from real photos.

    Photos are used in turn; each crop is square with a side of 50–100% of the photo's short side at a random
    position, flipped horizontally with probability 0.5, and resized to `size`. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    photos = [load_photo(name) for name in PHOTO_NAMES]
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = round(min(h, w) * float(rng.uniform(0.5, 1.0)))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = imagenet_normalize(_resize(np.ascontiguousarray(crop), size, size))[0]
    return out
