"""Samples out of and labels into the collector: the folder ``edge-sdk data export`` writes (which training code,
labelling tools and ``edge-sdk pipeline``'s gather step read) and ``edge-sdk data label``'s CSV.

Export folder (the issue-18 contract, exactly)::

    DIR/images/<sha256>.<ext>   the captured bytes as uploaded (png | jpg | npy, from the content)
    DIR/samples.csv             sha256,file,fleet,device,model_name,model_version,prediction,confidence,label,
                                policy,captured_at  (file relative to DIR; label empty when unlabelled; prediction
                                and label class indices; captured_at ISO 8601 UTC, e.g. 2026-12-06T21:25:28.123Z)
    DIR/samples.json            the same rows as a list of objects (label null when unlabelled)
    DIR/export.json             {"fleet", "filters", "count", "bytes", "created_at", "sha256_of_samples_csv"}

Rows are ordered by ``captured_at`` then ``sha256``. Each image is copied and its sha256 checked on the way. An
export into a folder that holds an earlier export replaces it (images no longer selected are removed); any other
non-empty folder is refused.

Labels CSV: columns ``sha256,label`` (a header row is optional; ``label`` a class index). A malformed row stops the
import before anything changes (one line naming the row); hashes no sample has are reported, not fatal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.device_agent.capture import POLICIES
from edge_sdk.fleet.samples.store import SHA256, SampleError, set_labels
from edge_sdk.topics import validate_id

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database

__all__ = ["COLUMNS", "ExportResult", "LabelResult", "export_samples", "iso_utc", "label_samples", "parse_since",
           "read_labels_csv"]

#: the columns of samples.csv, in order
COLUMNS = ("sha256", "file", "fleet", "device", "model_name", "model_version", "prediction", "confidence", "label",
           "policy", "captured_at")
_MAX_LABEL_ROWS = 10_000_000


def iso_utc(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds and ``Z`` (``2026-12-06T21:25:28.123Z``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(text: str | float | datetime | None, *, now: float | None = None) -> float | None:
    """A ``--since`` value as unix seconds: an ISO 8601 time (naive means UTC), or a number of SECONDS before now
    (a string or an int/float); a datetime as is. SampleError for anything else."""
    if text is None or text == "":
        return None
    t = time.time() if now is None else now
    if isinstance(text, datetime):
        return (text if text.tzinfo else text.replace(tzinfo=UTC)).timestamp()
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise SampleError(f"since {text!r} must be a number of seconds >= 0")
        return t - float(text)
    s = str(text).strip()
    try:
        seconds = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise SampleError(f"--since {s!r} must be seconds >= 0 or an ISO 8601 time")
        return t - seconds
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise SampleError(f"--since {s[:60]!r} is neither seconds nor an ISO 8601 time: use e.g. 86400 or "
                          "2026-12-01T00:00:00Z") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_samples` wrote: the folder, the row count, the image bytes and the export.json content."""

    out_dir: Path
    count: int
    bytes: int
    manifest: dict[str, Any] = field(repr=False)


def _policies(policy: str | Iterable[str] | None) -> list[str] | None:
    if policy is None or policy == "":
        return None
    items = [p.strip() for p in (policy.split(",") if isinstance(policy, str) else policy) if p.strip()]
    bad = [p for p in items if p not in POLICIES]
    if bad:
        raise SampleError(f"unknown policy {', '.join(bad)}: choose from {', '.join(POLICIES)}")
    return sorted(set(items), key=POLICIES.index) or None


