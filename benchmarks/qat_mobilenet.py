"""Does quantization-aware fine-tuning (converters/qat.py) lift MobileNetV2's int8 agreement with fp32?

    python benchmarks/qat_mobilenet.py [--epochs 0,1,2,3] [--to onnx,openvino,tflite] [--onnx-quantizers nncf,ort]
                                       [--lr 1e-5] [--out /tmp/qat_bench] [--json FILE]

The real ImageNet MobileNetV2 (``examples/torch_models.load_mobilenet_v2``), 200 calibration (seed 1) and 240
held-out (seed 0) photo crops (``examples/data.photo_crops``: the SDK's protocol). Epochs 0 is plain int8; every
other count fine-tunes the original model with :func:`~edge_sdk.converters.qat.qat_finetune` on the calibration
crops (1 thread), then quantizes the result with the SDK's own path (``convert(..., precision="fp32,int8")``:
NNCF for ONNX and OpenVINO, the AI Edge Quantizer for TFLite). Each int8 artifact runs on the val crops in the
SDK's runtime for its format (1 thread); the table gives its top-1 agreement with the ORIGINAL fp32 model, the
fine-tuned fp32 model's own agreement with the original, and the fine-tune's seconds.

Measured (2 shared cores, loaded), ``--epochs 0,2 --onnx-quantizers nncf,ort`` and ``--to tflite,openvino``:
plain int8 91.25% (ONNX, NNCF) / 87.1% (ONNX, ORT quantizer) / 85.4% (TFLite) / 93.75% (OpenVINO); after 2 QAT
epochs (weights returned on their int8 grid) 91.7% / 91.7% / 89.2% / 92.5%, the fine-tuned float model 89.6%.
The full table, with the variants tried and dropped, is in the module docstring of converters/qat.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def _argmax_torch(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + 16])).argmax(1).numpy() for i in range(0, len(x), 16)])


def _int8_argmax(bundle_dir: Path, fmt: str, val: np.ndarray) -> tuple[np.ndarray, float | None]:
    """argmax of the bundle's int8 artifact of ``fmt`` on ``val`` (the SDK's runtime, 1 thread), and the
    agreement the pipeline recorded for it."""
    from edge_sdk.bundle import Bundle
    from edge_sdk.runtimes import runtime_for

    bundle = Bundle.load(bundle_dir)
    art = next(a for a in bundle.artifacts if a.format == fmt and a.precision == "int8")
    session = runtime_for(fmt).load(bundle_dir / art.path, threads=1)
    try:
        out = np.concatenate([session.run([val[i:i + 1]])[0] for i in range(len(val))])
    finally:
        session.close()
    recorded = getattr(art.validation, "top1_agreement", None)
    return out.argmax(1), recorded


def _convert(model: Any, out: Path, fmt: str, calib: np.ndarray, val: np.ndarray, quantizer: str) -> Path:
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.pipeline import convert
    from edge_sdk.errors import ValidationError

    options = ConvertOptions(extra={"onnx_quantizer": quantizer}) if fmt == "onnx" else None
    try:
        convert(model, out=out, to=fmt, precision="fp32,int8", ort=False, calib=calib, val=val,
                input_shape=(1, 3, 224, 224), keep_failed=True, overwrite=True, quiet=True, options=options)
    except ValidationError:  # int8 below the default tolerance is kept, marked failed
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", default="0,1,2,3", help="QAT epoch counts to compare; 0 = plain int8")
    p.add_argument("--to", default="onnx", help="targets: onnx,openvino,tflite")
    p.add_argument("--onnx-quantizers", default="nncf", help="onnx int8 tools: nncf (the default), ort")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: qat_finetune's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/qat_bench"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import torch
    from data import photo_crops
    from torch_models import load_mobilenet_v2

    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.qat import qat_finetune

    torch.set_num_threads(1)
    model = load_mobilenet_v2()
    calib, val = photo_crops(n=200, seed=1), photo_crops(n=240, seed=0)
    ref = _argmax_torch(model, val)
    rows: list[dict[str, Any]] = []
    columns = [f"onnx/{q}" for q in args.onnx_quantizers.split(",")] if "onnx" in args.to.split(",") else []
    columns += [f for f in args.to.split(",") if f != "onnx"]
    for epochs in [int(e) for e in args.epochs.split(",")]:
        row: dict[str, Any] = {"epochs": epochs}
        if epochs == 0:
            tuned, row["seconds"], row["fp32_agreement"] = model, 0.0, 1.0
        else:
            t0 = time.perf_counter()
            tuned, record = qat_finetune(model, SampleSet([calib]), epochs=epochs, seed=args.seed, lr=args.lr,
                                         batch_size=args.batch_size,
                                         progress=lambda d, t: print(f"\r  qat step {d}/{t}", end="", flush=True))
            print()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["record"] = record
            row["fp32_agreement"] = float((_argmax_torch(tuned, val) == ref).mean())
        for col in columns:
            fmt, _, quantizer = col.partition("/")
            bundle_dir = _convert(tuned, args.out / f"e{epochs}-{fmt}-{quantizer}", fmt, calib, val, quantizer)
            pred, recorded = _int8_argmax(bundle_dir, fmt, val)
            row[col] = float((pred == ref).mean())
            row[f"{col} recorded"] = recorded
        print(json.dumps(row), flush=True)
        rows.append(row)
    fmts = columns
    heads = " | ".join(f"{f} int8 vs fp32" for f in fmts)
    print(f"\n| QAT epochs | fine-tune s | fp32 (tuned) vs fp32 | {heads} |")
    print("|---|---|---|" + "---|" * len(fmts))
    for r in rows:
        label = "plain int8" if r["epochs"] == 0 else str(r["epochs"])
        cells = " | ".join(f"{100 * r[f]:.1f}%" for f in fmts)
        print(f"| {label} | {r['seconds']} | {100 * r['fp32_agreement']:.1f}% | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
