"""What per-inference telemetry costs, with the real ImageNet MobileNetV2 (issue 5: <= 2 % of inference time).

One agent per runtime, one loaded model; rounds interleave ``Agent.predict`` with telemetry attached (latency
sketch, confidence and class histograms, strided input subsample for drift, prediction id remembered) and
detached, call by call, so both see the same machine state. Reported per runtime:

* p50 of each variant and their ratio (goal: on / off <= 1.02; noisy on a shared machine), and the median of the
  ratios of the two calls of each round (less sensitive to load that changes between rounds),
* the telemetry work itself, timed where it runs (inside those ``Agent.predict`` calls: ``observe_input`` before
  the model run, ``record`` after it, including the periodic bulk folds), mean per inference and as a fraction of
  the mean runtime call in the same calls: the figure that stays meaningful on a busy machine,
* what closing one window costs (``Telemetry.emit_window`` into a real SQLite outbox, synchronous=FULL), spread
  over a 10 s window at the measured inference rate.

    python benchmarks/telemetry_overhead.py [--bundle demo_out/mobilenet_v2] [--iters 400] [--runtimes onnxruntime]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from agent_overhead import ARTIFACTS, ROOT, ensure_bundle, interleaved, photo_jpeg  # noqa: E402


def timed_aggregator(baseline: dict, num_classes: int | None):  # type: ignore[no-untyped-def]
    """A WindowAggregator that adds the time spent in its per-inference methods to ``spent`` (seconds)."""
    from edge_sdk.device_agent.aggregates import WindowAggregator

    class Timed(WindowAggregator):
        spent = 0.0

        def observe_input(self, x, layout=None):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            super().observe_input(x, layout)
            Timed.spent += time.perf_counter() - t0

        def record(self, latency_ms, **kw):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            super().record(latency_ms, **kw)
            Timed.spent += time.perf_counter() - t0

    return Timed(baseline, classifier=True, num_classes=num_classes)


def emit_cost_ms(agent, tmp: Path, windows: int = 20) -> float:  # type: ignore[no-untyped-def]
    """Median time of Telemetry.emit_window (aggregates -> JSON -> committed outbox row), ms."""
    from edge_sdk.device_agent.outbox import Outbox
    from edge_sdk.device_agent.telemetry import Telemetry, TelemetrySettings

    settings = TelemetrySettings(enabled=True, fleet="bench", device="bench", outbox_path=str(tmp / "outbox.db"))
    x = np.zeros((1, 3, 224, 224), np.float32)
    with Outbox(settings.outbox_path) as outbox:
        tel = Telemetry.for_agent(agent, settings, outbox=outbox)
        times = []
        for _ in range(windows):
            for _ in range(50):
                agent.predict(x)
            t0 = time.perf_counter()
            tel.emit_window()
            times.append((time.perf_counter() - t0) * 1000)
    agent.set_telemetry(None)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "demo_out" / "mobilenet_v2")
    p.add_argument("--iters", type=int, default=400, help="interleaved rounds per runtime")
    p.add_argument("--runtimes", default=",".join(ARTIFACTS), help="comma list of runtimes to measure")
    p.add_argument("--window", type=float, default=10.0, help="window length for the emit cost share, s")
    args = p.parse_args()
    bundle = ensure_bundle(args.bundle)
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.aggregates import WindowAggregator
    from edge_sdk.preprocessing import Preprocessing, decode_image
    from edge_sdk.runtimes import get_runtime

    x = Preprocessing.imagenet().apply(decode_image(photo_jpeg()))
    print(f"MobileNetV2 bundle {bundle}; {platform.machine()} {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}; "
          f"iters {args.iters}")
    rows = []
    for runtime in [r for r in args.runtimes.split(",") if r]:
        if not get_runtime(runtime).is_available():
            print(f"{runtime}: not installed, skipped")
            continue
        agent = Agent(bundle, artifact=ARTIFACTS[runtime])
        agg = timed_aggregator(agent.bundle.manifest.baseline, agent.num_classes)
        runtime_ms: list[float] = []

        def off(a: Agent = agent) -> None:
            a.set_telemetry(None)
            a.predict(x)

        def on(a: Agent = agent, g: WindowAggregator = agg, lat: list[float] = runtime_ms) -> None:
            a.set_telemetry(g)
            lat.append(a.predict(x).latency_ms)

        t = interleaved({"off": off, "on": on}, args.iters)
        agent.set_telemetry(None)
        w = agg.take()
        assert w["count"] == len(runtime_ms) and w["input"]["sampled"] == len(runtime_ms), w["count"]
        hook = type(agg).spent / len(runtime_ms) * 1e6  # µs per inference, folds included
        share = hook / 1000 / statistics.mean(runtime_ms)
        with tempfile.TemporaryDirectory() as tmp:
            emit = emit_cost_ms(agent, Path(tmp))
        p_off, p_on = statistics.median(t["off"]), statistics.median(t["on"])
        paired = statistics.median(b / a for a, b in zip(t["off"], t["on"], strict=True))
        per_window = args.window * 1000 / p_off  # inferences in one window at full rate
        rows.append((runtime, p_off, p_on, p_on / p_off, paired, hook, share, emit,
                     emit / (per_window * p_off)))
        agent.close()
    print(f"\nper inference, p50 ms (goal: on / off <= 1.02); emit share = emit_window over a {args.window:g} s "
          "window at full rate")
    print("| runtime | telemetry off | telemetry on | on / off | median paired on/off | telemetry µs / inference "
          "| telemetry / runtime call | emit_window ms | emit share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r, a, b, ratio, paired, hook, share, emit, eshare in rows:
        print(f"| {r} | {a:.3f} | {b:.3f} | {ratio:.4f} | {paired:.4f} | {hook:.1f} | {share * 100:.2f} % "
              f"| {emit:.2f} | {eshare * 100:.3f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
