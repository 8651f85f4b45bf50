"""Input sources of the device agent: image files, a watched folder, cameras and video streams.

A source spec is one string:

- ``folder:PATH`` — every image already in the folder (sorted by name), then each new image as it appears
  (polled; a file is taken once its size stops changing), until the stop event is set;
- ``file:PATH`` — one image file, or every frame of a video file;
- ``camera:N`` — OpenCV ``VideoCapture`` device N;
- ``rtsp://…``, ``rtmp://…``, ``http(s)://…`` — a network video stream through ``VideoCapture``.

:func:`iter_source` yields ``(name, frame)`` pairs (frame: BGR uint8 as OpenCV decodes it);
:func:`run_source` feeds them to ``Agent.predict_image`` and hands each result to a callback; given a callable
returning the current agent (and the lock its owner swaps it under), it follows over-the-air model switches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.device_agent.metrics import inference_source
from edge_sdk.errors import InputError
from edge_sdk.preprocessing import IMAGE_SUFFIXES, decode_image

if TYPE_CHECKING:
    from edge_sdk.device_agent.agent import Agent, Prediction

__all__ = ["STREAM_SCHEMES", "iter_source", "parse_source", "run_source"]

log = logging.getLogger("edge_sdk.agent")

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")


def parse_source(spec: str) -> tuple[str, str | int]:
    """Split a source spec into (kind, value): ``folder``/``file`` with a path, ``camera`` with an index,
    ``stream`` with a URL. Raises InputError for anything else."""
    spec = spec.strip()
    if spec.lower().startswith(STREAM_SCHEMES):
        return "stream", spec
    kind, sep, value = spec.partition(":")
    kind = kind.lower()
    if not sep or not value:
        raise InputError(f"source {spec!r} is not understood: use camera:N, folder:PATH, file:PATH or an "
                         "rtsp:// / http(s):// URL")
    if kind == "camera":
        if not value.isdigit():
            raise InputError(f"camera index {value!r} is not a number: use camera:0, camera:1, ...")
        return "camera", int(value)
    if kind in ("folder", "file"):
        return kind, value
    raise InputError(f"unknown source kind {kind!r} in {spec!r}: use camera:N, folder:PATH, file:PATH or a URL")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _iter_folder(folder: Path, stop: threading.Event, poll_interval: float) -> Iterator[tuple[str, np.ndarray]]:
    if not folder.is_dir():
        raise InputError(f"folder source {folder} does not exist or is not a directory: create it or fix the path")
    seen: set[str] = set()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p)):
        seen.add(path.name)
        if stop.is_set():
            return
        frame = _decode_or_skip(path)
        if frame is not None:
            yield path.name, frame
    pending: dict[str, int] = {}  # name -> size at the previous poll (taken when it stops changing)
    while not stop.wait(poll_interval):
        try:
            entries = sorted(p for p in folder.iterdir() if p.name not in seen and _is_image(p) and p.is_file())
        except OSError as exc:
            raise InputError(f"folder source {folder} cannot be listed ({exc.strerror})") from None
        for path in entries:
            try:
                size = path.stat().st_size
            except OSError:  # removed between listing and stat
                pending.pop(path.name, None)
                continue
            if size == 0 or pending.get(path.name) != size:
                pending[path.name] = size
                continue
            pending.pop(path.name, None)
            seen.add(path.name)
            frame = _decode_or_skip(path)
            if frame is not None:
                yield path.name, frame
            if stop.is_set():
                return


def _decode_or_skip(path: Path) -> np.ndarray | None:
    try:
        return decode_image(path)
    except InputError as exc:
        log.warning("skipping %s: %s", path, exc)
        return None


def _iter_capture(target: str | int, label: str, stop: threading.Event,
                  missing: str) -> Iterator[tuple[str, np.ndarray]]:
    cv2 = require("cv2", "camera", "camera and video sources")
    cap = cv2.VideoCapture(target)
    try:
        if not cap.isOpened():
            raise InputError(f"cannot open {label}: {missing}")
        index = 0
        while not stop.is_set():
            ok, frame = cap.read()
            if not ok or frame is None:
                log.info("%s ended after %d frame(s)", label, index)
                return
            yield f"{label}#{index}", frame
            index += 1
    finally:
        cap.release()


def iter_source(spec: str, *, stop_event: threading.Event | None = None,
                poll_interval: float = 0.2) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, BGR frame)`` from a source spec until it ends or ``stop_event`` is set.

    Folder sources never end by themselves: they poll for new images every ``poll_interval`` seconds.
    Undecodable files in a folder are logged and skipped; a ``file:`` that is not a readable image or
    video, or a camera / stream that cannot be opened, raises InputError.
    """
    stop = stop_event or threading.Event()
    kind, value = parse_source(spec)
    if kind == "folder":
        yield from _iter_folder(Path(str(value)).expanduser(), stop, poll_interval)
    elif kind == "file":
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise InputError(f"file source {path} does not exist: check the path")
        if _is_image(path):
            yield path.name, decode_image(path)
        else:
            yield from _iter_capture(str(path), path.name, stop,
                                     "not a readable image or video file (OpenCV could not open it)")
    elif kind == "camera":
        yield from _iter_capture(int(value), f"camera{value}", stop,
                                 "no such camera (check the index, /dev/video*, and the user's video group)")
    else:
        yield from _iter_capture(str(value), str(value), stop,
                                 "the stream is unreachable or its codec unsupported by this OpenCV build")


def run_source(agent: Agent | Callable[[], Agent], spec: str, on_result: Callable[[str, Prediction], Any],
               stop_event: threading.Event | None = None, max_items: int | None = None, *,
               on_error: Callable[[str, Exception], Any] | None = None, poll_interval: float = 0.2,
               lock: contextlib.AbstractContextManager[Any] | None = None) -> int:
    """Run ``predict_image`` on every frame of a source; returns how many predictions were made.

    ``agent``: the Agent, or a zero-argument callable returning the agent serving now (the device runner's
    ``current_agent``), asked again for every frame under ``lock`` (the lock its owner swaps the agent under, so an
    agent is never closed mid-frame): a model switched by an update takes over from the next frame.
    Each result goes to ``on_result(name, prediction)``. A frame the model rejects (InputError) goes to
    ``on_error(name, error)`` when given, else is logged; the source keeps running. Stops after
    ``max_items`` predictions, when the source ends, or when ``stop_event`` is set.
    """
    current: Callable[[], Agent] = (lambda: agent) if hasattr(agent, "predict_image") else agent  # type: ignore
    guard: contextlib.AbstractContextManager[Any] = lock if lock is not None else contextlib.nullcontext()
    stop = stop_event or threading.Event()
    done = 0
    if max_items is not None and max_items <= 0:
        return 0
    frames = iter_source(spec, stop_event=stop, poll_interval=poll_interval)
    kind = parse_source(spec)[0]  # counted as edge_agent_inferences_total{source=kind} (/metrics)
    try:
        for name, frame in frames:
            try:
                with guard, inference_source(kind):
                    pred = current().predict_image(frame)
            except InputError as exc:
                if on_error is not None:
                    on_error(name, exc)
                else:
                    log.warning("%s rejected: %s", name, exc)
                continue
            on_result(name, pred)
            done += 1
            if max_items is not None and done >= max_items:
                break
    finally:
        frames.close()
    return done
