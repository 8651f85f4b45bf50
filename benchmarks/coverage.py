"""Coverage matrix: every real model of the corpus (examples/corpus.py) to every target it can reach, fp32 and int8.

    python benchmarks/coverage.py                       # all models, tflite,coreml,openvino,onnx x fp32,int8
    python benchmarks/coverage.py --models pnet,silero-vad-jit --targets tflite --markdown
    python benchmarks/coverage.py --json coverage.json  # keep every cell (reason, route, figures, time)

Each model runs in its own child process (a crash inside a vendor tool, even a segfault, is that model's row,
never the sweep's end), through the public ``edge_sdk.convert`` with real inputs from the model's package
(photos, speech, sentences): calibration and held-out validation sets from different seeds.

A cell is one of:
- ``pass``: converted and validated against the source model (cosine / top-1 agreement shown);
- ``spec``: Core ML on Linux — converted and the package spec checked; numbers need macOS;
- ``refused``: converted but over the precision's tolerance, with the measured figures (int8 that breaks the model);
- ``error``: no artifact; the one-line reason of every route tried;
- ``n/a``: no converter from this kind of source to the target (e.g. ONNX -> Core ML: coremltools 9 has no ONNX
  frontend);
- ``n/r``: the target cannot represent the model: its op set lacks an op the model needs (TFLite builtins have no
  3-D max pooling: only the Flex delegate, which LiteRT does not ship), reason listed;
- ``crash``: the child process died or ``convert`` raised something that is not an edge_sdk error (a bug here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("tflite", "coreml", "openvino", "onnx")
PRECISIONS = ("fp32", "int8")


def run_one(name: str, targets: list[str], precisions: list[str], n_calib: int, n_val: int) -> dict[str, Any]:
    """Convert one corpus model in this process; return its cells."""
    sys.path.insert(0, str(ROOT / "examples"))
    import corpus

    from edge_sdk.converters.pipeline import convert
    from edge_sdk.errors import EdgeSDKError

    model = corpus.get(name)
    row: dict[str, Any] = {"model": name, "kind": model.kind, "what": model.what, "requirement": model.requirement,
                           "cells": {}}
    reach = [t for t in targets if t in model.targets]
    for t in targets:
        if t not in reach:
            for p in precisions:
                row["cells"][f"{t}/{p}"] = {"state": "n/a", "reason": f"{model.kind} sources cannot reach {t}"}
    if not reach:
        return row
    t0 = time.perf_counter()
    try:
        kwargs = model.source()
        calib = model.inputs(n_calib, seed=1)
        val = model.inputs(n_val, seed=2)
    except Exception as exc:  # the corpus itself could not provide the model: a row of errors, said plainly
        for t in reach:
            for p in precisions:
                row["cells"][f"{t}/{p}"] = {"state": "error", "reason": f"corpus: {type(exc).__name__}: {exc}"[:300]}
        return row
    source = kwargs.pop("source")
    out = Path(tempfile.mkdtemp(prefix="coverage_")) / "bundle"
    results: list[Any] = []
    try:
        bundle = convert(source, out=out, to=",".join(reach), precision=",".join(precisions), calib=calib, val=val,
                         ort=False, skip_unsupported=True, quiet=True, **kwargs)
        results = bundle.results  # type: ignore[attr-defined]
    except EdgeSDKError as exc:
        results = getattr(exc, "results", [])
        if not results:
            for t in reach:
                for p in precisions:
                    row["cells"][f"{t}/{p}"] = {"state": "error", "reason": str(exc)[:400]}
    except Exception as exc:  # not an edge_sdk error: exactly what the corpus exists to catch
        for t in reach:
            for p in precisions:
                row["cells"][f"{t}/{p}"] = {"state": "crash", "reason": f"{type(exc).__name__}: {exc}"[:400]}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    for r in results:
        v = r.validation
        state = {"passed": "pass", "skipped-validation": "spec", "failed": "refused", "error": "error",
                 "unsupported": "n/a"}.get(r.status, r.status)
        row["cells"][r.key] = {"state": _classify(state, r.reason), "reason": r.reason, "route": r.route,
                               "attempts": r.attempts, "cosine": v.cosine, "top1": v.top1_agreement,
                               "seconds": getattr(r, "seconds", None), "size": r.size_bytes}
    _same_cause_as_fp32(row)  # after the cells are filled: an int8 cell inherits its target's fp32 n/r
    return row


_NO_CONVERTER = ("an existing model is bundled as it is", "is a full-integer model with int8 inputs/outputs")


def _classify(state: str, reason: str) -> str:
    """An error caused by the target's op set is n/r; one with no converter for this kind of source is n/a."""
    if state == "error" and _unrepresentable(reason):
        return "n/r"
    if state == "error" and any(m in reason for m in _NO_CONVERTER):
        return "n/a"  # an existing .tflite / IR ships in its own precision; int8-I/O files go nowhere else
    return state


