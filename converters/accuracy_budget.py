"""Accuracy budget with automatic fallback for int8 artifacts.

When a budget is given and a plain int8 artifact is over it, the fallback ladder tries, in order, the rungs its
converter offers (``budget_ladder``, a tuple of :class:`~edge_sdk.converters.base.LadderStep`; a converter with
none is judged without fallback) and reports each step (name, metric, size, pass/fail). The built-in rungs:

1. ``calibration:*`` — another quantizer / activation-range calibration (ORT mean min/max and percentile ranges;
   NNCF mean-quantile ranges for OpenVINO; for TFLite NNCF-like mean-of-sample min/max ranges with fast bias
   correction of the int8 weights).
2. ``mixed:stem`` — the network's stem (the layers from the input up to the first branch, at most a quarter of
   them: onnx_quantize.stem_layers) kept in float, so the input is never rounded to 8 bits, with GPTQ-rounded
   int8 weights everywhere else and int8 biases corrected on the int8 model (kept only where the outputs get
   closer to fp32). ONNX Runtime: its own quantizer (a faster graph than NNCF's: MobileNetV2 0.42x vs 0.50x
   fp32 latency) with converters/onnx_bias_correction.py. TFLite: the head (the layer writing the outputs) also
   computes in float from int8 weights, inputs and outputs are float, the GPTQ integers come from the ONNX
   twin (converters/tflite_weight_rounding.py), the biases are corrected by converters/tflite_bias_correction.py,
   and the ``mixed:kN`` rungs below build on it (their layers take int8 weights, dequantized, where nearest
   rounding changes the layer's output by at most 0.1% on the calibration data; fp32 otherwise).
3. ``mixed:kN`` — mixed precision: the N (1, 2, 4, 8) most sensitive layers kept in float (ORT
   ``nodes_to_exclude``; NNCF ``IgnoredScope``; AI Edge Quantizer ``no_quantize`` scopes, the layers found in the
   .tflite by graph position). Layers are ranked by what int8 on that layer alone does to the model's outputs,
   measured on the calibration data (converters/sensitivity.py).
4. ``int16-activations`` — 16-bit activations with 8-bit weights; on ONNX Runtime the weights are rounded by GPTQ
   (converters/weight_rounding.py), since with 16-bit activations the weights' rounding is what is left.
5. ``qat`` — PyTorch sources only: a quantization-aware fine-tuned copy of the model (converters/qat.py;
   ``AccuracyBudget.qat_epochs``, ``--qat-epochs``, 0 = off), distilled from fp32 on the calibration data, made
   once per conversion and quantized by each format's own int8 path; the same held-out validation judges it
   against the original model.
6. ``fp16`` — the float16 artifact of the same format (its own ``format/fp16`` key).

The first step within budget (and within the validation tolerance) that also runs faster than fp32 of its
format on this host is kept (speed-aware ladder, issue 14: each passing step is timed against fp32 with 1 thread
in interleaved rounds, :func:`latency_p50`); when only slower steps fit, the fastest of them is kept and
``validation.checks["slower_than_fp32"]`` is True (``checks["latency_vs_fp32"]`` gives the ratio and how it was
measured; ``checks["accuracy_budget"]["method"]`` says which method made the artifact). The chain is recorded in
the artifact's ``validation.checks["accuracy_budget"]`` and notes. When no step fits, the plain int8 artifact
is reported as failed with its figures: an over-budget artifact is never written as if it were fine.

Measured (tests/test_accuracy_budget.py, 1 thread). Fashion-MNIST CNN with 4 outlier channels (x1000), 0.5 pp
budget: plain int8 drops 76 pp on ORT and OpenVINO, 80 pp on TFLite; ``mixed:k1`` (the first Gemm and the ops in
front of it in float) brings all three back to 0.0 pp (TFLite 0.2 pp: ``mixed:stem`` alone does not, 69 pp).
ImageNet MobileNetV2, 240 photo crops, top-1 agreement >= 95% (AVX-512 VNNI CPU; ``benchmarks/compare_variants.py
--mobilenet``): OpenVINO plain int8 93.8% -> ``mixed:k4`` 95.0% at 0.31x fp32 size (float weights fp16) and 0.49x
latency. ONNX Runtime plain int8 (NNCF) 91.2% -> ``mixed:stem`` 95.0% at 0.28x size and 0.48x latency (before it,
the best int8 was ``mixed:k8`` 95.0% at 0.43x and 0.81x). TFLite plain 85.4% -> minmax-mean ranges with bias
correction 90.0% -> ``mixed:stem`` 93.8% -> ``mixed:k1`` (stem + one layer with int8 weights computed in float)
97.1% at 0.29x size and 0.56x latency. On this validation set agreement moves by +-1.5 pp between variants whose
logit error is the same (10% of the crops have a top-2 logit gap below 0.17): the logit error is what these
methods lower (normalised squared error, ORT: plain 0.0103 -> stem 0.0048 -> + GPTQ 0.0035 -> + bias correction
0.0028; TFLite ``mixed:stem`` 0.0030).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from edge_sdk.bundle import Validation, size_of
from edge_sdk.converters.base import (
    ArtifactDraft,
    ConversionContext,
    Converter,
    ConvertOptions,
    budget_ladder_of,
    produce,
)
from edge_sdk.errors import ConversionError, EdgeSDKError, first_line
from edge_sdk.formats import Format, Framework, Precision
from edge_sdk.progress import Reporter

__all__ = ["AccuracyBudget", "BudgetLadder", "FallbackStep", "latency_p50", "method_of"]

MIXED_K = (1, 2, 4, 8)
_MIXED_RECIPES = ("onnx", "openvino", "tflite")  # LadderStep.mixed values: how "keep layer X float" is told
_OPTION_FIELDS = frozenset(f.name for f in fields(ConvertOptions))
QAT_EPOCHS = 2  # default epochs of the qat rung (converters/qat.py; MobileNetV2, 200 crops: 26 steps, 1.5-3 min)
_QAT = "_qat"  # marker in a rung's options: the sub-context converts the fine-tuned source
#: marker in the options of a mixed rung whose LadderStep has ``best_calibration``: use the options of the best
#: ``calibration:*`` step measured before it (none when plain int8 measured better). TFLite's minmax-mean + bias
#: correction: MobileNetV2 85.4% -> 90.0%, but crepe-tiny 84.0% -> 56.0%
_BEST_CALIBRATION = "_best_calibration"


@dataclass(frozen=True)
class AccuracyBudget:
    """How far an optimized artifact may drift from the source model. ``None`` disables a limit.

    ``max_drop_pp`` is measured accuracy drop in percentage points with ``--val-labels``; without labels the
    top-1 disagreement with the source (an upper bound on the drop) is used instead.
    """

    max_drop_pp: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    #: measure each passing step's latency against fp32 of its format on this host and prefer one that is faster
    speed_check: bool = True
    #: epochs of the ``qat`` rung (PyTorch sources); 0 leaves the rung out
    qat_epochs: int = QAT_EPOCHS

    def __post_init__(self) -> None:
        if self.max_drop_pp is None and self.min_agreement is None and self.min_cosine is None:
            raise EdgeSDKError("an accuracy budget needs --max-accuracy-drop, --min-agreement or --min-cosine")
        if self.max_drop_pp is not None and self.max_drop_pp < 0:
            raise EdgeSDKError(f"--max-accuracy-drop {self.max_drop_pp} must be >= 0 percentage points")
        if not isinstance(self.qat_epochs, int) or isinstance(self.qat_epochs, bool) or self.qat_epochs < 0:
            raise EdgeSDKError(f"--qat-epochs {self.qat_epochs!r} must be a whole number >= 0 (0 = no fine-tuning)")
        for name, val in (("--min-agreement", self.min_agreement), ("--min-cosine", self.min_cosine)):
            if val is not None and not 0 <= val <= 1:
                raise EdgeSDKError(f"{name} {val} must be a fraction between 0 and 1")

    def judge(self, v: Validation) -> tuple[bool, str]:
        """(within budget, the figures that decided it) for one validation result."""
        ok, parts = True, []
        if self.max_drop_pp is not None:
            if v.accuracy is not None and v.source_accuracy is not None:
                drop = 100 * (v.source_accuracy - v.accuracy)
                parts.append(f"accuracy drop {drop:.2f} pp (<= {self.max_drop_pp:g})")
            elif v.top1_agreement is not None:
                drop = 100 * (1 - v.top1_agreement)
                parts.append(f"top-1 disagreement {drop:.2f}% (<= {self.max_drop_pp:g} pp; no labels)")
            else:
                drop = 0.0 if v.passed else float("inf")
                parts.append("no accuracy figure (not a classifier)")
            ok &= drop <= self.max_drop_pp + 1e-9  # float noise: 0.90 - 0.89 is not over a 1 pp budget
        if self.min_agreement is not None:
            agree = v.top1_agreement if v.top1_agreement is not None else 0.0
            parts.append(f"top-1 agreement {100 * agree:.1f}% (>= {100 * self.min_agreement:g}%)")
            ok &= agree >= self.min_agreement
        if self.min_cosine is not None:
            cos = v.cosine if v.cosine is not None else 0.0
            parts.append(f"cosine {cos:.4f} (>= {self.min_cosine:g})")
            ok &= cos >= self.min_cosine
        return ok, ", ".join(parts)

    def figure(self, v: Validation) -> float:
        """One number to compare two validations under this budget (higher is closer to the source): the
        agreement, cosine or accuracy the budget limits, summed."""
        total = 0.0
        if self.max_drop_pp is not None:
            total += v.accuracy if v.accuracy is not None else (v.top1_agreement or 0.0)
        if self.min_agreement is not None:
            total += v.top1_agreement or 0.0
        if self.min_cosine is not None:
            total += v.cosine or 0.0
        return total

    def to_dict(self) -> dict[str, float]:
        """The limits that are set (and the QAT epochs when not the default, so a re-conversion repeats them)."""
        return {k: v for k, v in asdict(self).items()
                if v is not None and k != "speed_check" and not (k == "qat_epochs" and v == QAT_EPOCHS)}


@dataclass
class FallbackStep:
    """One rung of the ladder as measured."""

    name: str
    passed: bool | None  # None: not tried (the reason is in detail)
    metric: str = ""
    size_bytes: int | None = None
    precision: str = "int8"
    detail: str = ""
    float_nodes: list[str] = field(default_factory=list)
    latency_ratio: float | None = None  # p50 of this step / p50 of fp32 of the same format, this host, 1 thread


Validate = Callable[[ArtifactDraft], Validation]


class BudgetLadder:
    """Runs the fallback ladder for every int8 artifact of one conversion; shares work between formats
    (the sensitivity ranking is measured once; the ORT-format steps reuse the ONNX step models)."""

    def __init__(self, ctx: ConversionContext, budget: AccuracyBudget, planned: set[str], report: Reporter) -> None:
        self.ctx = ctx
        self.budget = budget
        self.planned = planned  # "format/precision" keys the user asked for (fp16 fallback must not collide)
        self.report = report
        self._subs: dict[str, ConversionContext] = {}
        self._ranked: list[Any] | None = None
        self._rank_error: str | None = None
        self._fp32: dict[Format, ArtifactDraft | str] = {}  # the fp32 draft per format, or why there is none
        self._qat: tuple[Any, dict[str, Any]] | EdgeSDKError | None = None  # fine-tuned source + record, or why not

    def _sub(self, name: str, extra: dict[str, Any]) -> ConversionContext:
        key = f"{name} {sorted((k, repr(v)) for k, v in extra.items())}"  # ONNX and ORT share; OpenVINO differs
        if key not in self._subs:
            qat = bool(extra.get(_QAT))
            extra = {k: v for k, v in extra.items() if k != _QAT}
            opt_fields = {k: v for k, v in extra.items() if k in _OPTION_FIELDS}  # e.g. onnx_activation_type
            rest = {k: v for k, v in extra.items() if k not in _OPTION_FIELDS}
            opts = replace(self.ctx.options, **opt_fields, extra={**self.ctx.options.extra, **rest})
            source = self._qat_source()[0] if qat else self.ctx.source
            sub = ConversionContext(source, self.ctx.workdir / "_budget" / f"{len(self._subs)}",
                                    calibration=self.ctx.calibration, options=opts)
            if not qat:
                sub._onnx[Precision.FP32] = self.ctx.onnx(Precision.FP32)  # one fp32 export for every step
            self._subs[key] = sub
        return self._subs[key]

    def _qat_not_offered(self) -> str:
        """Why the ``qat`` rung does not apply to this conversion ("" when it does)."""
        src = self.ctx.source
        if self.budget.qat_epochs <= 0:
            return "--qat-epochs 0"
        if src.framework is not Framework.PYTORCH:
            return (f"quantization-aware fine-tuning needs a PyTorch nn.Module (this route converts from "
                    f"{src.framework.value})")
        if getattr(src, "kind", "module") in ("torchscript", "onnx2torch"):
            return f"quantization-aware fine-tuning needs a trainable nn.Module (this one is {src.kind})"
        return ""

    def _note_qat(self, d: ArtifactDraft) -> None:
        """Say in the draft (tool_versions, notes) that it was made from the fine-tuned model, and how."""
        r = self._qat_source()[1]
        d.tool_versions["qat"] = f"{r.get('epochs')} epochs, {r.get('steps')} steps, seed {r.get('seed')}"
        d.notes.append(f"quantization-aware fine-tuning: {r.get('epochs')} epochs ({r.get('steps')} steps, "
                       f"{r.get('seconds', 0):.0f} s) distilled from fp32 on the calibration data, "
                       f"{r.get('layers_fake_quantized')} layers fake-quantized; loss {r.get('loss_first', 0):.4g} -> "
                       f"{r.get('loss_last', 0):.4g}" + (f"; stopped early: {r['stopped_early']}"
                                                         if r.get("stopped_early") else ""))

    def _qat_source(self) -> tuple[Any, dict[str, Any]]:
        """The quantization-aware fine-tuned copy of the PyTorch source and its record: made once per conversion
        (every format quantizes the same fine-tuned model); a failure is kept and re-raised for each format."""
        if self._qat is None:
            import copy

            from edge_sdk.converters.qat import qat_finetune

            try:
                calib = self.ctx.require_calibration("quantization-aware fine-tuning (the qat rung)")
                epochs = self.budget.qat_epochs
                with self.report.progress(f"quantization-aware fine-tuning ({epochs} epochs)") as advance:
                    model, record = qat_finetune(self.ctx.source.model, calib, epochs=epochs, progress=advance)
                tuned = copy.copy(self.ctx.source)  # same names, shapes and dtypes; the fine-tuned module
                tuned.model, tuned.path = model, None
                self._qat = (tuned, record)
            except Exception as exc:  # whatever torch raises on a model QAT cannot train: the rung fails, not all
                self._qat = exc if isinstance(exc, EdgeSDKError) else ConversionError(
                    _why(exc, "quantization-aware fine-tuning"))
        if isinstance(self._qat, EdgeSDKError):
            raise self._qat
        return self._qat

    def _ranking(self) -> list[Any]:
        if self._ranked is None and self._rank_error is None:
            from edge_sdk.converters.onnx_common import onnx_input_names
            from edge_sdk.converters.sensitivity import rank_onnx_layers

            fp32 = self.ctx.onnx(Precision.FP32)
            names = onnx_input_names(fp32.path)
            src_names = list(self.ctx.source.input_names)
            if sorted(src_names) == sorted(names):
                names = src_names
            try:
                with self.report.step("ranking layers by measured int8 error"):
                    self._ranked = rank_onnx_layers(fp32.path, self.ctx.require_calibration("sensitivity"), names,
                                                    self.ctx.workdir / "_budget" / "sensitivity", self.ctx.options)
            except Exception as exc:  # no ranking: the mixed rungs are reported as not tried, the rest go on
                self._rank_error = _why(exc, "ranking layers")
        return self._ranked or []

    def _steps(self, conv: Converter) -> list[tuple[str, dict[str, Any], Precision, list[str], str]]:
        """(name, options, precision, float nodes, not-offered reason) per rung of ``conv``'s ``budget_ladder``."""
        steps: list[tuple[str, dict[str, Any], Precision, list[str], str]] = []
        extra = self.ctx.options.extra
        for rung in budget_ladder_of(conv):
            if any(str(extra.get(k, "")).strip().lower() == str(v) for k, v in rung.unless):
                continue
            if rung.mixed:
                inherit = {_BEST_CALIBRATION: True} if rung.best_calibration else {}
                steps.extend((name, {**dict(rung.options), **opts, **inherit}, rung.precision, nodes, "")
                              for name, opts, nodes in self._mixed(rung.mixed, on_stem=any(
                                  k.endswith("_float_stem") and v for k, v in rung.options)))
            elif rung.qat:
                steps.append((rung.name, {**dict(rung.options), _QAT: True}, rung.precision, [],
                              rung.not_offered or self._qat_not_offered()))
            else:
                inherit = {_BEST_CALIBRATION: True} if rung.best_calibration else {}
                steps.append((rung.name, {**dict(rung.options), **inherit}, rung.precision, [], rung.not_offered))
        return steps

    def _mixed(self, recipe: str, on_stem: bool = False) -> list[tuple[str, dict[str, Any], list[str]]]:
        """``mixed:kN`` rungs: the N most sensitive layers in float, the options that say so for ``recipe``.
        The rung's own ``options`` are added to each. ``on_stem``: the rung keeps the stem in float anyway, so N
        counts the most sensitive layers outside it."""
        from edge_sdk.converters.onnx_quantize import _quantizer, stem_of_file
        from edge_sdk.converters.sensitivity import float_nodes_for

        if recipe not in _MIXED_RECIPES:
            raise EdgeSDKError(f"unknown mixed-precision recipe {recipe!r} in a converter's budget_ladder: use "
                               + " or ".join(_MIXED_RECIPES))
        ranked = self._ranking()
        if on_stem and ranked:
            stem = set(stem_of_file(self.ctx.onnx(Precision.FP32).path)[0])
            ranked = [r for r in ranked if r.node not in stem]
        nncf_onnx = recipe == "onnx" and _quantizer(self.ctx.options) == "nncf"
        out: list[tuple[str, dict[str, Any], list[str]]] = []
        prev: list[str] = []
        every_layer = {r.node for r in ranked}
        for k in MIXED_K:
            if k > len(ranked):
                break
            if recipe == "tflite":  # the same layers by graph position; the converter adds the ops feeding them
                nodes = [r.node for r in ranked[:k]]
                opts = {"tflite_float_layers": [f"{r.index}/{r.of}" for r in ranked[:k]]}
            elif recipe == "openvino":  # NNCF quantizes op inputs only: the layer and its feeding ops
                nodes = float_nodes_for(ranked, k, "input_nodes")
                opts: dict[str, Any] = {"openvino_ignored_names": nodes + float_nodes_for(ranked, k, "outputs")}
            elif nncf_onnx:  # same with NNCF on ONNX (ignoring the feeding Conv too made NNCF 3.4 fail)
                nodes = float_nodes_for(ranked, k, "input_nodes")
                opts = {"onnx_float_nodes": nodes}
            else:  # ORT also rounds the outputs of quantized layers: the feeding layer stays float too
                nodes = float_nodes_for(ranked, k)
                opts = {"onnx_quantizer": "ort", "onnx_float_nodes": nodes}
            if nodes == prev:
                continue
            if every_layer <= set(nodes):
                break  # every weighted layer in float: that is the fp32 model, not a mixed-precision one
            prev = nodes
            out.append((f"mixed:k{k}", opts, nodes))
        return out

    def _fp32_of(self, fmt: Format, conv: Converter) -> ArtifactDraft | str:
        """The fp32 draft of ``fmt`` to time a step against (made once, in its own work directory)."""
        if fmt not in self._fp32:
            try:
                if Precision.FP32 not in getattr(conv, "precisions", (Precision.FP32,)):
                    raise EdgeSDKError(f"{fmt.value} has no fp32 artifact to compare with")
                self._fp32[fmt] = produce(self._sub("fp32-reference", {}), conv, Precision.FP32)[0]
            except Exception as exc:
                self._fp32[fmt] = f"no fp32 {fmt.value} to compare with ({_why(exc, 'fp32 reference')[:160]})"
        return self._fp32[fmt]

    def _speed(self, fmt: Format, conv: Converter, d: ArtifactDraft) -> tuple[float | None, str]:
        """(latency of ``d`` / latency of fp32 of ``fmt``, how it was measured) on this host; None when it cannot
        be measured here (the ratio is then unknown, never guessed)."""
        if not self.budget.speed_check:
            return None, "not measured (speed_check off)"
        if d.validation_skipped:
            return None, f"not measured: {d.validation_skipped}"
        base = self._fp32_of(fmt, conv)
        if isinstance(base, str):
            return None, base
        if base.path == d.path:
            return 1.0, "the fp32 artifact itself"
        try:
            with self.report.step(f"timing {fmt.value}/{d.precision.value} against fp32 ({SPEED_ROUNDS} rounds)"):
                p50 = latency_p50(fmt, [base, d])
        except Exception as exc:
            return None, f"not measured: {_why(exc, 'timing')[:160]}"
        return p50[1] / p50[0], (f"p50 {p50[1]:.3f} ms vs fp32 {p50[0]:.3f} ms, 1 thread, {SPEED_ROUNDS} "
                                 f"interleaved rounds x {SPEED_RUNS} runs, this host")

    def run(self, fmt: Format, conv: Converter, draft: ArtifactDraft, validate: Validate
            ) -> tuple[ArtifactDraft, Validation]:
        """Judge ``draft`` (plain int8) against the budget; fall back step by step while it is over.

        Speed-aware: a step within budget that runs slower than fp32 of its format on this host (measured,
        1 thread, interleaved rounds) is remembered and the ladder goes on; the first step within budget and
        faster than fp32 is kept. When only slower ones fit, the fastest of them is kept (a 3x slower
        int16-activation model is no better a pick than a 1.2x slower fp16 one) and marked
        ``validation.checks["slower_than_fp32"] = True``. Returns the kept draft and its validation (with
        ``checks["accuracy_budget"]`` filled in); when no step fits, the plain draft with ``passed=False``.
        """
        key = f"{fmt.value}/int8"
        v = validate(draft)
        ok, metric = self.budget.judge(v)
        steps = [FallbackStep("int8", bool(ok and v.passed), metric, _size(draft), detail="; ".join(v.failures))]
        kept: tuple[ArtifactDraft, Validation, FallbackStep] | None = None
        slow: list[tuple[ArtifactDraft, Validation, FallbackStep]] = []
        speed_how: dict[str, str] = {}

        def fast_enough(d: ArtifactDraft, sv: Validation, step: FallbackStep) -> bool:
            step.latency_ratio, speed_how[step.name] = self._speed(fmt, conv, d)
            if step.latency_ratio is not None and step.latency_ratio >= 1.0:
                slow.append((d, sv, step))
                return False
            return True

        if steps[0].passed and fast_enough(draft, v, steps[0]):
            kept = (draft, v, steps[0])
        calibration: tuple[float, dict[str, Any]] = (self.budget.figure(v), {})  # the best so far: plain int8
        if kept is None:
            for name, extra, precision, nodes, not_offered in self._steps(conv):
                if name.startswith("mixed:") and _BEST_CALIBRATION in extra:
                    # layers in float on top of whichever calibration measured better (it differs per model)
                    extra = {**calibration[1], **{k: v for k, v in extra.items() if k != _BEST_CALIBRATION}}
                fkey = f"{fmt.value}/{precision.value}"
                if not_offered:
                    steps.append(FallbackStep(name, None, detail="not offered: " + not_offered))
                    continue
                if precision is not Precision.INT8 and fkey in self.planned:
                    steps.append(FallbackStep(name, None, precision=precision.value,
                                              detail=f"{fkey} is requested too: see that artifact"))
                    continue
                try:
                    with self.report.step(f"{key} over budget: trying {name}"):
                        d = produce(self._sub(name, extra), conv, precision)[0]
                        if extra.get(_QAT):
                            self._note_qat(d)
                        sv = validate(d)
                except Exception as exc:  # one broken rung is a failed step, never the end of the artifact
                    steps.append(FallbackStep(name, False, precision=precision.value,
                                              detail=_why(exc, f"the {name} step")[:300], float_nodes=nodes))
                    continue
                s_ok, s_metric = self.budget.judge(sv)
                step = FallbackStep(name, bool(s_ok and sv.passed), s_metric, _size(d), precision.value,
                                    "; ".join(sv.failures), nodes)
                steps.append(step)
                if name.startswith("calibration:") and (figure := self.budget.figure(sv)) > calibration[0]:
                    calibration = (figure, extra)
                if step.passed and fast_enough(d, sv, step):
                    kept = (d, sv, step)
                    break
        slower = kept is None and bool(slow)
        if slower:  # only steps slower than fp32 fit: the fastest of them (issue 14: prefer the fastest), said so
            kept = min(slow, key=lambda k: k[2].latency_ratio or 0.0)
        if self._rank_error and any(rung.mixed for rung in budget_ladder_of(conv)):
            steps.append(FallbackStep("mixed", None, detail=f"no layer ranking: {self._rank_error}"))
        record = {"budget": self.budget.to_dict(), "steps": [asdict(s) for s in steps],
                  "kept": kept[2].name if kept else None,
                  "kept_in_float": kept[2].float_nodes if kept else []}
        if kept is None:
            tried = ", ".join(s.name for s in steps[1:] if s.passed is not None) or "nothing"
            why = f"over the accuracy budget: {metric}; fallback tried {tried} — none fit"
            v = replace(v, passed=False, failures=[*v.failures, why], checks={**v.checks, "accuracy_budget": record})
            return draft, v
        d, sv, step = kept
        record["method"] = method_of(d, step)
        if "qat" in d.tool_versions and isinstance(self._qat, tuple):
            record["qat"] = self._qat[1]
        speed = {"latency_ratio": step.latency_ratio, "measured": speed_how.get(step.name, "not measured")}
        checks = {**sv.checks, "accuracy_budget": record, "latency_vs_fp32": speed}
        if step.latency_ratio is not None:
            checks["slower_than_fp32"] = step.latency_ratio >= 1.0
        sv = replace(sv, checks=checks)
        notes = [f"accuracy budget {self.budget.to_dict()}: " + " -> ".join(
            f"{s.name} {'ok' if s.passed else 'over' if s.passed is False else 'n/a'}"
            + (f" ({s.latency_ratio:.2f}x fp32 latency)" if s.latency_ratio is not None else "") for s in steps)
            + f"; kept {step.name} ({step.metric}) by {record['method']}"]
        if slower:
            notes.append(f"slower than fp32 on this host ({step.latency_ratio:.2f}x): no faster step met the budget")
        if step.float_nodes:
            notes.append(f"kept in float by the accuracy budget ({len(step.float_nodes)} nodes): "
                         + ", ".join(step.float_nodes))
        d = replace(d, notes=[*d.notes, *notes])
        return d, sv