def _prepare(out: Path) -> set[str]:
    """Check ``out`` may be written; the image names an earlier export left there."""
    if out.exists() and not out.is_dir():
        raise SampleError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").is_file():
        raise SampleError(f"--out {out} is not empty and holds no earlier export: choose an empty or new folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    return {p.name for p in (out / "images").iterdir()}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_samples(db: Database, fleet: str, out_dir: str | os.PathLike[str], *,
                   since: str | float | datetime | None = None, policy: str | Iterable[str] | None = None,
                   labelled: bool = False, now: float | None = None) -> ExportResult:
    """Write the samples of ``fleet`` into ``out_dir`` in the export format (module docstring).

    ``since``: only samples captured since then (see :func:`parse_since`: ISO time, or seconds before now);
    ``policy``: only these policies (a list or ``"a,b"``); ``labelled``: only labelled samples.
    """
    try:
        validate_id(fleet, "fleet")
    except (ValueError, TypeError) as exc:
        raise SampleError(f"--fleet: {exc}") from None
    t = time.time() if now is None else now
    since_ts = parse_since(since, now=t)
    policies = _policies(policy)
    where, params = ["fleet = ?"], [fleet]
    if since_ts is not None:
        where.append("captured_at >= ?")
        params.append(since_ts)
    if policies:
        where.append(f"policy IN ({', '.join('?' * len(policies))})")
        params.extend(policies)
    if labelled:
        where.append("label IS NOT NULL")
    rows = db.query(f"SELECT sha256, ext, path, fleet, device, model_name, model_version, prediction, confidence, "
                    f"label, policy, captured_at FROM samples WHERE {' AND '.join(where)} "
                    f"ORDER BY captured_at, sha256", params)
    out = Path(out_dir)
    before = _prepare(out)
    records: list[dict[str, Any]] = []
    total = 0
    missing: list[str] = []
    for r in rows:
        name = f"{r['sha256']}.{r['ext']}"
        target = out / "images" / name
        if name not in before or hashlib.sha256(target.read_bytes()).hexdigest() != r["sha256"]:
            try:
                data = Path(r["path"]).read_bytes()
            except FileNotFoundError:
                missing.append(r["path"])
                continue
            if hashlib.sha256(data).hexdigest() != r["sha256"]:
                raise SampleError(f"sample file {r['path']} does not match its sha256: the samples folder was "
                                  "altered; delete that file and its row or restore it")
            _atomic_write(target, data)
        total += target.stat().st_size
        records.append({"sha256": r["sha256"], "file": f"images/{name}", "fleet": r["fleet"], "device": r["device"],
                        "model_name": r["model_name"], "model_version": r["model_version"],
                        "prediction": None if r["prediction"] is None else int(r["prediction"]),
                        "confidence": None if r["confidence"] is None else float(r["confidence"]),
                        "label": None if r["label"] is None else int(r["label"]), "policy": r["policy"],
                        "captured_at": iso_utc(float(r["captured_at"]))})
    if missing:
        raise SampleError(f"{len(missing)} sample file(s) are missing from the samples folder (first: {missing[0]}): "
                          "restore them or check the collector's --samples-dir")
    keep = {Path(rec["file"]).name for rec in records}
    for name in before - keep:
        (out / "images" / name).unlink(missing_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for rec in records:
        w.writerow(["" if rec[c] is None else (repr(rec[c]) if isinstance(rec[c], float) else rec[c])
                    for c in COLUMNS])
    csv_bytes = buf.getvalue().encode("utf-8")
    _atomic_write(out / "samples.csv", csv_bytes)
    _atomic_write(out / "samples.json", (json.dumps(records, indent=1) + "\n").encode("utf-8"))
    manifest = {"fleet": fleet, "filters": {"since": iso_utc(since_ts) if since_ts is not None else None,
                                            "policy": policies, "labelled": bool(labelled)},
                "count": len(records), "bytes": total, "created_at": iso_utc(t),
                "sha256_of_samples_csv": hashlib.sha256(csv_bytes).hexdigest()}
    _atomic_write(out / "export.json", (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return ExportResult(out, len(records), total, manifest)


@dataclass(frozen=True)
class LabelResult:
    """What :func:`label_samples` did: rows read, sample rows updated, and the hashes no sample has."""

    rows: int
    updated: int
    unknown: list[str]


def read_labels_csv(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """The (sha256, label) rows of a labels CSV (module docstring); SampleError naming the first bad row."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleError(f"cannot read the labels file {p}: {exc}") from None
    items: list[tuple[str, int]] = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if n == 1 and row[0].strip().lower() == "sha256":
            if len(row) < 2 or row[1].strip().lower() != "label":
                raise SampleError(f"{p}: the header must be 'sha256,label', got {','.join(row)[:80]!r}")
            continue
        if len(row) != 2:
            raise SampleError(f"{p}, row {n}: expected 2 columns (sha256,label), got {len(row)}")
        sha, label = row[0].strip().lower(), row[1].strip()
        if not SHA256.match(sha):
            raise SampleError(f"{p}, row {n}: {row[0][:80]!r} is not a sha256 (64 hex digits)")
        if not label.isascii() or not label.isdigit() or len(label) > 9:
            raise SampleError(f"{p}, row {n}: label {label[:40]!r} is not a class index (an integer >= 0)")
        items.append((sha, int(label)))
        if len(items) > _MAX_LABEL_ROWS:
            raise SampleError(f"{p}: more than {_MAX_LABEL_ROWS} rows: split the file")
    return items


def label_samples(db: Database, csv_path: str | os.PathLike[str], *, fleet: str | None = None) -> LabelResult:
    """Attach the labels of a ``sha256,label`` CSV to the samples (of ``fleet``, or of every fleet)."""
    if fleet is not None:
        try:
            validate_id(fleet, "fleet")
        except (ValueError, TypeError) as exc:
            raise SampleError(f"--fleet: {exc}") from None
    items = read_labels_csv(csv_path)
    latest = dict(items)  # a hash given twice: the last row wins
    updated, unknown = set_labels(db, list(latest.items()), fleet=fleet, source="import")
    return LabelResult(len(items), updated, unknown)
