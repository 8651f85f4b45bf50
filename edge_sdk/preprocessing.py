"""Image preprocessing, declared once and recorded in the manifest so the device applies the same.

The host (calibration from an image folder) and the device agent both call :meth:`Preprocessing.apply`,
so both sides decode and resize with the same code: Pillow (small enough for a Raspberry Pi install; the
``agent`` extra). OpenCV is needed only to capture camera / video frames (the ``camera`` extra).
Arrays are in OpenCV's convention, (H, W, 3) BGR uint8 or (H, W) gray, so camera frames pass straight in.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.errors import InputError

__all__ = ["CAP_FACTOR", "DEFAULT_PIXEL_CEILING", "IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "MIN_PIXEL_CAP",
           "Preprocessing", "decode_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")  # Pillow plugins tried: no EPS (Ghostscript), PSD, ICO ...
_EXPECTED = "JPEG, PNG, BMP, WebP or TIFF expected"

# Decoded-pixel caps. A full-size decode costs 4 bytes per pixel in Pillow (RGB is stored as RGBX), so the cap
# is what bounds the memory of one request: 12 MP ~ 48 MB, 24 MP ~ 96 MB, 64 MP ~ 256 MB.
MAX_IMAGE_PIXELS = 64_000_000  # absolute ceiling: no configuration decodes more (~8k x 8k)
MIN_PIXEL_CAP = 12_000_000  # floor of the derived cap: a 4000x3000 camera photo always decodes
DEFAULT_PIXEL_CEILING = 24_000_000  # the derived cap never exceeds this (set max_pixels to go higher)
CAP_FACTOR = 16  # derived cap: 16 x the model's input pixels (4x per side), within [floor, ceiling]
_REDUCING_GAP = 2  # JPEG draft / reduce() keep at least 2x the needed size per side for the final resize


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
    max_pixels: int | None = None  # decoded-pixel cap for encoded images; None: derived (see pixel_cap)

    def __post_init__(self) -> None:
        if self.color not in ("RGB", "BGR", "GRAY"):
            raise ValueError(f"preprocessing color must be RGB, BGR or GRAY, not {self.color!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"preprocessing layout must be NCHW or NHWC, not {self.layout!r}")
        if self.resize_mode not in ("stretch", "center_crop"):
            raise ValueError(f"resize_mode must be stretch or center_crop, not {self.resize_mode!r}")
        if any(s == 0 for s in self.std):
            raise ValueError("preprocessing std must not contain 0")
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or not 1 <= self.max_pixels <= MAX_IMAGE_PIXELS):
            raise ValueError(f"preprocessing max_pixels must be an integer in 1..{MAX_IMAGE_PIXELS}, "
                             f"not {self.max_pixels!r}")

    @property
    def pixel_cap(self) -> int:
        """The most pixels an encoded image may decode to: ``max_pixels``, or 16x the model input clamped to
        [12 MP, 24 MP] (12 MP without a size). Bounds the memory one request can take on the device."""
        if self.max_pixels is not None:
            return self.max_pixels
        if not self.size:
            return MIN_PIXEL_CAP
        return min(DEFAULT_PIXEL_CEILING, max(MIN_PIXEL_CAP, CAP_FACTOR * self.size[0] * self.size[1]))

    @classmethod
    def imagenet(cls, size: int = 224) -> Preprocessing:
        """torchvision-style ImageNet preprocessing (RGB, 1/255, mean/std, NCHW, centre crop)."""
        return cls(size=(size, size), color="RGB", layout="NCHW", scale=1 / 255,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_mode="center_crop")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if d["max_pixels"] is None:  # not written when unset: agents older than the field still read the manifest
            del d["max_pixels"]
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

    def decode(self, data: bytes | bytearray | memoryview, *, max_pixels: int | None = None) -> Any:
        """Decode encoded image bytes into a Pillow image in this preprocessing's colour mode, no bigger than the
        model needs: JPEGs decode scaled down (``draft``), others are ``reduce()``-d right after decoding.

        Refused with a one-line :class:`InputError` from the header alone when it would decode to more than
        ``max_pixels`` (default :attr:`pixel_cap`), and for anything Pillow cannot decode.
        """
        pil = require("PIL.Image", "agent", "image decoding")
        need = self._needed_size()
        return _load(pil, data, mode="L" if self.color == "GRAY" else "RGB", need=need,
                     cap=self.pixel_cap if max_pixels is None else int(max_pixels))

    def apply_encoded(self, data: bytes | bytearray | memoryview, *, max_pixels: int | None = None) -> np.ndarray:
        """Encoded image bytes -> a batch of 1, with one reduced-size decode and no full-size array copies.

        The device's path for untrusted images (see :meth:`decode` for the limits); equal to
        ``apply(decode_image(data))`` when the image is no bigger than twice the model input per side.
        """
        pil = require("PIL.Image", "agent", "image preprocessing")
        return self._tensor(pil, self.decode(data, max_pixels=max_pixels))

    def _needed_size(self) -> tuple[int, int] | None:
        """(W, H) the decoded image must keep for the final resize to see full detail (None: no resize)."""
        if not self.size:
            return None
        h, w = self.size
        if self.resize_mode == "center_crop":
            side = math.ceil(max(h, w) / self.crop_fraction)
            return side * _REDUCING_GAP, side * _REDUCING_GAP
        return w * _REDUCING_GAP, h * _REDUCING_GAP

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
        return self._tensor(pil, pim)

    def _tensor(self, pil: Any, pim: Any) -> np.ndarray:
        """A Pillow image in the right mode (``L`` or ``RGB``) -> resized, scaled, normalised batch of 1."""
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:120] if text else type(exc).__name__).rstrip(".")


def _load(pil: Any, data: bytes | bytearray | memoryview, *, mode: str, need: tuple[int, int] | None,
          cap: int) -> Any:
    """Open, check the size on the header, decode (JPEG: scaled with ``draft``), reduce and convert to ``mode``.

    Every failure is a one-line :class:`InputError`: Pillow's plugins raise OSError, SyntaxError, ValueError,
    struct.error, EOFError, DecompressionBombError ... on hostile input, all of which mean "not a usable image".
    """
    if not len(data):
        raise InputError(f"input is empty, not an image ({_EXPECTED})")
    try:
        im = pil.open(io.BytesIO(data), formats=_FORMATS)
        w0, h0 = im.size
        if w0 < 1 or h0 < 1:
            raise InputError(f"image of {w0}x{h0} pixels has no pixels: send a real image")
        if need is not None and im.format == "JPEG":
            im.draft(im.mode, need)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below ``need``
        # the cap applies to the decoded size (a JPEG's after draft); no image over the absolute ceiling at all
        w, h = im.size
        if w0 * h0 > MAX_IMAGE_PIXELS or w * h > cap:
            limit = min(cap, MAX_IMAGE_PIXELS)
            side = math.isqrt(limit)
            raise InputError(f"image of {w0}x{h0} pixels is over the {limit} pixel limit of this model: send at "
                             f"most about {side}x{side} (or raise max_pixels)")
        im.load()
        if im.mode not in ("L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "YCbCr"):  # palette, 1-bit, I;16 ...
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else mode)
        if need is not None:
            factor = min(w // need[0], h // need[1])
            if factor >= 2:
                im = im.reduce(factor)  # box filter, at the decoded size's memory cost only
        return im.convert(mode) if im.mode != mode else im
    except InputError:
        raise
    except pil.UnidentifiedImageError:
        raise InputError(f"input is not a decodable image ({_EXPECTED})") from None
    except pil.DecompressionBombError:
        raise InputError(f"image is over the {cap} pixel limit of this model: send a smaller image") from None
    except MemoryError:
        raise InputError("image is too large to decode on this device: send a smaller image") from None
    except Exception as exc:  # any Pillow failure on untrusted bytes is bad input, never a crash
        raise InputError(f"input is not a decodable image ({_EXPECTED}): {_one_line(exc)}") from None


def decode_image(data: bytes | bytearray | memoryview | str | Path, *, grayscale: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode image bytes or a file into a full-size BGR (or gray) uint8 array; raise InputError if it is not an
    image or decodes to more than ``max_pixels`` (checked on the header, before decoding)."""
    pil = require("PIL.Image", "agent", "image decoding")
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read image {data}: {exc.strerror}") from None
    im = _load(pil, data, mode="L" if grayscale else "RGB", need=None, cap=int(max_pixels))
    arr = np.array(im)  # the one full-size array copy; the Pillow image is dropped right after
    del im
    if not grayscale:  # RGB -> BGR in place, a band of rows at a time (no second full-size array)
        for top in range(0, arr.shape[0], 256):
            band = arr[top:top + 256]
            band[:] = band[:, :, ::-1]
    return arr
