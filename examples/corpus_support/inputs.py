"""Real input data for the corpus: photos from scikit-image, speech from espeak-ng, real sentences and tokens.

Every model's ``inputs(n, seed)`` is built from these, so conversions are calibrated and checked on real data
rather than noise.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

import numpy as np

from corpus_support.base import CACHE, _support

__all__ = [
    "COLOR_PHOTOS",
    "GRAY_PHOTOS",
    "SENTENCES",
    "TEXT_PHOTOS",
    "audio_windows",
    "photo_crops",
    "spectrogram_frames",
    "speech",
]

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
