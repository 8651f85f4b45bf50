"""Step *gather*: the original training data + the labelled rows of exported sample folders -> one hashed snapshot.

Reads each folder written by ``edge-sdk data export`` (``samples.csv``, ``images/<sha256>.<ext>``,
``export.json``): the CSV must match ``export.json``'s sha256 (a half-copied export is refused), every used row's
file must lie inside the folder and hash to the row's ``sha256`` (content-addressed), labels must be class indices
of the current model. Unlabelled rows are counted and skipped; the same sample exported twice is used once.

Images are turned into model inputs with the current version's manifest preprocessing (PNG / JPEG) or read as
arrays (``.npy``, the input tensor as captured). Each labelled sample goes, by its sha256, either to training or to
the *drifted holdout* (``[data] holdout_fraction``): stable across runs, so a sample never moves from the holdout
into training later.

Writes ``gather/data.npz`` (``train_inputs``, ``train_labels``, ``train_is_sample``, ``drift_inputs``,
``drift_labels``, ``test_inputs``, ``test_labels``) and ``gather/gather.json`` with ``data_sha256``: sha256 over
every array of the snapshot.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.pipeline.context import StepContext, arrays_sha256, file_ref, load_arrays
from edge_sdk.pipeline.errors import PipelineError

__all__ = ["COLUMNS", "MAX_SAMPLE_BYTES", "read_export", "run"]

COLUMNS = ("sha256", "file", "fleet", "device", "model_name", "model_version", "prediction", "confidence", "label",
           "policy", "captured_at")
"""samples.csv's columns, in order (the export contract)."""

MAX_SAMPLE_BYTES = 16 << 20  # one captured input; bigger files are refused, not decoded
MAX_CSV_BYTES = 512 << 20


def _input_spec(manifest: dict[str, Any]) -> tuple[list[int], str, int]:
    """(input shape without batch, dtype, number of classes) from the current version's manifest."""
    inputs = manifest.get("inputs") or []
    if len(inputs) != 1:
        raise PipelineError(f"the current model has {len(inputs)} inputs: the pipeline retrains one-input "
                            "classifiers")
    shape = [int(d) if d not in (None, -1) else -1 for d in inputs[0]["shape"][1:]]
    labels = manifest.get("labels")
    outputs = manifest.get("outputs") or [{}]
    classes = len(labels) if labels else int((outputs[0].get("shape") or [1, 0])[-1])
    return shape, str(inputs[0].get("dtype") or "float32"), classes


def _preprocessing(manifest: dict[str, Any], shape: list[int]) -> Any:
    """The manifest's preprocessing, or (none recorded) gray/RGB at the input size, x/255, the input layout."""
    from edge_sdk.preprocessing import Preprocessing

    pre = Preprocessing.from_dict(manifest.get("preprocessing"))
    if pre is not None:
        return pre
    layout = (manifest.get("inputs") or [{}])[0].get("layout") or "NCHW"
    c, h, w = (shape[0], shape[1], shape[2]) if layout == "NCHW" else (shape[2], shape[0], shape[1])
    return Preprocessing(size=(h, w), color="GRAY" if c == 1 else "RGB", layout=layout)


def _decode(path: Path, data: bytes, pre: Any, shape: list[int], dtype: str) -> np.ndarray:
    """One captured input -> an array of the model's input shape (without batch)."""
    if path.suffix.lower() == ".npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype == np.uint8 and arr.ndim in (2, 3) and int(np.prod(arr.shape)) != int(np.prod(shape)):
            arr = pre.apply(arr)  # a raw image array: the model's preprocessing
        elif arr.dtype == np.uint8:
            arr = arr.astype(np.float32) * pre.scale
    else:
        arr = pre.apply_encoded(data)
    if int(np.prod(arr.shape)) != int(np.prod(shape)):
        raise ValueError(f"holds {list(arr.shape)}, the model takes {shape}")
    return arr.reshape(shape).astype(dtype)


