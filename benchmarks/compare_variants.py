"""fp32 against every other precision, per format, measured side by side in one run on this host.

    python benchmarks/compare_variants.py BUNDLE [--runs 100] [--warmup 10] [--rounds 5] [--threads 1]
                                          [--json FILE] [--plot FILE.png]

Prints a markdown table (paste it into a report): for each format and each non-fp32 variant, the
latency ratio (p50 variant / p50 fp32), in how many rounds the variant beat fp32, the size ratio,
and the agreement with the source model recorded in the manifest (top-1 agreement, cosine).
The artifacts are measured in alternating order, round after round, each in a fresh process, so
machine noise hits every variant alike; p50 pools all rounds.

A bundle with the real ImageNet MobileNetV2 in every format and precision (about 5 minutes):

    python examples/demo.py --mobilenet --out demo_out     # then BUNDLE = demo_out/mobilenet_v2

With ``--plain PLAIN_BUNDLE`` (the same model converted without an accuracy budget) it prints instead, per
target, fp32 vs plain int8 vs the budgeted pick (BUNDLE, converted with ``--min-agreement`` etc.): top-1
agreement, size ratio and latency ratio (fp32 = 1), with the ladder step and method that made the pick and
whether it is slower than fp32. All three are timed in the same interleaved rounds, each in a fresh process.
``--mobilenet OUT`` first builds both bundles of the real ImageNet MobileNetV2 (tflite, onnx, openvino; 200
calibration and 240 validation photo crops; budget ``--min-agreement``, default 0.95) into OUT/plain and
OUT/budget (many minutes; ``--to onnx,openvino`` for fewer targets):

    python benchmarks/compare_variants.py --mobilenet /tmp/mnv2 --min-agreement 0.95 --rounds 5 --runs 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._bench_worker import run_job
from edge_sdk.benchmark import OK, BenchmarkReport, BenchmarkResult, _load_options, _runtime_of, benchmark_bundle
from edge_sdk.bundle import Artifact, Bundle
from edge_sdk.errors import EdgeSDKError

__all__ = ["budget_table", "build_mobilenet", "compare_table", "main"]

BASELINE = "fp32"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def _num(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _rounds_won(variant: BenchmarkResult, base: BenchmarkResult) -> str:
    pairs = list(zip(variant.round_p50_ms, base.round_p50_ms, strict=False))
    if not pairs:
        return "—"
    return f"{sum(v < b for v, b in pairs)}/{len(pairs)}"


def compare_table(report: BenchmarkReport) -> str:
    """The markdown comparison table of ``report``: one row per (format, non-fp32 variant, threads)."""
    head = ("| format | runtime | threads | variant | p50 fp32 ms | p50 variant ms | latency ratio | faster in rounds "
            "| size ratio | top-1 agreement | cosine | validation |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_key = {(r.format, r.precision, r.threads): r for r in report.results}
    formats = list(dict.fromkeys(r.format for r in report.results))
    for fmt in formats:
        variants = [r for r in report.results if r.format == fmt and r.precision != BASELINE]
        threads = list(dict.fromkeys(r.threads for r in report.results if r.format == fmt))
        for t in threads:
            base = by_key.get((fmt, BASELINE, t))
            rows = [r for r in variants if r.threads == t]
            if not rows and base is not None:
                measured = _num(base.p50_ms, 3) if base.status == OK else f"not run: {base.reason}"
                lines.append(f"| {fmt} | {base.runtime or '—'} | {t} | (fp32 only) | {measured} | — | — | — | — "
                             "| — | — | — |")
            for r in rows:
                runtime = r.runtime or (base.runtime if base else None) or "—"
                v = r.validation
                top1 = "—" if v.get("top1_agreement") is None else f"{100 * v['top1_agreement']:.1f}%"
                passed = {True: "passed", False: "FAILED", None: "not validated"}[v.get("passed")]
                if r.status != OK or base is None or base.status != OK:
                    why = r.reason if r.status != OK else (base.reason if base else "no fp32 artifact")
                    lines.append(f"| {fmt} | {runtime} | {t} | {r.precision} | — | — | not run: {why} | — "
                                 f"| {_ratio(r.size_bytes, base.size_bytes if base else None)} | {top1} "
                                 f"| {_num(v.get('cosine'), 4)} | {passed} |")
                    continue
                lines.append(f"| {fmt} | {runtime} | {t} | {r.precision} | {_num(base.p50_ms, 3)} "
                             f"| {_num(r.p50_ms, 3)} | {_ratio(r.p50_ms, base.p50_ms)} | {_rounds_won(r, base)} "
                             f"| {_ratio(r.size_bytes, base.size_bytes)} | {top1} | {_num(v.get('cosine'), 4)} "
                             f"| {passed} |")
    return "\n".join(lines)


def _describe(report: BenchmarkReport) -> str:
    h, s = report.host, report.settings
    runtimes = ", ".join(f"{k} {v}" for k, v in h.get("runtimes", {}).items())
    return (f"Bundle `{report.bundle}` on {h.get('cpu')} ({h.get('logical_cores')} logical cores, {h.get('os')}, "
            f"Python {h.get('python')}; {runtimes}). {s['rounds']} interleaved rounds × {s['runs']} timed runs "
            f"(after {s['warmup']} warm-up) per artifact, batch 1, each in a fresh process; {report.timestamp}.")


def _pick(bundle: Bundle, fmt: str) -> Artifact | None:
    """The artifact of ``fmt`` the accuracy budget kept (any precision), else the int8 one."""
    arts = [a for a in bundle.artifacts if a.format == fmt]
    return (next((a for a in arts if "accuracy_budget" in a.validation.checks), None)
            or next((a for a in arts if a.precision == "int8"), None))


def budget_table(budget: Bundle, plain: Bundle, *, runs: int = 30, warmup: int = 5, rounds: int = 5,
                 progress: Any = None) -> str:
    """Per format: fp32 vs plain int8 (``plain``) vs the budgeted pick (``budget``), timed in the same interleaved
    rounds (1 thread, fresh process per measurement); markdown."""
    rows: list[tuple[str, str, Bundle, Artifact]] = []
    for fmt in dict.fromkeys(a.format for a in budget.artifacts):
        fp32 = next((a for a in budget.artifacts if a.format == fmt and a.precision == "fp32"), None)
        plain_int8 = next((a for a in plain.artifacts if a.format == fmt and a.precision == "int8"), None)
        pick = _pick(budget, fmt)
        for role, b, a in (("fp32", budget, fp32), ("plain int8", plain, plain_int8), ("budgeted pick", budget, pick)):
            if a is not None:
                rows.append((fmt, role, b, a))
    lat: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    why: dict[int, str] = {}
    for rnd in range(rounds):
        order = list(range(len(rows))) if rnd % 2 == 0 else list(range(len(rows)))[::-1]
        for i in order:
            fmt, role, b, a = rows[i]
            rt, reason = _runtime_of(a)
            if rt is None:
                why[i] = reason or "no runtime"
                continue
            out = run_job({"runtime": rt.name, "path": str(b.path_of(a)), "threads": 1, "runs": runs,
                           "warmup": warmup, "seed": 0, "options": _load_options(rt, a),
                           "shapes": [s.shape for s in a.inputs]})
            if not out.get("ok"):
                why[i] = out.get("error", "failed")
                continue
            lat[i].extend(out["latencies_ms"])
            if progress:
                progress(f"round {rnd + 1}/{rounds} {fmt} {role} {a.key}: p50 {np.median(out['latencies_ms']):.3f} ms")
    head = ("| target | variant | artifact | top-1 agreement | size ratio | p50 ms | latency ratio | ladder step "
            "| method | slower than fp32 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, (fmt, role, _b, a) in enumerate(rows):
        base = next(j for j, r in enumerate(rows) if r[0] == fmt)
        base_art = rows[base][3]
        p50 = float(np.median(lat[i])) if lat[i] else None
        p50_base = float(np.median(lat[base])) if lat[base] else None
        checks = a.validation.checks
        rec = checks.get("accuracy_budget", {})
        step = rec.get("kept") or ("—" if role != "budgeted pick" else "int8 (no budget record)")
        method = rec.get("method") or "—"
        top1 = a.validation.top1_agreement
        slower = checks.get("slower_than_fp32")
        if slower is None and p50 is not None and p50_base is not None and role != "fp32":
            slower = p50 >= p50_base
        lines.append(f"| {fmt} | {role} | {a.key} | {'—' if top1 is None else f'{100 * top1:.1f}%'} "
                     f"| {_ratio(a.size_bytes, base_art.size_bytes)} | {_num(p50, 3) if p50 else why.get(i, '—')} "
                     f"| {_ratio(p50, p50_base)} | {step if role == 'budgeted pick' else '—'} "
                     f"| {method if role == 'budgeted pick' else '—'} "
                     f"| {'—' if role == 'fp32' or slower is None else ('yes' if slower else 'no')} |")
    return "\n".join(lines)


def build_mobilenet(out: Path, min_agreement: float, to: str = "tflite,onnx,openvino") -> tuple[Bundle, Bundle]:
    """Convert the real ImageNet MobileNetV2 twice (plain int8; with ``--min-agreement``) into out/plain and
    out/budget: 200 calibration crops (seed 1), 240 validation crops (seed 0), 1 thread."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import torch
    from data import photo_crops
    from torch_models import load_mobilenet_v2

    from edge_sdk.converters.accuracy_budget import AccuracyBudget
    from edge_sdk.converters.pipeline import convert
    from edge_sdk.errors import ValidationError

    torch.set_num_threads(1)
    model = load_mobilenet_v2()
    calib, val = photo_crops(n=200, seed=1), photo_crops(n=240, seed=0)
    bundles = []
    for name, budget in (("plain", None), ("budget", AccuracyBudget(min_agreement=min_agreement))):
        try:
            bundles.append(convert(model, out=out / name, to=to, precision="fp32,int8", ort=False, calib=calib,
                                   val=val, input_shape=(1, 3, 224, 224), budget=budget, keep_failed=True,
                                   overwrite=True))
        except ValidationError as exc:  # plain int8 below the default tolerance is kept (marked failed)
            bundles.append(getattr(exc, "bundle", None) or Bundle.load(out / name))
    return bundles[0], bundles[1]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, nargs="?", help="bundle directory (or .tar.gz)")
    p.add_argument("--plain", type=Path, help="the same model without an accuracy budget: print fp32 vs plain int8 "
                                             "vs the budgeted pick (BUNDLE) per target")
    p.add_argument("--mobilenet", type=Path, metavar="OUT",
                   help="build the MobileNetV2 plain/budget bundles here first")
    p.add_argument("--min-agreement", type=float, default=0.95, help="budget for --mobilenet (default 0.95)")
    p.add_argument("--to", default="tflite,onnx,openvino", help="targets for --mobilenet (default all three)")
    p.add_argument("--runs", type=int, default=100, help="timed calls per artifact per round (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    p.add_argument("--json", type=Path, help="also write the full benchmark report as JSON here")
    p.add_argument("--plot", type=Path, help="also write the latency/size plot (PNG) here")
    args = p.parse_args(argv)
    if args.mobilenet or args.plain:
        try:
            if args.mobilenet:
                plain, budget = build_mobilenet(args.mobilenet, args.min_agreement, args.to)
            else:
                if args.bundle is None:
                    p.error("--plain needs BUNDLE (the budgeted bundle)")
                plain, budget = Bundle.load(args.plain), Bundle.load(args.bundle)
            table = budget_table(budget, plain, runs=args.runs, warmup=args.warmup, rounds=args.rounds,
                                 progress=lambda line: print(line, file=sys.stderr))
        except (EdgeSDKError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"fp32 vs plain int8 vs budgeted pick: {budget.root} (plain: {plain.root}); {args.rounds} interleaved "
              f"rounds x {args.runs} runs, 1 thread, fresh process each; agreement = validation top-1 agreement "
              "with the source model\n")
        print(table)
        return 0
    if args.bundle is None:
        p.error("give BUNDLE (or --mobilenet OUT)")
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
        report = benchmark_bundle(args.bundle, runs=args.runs, warmup=args.warmup, threads=threads,
                                  rounds=args.rounds, progress=lambda line: print(line, file=sys.stderr))
    except (EdgeSDKError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_describe(report) + "\n")
    print(compare_table(report))
    not_run = [f"{r.key}: {r.reason}" for r in report.results if r.status != OK]
    if not_run:
        print("\nNot measured here: " + "; ".join(dict.fromkeys(not_run)))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.plot:
        report.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
