"""End-to-end demo: a real Fashion-MNIST CNN -> TFLite, Core ML, OpenVINO, ONNX (+ORT) in fp32 and int8,
every artifact validated against the source on held-out labelled test images; then the fleet part
(examples/fleet_demo.py): the bundle signed, a device agent with MQTT telemetry, the collector with its
dashboard, a drift alert when the camera's images turn dark, and the fleet status table.

    python examples/demo.py [--out demo_out] [--keras] [--mobilenet] [--no-fleet]

The CNN is trained once (about a minute on 2 cores) and cached under .cache/models/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import edge_sdk  # noqa: E402
from edge_sdk._quiet import quiet_third_party  # noqa: E402
from edge_sdk.errors import ValidationError  # noqa: E402

FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


def _summary(bundle: edge_sdk.Bundle) -> None:
    fp32 = {a.format: a.size_bytes for a in bundle.artifacts if a.precision == "fp32"}
    print(f"\n{bundle.manifest.name}: {bundle.root}")
    print(f"{'artifact':<16}{'size':>10}{'vs fp32':>9}{'cosine':>10}{'top-1 agr.':>12}{'accuracy':>10}  status")
    for a in bundle.artifacts:
        v = a.validation
        ratio = a.size_bytes / fp32[a.format] if a.format in fp32 else float("nan")
        status = "passed" if v.passed else ("numeric check skipped (needs macOS)" if v.passed is None else "FAILED")
        cos = f"{v.cosine:.5f}" if v.cosine is not None else "-"
        agr = f"{100 * v.top1_agreement:.1f}%" if v.top1_agreement is not None else "-"
        acc = f"{100 * v.accuracy:.2f}%" if v.accuracy is not None else "-"
        print(f"{a.key:<16}{a.size_bytes / 1024:>8.0f}KB{ratio:>9.2f}{cos:>10}{agr:>12}{acc:>10}  {status}")


def fashion(out: Path, kind: str) -> edge_sdk.Bundle:
    """Train (or load) the Fashion-MNIST CNN and convert it to every target, fp32 and int8."""
    from data import fashion_tensors
    from train import cached_model, cached_model_info

    layout = "NCHW" if kind == "torch" else "NHWC"
    model = cached_model(kind)
    info = cached_model_info(kind)
    print(f"{kind} Fashion-MNIST CNN: test accuracy {100 * info['test_accuracy']:.2f}% "
          f"(trained in {info['train_seconds']} s, cached)")
    calib, _ = fashion_tensors("train", layout, n=300)
    val_x, val_y = fashion_tensors("test", layout, n=2000)
    work = out / f"inputs_{kind}"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", calib)
    np.save(work / "val.npy", val_x)
    np.save(work / "val_labels.npy", val_y)
    if kind == "torch":
        import torch

        source: object = work / "fashion_cnn.pt"
        torch.save(model.state_dict(), source)
        extra = {"model_class": "torch_models:FashionCNN", "input_shape": [1, 1, 28, 28]}
    else:
        source = work / "fashion_cnn.keras"
        model.save(source)
        extra = {}
    try:
        return edge_sdk.convert(
            source, out=out / f"fashion_{kind}", to="tflite,coreml,openvino,onnx", precision="fp32,int8",
            calib=work / "calib.npy", val=work / "val.npy", val_labels=work / "val_labels.npy",
            labels=FASHION_LABELS, name=f"fashion-cnn-{kind}", version="1", overwrite=True, **extra)
    except ValidationError as exc:  # the bundle still holds every artifact that passed
        print(f"\n{exc}")
        return exc.bundle  # type: ignore[attr-defined]


def mobilenet(out: Path) -> edge_sdk.Bundle:
    """The real ImageNet MobileNetV2 from its state_dict, validated on 240 real photo crops."""
    from data import photo_crops
    from torch_models import mobilenet_v2_weights_path

    work = out / "inputs_mobilenet"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", photo_crops(n=200, seed=1))
    np.save(work / "val.npy", photo_crops(n=240, seed=0))
    return edge_sdk.convert(
        mobilenet_v2_weights_path(), model_class="torch_models:MobileNetV2", input_shape=[1, 3, 224, 224],
        out=out / "mobilenet_v2", to="tflite,coreml,openvino,onnx", precision="fp32,int8",
        calib=work / "calib.npy", val=work / "val.npy", preprocessing=edge_sdk.Preprocessing.imagenet(),
        name="mobilenet-v2", version="1", overwrite=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--keras", action="store_true", help="also convert the Keras CNN")
    p.add_argument("--mobilenet", action="store_true", help="also convert the real ImageNet MobileNetV2")
    p.add_argument("--clean", action="store_true", help="remove --out first")
    p.add_argument("--no-fleet", action="store_true", help="skip the telemetry / collector / drift part")
    p.add_argument("--verbose", action="store_true", help="show third-party logs and warnings (EDGE_SDK_VERBOSE=1)")
    args = p.parse_args()
    quiet_third_party(args.verbose)  # before the first TensorFlow / torch import
    if args.clean:
        shutil.rmtree(args.out, ignore_errors=True)
    bundles = [fashion(args.out, "torch")]
    if args.keras:
        bundles.append(fashion(args.out, "keras"))
    if args.mobilenet:
        bundles.append(mobilenet(args.out))
    for b in bundles:
        _summary(b)
    import serving_demo
    from data import fashion_tensors

    serving_demo.run(bundles[0].root, fashion_tensors("test", "NCHW", n=1)[0])
    if args.no_fleet:
        return 0
    import fleet_demo

    return fleet_demo.run(bundles[0].root, args.out)


if __name__ == "__main__":
    sys.exit(main())
