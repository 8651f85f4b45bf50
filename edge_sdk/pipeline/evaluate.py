"""Step *evaluate*: the registry's gate on two holdouts — the drifted slice and the original test set.

Both versions run through the device :class:`~edge_sdk.device_agent.agent.Agent` on this host
(:func:`edge_sdk.fleet.lifecycle.gate.evaluate_on_holdout`: the artifact and runtime a device would pick), on

* the *drifted holdout* (labelled device samples held out by the gather step): the new version must beat the
  current one by at least ``[evaluate] min_gain_pp`` percentage points;
* the *original test set*: it must not lose more than ``[evaluate] max_loss_pp`` points
  (:func:`~edge_sdk.fleet.lifecycle.gate.gate` with that tolerance).

Both figures go to ``evaluate/evaluate.json`` (and later the lineage). A refusal stops the run: the new version is
neither registered nor deployed. ``evaluate/holdout.npz`` (both sets together) becomes the model's registered
holdout in the register step, so the registry's own promotion gate judges on the same data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.pipeline.context import StepContext, file_ref
from edge_sdk.pipeline.errors import GateRefused, PipelineError

__all__ = ["run"]


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez(tmp, inputs=x, labels=y)
    tmp.replace(path)
    return path


def _part(name: str, cand: dict[str, Any], cur: dict[str, Any], ok: bool, limit: str) -> dict[str, Any]:
    delta = 100.0 * (cand["accuracy"] - cur["accuracy"])
    return {"holdout": name, "samples": cand["samples"], "candidate_accuracy": cand["accuracy"],
            "current_accuracy": cur["accuracy"], "delta_pp": round(delta, 4), "limit": limit, "passed": ok,
            "candidate": cand, "current": cur}


def run(ctx: StepContext) -> dict[str, Any]:
    """Run the evaluate step (module doc); return its record, or raise GateRefused after writing it."""
    from edge_sdk.fleet.lifecycle.gate import evaluate_archive, evaluate_on_holdout, gate

    started, t0 = time.time(), time.perf_counter()
    cfg = ctx.config
    gathered, converted = ctx.record("gather"), ctx.record("convert")
    current = ctx.current()
    out = ctx.dir("evaluate")
    with np.load(gathered["outputs"]["data"]["path"], allow_pickle=False) as npz:
        dx, dy, tx, ty = npz["drift_inputs"], npz["drift_labels"], npz["test_inputs"], npz["test_labels"]
    if len(dy) == 0:
        raise PipelineError("the drifted holdout is empty: no labelled sample was held out (raise [data] "
                            "holdout_fraction, or label more exported samples)")
    drift_p, test_p = _save(out / "drift_holdout.npz", dx, dy), _save(out / "test_holdout.npz", tx, ty)
    combined = _save(out / "holdout.npz", np.concatenate([dx, tx]), np.concatenate([dy, ty]))
    bundle = Path(converted["outputs"]["bundle"]["path"])
    new_ref = f"{converted['outputs']['name']}:{converted['outputs']['version']}"
    results: dict[str, dict[str, Any]] = {}
    for key, path in (("drift", drift_p), ("test", test_p)):
        results[key] = {"candidate": evaluate_on_holdout(bundle, path),
                        "current": evaluate_archive(current.archive_path, path)}
    e = cfg.evaluate
    d_dec = gate(results["drift"]["candidate"], results["drift"]["current"], 0.0, candidate=new_ref,
                 active=current.ref)
    t_dec = gate(results["test"]["candidate"], results["test"]["current"], e.max_loss_pp, candidate=new_ref,
                 active=current.ref)
    d_ok = d_dec.figures["delta_pp"] >= e.min_gain_pp - 1e-9
    drift = _part("drifted", results["drift"]["candidate"], results["drift"]["current"], d_ok,
                  f">= +{e.min_gain_pp:g} pp")
    test = _part("original test", results["test"]["candidate"], results["test"]["current"], t_dec.accepted,
                 f">= -{e.max_loss_pp:g} pp")
    accepted = d_ok and t_dec.accepted
    reason = (f"{new_ref} vs {current.ref}: drifted holdout {100 * drift['candidate_accuracy']:.2f}% vs "
              f"{100 * drift['current_accuracy']:.2f}% ({drift['delta_pp']:+.2f} pp, needs >= +{e.min_gain_pp:g}) "
              f"on {drift['samples']}; original test {100 * test['candidate_accuracy']:.2f}% vs "
              f"{100 * test['current_accuracy']:.2f}% ({test['delta_pp']:+.2f} pp, allowed >= -{e.max_loss_pp:g}) "
              f"on {test['samples']}")
    figures = {"accepted": accepted, "reason": reason, "min_gain_pp": e.min_gain_pp, "max_loss_pp": e.max_loss_pp,
               "drift": drift, "test": test, "candidate": new_ref, "current": current.ref}
    rec = ctx.write_record("evaluate", started, t0=t0,
                           inputs={"bundle": converted["outputs"]["bundle"], "current": current.ref,
                                   "current_archive_sha256": current.bundle_sha256},
                           outputs={"drift_holdout": file_ref(drift_p), "test_holdout": file_ref(test_p),
                                    "holdout": file_ref(combined)}, figures=figures)
    if not accepted:
        raise GateRefused(f"gate refused: {reason}", figures)
    return rec
