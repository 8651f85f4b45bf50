"""One artifact of a conversion: try its routes, judge each draft on the validation inputs, place it in the bundle.

``convert`` (converters/pipeline.py) plans the (format, precision) pairs; for each it calls
:func:`produce_artifact`, which tries the routes in order until one gives drafts that pass validation
(:class:`Judge`), running the accuracy-budget ladder on int8 drafts when a budget is set; :func:`place` copies a
judged draft into the bundle directory and describes it for the manifest.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.bundle import Artifact, TensorSpec, Validation, sha256_path, size_of
from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, produce
from edge_sdk.converters.routes import Route, failure_reason, route_context
from edge_sdk.converters.validate import validate_artifact
from edge_sdk.errors import EdgeSDKError
from edge_sdk.formats import Format, Precision
from edge_sdk.progress import Reporter

__all__ = ["ArtifactResult", "Judge", "place", "produce_artifact"]

_QUANTIZED = (Precision.INT8, Precision.DYNAMIC, Precision.PALETTIZED)
_TRANSPOSE = {("NCHW", "NHWC"): (0, 2, 3, 1), ("NHWC", "NCHW"): (0, 3, 1, 2)}


@dataclass
class ArtifactResult:
    """The outcome for one requested format/precision (for tables and JSON)."""

    format: str
    precision: str
    status: str  # passed | failed | skipped-validation | error | unsupported
    validation: Validation = field(default_factory=Validation)
    size_bytes: int | None = None
    shipped: bool = False
    reason: str = ""
    route: str = ""  # the route that produced the artifact (converters/routes.py)
    attempts: list[str] = field(default_factory=list)  # routes tried before it, each "name: one-line reason"
    seconds: float | None = None  # conversion + validation time over every route tried

    @property
    def key(self) -> str:
        return f"{self.format}/{self.precision}"




def _copy_draft(draft: ArtifactDraft, bundle_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    fdir = bundle_dir / draft.format.value
    fdir.mkdir(parents=True, exist_ok=True)
    dest = fdir / draft.path.name
    if draft.path.is_dir():
        shutil.copytree(draft.path, dest)
    else:
        shutil.copy2(draft.path, dest)
    sides = []
    for side in draft.files:
        target = fdir / side.name
        if target.exists():
            target = fdir / f"{draft.precision.value}.{side.name}"
        shutil.copy2(side, target)
        rel = target.relative_to(bundle_dir).as_posix()
        sides.append({"path": rel, "sha256": sha256_path(target), "size_bytes": target.stat().st_size})
    return dest.relative_to(bundle_dir).as_posix(), sides




class Judge:
    """Runs a draft in its runtime on the validation inputs and compares it with the source's outputs."""

    def __init__(self, src, val_set: SampleSet, ref, val_y, classifier: bool, tols, report: Reporter) -> None:
        self.src, self.val_set, self.ref, self.val_y = src, val_set, ref, val_y
        self.classifier, self.tols, self.report = classifier, tols, report

    def transpose(self, d: ArtifactDraft) -> tuple[int, ...] | None:
        return _TRANSPOSE.get((self.src.layout, d.input_layout)) if d.input_layout else None

    def validate(self, d: ArtifactDraft) -> Validation:
        """Run and judge one draft (also used by the accuracy-budget ladder for every step it tries)."""
        with self.report.step(f"validating {d.format.value}/{d.precision.value} on {len(self.val_set)} inputs"):
            v, _, _ = validate_artifact(d.path, d.format, d.precision, self.val_set, self.ref,
                                        classifier=self.classifier, tolerance=self.tols[d.precision],
                                        labels=self.val_y, transpose=self.transpose(d))
        return v

    def judge(self, d: ArtifactDraft, judged: Validation | None = None) -> ArtifactResult:
        """The result for one draft (validation, specs, size); ``judged`` when the budget ladder already ran it."""
        if d.validation_skipped:
            v = Validation(passed=None, samples=0, skipped_reason=d.validation_skipped, checks=dict(d.spec_checks))
            ins, outs = ([TensorSpec(t["name"], list(t["shape"]), t["dtype"]) for t in d.spec_checks.get(k, [])]
                         for k in ("inputs", "outputs"))
            status = "skipped-validation"
        else:
            if judged is not None:  # already run by the accuracy-budget ladder; the specs come from one more load
                v = judged
                ins, outs = _io_specs(d, self.val_set, self.transpose(d))
            else:
                with self.report.step(f"validating {d.format.value}/{d.precision.value} on {len(self.val_set)} "
                                      "inputs"):
                    v, ins, outs = validate_artifact(d.path, d.format, d.precision, self.val_set, self.ref,
                                                     classifier=self.classifier, tolerance=self.tols[d.precision],
                                                     labels=self.val_y, transpose=self.transpose(d))
            if d.spec_checks:
                v.checks["spec"] = d.spec_checks
            status = "passed" if v.passed else "failed"
        size = size_of(d.path) + sum(size_of(f) for f in d.files)
        reason = "; ".join(v.failures) if v.failures else (v.skipped_reason or "")
        if status == "failed" and d.precision in _QUANTIZED and v.cosine is not None:
            reason = (f"plain {d.precision.value} loses too much on this model: {reason} — pass --min-cosine / "
                      "--min-agreement for the fallback ladder (layers in float, 16-bit activations, fp16)")
        res = ArtifactResult(d.format.value, d.precision.value, status, v, size, reason=reason, route=d.route)
        res._specs = (ins, outs)  # type: ignore[attr-defined]
        return res