def read_export(folder: Path, pre: Any, shape: list[int], dtype: str, classes: int) -> dict[str, Any]:
    """The labelled samples of one export folder: ``{"sha256": [...], "inputs": array, "labels": array, ...}``.

    PipelineError (one line) for a folder that is not a complete export; rows that are unusable (missing file,
    wrong hash, undecodable, label out of range) are counted by reason, not fatal.
    """
    csv_path, meta_path = folder / "samples.csv", folder / "export.json"
    if not csv_path.is_file() or not meta_path.is_file():
        raise PipelineError(f"{folder} is not an export folder (samples.csv and export.json expected): write one "
                            "with `edge-sdk data export --fleet F --labelled --out DIR`")
    if csv_path.stat().st_size > MAX_CSV_BYTES:
        raise PipelineError(f"{csv_path} is over {MAX_CSV_BYTES >> 20} MiB: export a shorter period (--since)")
    raw = csv_path.read_bytes()
    try:
        meta = json.loads(meta_path.read_text())
        want = meta.get("sha256_of_samples_csv") if isinstance(meta, dict) else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{meta_path} is not valid JSON ({exc}): export the folder again") from None
    if want is not None and hashlib.sha256(raw).hexdigest() != want:
        raise PipelineError(f"{csv_path} does not match the sha256 in export.json: the export is incomplete or was "
                            "changed; export it again")
    try:
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
        header = tuple(csv.reader(io.StringIO(raw.decode("utf-8").partition("\n")[0])).__next__()) if raw else ()
    except (UnicodeDecodeError, csv.Error, StopIteration) as exc:
        raise PipelineError(f"{csv_path} is not a UTF-8 CSV ({exc}): export the folder again") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise PipelineError(f"{csv_path} lacks column(s) {', '.join(missing)}: it is not an `edge-sdk data export` "
                            f"file (columns {','.join(COLUMNS)})")
    root = folder.resolve()
    shas: list[str] = []
    xs: list[np.ndarray] = []
    ys: list[int] = []
    skipped: dict[str, int] = {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for row in rows:
        label = (row.get("label") or "").strip()
        if not label:
            skip("unlabelled")
            continue
        try:
            y = int(label)
        except ValueError:
            skip("label not an integer")
            continue
        if not 0 <= y < classes:
            skip(f"label outside 0..{classes - 1}")
            continue
        sha = (row.get("sha256") or "").strip().lower()
        path = (folder / (row.get("file") or "")).resolve()
        if not path.is_relative_to(root) or path == root or not path.is_file():
            skip("file missing or outside the folder")
            continue
        if path.stat().st_size > MAX_SAMPLE_BYTES:
            skip("file too large")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            skip("sha256 mismatch")
            continue
        try:
            xs.append(_decode(path, data, pre, shape, dtype))
        except Exception:  # hostile or damaged input: counted, never a traceback
            skip("undecodable")
            continue
        shas.append(sha)
        ys.append(y)
    return {"folder": str(folder), "export": meta, "csv": file_ref(csv_path), "rows": len(rows),
            "labelled": len(ys), "skipped": skipped, "sha256": shas,
            "inputs": np.stack(xs) if xs else np.zeros((0, *shape), dtype), "labels": np.asarray(ys, np.int64)}


def _export_now(ctx: StepContext) -> Path:
    """Export the fleet's labelled samples from the collector's sample store into ``gather/export`` (``[data]
    export_fleet``): the same folder format ``edge-sdk data export --labelled`` writes.

    With ``[data] wait_for_samples`` the export is repeated (every few seconds) until it holds ``min_samples``
    labelled samples or that time passed: a run started by a drift alert waits for the drifted data the devices
    are only starting to send back (the last export is used either way; too few then fails as usual)."""
    try:
        from edge_sdk.fleet.samples import export_samples
    except ImportError:
        raise PipelineError("[data] export_fleet needs the collector's sample store (edge_sdk.fleet.samples, issue "
                            "18 item 2), which this install does not have: export with `edge-sdk data export` and "
                            "list the folder in [data] samples") from None
    import shutil

    out = ctx.dir("gather") / "export"
    d = ctx.config.data
    deadline = time.monotonic() + d.wait_for_samples_s
    while True:
        if out.exists():
            shutil.rmtree(out)
        # since: seconds before now (None: everything the store holds)
        res = export_samples(ctx.registry.db, d.export_fleet, out, since=d.export_since_s, labelled=True)
        left = deadline - time.monotonic()
        if res.count >= d.min_samples or left <= 0:
            return out
        time.sleep(min(5.0, left))


def _in_holdout(sha: str, fraction: float) -> bool:
    return int(sha[:8], 16) % 10_000 < round(fraction * 10_000)


def run(ctx: StepContext) -> dict[str, Any]:
    """Run the gather step (module doc); return its record."""
    started, t0 = time.time(), time.perf_counter()
    cfg = ctx.config
    current = ctx.current()
    shape, dtype, classes = _input_spec(current.manifest)
    pre = _preprocessing(current.manifest, shape)
    xo, yo, ref_o = load_arrays(cfg.data.original, cfg.train.path, "[data] original")
    xt, yt, ref_t = load_arrays(cfg.data.test, cfg.train.path, "[data] test")
    for what, x in (("[data] original", xo), ("[data] test", xt)):
        if list(x.shape[1:]) != shape:
            raise PipelineError(f"{what} inputs have shape {list(x.shape)}, {current.ref} takes [N, "
                                f"{', '.join(map(str, shape))}]: save them in the model's input layout")
    if cfg.data.max_original and len(xo) > cfg.data.max_original:
        xo, yo = xo[:cfg.data.max_original], yo[:cfg.data.max_original]
    seen: dict[str, int] = {}
    sx, sy, shas, folders = [], [], [], []
    conflicts = 0
    sources = list(cfg.data.samples)
    if cfg.data.export_fleet:
        sources.append(_export_now(ctx))
    for folder in sources:
        exp = read_export(folder, pre, shape, dtype, classes)
        for sha, x, y in zip(exp.pop("sha256"), exp.pop("inputs"), exp.pop("labels"), strict=True):
            if sha in seen:
                conflicts += int(sy[seen[sha]] != y)
                continue
            seen[sha] = len(shas)
            shas.append(sha)
            sx.append(x)
            sy.append(int(y))
        folders.append(exp)
    if len(shas) < cfg.data.min_samples:
        raise PipelineError(f"only {len(shas)} labelled sample(s) in {len(sources)} export folder(s), "
                            f"[data] min_samples is {cfg.data.min_samples}: label more (`edge-sdk data label`) or "
                            "export a longer period")
    hold = np.array([_in_holdout(s, cfg.data.holdout_fraction) for s in shas], bool)
    sx_a = np.stack(sx).astype(dtype) if sx else np.zeros((0, *shape), dtype)
    sy_a = np.asarray(sy, np.int64)
    train_x = np.concatenate([xo.astype(dtype), sx_a[~hold]])
    train_y = np.concatenate([yo, sy_a[~hold]])
    is_sample = np.concatenate([np.zeros(len(xo), bool), np.ones(int((~hold).sum()), bool)])
    arrays = {"train_inputs": train_x, "train_labels": train_y, "train_is_sample": is_sample,
              "drift_inputs": sx_a[hold], "drift_labels": sy_a[hold], "test_inputs": xt.astype(dtype),
              "test_labels": yt,
              "sample_sha256": np.asarray(shas, dtype="<U64"), "sample_in_holdout": hold}
    out = ctx.dir("gather") / "data.npz"
    tmp = out.with_name("data.partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    figures = {"data_sha256": arrays_sha256(*arrays.values()), "original_rows": len(xo),
               "sample_rows_labelled": len(shas), "sample_rows_train": int((~hold).sum()),
               "drift_holdout_rows": int(hold.sum()), "test_rows": len(xt), "train_rows": len(train_x),
               "duplicate_samples_with_other_label": conflicts, "input_shape": shape, "classes": classes,
               "sample_label_counts": np.bincount(sy_a, minlength=classes).tolist() if len(sy_a) else [],
               "exports": [{k: v for k, v in f.items() if k != "export"} | {"export_created_at":
                            (f["export"] or {}).get("created_at") if isinstance(f["export"], dict) else None}
                           for f in folders]}
    return ctx.write_record("gather", started, t0=t0,
                            inputs={"original": ref_o, "test": ref_t, "current_version": current.ref,
                                    "samples": [{"folder": f["folder"], "samples_csv": f["csv"]} for f in folders]},
                            outputs={"data": file_ref(out)}, figures=figures)
