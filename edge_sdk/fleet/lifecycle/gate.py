"""The evaluation gate: a candidate version must beat the active one (or match it within a tolerance) on the
holdout set registered for its model name.

Both versions are evaluated here, on this host, with the device :class:`~edge_sdk.device_agent.agent.Agent`
(the artifact and runtime a device with the same runtimes installed would pick), so the comparison is between
the models as they will run, not between their source frameworks.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import Bundle, sha256_file
from edge_sdk.errors import EdgeSDKError, GateError

__all__ = ["GateDecision", "GateError", "evaluate_archive", "evaluate_on_holdout", "gate"]

_BATCH = 64


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate may be promoted, why (one line), and the figures the decision rests on."""

    accepted: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def _load_holdout(holdout: Any) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(inputs, labels, sha256) from a Holdout record, an .npz path or an (inputs, labels) pair."""
    if isinstance(holdout, tuple) and len(holdout) == 2:
        return np.asarray(holdout[0]), np.asarray(holdout[1]), None
    path = Path(getattr(holdout, "path", holdout))
    with np.load(path, allow_pickle=False) as data:
        x, y = data["inputs"], data["labels"]
    return x, y, getattr(holdout, "sha256", None) or sha256_file(path)


def evaluate_on_holdout(bundle_dir: str | os.PathLike | Bundle, holdout: Any, *, threads: int | None = 1,
                        runtime_order: list[str] | None = None) -> dict[str, Any]:
    """Top-1 accuracy of a classifier bundle on a holdout set, run by the device Agent.

    ``holdout``: a :class:`~.registry.Holdout`, an ``.npz`` path (arrays ``inputs`` in the source
    model's layout and ``labels``, integer classes) or an ``(inputs, labels)`` pair. Inputs are fed in batches
    when the artifact's batch dimension is dynamic, one at a time otherwise.
    Returns ``{accuracy, samples, correct, runtime, runtime_version, artifact, holdout_sha256, seconds}``.
    """
    from edge_sdk.device_agent.agent import Agent

    x, y, digest = _load_holdout(holdout)
    t0 = time.perf_counter()
    with Agent(bundle_dir, runtime_order=runtime_order, threads=threads) as agent:
        if len(agent.input_specs) != 1:
            raise EdgeSDKError(f"{agent.model_version} takes {len(agent.input_specs)} inputs: the holdout gate "
                               "evaluates one-input classifiers only")
        want = list(agent.input_specs[0].shape[1:])
        if x.ndim != len(want) + 1 or any(d not in (None, -1) and int(d) != g
                                          for d, g in zip(want, x.shape[1:], strict=True)):
            raise EdgeSDKError(f"holdout inputs have shape {list(x.shape)}, {agent.model_version} expects "
                               f"[N, {', '.join(map(str, want))}]: register a holdout set in the model's input layout")
        first = agent.input_specs[0].shape[0]
        dynamic = first in (None, -1)
        batch = _BATCH if dynamic else int(first)
        dtype = np.dtype(agent.input_specs[0].dtype or "float32")
        correct = 0
        for start in range(0, len(x), batch):
            xb = np.asarray(x[start:start + batch], dtype=dtype)
            n = len(xb)
            if n < batch and not dynamic:  # a static batch dimension: pad the last chunk, count its real rows
                xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), dtype)])
            out = agent.predict(np.ascontiguousarray(xb)).outputs[agent.output_names[0]]
            pred = np.asarray(out).reshape(len(xb), -1)[:n].argmax(axis=1)
            correct += int((pred == y[start:start + n]).sum())
        info = {"runtime": agent.runtime_name, "runtime_version": agent.runtime_version,
                "artifact": agent.artifact.key, "model": agent.model_version}
    return {"accuracy": correct / len(x), "samples": len(x), "correct": correct, **info,
            "holdout_sha256": digest, "seconds": round(time.perf_counter() - t0, 3)}


def evaluate_archive(archive: str | os.PathLike, holdout: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_on_holdout` of a registry archive (unpacked safely into a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix=".edge-sdk-gate.") as tmp:
        bundle = Bundle.extract(archive, Path(tmp) / "bundle")
        return evaluate_on_holdout(bundle, holdout, **kwargs)


def gate(candidate_result: dict[str, Any], active_result: dict[str, Any], tolerance_pp: float = 0.5, *,
         candidate: str = "candidate", active: str = "active") -> GateDecision:
    """Accept when the candidate's holdout accuracy >= the active's minus ``tolerance_pp`` percentage points."""
    if tolerance_pp < 0:
        raise EdgeSDKError(f"tolerance must be >= 0 percentage points, got {tolerance_pp}")
    if candidate_result.get("holdout_sha256") != active_result.get("holdout_sha256") or \
            candidate_result["samples"] != active_result["samples"]:
        raise EdgeSDKError("the two versions were evaluated on different holdout sets: evaluate both on the same one")
    c, a = float(candidate_result["accuracy"]), float(active_result["accuracy"])
    delta_pp = 100.0 * (c - a)
    figures = {"candidate": candidate_result, "active": active_result, "tolerance_pp": tolerance_pp,
               "delta_pp": round(delta_pp, 4)}
    n = candidate_result["samples"]
    compare = (f"{candidate} {100 * c:.2f}% vs active {active} {100 * a:.2f}% on {n} holdout samples "
               f"({delta_pp:+.2f} pp, tolerance {tolerance_pp:g} pp)")
    if delta_pp >= -tolerance_pp - 1e-9:
        return GateDecision(True, compare, figures)
    return GateDecision(False, compare, figures)