def _why(exc: BaseException, where: str) -> str:
    """One line for a step that raised: the SDK's own message, or where, the exception type and its first line."""
    if isinstance(exc, EdgeSDKError):
        return first_line(exc, 300)
    return f"{where} raised {type(exc).__name__}: {first_line(exc, 220)} (a bug or limit of that step)"


def method_of(d: ArtifactDraft, step: FallbackStep) -> str:
    """How the kept artifact was made, in one phrase (quantizer, weight rounding, calibration, float layers)."""
    tv = d.tool_versions
    if step.precision != Precision.INT8.value:
        return f"{step.precision}, no quantization [{step.name}]"
    parts = [tv.get("onnx_quantizer") or tv.get("quantizer") or d.runtime.get("quantizer") or
             ("nncf" if "nncf" in tv else d.format.value)]
    if "qat" in tv:
        parts.insert(0, "qat")
    for k in ("onnx_weight_rounding", "openvino_weight_rounding", "tflite_weight_rounding", "onnx_calibration",
              "openvino_ranges", "tflite_ranges"):
        if tv.get(k) and tv[k] != "nearest":
            parts.append(str(tv[k]).split(" (")[0])
    if tv.get("tflite_bias_correction") or str(tv.get("onnx_bias_correction", "none")).split(" ")[0] != "none":
        parts.append("bias-correction")
    if tv.get("onnx_float_stem"):
        parts.append(f"stem in float ({tv['onnx_float_stem']})")
    if tv.get("tflite_float_stem"):
        parts.append(f"stem in float ({tv['tflite_float_stem']})")
    if step.float_nodes:
        parts.append(f"{len(step.float_nodes)} nodes in float")
    return " + ".join(parts) + f" [{step.name}]"


