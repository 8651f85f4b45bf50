"""Demo step: the agent answers other people's clients — Open Inference Protocol v2 (Triton / KServe), TF Serving
and Prometheus — on the bundle just built, and every answer equals the in-process prediction."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.device_agent.agent import Agent
from edge_sdk.device_agent.server import AgentServer

__all__ = ["run"]


def _call(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return raw.decode() if url.endswith("/metrics") else json.loads(raw)


def run(bundle_dir: Path, x: np.ndarray) -> None:
    """Serve ``bundle_dir`` on a free loopback port; predict ``x`` (one model input) three ways and compare."""
    agent = Agent(bundle_dir)
    try:
        want = np.asarray(next(iter(agent.predict(x).outputs.values())), dtype=np.float32).ravel()
        with AgentServer(agent, "127.0.0.1", 0) as srv:
            base = srv.url
            name = agent.bundle.manifest.name
            meta = _call(f"{base}/v2/models/{name}")
            inp = meta["inputs"][0]
            v2 = _call(f"{base}/v2/models/{name}/infer", {"inputs": [
                {"name": inp["name"], "shape": list(x.shape), "datatype": inp["datatype"],
                 "data": x.ravel().tolist()}]})
            got_v2 = np.asarray(v2["outputs"][0]["data"], dtype=np.float32)
            tfs = _call(f"{base}/v1/models/{name}:predict", {"instances": x.tolist()})
            got_tfs = np.asarray(tfs["predictions"], dtype=np.float32).ravel()
            metrics = _call(f"{base}/metrics")
        served = [ln for ln in metrics.splitlines() if ln.startswith("edge_agent_inferences_total")]
        print(f"\nserving {name} on {base}: Open Inference Protocol v2 ({inp['name']} {inp['datatype']} "
              f"{inp['shape']}) max |diff| {np.abs(got_v2 - want).max():.1e}, TF Serving :predict max |diff| "
              f"{np.abs(got_tfs - want).max():.1e} vs in-process; Prometheus: {'; '.join(served)}")
    finally:
        agent.close()
