"""Browser vs native: the real MobileNetV2 in ONNX Runtime Web (WASM, headless Chromium) vs native ONNX Runtime.

Converts MobileNetV2 (torchvision weights) to ``--to web,onnx --precision fp32,int8`` once, then measures with
``edge_sdk.benchmark`` (one fresh process per artifact and thread count, rounds interleaved, medians): native ORT
at 1 thread, web at 1 thread and at N threads (WASM threads need the cross-origin isolated page the runtime
serves). Web latency is timed inside the page (``performance.now`` around ``session.run``); its load time includes
starting Chromium. Prints one table and the browser/native ratio of the 1-thread medians.

    python benchmarks/web_latency.py [--runs 50] [--rounds 3] [--threads 2] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def build(out: Path) -> Path:
    """The MobileNetV2 bundle with web and onnx artifacts (fp32, int8)."""
    from data import photo_crops
    from torch_models import mobilenet_v2_weights_path

    from edge_sdk.cli import main as cli

    work = out.parent
    np.save(work / "calib.npy", photo_crops(n=100, seed=1))
    np.save(work / "val.npy", photo_crops(n=40, seed=0))
    code = cli(["convert", str(mobilenet_v2_weights_path()), "--model-class", "torch_models:MobileNetV2",
                "--input-shape", "1,3,224,224", "--to", "web,onnx", "--no-ort", "--precision", "fp32,int8",
                "--calib", str(work / "calib.npy"), "--val", str(work / "val.npy"), "--preset", "imagenet",
                "--out", str(out), "--overwrite"])
    if code != 0:
        raise SystemExit(f"conversion failed (exit {code})")
    return out


def main() -> None:
    """Build (or reuse --bundle), measure, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="the N of the multi-threaded web run (default 2)")
    ap.add_argument("--bundle", type=Path, help="reuse a bundle built by an earlier run")
    args = ap.parse_args()
    from edge_sdk.benchmark import benchmark_bundle

    with tempfile.TemporaryDirectory(prefix="web_latency_") as tmp:
        bundle = args.bundle if args.bundle and args.bundle.is_dir() else build(Path(tmp) / "bundle")
        if args.bundle and not args.bundle.is_dir():
            import shutil

            shutil.copytree(bundle, args.bundle)
        report = benchmark_bundle(bundle, runs=args.runs, warmup=args.warmup, threads=(1, args.threads),
                                  rounds=args.rounds, progress=lambda line: print(line, file=sys.stderr))
    rows = {(r.key, r.threads): r for r in report.results}
    print(f"{'artifact':<10} {'threads':>7} {'load ms':>9} {'p50 ms':>8} {'p95 ms':>8}  round p50s")
    for (key, t), r in sorted(rows.items()):
        if r.status != "ok":
            print(f"{key:<10} {t:>7} {r.status}: {r.reason}")
            continue
        print(f"{key:<10} {t:>7} {r.load_ms:>9.0f} {r.p50_ms:>8.2f} {r.p95_ms:>8.2f}  "
              + ", ".join(f"{x:.2f}" for x in r.round_p50_ms))
    for prec in ("fp32", "int8"):
        web1, webn, nat = (rows.get((f"{f}/{prec}", t)) for f, t in (("web", 1), ("web", args.threads),
                                                                     ("onnx", 1)))
        if not (web1 and nat and web1.p50_ms and nat.p50_ms):
            continue
        med = statistics.median
        ratio = med(web1.round_p50_ms) / med(nat.round_p50_ms)
        line = f"{prec}: browser/native at 1 thread = {ratio:.2f}x ({web1.p50_ms:.2f} ms vs {nat.p50_ms:.2f} ms)"
        if webn and webn.p50_ms:
            line += f"; web {args.threads} threads {webn.p50_ms:.2f} ms ({web1.p50_ms / webn.p50_ms:.2f}x faster)"
        print(line)


if __name__ == "__main__":
    main()
