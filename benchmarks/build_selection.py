"""Which variant does `edge-sdk build` pick for the real MobileNetV2, and is the pick stable?

For each target that this host can stand in for (host, x86-openvino): one full build (convert, validate,
check, benchmark, select), then the benchmark + selection repeated on the same bundle, so the table shows
three independent selections. Prints, per run: the selected artifact, its p50, the p50 of the fp32 artifact
of the same format and their ratio.

    python benchmarks/build_selection.py [--out /tmp/build_selection] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def main() -> int:
    from data import photo_crops
    from torch_models import mobilenet_v2_weights_path

    from edge_sdk.converters.build import build, select_for_target
    from edge_sdk.preprocessing import Preprocessing
    from edge_sdk.targets import load_profile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/build_selection"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--targets", default="host,x86-openvino")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "calib.npy", photo_crops(n=200, seed=1))
    np.save(args.out / "val.npy", photo_crops(n=240, seed=0))
    rows = []
    for target in args.targets.split(","):
        profile = load_profile(target)
        bundle = build(mobilenet_v2_weights_path(), target=target, out=args.out / target, overwrite=True,
                       calib=args.out / "calib.npy", val=args.out / "val.npy", model_class="torch_models:MobileNetV2",
                       input_shape=[1, 3, 224, 224], preprocessing=Preprocessing.imagenet(), quiet=True)
        for run in range(args.repeats):
            if run:
                bundle = select_for_target(bundle, profile, profile.accuracy.max_accuracy_drop_pp, quiet=True)
            b = bundle.manifest.extra["build"]
            c = next(c for c in b["candidates"] if c["key"] == b["selected"])
            ratio = c["p50_ms"] / c["fp32_p50_ms"] if c["fp32_p50_ms"] else float("nan")
            others = ", ".join(f"{o['key']} {o['p50_ms']:.2f}" + ("" if o["eligible"] else " (ineligible)")
                               for o in b["candidates"] if o["p50_ms"])
            rows.append((target, run + 1, b["selected"], c["p50_ms"], c["fp32_p50_ms"], ratio, others))
    print("| target | run | selected | p50 ms | fp32 p50 ms (same format) | ratio | all candidates p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for t, r, sel, p50, f32, ratio, others in rows:
        print(f"| {t} | {r} | {sel} | {p50:.2f} | {f32:.2f} | {ratio:.2f} | {others} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
