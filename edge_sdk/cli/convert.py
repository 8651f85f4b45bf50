"""``edge-sdk convert | build | benchmark | check``: from a source model to a validated, measured bundle.

The converters, the benchmark and the target profiles are imported inside the handlers: ``edge-sdk --help`` and
every other command load no framework.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge_sdk._deps import has_module
from edge_sdk.cli._common import (
    RegistryHelpFormatter,
    add_alias,
    floats,
    json_parent,
    log_parent,
    model_identity_parent,
    named_shape,
    named_values,
    shape_spec,
    size,
    stdout_to_stderr,
)
from edge_sdk.errors import EdgeSDKError, ValidationError

__all__ = ["register", "to_help"]

TARGET_HELP = "profile name (see `edge-sdk targets`) or a .toml file"


def to_help() -> str:
    """``--to`` help naming every format a registered converter produces (built-ins and entry-point plugins)."""
    from edge_sdk.errors import EdgeSDKError
    from edge_sdk.formats import Format

    try:
        from edge_sdk.converters import target_formats
    except EdgeSDKError as exc:  # Python 3.10 (a device): help still prints, with the reason
        return f"target formats (unavailable: {exc})"
    names = ", ".join(f.value for f in target_formats())
    ort = " (onnx also writes .ort unless --no-ort)" if Format.ORT in target_formats() else ""
    return f"target formats, comma-separated, from: {names}{ort}; default onnx"


def register(sub: Any) -> None:
    """Add ``convert``, ``build``, ``benchmark`` and ``check``."""
    json_summary, identity = json_parent("print a JSON summary on stdout, no progress"), model_identity_parent()
    c = sub.add_parser("convert", help="convert a model to validated device artifacts in one bundle",
                       parents=[json_summary, identity, log_parent()], formatter_class=RegistryHelpFormatter)
    _add_source_args(c)
    c.set_defaults(func=_cmd_convert)
    bld = sub.add_parser("build", help="build for a named device: convert, validate, check, benchmark, select",
                         parents=[json_summary, identity, log_parent()])
    bld.add_argument("--target", required=True, help=TARGET_HELP)
    bld.add_argument("--max-accuracy-drop", type=float, metavar="PP",
                     help="accuracy budget in percentage points (default: the profile's)")
    bld.add_argument("--runs", type=int, default=50, help="benchmark runs per candidate (default 50)")
    _add_source_args(bld, build=True)
    bld.set_defaults(func=_cmd_build)
    bm = sub.add_parser("benchmark", help="latency, memory, size and accuracy of every artifact of a bundle",
                        parents=[json_parent("print the report as JSON"), log_parent()])
    bm.add_argument("bundle")
    bm.add_argument("--runs", type=int, default=100)
    bm.add_argument("--warmup", type=int, default=10)
    bm.add_argument("--threads", default="1", help="thread counts to measure, e.g. 1,2")
    bm.add_argument("--plot", help="write a PNG of latency against size")
    save = bm.add_argument("--save-results", action="store_true",
                           help="write the results (with the host) into the bundle's manifest")
    add_alias(bm, save, "--store")
    bm.set_defaults(func=_cmd_benchmark)
    ck = sub.add_parser("check", help="check a bundle's artifacts against a target profile",
                        parents=[json_parent("print the reports as JSON"), log_parent()])
    ck.add_argument("bundle")
    ck.add_argument("--target", required=True, help=TARGET_HELP)
    ck.set_defaults(func=_cmd_check)


def _add_source_args(c: argparse.ArgumentParser, *, build: bool = False) -> None:
    """Arguments shared by ``convert`` and ``build``."""
    c.add_argument("source", help="model file (.pt/.pth/.pt2/TorchScript, .keras/.h5, SavedModel dir, .onnx)")
    if not build:
        c.add_argument("--to", default="onnx", metavar="FORMAT,...", help=to_help)  # computed by --help only
        c.add_argument("--precision", help="fp32,fp16,dynamic,int8,palettized (default fp32; an existing .tflite or "
                       "OpenVINO IR: its own precision)")
    c.add_argument("--calib", help="calibration data: .npy/.npz of ready tensors or an image folder")
    c.add_argument("--out", required=True, help="bundle directory to create")
    c.add_argument("--input-shape", type=named_shape, action="append", metavar="[NAME=]DIMS",
                   help="e.g. 1,3,224,224; pins dynamic axes; NAME=DIMS per input for multi-input models (repeatable)")
    c.add_argument("--input-dtype", action="append", metavar="[NAME=]DTYPE",
                   help="integer inputs, e.g. input_ids=int64 (repeatable; default float32)")
    c.add_argument("--dynamic", default="", metavar="AXES",
                   help="keep these axes dynamic in ONNX/OpenVINO artifacts of an ONNX source: batch,height,width,"
                        "sequence or indices")
    c.add_argument("--model-class", help="pkg.module:Class for state_dict sources")
    c.add_argument("--custom-objects", action="append", metavar="MODULE:NAME",
                   help="custom Keras layers/functions the model needs (repeatable)")
    c.add_argument("--route", action="append", metavar="[TARGET=]NAME",
                   help="force a conversion route, e.g. tflite=onnx2tf (default: try each route in order)")
    c.add_argument("--framework", choices=["pytorch", "keras", "onnx", "tflite", "openvino"],
                   help="override framework detection")
    c.add_argument("--val", help="held-out validation inputs (.npy/.npz or image folder)")
    c.add_argument("--val-labels", help=".npy of integer labels for --val (reports accuracy)")
    c.add_argument("--labels", help="text file with one class label per line")
    c.add_argument("--name", help="bundle name (default: source file stem)")
    version = c.add_argument("--model-version", dest="model_version", default="1", help="bundle version (default 1)")
    add_alias(c, version, "--version")  # `edge-sdk --version` is the program's version
    c.add_argument("--task", choices=["classification", "other"], help="default: detected from the output shape")
    c.add_argument("--keep-failed", action="store_true", help="keep artifacts that fail validation (passed: false)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    if not build:
        c.add_argument("--no-ort", action="store_true", help="do not write the .ort file beside the onnx target")
    g = c.add_argument_group("preprocessing (recorded in the manifest; needed for image-folder data)")
    g.add_argument("--preset", choices=["imagenet"], help="imagenet: 224 centre crop, RGB, ImageNet mean/std, NCHW")
    g.add_argument("--resize", type=size, help="HxW")
    g.add_argument("--resize-mode", choices=["stretch", "center_crop"], default="stretch")
    g.add_argument("--color", choices=["RGB", "BGR", "GRAY"], default="RGB")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="default: the source model's layout")
    g.add_argument("--scale", type=float, default=1 / 255)
    g.add_argument("--mean", type=floats, default=(0.0,))
    g.add_argument("--std", type=floats, default=(1.0,))
    o = c.add_argument_group("per-target options")
    o.add_argument("--calib-limit", type=int, default=200, help="calibration samples used (default 200)")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    o.add_argument("--onnx-activations", choices=["uint8", "int8"], default="uint8",
                   help="ONNX int8 activation type (uint8 is faster on x86 ORT)")
    o.add_argument("--ort-platform", choices=["amd64", "arm"],
                   help=".ort layout optimisation (default amd64, or the target profile's)")
    o.add_argument("--coreml-target", help="Core ML minimum deployment target (default iOS16, or the profile's)")
    o.add_argument("--palette-bits", type=int, default=6, help="Core ML palettization bits")
    o.add_argument("--float-io", action="store_true", help="TFLite int8 keeps float inputs/outputs")
    o.add_argument("--web-runtime", choices=["onnxruntime-web", "litertjs"],
                   help="browser runtime of the web target: onnxruntime-web (default; runs the ONNX model) or "
                        "litertjs (LiteRT.js; runs the .tflite, float I/O)")
    o.add_argument("--tolerance", action="append", default=[], metavar="PRECISION:KEY=VALUE",
                   help="override a validation limit, e.g. int8:min_cosine=0.9 (repeatable)")
    # -- accuracy budget with automatic fallback (issue 7) --
    ab = c.add_argument_group("accuracy budget (int8 over it falls back: calibration, layers in float, 16-bit "
                              "activations, fp16)")
    if not build:  # build has its own --max-accuracy-drop (also used to select the variant)
        ab.add_argument("--max-accuracy-drop", type=float, metavar="PP",
                        help="max accuracy drop in percentage points (top-1 disagreement without --val-labels)")
    ab.add_argument("--min-agreement", type=float, metavar="FRAC", help="label-free: min top-1 agreement, e.g. 0.95")
    ab.add_argument("--min-cosine", type=float, metavar="X", help="min cosine similarity of the outputs")
    ab.add_argument("--qat-epochs", type=int, default=None, metavar="N",
                    help="epochs of quantization-aware fine-tuning, the last int8 step for PyTorch sources "
                         "(default 2; 0 = none)")
    # -- end accuracy budget --




def _tolerances(items: list[str]) -> dict:
    from dataclasses import replace

    from edge_sdk.converters.validate import DEFAULT_TOLERANCES
    from edge_sdk.formats import Precision

    out = dict(DEFAULT_TOLERANCES)
    for item in items:
        try:
            prec, _, kv = item.partition(":")
            key, _, value = kv.partition("=")
            p = Precision.parse(prec)
            out[p] = replace(out[p], **{key: None if value.lower() == "none" else float(value)})
        except (ValueError, TypeError):
            raise EdgeSDKError(f"--tolerance {item!r} must look like int8:min_cosine=0.9 (keys: min_cosine, "
                               "max_rel_error, min_top1_agreement, min_top1_agreement_confident, "
                               "min_top5_containment)") from None
    return out


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from edge_sdk.preprocessing import Preprocessing

    pre = None
    if args.preset == "imagenet":
        pre = Preprocessing.imagenet()
    elif args.resize or args.layout:
        pre = Preprocessing(size=args.resize, color=args.color, layout=args.layout or "NCHW", scale=args.scale,
                            mean=args.mean, std=args.std, resize_mode=args.resize_mode)
    return dict(val=args.val, val_labels=args.val_labels, labels=args.labels,
                input_shape=shape_spec(args.input_shape),
                input_dtypes=named_values(args.input_dtype, "--input-dtype"),
                dynamic=args.dynamic, custom_objects=args.custom_objects, route=args.route,
                model_class=args.model_class, framework=args.framework, name=args.name, version=args.model_version,
                task=args.task, preprocessing=pre, tolerances=_tolerances(args.tolerance),
                version_code=args.version_code, fleets=args.fleets,
                keep_failed=args.keep_failed, overwrite=args.overwrite, quiet=args.json)


def _explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """Per-target options the user gave on the command line (those override a target profile)."""
    pairs = (("ort_target_platform", args.ort_platform), ("coreml_minimum_deployment_target", args.coreml_target))
    return {k: v for k, v in pairs if v is not None}


def _options(args: argparse.Namespace) -> Any:
    from edge_sdk.converters.base import ConvertOptions

    return ConvertOptions(calib_limit=args.calib_limit, onnx_opset=args.opset,
                          onnx_activation_type=args.onnx_activations, coreml_palette_bits=args.palette_bits,
                          tflite_int8_io=not args.float_io, **_explicit_options(args),
                          extra={"web_runtime": args.web_runtime} if args.web_runtime else {})


def _budget(args: argparse.Namespace) -> Any:
    """The accuracy budget given on the command line, or None (no fallback ladder)."""
    if args.max_accuracy_drop is None and args.min_agreement is None and args.min_cosine is None:
        return None
    from edge_sdk.converters.accuracy_budget import AccuracyBudget

    return AccuracyBudget(args.max_accuracy_drop, args.min_agreement, args.min_cosine, **_qat(args))


def _qat(args: argparse.Namespace) -> dict[str, int]:
    return {} if args.qat_epochs is None else {"qat_epochs": args.qat_epochs}


def _print_json(bundle: Any, results: list, error: str | None) -> None:
    from dataclasses import asdict

    out = {"bundle": str(bundle.root) if bundle else None, "error": error,
           "results": [{**{k: v for k, v in asdict(r).items() if k != "validation"},
                        "validation": asdict(r.validation)} for r in results]}
    if bundle:
        out.update(name=bundle.manifest.name, version=bundle.manifest.version)
    print(json.dumps(out, indent=2))



def _cmd_convert(args: argparse.Namespace) -> int:
    from edge_sdk.converters.pipeline import convert

    try:
        with stdout_to_stderr(args.json):
            bundle = convert(args.source, out=args.out, to=args.to, precision=args.precision, calib=args.calib,
                             options=_options(args), ort=not args.no_ort, budget=_budget(args),
                             **_common_kwargs(args))
    except ValidationError as exc:
        bundle = getattr(exc, "bundle", None)
        if args.json:
            _print_json(bundle, getattr(exc, "results", []), str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(bundle, getattr(bundle, "results", []), None)
    else:
        print(f"bundle written: {bundle.root} ({len(bundle.artifacts)} artifacts)", file=sys.stderr)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edge_sdk.converters.build import build
    from edge_sdk.targets.profiles import load_profile

    options = replace(_options(args), **{**load_profile(args.target).convert_options(), **_explicit_options(args)})
    with stdout_to_stderr(args.json):
        bundle = build(args.source, target=args.target, out=args.out, calib=args.calib, options=options,
                       max_accuracy_drop=args.max_accuracy_drop, runs=args.runs, min_agreement=args.min_agreement,
                       min_cosine=args.min_cosine, **_qat(args), **_common_kwargs(args))
    info = bundle.manifest.extra["build"]
    if args.json:
        print(json.dumps({"bundle": str(bundle.root), **info}, indent=2))
    else:
        print(f"bundle written: {bundle.root}; selected {info['selected']} for {info['target']}", file=sys.stderr)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from edge_sdk.benchmark import benchmark_bundle, store_in_manifest
    from edge_sdk.bundle import Bundle

    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        raise EdgeSDKError(f"--threads {args.threads!r} must be integers like 1,2") from None
    bundle = Bundle.load(args.bundle)
    with stdout_to_stderr(args.json):
        report = benchmark_bundle(bundle, runs=args.runs, warmup=args.warmup, threads=threads)
    if args.plot:
        report.plot(args.plot)
    if args.save_results:
        store_in_manifest(bundle, report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif has_module("rich"):
        from rich.console import Console

        Console().print(report.table())
    else:  # a device install without the host extras: plain text
        print(report.markdown())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle
    from edge_sdk.targets import check_bundle, load_profile

    reports = check_bundle(load_profile(args.target), Bundle.load(args.bundle))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            print(r.summary())
            for issue in r.warnings:
                print(f"  note ({issue.check}): {issue.message}")
    return 0 if any(r.ok for r in reports) else 1
