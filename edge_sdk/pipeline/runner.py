"""Running the steps in order, one run at a time per model, with a one-line record of how the run ended.

:func:`run_pipeline` takes the per-model lock (an ``flock`` on ``<lock dir>/<model>.pipeline.lock``: released by the
kernel if the process dies, so a crashed run never blocks the next), then runs ``gather -> train -> convert ->
evaluate -> register -> deploy`` (or from ``from_step``, or ``only`` one), writing ``<workdir>/run.json`` before
and after every step::

    {"run_id", "model", "workdir", "status": "running|succeeded|refused|failed", "trigger", "steps": [{"step",
     "status", "seconds"}], "failed_step", "error": "<one line>", "version", "deployment_id", "started_at",
     "finished_at"}

A failing step stops the run (no later step runs, so nothing is deployed); its one line goes to ``error``, a
traceback of an unexpected exception to ``<workdir>/<step>/error.log``. A gate refusal ends as ``refused``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_sdk.errors import EdgeSDKError, GateError, first_line
from edge_sdk.pipeline import convert, deploy, evaluate, gather, register, train
from edge_sdk.pipeline.config import PipelineConfig
from edge_sdk.pipeline.context import StepContext
from edge_sdk.pipeline.errors import GateRefused, PipelineBusy, PipelineError

__all__ = ["STEPS", "RunResult", "lock_path", "model_lock", "new_run_id", "run_pipeline", "steps_to_run"]

log = logging.getLogger("edge_sdk.pipeline")

STEPS: dict[str, Callable[[StepContext], dict[str, Any]]] = {
    "gather": gather.run, "train": train.run, "convert": convert.run, "evaluate": evaluate.run,
    "register": register.run, "deploy": deploy.run,
}
_ALIASES = {"sign": "register"}


@dataclass(frozen=True)
class RunResult:
    """How a run ended: ``status`` succeeded | refused | failed, and the run.json content."""

    status: str
    workdir: Path
    record: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True when every step that was asked for succeeded."""
        return self.status == "succeeded"

    @property
    def error(self) -> str | None:
        """The one-line reason of a refused or failed run."""
        return self.record.get("error")


