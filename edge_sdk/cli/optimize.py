"""``edge-sdk distill`` and ``edge-sdk prune``: make a PyTorch model smaller before converting it. torch and the
training code are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_sdk.cli._common import json_parent, log_parent, shape, size

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``distill`` and ``prune``."""
    report = json_parent("print the report as JSON")
    d = sub.add_parser("distill", help="train a small student on a teacher's softened outputs plus the labels",
                       parents=[report, log_parent()])
    d.add_argument("--teacher", required=True, help="teacher state_dict (.pt/.pth)")
    d.add_argument("--teacher-class", required=True, help="pkg.module:Class of the teacher")
    d.add_argument("--student-class", required=True, help="pkg.module:Class of the student (built with no arguments)")
    tr = d.add_mutually_exclusive_group(required=True)
    tr.add_argument("--train", nargs=2, metavar=("X.npy", "Y.npy"), help="training inputs and integer labels")
    tr.add_argument("--train-dir", metavar="DIR", help="training images in one subfolder per class")
    va = d.add_mutually_exclusive_group()
    va.add_argument("--val", nargs=2, metavar=("X.npy", "Y.npy"), help="validation inputs and labels (accuracy)")
    va.add_argument("--val-dir", metavar="DIR", help="validation images in one subfolder per class")
    d.add_argument("--temperature", type=float, default=4.0, help="softening temperature T (default 4)")
    d.add_argument("--alpha", type=float, default=0.7, help="weight of the soft targets, 0..1 (default 0.7)")
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--baseline", action="store_true", help="also train the student on labels alone and compare")
    d.add_argument("--resize", type=size, help="HxW for image folders (default: keep the images' size)")
    d.add_argument("--threads", type=int, help="torch intra-op threads (1 is fastest on a busy small machine)")
    d.add_argument("--out", required=True, help="where to write the student's state_dict (.pt)")
    d.set_defaults(func=_cmd_distill)
    pr = sub.add_parser("prune", help="prune a PyTorch model (structured channels or magnitude), fine-tune, report",
                        parents=[report, log_parent()])
    pr.add_argument("model", help="state_dict (.pt/.pth, with --model-class), or a .pt2 torch.export program")
    pr.add_argument("--model-class", help="pkg.module:Class for a state_dict")
    pr.add_argument("--input-shape", type=shape, required=True, help="e.g. 1,1,28,28")
    pr.add_argument("--method", choices=("structured", "magnitude"), default="structured",
                    help="structured: remove conv channels (faster on every runtime); magnitude: zero weights")
    pr.add_argument("--amount", type=float, default=0.5, help="fraction of channels / weights to remove (0.5)")
    pr.add_argument("--train", nargs=2, metavar=("X.npy", "Y.npy"), help="fine-tune inputs and integer labels")
    pr.add_argument("--val", nargs=2, metavar=("X.npy", "Y.npy"), help="validation inputs and labels (accuracy)")
    pr.add_argument("--epochs", type=int, default=2, help="fine-tune epochs (default 2)")
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--max-train-samples", type=int, help="fine-tune on at most this many samples per epoch")
    pr.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    pr.add_argument("--out", required=True, help="pruned model: .pt2 (torch.export, recommended) or TorchScript")
    pr.set_defaults(func=_cmd_prune)


def _cmd_distill(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_sdk._deps import require
    from edge_sdk.errors import CalibrationError, SourceModelError
    from edge_sdk.optimize.distill import distill, import_class

    torch = require("torch", "torch", "knowledge distillation")
    teacher = import_class(args.teacher_class)()
    try:
        teacher.load_state_dict(torch.load(args.teacher, map_location="cpu", weights_only=True), strict=True)
    except (OSError, RuntimeError, TypeError, AttributeError) as exc:
        raise SourceModelError(f"cannot load {args.teacher} into {args.teacher_class} "
                               f"({str(exc).splitlines()[0][:160]}): give its state_dict and class") from None
    torch.manual_seed(args.seed)  # the student's initial weights depend on the seed too
    student = import_class(args.student_class)()

    def arrays(paths: list[str]) -> tuple[Any, Any]:
        try:
            return np.load(paths[0]), np.load(paths[1])
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read {paths[0]} / {paths[1]} ({exc}): give two .npy files") from None

    train = arrays(args.train) if args.train else args.train_dir
    val = arrays(args.val) if args.val else args.val_dir
    result = distill(teacher, student, train, val_data=val, temperature=args.temperature, alpha=args.alpha,
                     epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     baseline=args.baseline, image_size=args.resize, threads=args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.student.state_dict(), out)
    if args.json:
        print(json.dumps({**result.to_dict(), "out": str(out)}, indent=2))
    else:
        print(result.report())
        print(f"student state_dict written to {out}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_sdk.converters.sources import load_source
    from edge_sdk.errors import CalibrationError
    from edge_sdk.optimize.prune import prune

    def arrays(paths: list[str] | None) -> tuple[Any, Any] | None:
        try:
            return (np.load(paths[0]), np.load(paths[1])) if paths else None
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read {paths[0]} / {paths[1]} ({exc}): give two .npy files") from None

    src = load_source(args.model, input_shape=args.input_shape, model_class=args.model_class)
    result = prune(src.model, method=args.method, amount=args.amount, example_input=np.zeros(args.input_shape,
                   np.float32), train_data=arrays(args.train), val_data=arrays(args.val), finetune_epochs=args.epochs,
                   lr=args.lr, max_train_samples=args.max_train_samples, threads=args.threads)
    out = result.save(args.out)
    if args.json:
        print(json.dumps({**result.report.to_dict(), "out": str(out)}, indent=2))
    else:
        print(result.report.format())
        print(f"pruned model written to {out} (edge-sdk convert {out} --input-shape "
              f"{','.join(map(str, args.input_shape))} ...)")
    return 0
