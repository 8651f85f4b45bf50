"""Train the Fashion-MNIST CNNs (torch and Keras) once per machine and cache them.

`cached_model("torch")` / `cached_model("keras")` return a trained model, training it (~30-60 s on 2 cores)
only when the cache holds none. The cache lives in ``$EDGE_SDK_CACHE/models`` (default ``<repo>/.cache/models``).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__:
    from . import data
else:  # examples/ itself is on sys.path (tests, demo scripts)
    import data

__all__ = [
    "CACHE_VERSION",
    "cached_model",
    "cached_model_info",
    "default_cache_dir",
    "evaluate_keras",
    "evaluate_torch",
    "train_keras_fashion",
    "train_torch_fashion",
]

CACHE_VERSION = 2
"""Bump when the architecture or the training recipe changes so stale cached models are not reused."""

_KINDS = {"torch": ".pt", "keras": ".keras"}


def default_cache_dir() -> Path:
    """Return ``$EDGE_SDK_CACHE/models`` when EDGE_SDK_CACHE is set, else ``<repo>/.cache/models``."""
    root = os.environ.get("EDGE_SDK_CACHE")
    base = Path(root) if root else Path(__file__).resolve().parent.parent / ".cache"
    return base / "models"


def _torch_model_class() -> Any:
    if __package__:
        from .torch_models import FashionCNN
    else:
        from torch_models import FashionCNN
    return FashionCNN


def _keras_builder() -> Any:
    if __package__:
        from .keras_models import build_keras_fashion_cnn
    else:
        from keras_models import build_keras_fashion_cnn
    return build_keras_fashion_cnn


def evaluate_torch(model: Any, n: int | None = None) -> float:
    """Return the top-1 accuracy of a torch Fashion-MNIST model (NCHW input) on the test split."""
    import torch

    x, y = data.fashion_tensors("test", "NCHW", n)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            logits = model(torch.from_numpy(x[start : start + 1000]))
            correct += int((logits.argmax(1).numpy() == y[start : start + 1000]).sum())
    return correct / len(x)


def evaluate_keras(model: Any, n: int | None = None) -> float:
    """Return the top-1 accuracy of a Keras Fashion-MNIST model (NHWC input) on the test split."""
    import numpy as np

    x, y = data.fashion_tensors("test", "NHWC", n)
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def train_torch_fashion(
    epochs: int = 1,
    n_train: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    threads: int = 1,
) -> tuple[Any, float]:
    """Train `FashionCNN` on Fashion-MNIST (Adam, cosine-decayed lr); return (eval-mode model, test accuracy).

    Trains channels-last with `threads` intra-op threads (restored afterwards): one thread does an epoch in
    about 30 s here, while two OpenMP threads on a busy 2-core machine were 10x slower (spin-waiting).
    """
    import torch

    torch.manual_seed(seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    channels_last = torch.channels_last
    try:
        x, y = data.fashion_tensors("train", "NCHW", n_train)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        model = _torch_model_class()().to(memory_format=channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * -(-len(xt) // batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        loss_fn = torch.nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(xt), generator=generator)
            for start in range(0, len(xt), batch_size):
                idx = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xt[idx].contiguous(memory_format=channels_last)), yt[idx])
                loss.backward()
                optimizer.step()
                scheduler.step()
        model = model.to(memory_format=torch.contiguous_format).eval()
        return model, evaluate_torch(model)
    finally:
        torch.set_num_threads(previous_threads)


def train_keras_fashion(
    epochs: int = 1, n_train: int | None = None, seed: int = 0, batch_size: int = 64, lr: float = 2e-3
) -> tuple[Any, float]:
    """Train the Keras Fashion CNN (Adam, cosine-decayed lr); return (model, test accuracy on 10k)."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = data.fashion_tensors("train", "NHWC", n_train)
    model = _keras_builder()()
    steps = epochs * -(-len(x) // batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    return model, evaluate_keras(model)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock so parallel test workers train a model only once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _paths(kind: str, cache_dir: Path) -> tuple[Path, Path]:
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}: use 'torch' or 'keras'")
    stem = f"fashion_cnn_{kind}_v{CACHE_VERSION}"
    return cache_dir / f"{stem}{_KINDS[kind]}", cache_dir / f"{stem}.json"


def _load(kind: str, path: Path) -> Any:
    if kind == "torch":
        import torch

        model = _torch_model_class()()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return model.eval()
    import keras

    return keras.models.load_model(path)


def cached_model(kind: str, cache_dir: str | Path | None = None) -> Any:
    """Return a trained Fashion-MNIST CNN, "torch" (eval-mode `FashionCNN`) or "keras" (Keras model).

    Loads ``fashion_cnn_<kind>_v<N>.pt|.keras`` from `cache_dir` (default `default_cache_dir()`), or trains
    the model (1 epoch), saves it atomically with a JSON sidecar (test accuracy, training time) and returns it.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_path, info_path = _paths(kind, cache)
    with _locked(cache / f".{model_path.name}.lock"):
        if model_path.exists() and info_path.exists():
            return _load(kind, model_path)
        start = time.perf_counter()
        model, accuracy = train_torch_fashion() if kind == "torch" else train_keras_fashion()
        seconds = time.perf_counter() - start
        tmp = model_path.with_name(f"{model_path.stem}.tmp{os.getpid()}{model_path.suffix}")
        if kind == "torch":
            import torch

            torch.save(model.state_dict(), tmp)
        else:  # save an uncompiled copy: weights only, no optimizer state (a third of the size)
            clean = _keras_builder()()
            clean.set_weights(model.get_weights())
            clean.save(tmp)
        os.replace(tmp, model_path)
        info = {"kind": kind, "test_accuracy": accuracy, "train_seconds": round(seconds, 1), "epochs": 1}
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        return model


def cached_model_info(kind: str, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Return the JSON sidecar of a cached model (test_accuracy, train_seconds), training it first if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _, info_path = _paths(kind, cache)
    if not info_path.exists():
        cached_model(kind, cache)
    return json.loads(info_path.read_text())
