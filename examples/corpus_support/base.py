"""Plumbing shared by the corpus modules: the package cache, :func:`fetch`, :class:`CorpusModel` and source helpers.

Kept apart from ``examples/corpus.py`` so the model and input modules can use it without importing ``corpus``
itself (``corpus`` imports them: a cycle otherwise). ``corpus`` re-exports every name here.
"""

from __future__ import annotations

import importlib.util
import os
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

__all__ = ["ALL", "CACHE", "EXAMPLES", "NO_COREML", "REPO", "CorpusModel", "Inputs", "fetch"]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGE_SDK_CORPUS_CACHE", REPO / ".cache" / "corpus"))
EXAMPLES = Path(__file__).resolve().parents[1]
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
    """Path for a file the corpus makes from a real model (TorchScript trace, pt2 export, .keras)."""
    d = CACHE / "_derived"
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def _support() -> Any:
    """Import examples/corpus_support.torch_models (puts examples/ on sys.path, as model_class needs)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import corpus_support.torch_models as tm

    return tm


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