def new_run_id() -> str:
    """``YYYYmmddTHHMMSSZ-xxxxxx``: sortable by start time, unique."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def steps_to_run(from_step: str | None = None, only: str | None = None) -> list[str]:
    """The step names to run; PipelineError naming the valid ones for an unknown name."""
    names = list(STEPS)
    if from_step and only:
        raise PipelineError("give --from or --only, not both")
    for given in (from_step, only):
        if given is not None and _ALIASES.get(given, given) not in STEPS:
            raise PipelineError(f"unknown step {given!r}: use one of {', '.join(names)}")
    if only:
        return [_ALIASES.get(only, only)]
    if from_step:
        return names[names.index(_ALIASES.get(from_step, from_step)):]
    return names


def lock_path(cfg: PipelineConfig) -> Path:
    """The per-model lock file: `<[pipeline] lock_dir or the registry dir>/<model>.pipeline.lock`."""
    return (cfg.lock_dir or cfg.registry.dir) / f"{cfg.model.name}.pipeline.lock"


@contextlib.contextmanager
def model_lock(cfg: PipelineConfig, run_id: str, workdir: Path) -> Iterator[None]:
    """Hold the model's pipeline lock for the block; PipelineBusy (naming the holder) when another run has it."""
    path = lock_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise PipelineBusy(f"a pipeline run of {cfg.model.name} is already in progress ({holder}): wait for it "
                               f"to end (lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run {run_id}, pid {os.getpid()}, workdir {workdir}, since "
                      f"{datetime.now(UTC).isoformat(timespec='seconds')}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_run(workdir: Path, record: dict[str, Any]) -> None:
    path = workdir / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_pipeline(config: PipelineConfig, *, workdir: str | os.PathLike | None = None, from_step: str | None = None,
                 only: str | None = None, trigger: dict[str, Any] | None = None,
                 on_step: Callable[[str, str], None] | None = None, run_id: str | None = None) -> RunResult:
    """Run the pipeline (module doc). ``workdir`` defaults to ``<[pipeline] workdir>/<model>/<run id>``;
    ``--from`` / ``--only`` continue an existing one. ``on_step(step, status)`` is told of each step's start/end.

    Raises PipelineBusy (nothing written) when another run of the model holds the lock; every other failure is
    recorded in run.json and returned as a ``failed`` / ``refused`` :class:`RunResult`.
    """
    steps = steps_to_run(from_step, only)
    run_id = run_id or new_run_id()
    if workdir is None:
        if from_step or only:
            raise PipelineError("--from / --only continue an earlier run: pass its --workdir")
        wd = config.workdir / config.model.name / run_id
    else:
        wd = Path(workdir)
    wd = wd.resolve()
    with model_lock(config, run_id, wd):
        wd.mkdir(parents=True, exist_ok=True)
        previous: dict[str, Any] = {}
        if (wd / "run.json").is_file() and (from_step or only):
            with contextlib.suppress(ValueError, OSError):
                previous = json.loads((wd / "run.json").read_text())
        record: dict[str, Any] = {
            "run_id": previous.get("run_id", run_id), "model": config.model.name, "workdir": str(wd),
            "config": {"path": str(config.path) if config.path else None, "sha256": config.sha256},
            "status": "running", "trigger": trigger or {"kind": "manual"}, "steps_asked": steps,
            "steps": [s for s in previous.get("steps", []) if s.get("step") not in steps],
            "failed_step": None, "error": None, "started_at": time.time(), "finished_at": None,
            "pid": os.getpid(),
        }
        _write_run(wd, record)
        ctx = StepContext(config, wd, record["run_id"], record["trigger"])
        status, finished = "succeeded", False
        try:
            for step in steps:
                t0 = time.perf_counter()
                entry = {"step": step, "status": "running", "seconds": None}
                record["steps"].append(entry)
                _write_run(wd, record)
                if on_step:
                    on_step(step, "running")
                log.info("pipeline %s run %s: %s", config.model.name, record["run_id"], step)
                try:
                    out = STEPS[step](ctx)
                except GateRefused as exc:
                    status, entry["status"] = "refused", "refused"
                    record["error"] = f"{step}: {first_line(exc, 600)}"
                except (GateError, EdgeSDKError) as exc:
                    status, entry["status"] = ("refused" if isinstance(exc, GateError) else "failed"), "failed"
                    record["error"] = f"{step}: {first_line(exc, 600)}"
                except Exception as exc:  # a bug or a crash in user code: one line here, the traceback in a file
                    status, entry["status"] = "failed", "failed"
                    record["error"] = f"{step}: {type(exc).__name__}: {first_line(exc, 500)} (traceback in " \
                                      f"{ctx.dir(step) / 'error.log'})"
                    (ctx.dir(step) / "error.log").write_text(traceback.format_exc())
                else:
                    entry["status"] = "succeeded"
                    if step == "convert":
                        record["version"] = out["outputs"]["version"]
                    if step == "deploy":
                        record["deployment_id"] = out["outputs"].get("deployment_id")
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                if on_step:
                    on_step(step, entry["status"])
                if status != "succeeded":
                    record["failed_step"] = step
                    log.warning("pipeline %s run %s %s: %s", config.model.name, record["run_id"], status,
                                record["error"])
                    break
                _write_run(wd, record)
            finished = True
        finally:
            ctx.close()
            if not finished:  # interrupted (Ctrl-C, SIGTERM): nothing after the running step happened
                status = "failed"
                record["error"] = record["error"] or f"{record['steps'][-1]['step']}: interrupted"
            record["status"] = status
            record["finished_at"] = time.time()
            _write_run(wd, record)
    return RunResult(status, wd, record)
