"""Run a bundle's smoke sample (:mod:`edge_sdk.smoke`) through the device Agent: the check a device does before
it switches to a new model version (``updater``) and that ``edge-sdk`` runs after a build."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.bundle import Bundle
from edge_sdk.device_agent.agent import Agent
from edge_sdk.smoke import compare_smoke, load_smoke_sample, smoke_limits

__all__ = ["SmokeResult", "run_smoke_test"]


@dataclass
class SmokeResult:
    """The outcome of one smoke test: ``passed`` and, when it failed, ``reason`` (one line)."""

    passed: bool
    model_version: str
    artifact: str
    runtime: str
    cosine: float | None = None
    max_abs_error: float | None = None
    min_cosine: float | None = None
    atol: float | None = None
    latency_ms: float | None = None
    reason: str = ""
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for events and state files)."""
        return {k: getattr(self, k) for k in ("passed", "model_version", "artifact", "runtime", "cosine",
                                               "max_abs_error", "min_cosine", "atol", "latency_ms", "reason")}



def run_smoke_test(agent_or_bundle: Agent | Bundle | str | os.PathLike, *, runtime_order: Sequence[str] | None = None,
                   artifact: str | None = None, threads: int | None = 1) -> SmokeResult:
    """Run the bundle's smoke sample through the device Agent and compare with the recorded reference output.

    ``agent_or_bundle`` is a loaded Agent (used as is) or a bundle / directory (loaded with an Agent built from
    ``runtime_order``, ``artifact``, ``threads`` — the settings the device runs with — and closed afterwards).
    Returns a :class:`SmokeResult`; raises BundleError when there is no usable smoke sample and
    InferenceError / MissingDependencyError when the artifact cannot be loaded or run here.
    """
    own = not isinstance(agent_or_bundle, Agent)
    if own:
        bundle = agent_or_bundle if isinstance(agent_or_bundle, Bundle) else Bundle.load(agent_or_bundle)
        inputs, reference = load_smoke_sample(bundle)  # before loading a runtime: a bundle without a sample fails fast
        agent = Agent(bundle, runtime_order=list(runtime_order) if runtime_order else None, artifact=artifact,
                      threads=threads)
    else:
        agent = agent_or_bundle
        inputs, reference = load_smoke_sample(agent.bundle)
    try:
        min_cos, atol = smoke_limits(agent.bundle, agent.artifact.precision)
        t0 = time.perf_counter()
        pred = agent.predict(list(inputs))
        latency = (time.perf_counter() - t0) * 1000.0
        cosine, max_abs, failures = compare_smoke(reference, list(pred.outputs.values()), min_cosine=min_cos,
                                                  atol=atol)
        res = SmokeResult(passed=not failures, model_version=agent.model_version, artifact=agent.artifact.key,
                          runtime=agent.runtime_name, cosine=cosine, max_abs_error=max_abs, min_cosine=min_cos,
                          atol=atol, latency_ms=latency, failures=failures)
        if failures:
            res.reason = (f"smoke test of {agent.model_version} ({agent.artifact.key} on {agent.runtime_name}) "
                          f"failed: {'; '.join(failures)}")
        return res
    finally:
        if own:
            agent.close()