SPEED_ROUNDS = 5
SPEED_RUNS = 10


def latency_p50(fmt: Format, drafts: list[ArtifactDraft], *, rounds: int = SPEED_ROUNDS, runs: int = SPEED_RUNS,
                warmup: int = 3) -> list[float]:
    """Median latency (ms) of each draft on this host, 1 thread, loaded as the device loads it (its runtime
    hints), timed in interleaved rounds so machine load hits every draft alike (edge_sdk.benchmark's method)."""
    import inspect
    import time

    from edge_sdk._bench_worker import make_inputs
    from edge_sdk.runtimes import runtime_for

    rt = runtime_for(fmt)
    if rt is None:
        raise EdgeSDKError(f"no {fmt.value} runtime installed here")
    params = inspect.signature(rt.load).parameters
    sessions = [rt.load(d.path, threads=1, **{k: v for k, v in d.runtime.items()
                                              if k in params and k not in ("path", "threads")}) for d in drafts]
    try:
        inputs = [make_inputs(s.inputs, 0) for s in sessions]
        for s, x in zip(sessions, inputs, strict=True):
            for _ in range(warmup):
                s.run(x)
        times: list[list[float]] = [[] for _ in sessions]
        for r in range(rounds):
            order = list(range(len(sessions)))
            if r % 2:
                order.reverse()
            for i in order:
                for _ in range(runs):
                    t = time.perf_counter_ns()
                    sessions[i].run(inputs[i])
                    times[i].append((time.perf_counter_ns() - t) / 1e6)
    finally:
        for s in sessions:
            s.close()
    return [float(sorted(t)[len(t) // 2]) for t in times]


def _size(d: ArtifactDraft) -> int:
    return size_of(d.path) + sum(size_of(f) for f in d.files)
