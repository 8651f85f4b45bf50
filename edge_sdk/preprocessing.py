"""Image preprocessing, declared once and recorded in the manifest so the device applies the same.

The host (calibration from an image folder) and the device agent both call :meth:`Preprocessing.apply`,
so both sides decode and resize with the same code: Pillow (small enough for a Raspberry Pi install; the
``agent`` extra). OpenCV is needed only to capture camera / video frames (the ``camera`` extra).
Arrays are in OpenCV's convention, (H, W, 3) BGR uint8 or (H, W) gray, so camera frames pass straight in.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "Preprocessing", "decode_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the model's input tensor.

    Steps in order: colour order (``RGB``/``BGR``/``GRAY``), resize to ``size`` (H, W) — with
    ``resize_mode`` ``stretch`` or ``center_crop`` (resize the short side to ``crop_from`` x size
    ratio then crop) — ``x * scale``, then ``(x - mean) / std`` per channel, layout ``NCHW`` or
    ``NHWC``, batch dimension added.
    """

    size: tuple[int, int] | None = None
    color: str = "RGB"
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize_mode: str = "stretch"
    crop_fraction: float = 0.875
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.color not in ("RGB", "BGR", "GRAY"):
            raise ValueError(f"preprocessing color must be RGB, BGR or GRAY, not {self.color!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"preprocessing layout must be NCHW or NHWC, not {self.layout!r}")
        if self.resize_mode not in ("stretch", "center_crop"):
            raise ValueError(f"resize_mode must be stretch or center_crop, not {self.resize_mode!r}")
        if any(s == 0 for s in self.std):
            raise ValueError("preprocessing std must not contain 0")

    @classmethod
    def imagenet(cls, size: int = 224) -> Preprocessing:
        """torchvision-style ImageNet preprocessing (RGB, 1/255, mean/std, NCHW, centre crop)."""
        return cls(size=(size, size), color="RGB", layout="NCHW", scale=1 / 255,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_mode="center_crop")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Preprocessing | None:
        if not d:
            return None
        d = dict(d)
        if d.get("size"):
            d["size"] = tuple(d["size"])
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def apply(self, image_bgr: np.ndarray) -> np.ndarray:
        """Turn one decoded image (H, W, 3 BGR uint8, or H, W gray) into a batch of 1."""
        pil = require("PIL.Image", "agent", "image preprocessing")
        img = image_bgr if image_bgr.ndim == 3 else image_bgr[:, :, None]
        if img.dtype != np.uint8:
            raise InputError(f"image arrays must be uint8, got {img.dtype}")
        if self.color == "GRAY":
            mode = "L"
            rgb = img[:, :, 0] if img.shape[2] == 1 else np.ascontiguousarray(img[:, :, ::-1])
        else:
            mode = "RGB"
            rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else np.ascontiguousarray(img[:, :, ::-1])
        pim = pil.fromarray(rgb)
        pim = pim.convert(mode) if pim.mode != mode else pim
        if self.size:
            pim = self._resize(pil, pim)
        arr = np.asarray(pim)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.color == "BGR":
            arr = arr[:, :, ::-1]
        x = arr.astype(np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (x - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None], dtype=self.dtype)

    def _resize(self, pil: Any, pim: Any) -> Any:
        h, w = self.size  # type: ignore[misc]
        bilinear = pil.Resampling.BILINEAR
        if self.resize_mode == "center_crop":
            short = min(pim.width, pim.height)
            f = max(h, w) / self.crop_fraction / short
            nw, nh = max(w, round(pim.width * f)), max(h, round(pim.height * f))
            pim = pim.resize((nw, nh), bilinear)
            left, top = (nw - w) // 2, (nh - h) // 2
            return pim.crop((left, top, left + w, top + h))
        return pim.resize((w, h), bilinear)


MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs: ~8k x 8k


def decode_image(data: bytes | str | Path, *, grayscale: bool = False) -> np.ndarray:
    """Decode image bytes or a file into a BGR (or gray) uint8 array; raise InputError if it is not an image."""
    pil = require("PIL.Image", "agent", "image decoding")
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read image {data}: {exc.strerror}") from None
    if not data:
        raise InputError("input is empty, not an image (JPEG, PNG, BMP, WebP or TIFF expected)")
    try:
        with pil.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InputError(f"image of {im.width}x{im.height} pixels is over the {MAX_IMAGE_PIXELS} pixel limit")
            im.load()
            arr = np.asarray(im.convert("L" if grayscale else "RGB"))
    except (pil.UnidentifiedImageError, OSError, SyntaxError, ValueError, pil.DecompressionBombError):
        raise InputError("input is not a decodable image (JPEG, PNG, BMP, WebP or TIFF expected)") from None
    return arr if grayscale else np.ascontiguousarray(arr[:, :, ::-1])
