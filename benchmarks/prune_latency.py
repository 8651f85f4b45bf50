"""What pruning buys on a dense runtime: the Fashion-MNIST FashionCNN, original vs structured vs magnitude pruning.

Each model is pruned with ``edge_sdk.optimize.prune`` (fine-tuned on a training subset), saved as a ``.pt2``
program, converted to ONNX fp32 with ``edge_sdk.convert`` and timed with ONNX Runtime (1 thread, batch 1), the
variants' runs interleaved round by round in a rotating order, medians reported. Structured pruning shrinks the
layers, so it is faster; magnitude pruning only zeroes weights, so it is not (its ONNX file is as large; only gzip
shrinks).

    python benchmarks/prune_latency.py [--amount 0.5] [--epochs 2] [--train-samples 20000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    """Prune, convert, time and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--amount", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()

    import torch
    from data import fashion_tensors
    from train import cached_model

    import edge_sdk
    from edge_sdk.optimize.prune import prune

    torch.set_num_threads(1)
    model = cached_model("torch")
    x_train, y_train = fashion_tensors("train", "NCHW")
    x_val, y_val = fashion_tensors("test", "NCHW")
    rows: dict[str, dict[str, Any]] = {"original": {"source": model, "acc": None, "params": None}}
    for method in ("structured", "magnitude"):
        res = prune(model, method=method, amount=args.amount, example_input=x_val[:1], train_data=(x_train, y_train),
                    val_data=(x_val, y_val), finetune_epochs=args.epochs, max_train_samples=args.train_samples)
        rep = res.report
        rows["original"].update(acc=rep.accuracy_before, params=rep.params_before)
        rows[method] = {"result": res, "acc": rep.accuracy_after, "params": rep.nonzero_params_after,
                        "sparsity": rep.sparsity}
        print(f"--- {method}\n{rep.format()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="prune_bench_") as tmp:
        for name, row in rows.items():
            source = row["result"].save(Path(tmp) / f"{name}.pt2") if "result" in row else row["source"]
            bundle = edge_sdk.convert(source, input_shape=[1, 1, 28, 28], out=Path(tmp) / f"b_{name}", to="onnx",
                                      ort=False, quiet=True)
            path = bundle.path_of(bundle.artifact("onnx", "fp32"))
            row.update(session=_session(path), size=path.stat().st_size,
                       gzip=len(gzip.compress(path.read_bytes(), mtime=0)))
        x = np.ascontiguousarray(x_val[:1])
        times: dict[str, list[float]] = {k: [] for k in rows}
        for row in rows.values():
            row["session"].run(None, {"input": x})
        names = list(rows)
        for r in range(args.rounds):  # rotate the order: the first variant of a round measured ~20% slower here
            for name in names[r % len(names):] + names[:r % len(names)]:
                row = rows[name]
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    row["session"].run(None, {"input": x})
                times[name].append((time.perf_counter() - t0) * 1000 / args.calls)
    base = statistics.median(times["original"])
    print(f"\nFashionCNN, amount {args.amount}, ONNX Runtime 1 thread, batch 1, median of {args.rounds} interleaved "
          f"rounds x {args.calls} calls")
    print(f"{'variant':<11} {'top-1':>7} {'params':>9} {'onnx B':>10} {'gzip B':>10} {'p50 ms':>8} {'x orig':>7}")
    for name, row in rows.items():
        p50 = statistics.median(times[name])
        print(f"{name:<11} {100 * row['acc']:>6.2f}% {row['params']:>9,} {row['size']:>10,} {row['gzip']:>10,} "
              f"{p50:>8.3f} {p50 / base:>7.2f}")


if __name__ == "__main__":
    main()
