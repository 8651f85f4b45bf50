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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_sdk.benchmark import OK, BenchmarkReport, BenchmarkResult, benchmark_bundle
from edge_sdk.errors import EdgeSDKError

__all__ = ["compare_table", "main"]

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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="bundle directory (or .tar.gz)")
    p.add_argument("--runs", type=int, default=100, help="timed calls per artifact per round (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    p.add_argument("--json", type=Path, help="also write the full benchmark report as JSON here")
    p.add_argument("--plot", type=Path, help="also write the latency/size plot (PNG) here")
    args = p.parse_args(argv)
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
