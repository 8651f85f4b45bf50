"""The collector's sample store: captured inputs as content-addressed files plus an index in the fleet database.

Files: ``<samples dir>/<sha256[:2]>/<sha256>.<ext>`` (``ext`` from the content: ``png``, ``jpg`` or ``npy``),
written to a temporary name, flushed and renamed, so a file under its final name is always complete. Index: the
``samples`` table (migration 0005), one row per (fleet, sha256); a second upload of the same bytes to the same
fleet is a duplicate (acknowledged, nothing changes but a newer label), so devices may retry freely. Two fleets
that upload the same bytes share one file; :func:`apply_sample_retention` deletes a file only with its last row.

Every upload is checked before anything is written (:func:`check_meta`, :meth:`SampleStore.add`): the metadata's
fields and types, the body's size, that its sha256 is the one announced, and that it is a PNG, a JPEG or a
non-object ``.npy``. A refusal is a :class:`SampleError` with one line saying what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.device_agent.capture import POLICIES, sample_ext
from edge_sdk.errors import EdgeSDKError
from edge_sdk.topics import validate_id

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database

__all__ = ["DEFAULT_MAX_SAMPLE_BYTES", "SHA256", "SampleError", "SampleMeta", "SampleStore", "apply_sample_retention",
           "check_meta"]

#: the largest sample the collector takes by default
DEFAULT_MAX_SAMPLE_BYTES = 8 * 1024 * 1024
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PAGE = 1000
_MAX_CLASS = 2**31 - 1


class SampleError(EdgeSDKError, ValueError):
    """A sample, its metadata, a label file or an export request is refused; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SampleMeta:
    """What a device says about one sample (the ``X-Edge-Sample`` header of ``POST /api/samples``)."""

    sha256: str
    fleet: str
    device: str
    model_name: str
    model_version: str
    prediction: int | None
    confidence: float | None
    label: int | None
    policy: str
    captured_at: float


def _class_index(doc: dict[str, Any], key: str) -> int | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_CLASS:
        raise SampleError(f"sample metadata {key!r} must be a class index (integer >= 0) or null, got {v!r:.40}")
    return v


def _text(doc: dict[str, Any], key: str, limit: int) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or not v or len(v) > limit or not v.isprintable():
        raise SampleError(f"sample metadata {key!r} must be a printable string of 1-{limit} characters")
    return v


def check_meta(doc: Any, *, now: float | None = None) -> SampleMeta:
    """Validate the metadata of one upload; :class:`SampleError` (400) naming the first bad field."""
    if not isinstance(doc, dict):
        raise SampleError("sample metadata must be a JSON object")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or not SHA256.match(sha):
        raise SampleError("sample metadata 'sha256' must be 64 lowercase hex digits (the sha256 of the body)")
    ids = {}
    for key in ("fleet", "device"):
        try:
            ids[key] = validate_id(doc.get(key), key)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise SampleError(f"sample metadata {key!r}: {exc}") from None
    policy = doc.get("policy")
    if policy not in POLICIES:
        raise SampleError(f"sample metadata 'policy' must be one of {', '.join(POLICIES)}, got {policy!r:.40}")
    conf = doc.get("confidence")
    if conf is not None and (isinstance(conf, bool) or not isinstance(conf, (int, float)) or not math.isfinite(conf)
                             or not 0.0 <= conf <= 1.0):
        raise SampleError(f"sample metadata 'confidence' must be a number in [0, 1] or null, got {conf!r:.40}")
    ts = doc.get("captured_at")
    t = time.time() if now is None else now
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or not 0 < ts < t + 86400:
        raise SampleError("sample metadata 'captured_at' must be unix seconds, not in the future")
    return SampleMeta(sha, ids["fleet"], ids["device"], _text(doc, "model_name", 200), _text(doc, "model_version", 100),
                      _class_index(doc, "prediction"), None if conf is None else float(conf),
                      _class_index(doc, "label"), str(policy), float(ts))