def _same_cause_as_fp32(row: dict[str, Any]) -> None:
    """A target that cannot represent the model in fp32 cannot in int8 either: those int8 errors are n/r too."""
    for key, cell in row["cells"].items():
        target, _, precision = key.partition("/")
        fp32 = row["cells"].get(f"{target}/fp32", {})
        if precision != "fp32" and cell["state"] == "error" and fp32.get("state") == "n/r":
            cell["state"] = "n/r"
            cell["reason"] = f"as fp32 ({fp32['reason'][:200]}); " + cell["reason"]


def _unrepresentable(reason: str) -> bool:
    """An error whose cause is the target's op set, not a tool failure: TFLite builtins have no such op (Flex), or
    the model uses a runtime's custom op (MediaPipe's Convolution2DTransposeBias) that other targets lack."""
    return "Flex (select TF) ops" in reason or "needs custom ops" in reason


def _child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--one", name, "--result", str(out), "--targets", args.targets,
           "--precisions", args.precisions, "--n-calib", str(args.n_calib), "--n-val", str(args.n_val)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
        if out.stat().st_size:
            return json.loads(out.read_text())
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])[-300:]
        reason = f"child process ended with {proc.returncode} and no result: {tail}"
    except subprocess.TimeoutExpired:
        reason = f"timed out after {args.timeout} s"
    finally:
        out.unlink(missing_ok=True)
    cells = {f"{t}/{p}": {"state": "crash", "reason": reason} for t in args.targets.split(",")
             for p in args.precisions.split(",")}
    return {"model": name, "kind": "?", "what": "", "requirement": "", "cells": cells}


def _cell_text(c: dict[str, Any], with_route: bool = False) -> str:
    s = c["state"]
    if s == "pass":
        fig = f"{c['cosine']:.4f}" if c.get("cosine") is not None else ""
        if c.get("top1") is not None:
            fig += f" / {100 * c['top1']:.0f}%"
        return f"✓ {fig}" + (f" `{c['route']}`" if with_route and c.get("route") else "")
    if s == "refused":
        return "✗ " + (f"cos {c['cosine']:.3f}" if c.get("cosine") is not None else "refused")
    return {"spec": "spec", "error": "E", "n/a": "–", "n/r": "n/r", "crash": "CRASH"}.get(s, s)


def summarize(rows: list[dict[str, Any]], precisions: list[str]) -> dict[str, Any]:
    """Counts per precision: the acceptance figures of issue 11."""
    out: dict[str, Any] = {}
    for p in precisions:
        cells = [c for r in rows for k, c in r["cells"].items() if k.endswith("/" + p)]
        reachable = [c for c in cells if c["state"] not in ("n/a", "n/r", "spec")]
        passed = sum(c["state"] == "pass" for c in reachable)
        honest = sum(c["state"] == "refused" for c in reachable)
        out[p] = {"reachable": len(reachable), "pass": passed, "refused": honest,
                  "error": sum(c["state"] == "error" for c in reachable),
                  "crash": sum(c["state"] == "crash" for c in cells),
                  "spec_only": sum(c["state"] == "spec" for c in cells),
                  "unrepresentable": sum(c["state"] == "n/r" for c in cells),
                  "pass_rate": passed / len(reachable) if reachable else None,
                  "pass_or_refused_rate": (passed + honest) / len(reachable) if reachable else None}
    return out


