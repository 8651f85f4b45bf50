"""Image preprocessing, declared once and recorded in the manifest so the device applies the same.

The host (calibration from an image folder) and the device agent both call :meth:`Preprocessing.apply`.
Decoding uses OpenCV (``opencv-python-headless``, in the ``agent`` and ``convert`` extras).
"""

from __future__ import annotations

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
        """Turn one decoded image (H, W, 3 BGR uint8, as OpenCV decodes, or H, W gray) into a batch of 1."""
        cv2 = require("cv2", "agent", "image preprocessing")
        img = image_bgr
        if img.ndim == 2:
            img = img[:, :, None]
        if self.color == "GRAY" and img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
        elif self.color == "RGB" and img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        elif self.color in ("RGB", "BGR") and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        if self.size:
            img = self._resize(cv2, img)
        if img.ndim == 2:
            img = img[:, :, None]
        x = img.astype(np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (x - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None], dtype=self.dtype)

    def _resize(self, cv2: Any, img: np.ndarray) -> np.ndarray:
        h, w = self.size  # type: ignore[misc]
        if self.resize_mode == "center_crop":
            short = min(img.shape[0], img.shape[1])
            target_short = max(h, w) / self.crop_fraction
            f = target_short / short
            nh, nw = max(h, round(img.shape[0] * f)), max(w, round(img.shape[1] * f))
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
            top, left = (nh - h) // 2, (nw - w) // 2
            return img[top:top + h, left:left + w]
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def decode_image(data: bytes | str | Path, *, grayscale: bool = False) -> np.ndarray:
    """Decode image bytes or a file into a BGR (or gray) uint8 array; raise InputError if it is not an image."""
    cv2 = require("cv2", "agent", "image decoding")
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read image {data}: {exc.strerror}") from None
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise InputError("input is not a decodable image (JPEG, PNG, BMP, WebP or TIFF expected)")
    return img