def _check_content(data: bytes, sha: str) -> str:
    """The body's extension after checking its hash and type (SampleError 400 / 415)."""
    if not data:
        raise SampleError("the sample body is empty: send the captured bytes")
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise SampleError(f"the body's sha256 is {got[:16]}..., not the announced {sha[:16]}...: the upload was "
                          "damaged or the metadata belongs to another sample")
    ext = sample_ext(data)
    if ext is None:
        raise SampleError("the sample is not a PNG, a JPEG or a .npy array: capture sends only those", 415)
    if ext == "npy":
        import numpy as np

        buf = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
            else:
                raise ValueError(f"format version {version} is not taken (1.0 and 2.0 are)")
        except (ValueError, SyntaxError, TypeError, EOFError) as exc:
            raise SampleError(f"the .npy header is malformed ({str(exc)[:100]}): send an array saved by numpy.save",
                              415) from None
        if dtype.hasobject:
            raise SampleError("the .npy array holds Python objects (pickles): only plain numeric arrays are taken", 415)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > len(data):
            raise SampleError("the .npy array is shorter than its header says: the upload is truncated", 400)
    return ext


class SampleStore:
    """Samples of the collector (module docstring): files under ``directory``, rows in ``db`` (migrated)."""

    def __init__(self, db: Database, directory: str | os.PathLike[str], *,
                 max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> None:
        self.db = db
        self.dir = Path(directory).expanduser().resolve()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SampleError(f"samples folder {self.dir} cannot be created ({exc.strerror}): choose a writable "
                              "--samples-dir", 500) from None
        self.max_sample_bytes = int(max_sample_bytes)
        db.migrate()

    def path_of(self, sha: str, ext: str) -> Path:
        """Where the file of ``sha`` lives."""
        return self.dir / sha[:2] / f"{sha}.{ext}"

    def add(self, meta: SampleMeta, data: bytes, *, now: float | None = None) -> bool:
        """Store one sample; True when new, False when (fleet, sha256) was stored already (a label that came with
        it is still applied). SampleError for a body that does not match its metadata."""
        if len(data) > self.max_sample_bytes:
            raise SampleError(f"sample of {len(data)} bytes is over the collector's {self.max_sample_bytes}-byte "
                              "limit", 413)
        ext = _check_content(data, meta.sha256)
        t = time.time() if now is None else now
        path = self.path_of(meta.sha256, ext)
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        labelled = (t, "feedback") if meta.label is not None else (None, None)
        n = self.db.execute(
            "INSERT INTO samples (fleet, sha256, device, ext, size_bytes, path, model_name, model_version, prediction, "
            "confidence, label, label_source, labelled_at, policy, captured_at, received_at) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, sha256) DO NOTHING",
            (meta.fleet, meta.sha256, meta.device, ext, len(data), str(path), meta.model_name, meta.model_version,
             meta.prediction, meta.confidence, meta.label, labelled[1], labelled[0], meta.policy, meta.captured_at,
             t))
        if n == 0 and meta.label is not None:
            self.set_labels([(meta.sha256, meta.label)], fleet=meta.fleet, source="feedback", now=t)
        return n != 0

    def set_labels(self, items: list[tuple[str, int]], *, fleet: str | None = None, source: str = "import",
                   now: float | None = None) -> tuple[int, list[str]]:
        """Label samples by sha256 (in ``fleet``, or in every fleet); returns (rows updated, unknown hashes)."""
        return set_labels(self.db, items, fleet=fleet, source=source, now=now)

    def summary(self, fleet: str | None = None) -> dict[str, Any]:
        """``{"count", "bytes", "labelled", "by_policy": {policy: count}}`` (of ``fleet``, or of every fleet)."""
        where, params = ("WHERE fleet = ?", (fleet,)) if fleet else ("", ())
        rows = self.db.query(f"SELECT policy, COUNT(*) AS n, COALESCE(SUM(size_bytes), 0) AS b, COUNT(label) AS l "
                             f"FROM samples {where} GROUP BY policy ORDER BY policy", params)
        return {"count": sum(int(r["n"]) for r in rows), "bytes": sum(int(r["b"]) for r in rows),
                "labelled": sum(int(r["l"]) for r in rows), "by_policy": {r["policy"]: int(r["n"]) for r in rows}}


def set_labels(db: Database, items: list[tuple[str, int]], *, fleet: str | None = None, source: str = "import",
               now: float | None = None) -> tuple[int, list[str]]:
    """Label the samples whose sha256 is given (in ``fleet``, or in every fleet) in one transaction; returns
    (rows updated, the hashes no sample has)."""
    t = time.time() if now is None else now
    updated, unknown = 0, []
    with db.transaction():
        for sha, label in items:
            if fleet is None:
                n = db.execute("UPDATE samples SET label = ?, label_source = ?, labelled_at = ? WHERE sha256 = ?",
                               (int(label), source, t, sha))
            else:
                n = db.execute("UPDATE samples SET label = ?, label_source = ?, labelled_at = ? WHERE sha256 = ? "
                               "AND fleet = ?", (int(label), source, t, sha, fleet))
            updated += max(n, 0)
            if n <= 0:
                unknown.append(sha)
    return updated, unknown


def apply_sample_retention(db: Database, cutoff: float, max_rows: int, *, max_pages: int = 50) -> int:
    """Delete samples received before ``cutoff`` or beyond the newest ``max_rows`` (oldest first), and their files
    once no row refers to them; counted in ``retention_drops`` (kind ``sample``, reason = policy). Returns how many
    rows went."""
    n = int(db.query("SELECT COUNT(*) AS n FROM samples")[0]["n"])
    if n > max_rows:
        edge = db.query("SELECT received_at FROM samples ORDER BY received_at DESC LIMIT 1 OFFSET ?", (int(max_rows),))
        if edge:
            cutoff = max(cutoff, math.nextafter(float(edge[0]["received_at"]), math.inf))
    dropped = 0
    for _ in range(max_pages):
        with db.transaction():
            rows = db.query("SELECT fleet, sha256, device, policy, path, received_at FROM samples "
                            "WHERE received_at < ? ORDER BY received_at LIMIT ?", (cutoff, _PAGE))
            if not rows:
                break
            for r in rows:
                db.execute("DELETE FROM samples WHERE fleet = ? AND sha256 = ?", (r["fleet"], r["sha256"]))
            counts: dict[tuple[str, str, str], list[float]] = {}
            for r in rows:
                c = counts.setdefault((r["fleet"], r["device"], r["policy"]), [0, math.inf, -math.inf])
                ts = float(r["received_at"])
                c[0] += 1
                c[1], c[2] = min(c[1], ts), max(c[2], ts)
            db.executemany(
                "INSERT INTO retention_drops (kind, fleet, device, reason, dropped, first_ts, last_ts) "
                "VALUES ('sample', ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, fleet, device, reason) DO UPDATE SET "
                "dropped = retention_drops.dropped + excluded.dropped, "
                "first_ts = CASE WHEN excluded.first_ts < retention_drops.first_ts THEN excluded.first_ts "
                "ELSE retention_drops.first_ts END, "
                "last_ts = CASE WHEN excluded.last_ts > retention_drops.last_ts THEN excluded.last_ts "
                "ELSE retention_drops.last_ts END",
                [(*k, int(v[0]), v[1], v[2]) for k, v in sorted(counts.items())])
            still = {r["sha256"] for r in db.query(
                f"SELECT DISTINCT sha256 FROM samples WHERE sha256 IN ({', '.join('?' * len(rows))})",
                [r["sha256"] for r in rows])}
        for r in rows:  # after the commit: a crash leaves a file without a row, never a row without its file
            if r["sha256"] not in still:
                Path(r["path"]).unlink(missing_ok=True)
        dropped += len(rows)
        if len(rows) < _PAGE:
            break
    return dropped
