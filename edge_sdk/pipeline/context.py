"""What every step shares: the run's work directory, the step records, the registry, entry points and hashing.

A step reads files written by the steps before it and writes its own under ``<workdir>/<step>/`` plus a record
``<workdir>/<step>/<step>.json``: ``{"step", "inputs": {name: {path, sha256}}, "outputs": {...}, "figures": {...},
"started_at", "seconds"}``. Those records are what the register step copies into the new version's lineage, so
any scheduler can run the steps one by one (``edge-sdk pipeline run --only STEP``) and the result is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.bundle import sha256_path
from edge_sdk.pipeline.config import PipelineConfig
from edge_sdk.pipeline.errors import PipelineError

if TYPE_CHECKING:
    from edge_sdk.fleet.lifecycle.registry import ModelRecord, Registry

__all__ = ["StepContext", "arrays_sha256", "file_ref", "import_entry", "load_arrays", "on_path", "read_record"]


def file_ref(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "sha256", "size_bytes"}`` of a file or folder (the lineage's way to name a step's input/output)."""
    p = Path(path)
    size = p.stat().st_size if p.is_file() else sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
    return {"path": str(p), "sha256": sha256_path(p), "size_bytes": size}


def arrays_sha256(*arrays: np.ndarray) -> str:
    """sha256 over arrays' dtype, shape and bytes, in order: the snapshot hash of a data set."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{list(a.shape)}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


@contextlib.contextmanager
def on_path(paths: tuple[Path, ...]) -> Iterator[None]:
    """``paths`` in front of sys.path for the block (the user's training code and model classes)."""
    added = [str(p) for p in paths if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def import_entry(entry: str, paths: tuple[Path, ...] = (), what: str = "[train] entry") -> Callable[..., Any]:
    """The function named by ``module:function`` (``paths`` added to sys.path); PipelineError in one line."""
    module_name, _, attr = entry.partition(":")
    with on_path(paths):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PipelineError(f"{what} {entry}: cannot import {module_name} ({exc}): add its folder to [train] "
                                "path") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PipelineError(f"{what} {entry}: {module_name} has no function {attr}")
    return fn


def load_arrays(source: Path | str, paths: tuple[Path, ...], what: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(inputs, labels, ref) from an ``.npz`` (arrays ``inputs``/``labels``, or ``x``/``y``) or ``module:function``
    returning ``(inputs, labels)``; ``ref`` names where they came from (path and sha256, or the entry point)."""
    if isinstance(source, Path):
        if not source.is_file():
            raise PipelineError(f"{what} {source} not found: check the path in pipeline.toml")
        try:
            with np.load(source, allow_pickle=False) as npz:
                keys = ("inputs", "labels") if "inputs" in npz.files else ("x", "y")
                if not all(k in npz.files for k in keys):
                    raise PipelineError(f"{what} {source} has no inputs/labels arrays (it has "
                                        f"{', '.join(npz.files) or 'none'}): save it with np.savez(path, inputs=X, "
                                        "labels=y)")
                x, y = npz[keys[0]], npz[keys[1]]
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{what} {source} is not a readable .npz ({exc})") from None
        ref: dict[str, Any] = file_ref(source)
    else:
        got = import_entry(source, paths, what)()
        if isinstance(got, dict):
            got = (got.get("inputs"), got.get("labels"))
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise PipelineError(f"{what} {source} must return (inputs, labels), got {type(got).__name__}")
        x, y = np.asarray(got[0]), np.asarray(got[1])
        ref = {"entry": source}
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(x) != len(y):
        raise PipelineError(f"{what}: labels must be a 1-D integer array with one label per input (inputs "
                            f"{list(x.shape)}, labels {list(y.shape)} {y.dtype})")
    return x, y.astype(np.int64), ref


def read_record(workdir: Path, step: str) -> dict[str, Any]:
    """The record a step wrote; PipelineError naming the step to run first when it is missing."""
    path = workdir / step / f"{step}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the {step} step first (edge-sdk pipeline run ... --from "
                            f"{step} --workdir {workdir})") from None
    except ValueError as exc:
        raise PipelineError(f"{path} is damaged ({exc}): run the {step} step again") from None


@dataclass
class StepContext:
    """One step's view of the run: config, work directory, run id, trigger, and lazily the registry."""

    config: PipelineConfig
    workdir: Path
    run_id: str
    trigger: dict[str, Any] = field(default_factory=dict)
    _db: Any = None
    _registry: Registry | None = None

    def dir(self, step: str) -> Path:
        """``<workdir>/<step>/`` (created)."""
        d = self.workdir / step
        d.mkdir(parents=True, exist_ok=True)
        return d

    def record(self, step: str) -> dict[str, Any]:
        """The record of an earlier step."""
        return read_record(self.workdir, step)

    def write_record(self, step: str, started: float, *, inputs: dict[str, Any], outputs: dict[str, Any],
                     figures: dict[str, Any], t0: float) -> dict[str, Any]:
        """Write ``<step>/<step>.json`` atomically and return it."""
        rec = {"step": step, "run_id": self.run_id, "inputs": inputs, "outputs": outputs, "figures": figures,
               "started_at": started, "seconds": round(time.perf_counter() - t0, 3)}
        path = self.dir(step) / f"{step}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return rec

    @property
    def registry(self) -> Registry:
        """The registry on the configured database (migrated), opened once per run."""
        if self._registry is None:
            from edge_sdk.fleet.db import Database
            from edge_sdk.fleet.lifecycle.registry import Registry

            self._db = Database.connect(self.config.registry.db)
            self._db.migrate()
            r = self.config.registry
            self._registry = Registry(self._db, r.dir, trusted_keys=str(r.trusted_keys) if r.trusted_keys else None)
        return self._registry

    def current(self) -> ModelRecord:
        """The version to beat: ``[model] current`` ("active": the active version)."""
        m = self.config.model
        if m.current == "active":
            rec = self.registry.active(m.name)
            if rec is None:
                raise PipelineError(f"no active version of {m.name} in the registry: activate the deployed one "
                                    f"(`edge-sdk deploy`), or name it with [model] current = \"VERSION\"")
            return rec
        return self.registry.show(m.name, m.current)

    def close(self) -> None:
        """Close the database connection (if one was opened)."""
        if self._db is not None:
            self._db.close()
            self._db, self._registry = None, None