def produce_artifact(ctx: ConversionContext, fmt: Format, p: Precision, routes: list[Route], skipped: list[str],
             judge: Judge, ladder_for, report: Reporter) -> list[tuple[ArtifactResult, ArtifactDraft | None]]:
    """Try the routes of one (format, precision) in order until one gives artifacts that pass validation.

    Whatever a tool raises in a route (any exception type) becomes that attempt's one-line reason and the next
    route is tried; a route whose artifact converts but fails validation is kept as the answer unless a later
    route passes. Returns (result, draft) pairs — draft None when nothing could be produced.
    """
    key = f"{fmt.value}/{p.value}"
    attempts = list(skipped)
    failed: list[tuple[ArtifactResult, ArtifactDraft | None]] | None = None
    t0 = time.perf_counter()

    def timed(out: list[tuple[ArtifactResult, ArtifactDraft | None]]) -> list[tuple[ArtifactResult,
                                                                                 ArtifactDraft | None]]:
        for r, _ in out:
            r.seconds = round(time.perf_counter() - t0, 2)
        return out

    for route in routes:
        label = f"converting {key}" + (f" via {route.name}" if len(routes) > 1 else "")
        try:
            with report.step(label):
                rctx, conv = route_context(ctx, route, fmt, p)
                drafts = produce(rctx, conv, p)
        except (Exception, SystemExit) as exc:  # any vendor failure is this attempt's reason, never the run's end
            attempts.append(f"{route.name}: {failure_reason(exc, route, 'converting')}")
            continue
        outcome: list[tuple[ArtifactResult, ArtifactDraft | None]] = []
        try:
            for d in drafts:
                d.route = route.name
                judged = None
                ladder = ladder_for(rctx)
                if ladder is not None and d.precision is Precision.INT8 and not d.validation_skipped:
                    d, judged = ladder.run(fmt, conv, d, judge.validate)
                    d.route = route.name
                    if judged.passed and d.precision is Precision.INT8:
                        rctx.adopt(d)  # an ONNX model the ladder kept: the .ort file is made from it
                outcome.append((judge.judge(d, judged), d))
        except (Exception, SystemExit) as exc:
            attempts.append(f"{route.name}: {failure_reason(exc, route, 'validating')}")
            continue
        if all(r.status != "failed" for r, _ in outcome):
            for r, d in outcome:
                r.attempts = list(attempts)
                if d is not None and attempts:
                    d.notes.append("route " + route.name + " used after: " + "; ".join(attempts))
            return timed(outcome)
        attempts.append(f"{route.name}: converted but failed validation ("
                        + "; ".join(r.reason for r, _ in outcome if r.status == "failed") + ")")
        failed = failed or outcome
    if failed is not None:
        for r, _ in failed:
            r.attempts = list(attempts)
            others = [a for a in attempts if not a.startswith(f"{r.route}: converted but failed")]
            if others:
                r.reason += " [other routes: " + "; ".join(others) + "]"
        return timed(failed)
    reason = ("every route failed: " if len(attempts) > 1 else "") + "; ".join(attempts)
    return timed([(ArtifactResult(fmt.value, p.value, "error", reason=reason, attempts=attempts), None)])


def place(d: ArtifactDraft, res: ArtifactResult, bdir: Path) -> Artifact:
    """Copy a judged draft into the bundle and describe it for the manifest."""
    rel, sides = _copy_draft(d, bdir)
    runtime = dict(d.runtime)
    if d.input_layout:
        runtime.setdefault("input_layout", d.input_layout)
    res.shipped = True
    ins, outs = getattr(res, "_specs", ([], []))
    return Artifact(format=d.format.value, precision=d.precision.value, path=rel, sha256=sha256_path(bdir / rel),
                    size_bytes=res.size_bytes or 0, inputs=ins, outputs=outs, runtime=runtime,
                    tool_versions=dict(d.tool_versions), validation=res.validation, files=sides,
                    notes=list(d.notes), route=d.route)


def _io_specs(d: ArtifactDraft, val_set: SampleSet, transpose) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from edge_sdk.converters.validate import run_artifact

    try:
        _, ins, outs = run_artifact(d.path, d.format, val_set.take(1), transpose=transpose)
    except EdgeSDKError:
        return [], []
    return ins, outs