def print_matrix(rows: list[dict[str, Any]], targets: list[str], precisions: list[str], markdown: bool) -> None:
    keys = [f"{t}/{p}" for t in targets for p in precisions]
    head = ["model", "kind", *keys, "s"]
    lines = [[r["model"], r["kind"], *[_cell_text(r["cells"].get(k, {"state": "n/a"}), markdown) for k in keys],
              str(r.get("seconds", ""))] for r in rows]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for ln in lines:
            print("  ".join(x.ljust(w) for x, w in zip(ln, widths, strict=True)))
    print()
    print("routes, times and reasons:")
    for r in rows:
        for k in keys:
            c = r["cells"].get(k)
            if c and c["state"] in ("pass", "spec") and c.get("route"):
                extra = f" after {len(c['attempts'])} other(s)" if c.get("attempts") else ""
                secs = f", {c['seconds']:.0f} s" if c.get("seconds") else ""
                print(f"  {r['model']} {k}: {c['state']} via {c['route']}{extra}{secs}")
            elif c and c["state"] in ("refused", "error", "crash", "n/r"):
                print(f"  {r['model']} {k}: {c['state']}: {c['reason'][:400]}")
    print()
    for p, s in summarize(rows, precisions).items():
        rate = f"{100 * s['pass_rate']:.1f}%" if s["pass_rate"] is not None else "-"
        honest = f"{100 * s['pass_or_refused_rate']:.1f}%" if s["pass_or_refused_rate"] is not None else "-"
        print(f"{p}: {s['pass']}/{s['reachable']} cells pass ({rate}); pass or honest refusal {honest}; "
              f"errors {s['error']}; crashes {s['crash']}; target cannot represent {s['unrepresentable']}; "
              f"Core ML spec-checked only (macOS for numbers) {s['spec_only']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated corpus names (default: all)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--n-calib", type=int, default=64, help="real calibration inputs per model")
    ap.add_argument("--n-val", type=int, default=24, help="real held-out validation inputs per model")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    ap.add_argument("--json", help="write every cell here")
    ap.add_argument("--markdown", action="store_true", help="print the matrix as a Markdown table (README)")
    ap.add_argument("--from-json", nargs="+", help="print the matrix of stored --json runs instead of converting "
                    "(a model in several files: the last one's row)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    targets, precisions = args.targets.split(","), args.precisions.split(",")
    if args.from_json:
        by_model: dict[str, dict[str, Any]] = {}
        for path in args.from_json:
            for row in json.loads(Path(path).read_text())["rows"]:
                by_model[row["model"]] = row
        rows = list(by_model.values())
        for row in rows:  # a run stored before a classification rule existed reads the same as a new one
            for cell in row["cells"].values():
                cell["state"] = _classify(cell["state"], cell.get("reason") or "")
            _same_cause_as_fp32(row)
        print_matrix(rows, targets, precisions, args.markdown)
        return 0
    if args.one:
        row = run_one(args.one, targets, precisions, args.n_calib, args.n_val)
        Path(args.result).write_text(json.dumps(row, default=str))
        return 0
    sys.path.insert(0, str(ROOT / "examples"))
    import corpus

    names = args.models.split(",") if args.models else [m.name for m in corpus.MODELS]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = _child(name, args)
        states = [c["state"] for c in row["cells"].values()]
        print(f"{name}: {', '.join(f'{s} {states.count(s)}' for s in sorted(set(states)))} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
        if args.json:  # written after every model: a long sweep that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps({"rows": rows, "summary": summarize(rows, precisions)}, indent=1,
                                                  default=str))
    print_matrix(rows, targets, precisions, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
