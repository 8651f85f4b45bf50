"""Prune a PyTorch model, fine-tune it briefly, and report what changed.

Two methods:

- ``structured``: removes whole output channels of every ``Conv2d`` (the lowest L1-norm filters, ``amount`` of
  each layer) and the matching inputs of what reads them: the following ``BatchNorm2d``, the next ``Conv2d``, or
  the first ``Linear`` after a flatten. The layers really get smaller, so every dense runtime runs fewer FLOPs.
  The module graph is read with ``torch.fx``; a model where a pruned channel reaches anything else (a residual
  add, a concat, a reshape, a grouped / depthwise conv) is refused with a one-line reason, never guessed.
- ``magnitude``: global unstructured L1 pruning of Conv2d / Linear weights (``torch.nn.utils.prune``), made
  permanent. Dense runtimes gain no speed from zeros; only a compressed file gets smaller.

torch is imported inside the functions (extra ``torch``).
"""

from __future__ import annotations

import copy
import gzip
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.errors import PruneError

__all__ = ["PruneError", "PruneReport", "PruneResult", "prune"]

METHODS = ("structured", "magnitude")
_POOLS_AND_ACTIVATIONS = (
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "GELU", "SiLU", "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "Mish",
    "Identity", "Dropout", "Dropout2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d",
)
_ELEMENTWISE_FUNCTIONS = ("relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "hardswish", "hardsigmoid",
                          "sigmoid", "tanh", "mish", "dropout", "dropout2d", "max_pool2d", "avg_pool2d",
                          "adaptive_avg_pool2d", "adaptive_max_pool2d")
_ELEMENTWISE_METHODS = ("relu", "relu_", "sigmoid", "tanh", "contiguous")
Batches = Iterable[tuple[Any, Any]]


@dataclass(frozen=True)
class PruneReport:
    """What pruning changed. Accuracies are top-1 on ``val_data`` (None without it); sizes are bytes of the
    ``torch.save``-d state_dict, raw and gzip-compressed."""

    method: str
    amount: float
    params_before: int
    params_after: int
    nonzero_params_after: int
    sparsity: float
    """structured: fraction of conv output channels removed; magnitude: fraction of pruned weights set to zero."""
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    """structured: conv layer name -> (output channels before, after)."""
    accuracy_before: float | None = None
    accuracy_pruned: float | None = None
    accuracy_after: float | None = None
    state_dict_bytes_before: int = 0
    state_dict_bytes_after: int = 0
    gzip_bytes_before: int = 0
    gzip_bytes_after: int = 0
    finetune_epochs: int = 0
    finetune_samples: int = 0
    finetune_seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        d = asdict(self)
        d["channels"] = {k: list(v) for k, v in self.channels.items()}
        return d

    def format(self) -> str:
        """A short human-readable table."""
        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f}%"
        lines = [f"method {self.method}, amount {self.amount:g}: sparsity {100 * self.sparsity:.1f}%",
                 f"parameters {self.params_before:,} -> {self.params_after:,} "
                 f"({self.nonzero_params_after:,} non-zero, {self.nonzero_params_after / self.params_before:.2f}x)"]
        lines += [f"  {name}: {a} -> {b} channels" for name, (a, b) in self.channels.items()]
        lines.append(f"state_dict {self.state_dict_bytes_before:,} -> {self.state_dict_bytes_after:,} bytes "
                     f"({self.state_dict_bytes_after / self.state_dict_bytes_before:.2f}x); gzip "
                     f"{self.gzip_bytes_before:,} -> {self.gzip_bytes_after:,} bytes "
                     f"({self.gzip_bytes_after / self.gzip_bytes_before:.2f}x)")
        lines.append(f"accuracy: original {pct(self.accuracy_before)}, pruned {pct(self.accuracy_pruned)}, "
                     f"after fine-tune {pct(self.accuracy_after)} ({self.finetune_epochs} epochs on "
                     f"{self.finetune_samples} samples, {self.finetune_seconds:.1f} s)")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


@dataclass
class PruneResult:
    """The pruned module (eval mode, pruning permanent), its report and the example input used to trace it."""

    model: Any
    report: PruneReport
    example_input: Any

    def save(self, path: str | Path) -> Path:
        """Save architecture + weights in a form ``edge_sdk.convert`` loads: ``.pt2`` -> ``torch.export`` program,
        anything else -> TorchScript (pass ``input_shape`` when converting it)."""
        torch = require("torch", "torch", "saving the pruned model")
        if self.example_input is None:
            raise PruneError("saving needs the model's input shape: call prune(..., example_input=...)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = self.model.eval()
        with torch.no_grad():
            if path.suffix == ".pt2":
                torch.export.save(torch.export.export(model, (self.example_input,)), str(path))
            else:
                torch.jit.save(torch.jit.trace(model, (self.example_input,)), str(path))
        return path


def prune(
    model: Any,
    *,
    method: str = "structured",
    amount: float = 0.5,
    example_input: Any = None,
    train_data: tuple[Any, Any] | Callable[[], Batches] | None = None,
    val_data: tuple[Any, Any] | None = None,
    finetune_epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 64,
    max_train_samples: int | None = None,
    seed: int = 0,
    threads: int = 1,
) -> PruneResult:
    """Prune ``model`` (left untouched; a copy is pruned), fine-tune it, return a :class:`PruneResult`.

    ``amount`` is the fraction of each conv's output channels (structured) or of all Conv2d/Linear weights
    (magnitude) to remove. ``example_input`` (a tensor or array of the model's input shape) is required for
    structured pruning. ``train_data`` is ``(x, y)`` arrays/tensors or a callable returning an iterable of
    ``(x, y)`` batches (called once per epoch); without it no fine-tune happens. Fine-tuning uses Adam with
    ``threads`` intra-op threads (restored afterwards) on at most ``max_train_samples`` samples.
    """
    torch = require("torch", "torch", "pruning")
    if method not in METHODS:
        raise PruneError(f"unknown pruning method {method!r}: use one of {', '.join(METHODS)}")
    if not 0.0 < float(amount) < 1.0:
        raise PruneError(f"amount {amount!r} must be a fraction between 0 and 1 (e.g. 0.5)")
    if not isinstance(model, torch.nn.Module):
        raise PruneError(f"prune needs a torch.nn.Module, got {type(model).__name__}: load the model first")
    example = _tensor(example_input) if example_input is not None else None
    if method == "structured" and example is None:
        raise PruneError("structured pruning needs example_input (a tensor of the model's input shape)")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        original = copy.deepcopy(model).eval()
        pruned = copy.deepcopy(model).eval()
        val = (_tensor(val_data[0]), _tensor(val_data[1])) if val_data is not None else None
        acc_before = _accuracy(original, val)
        params_before = _count(original)
        channels: dict[str, tuple[int, int]] = {}
        masked: list[tuple[Any, str]] = []
        if method == "structured":
            channels = _prune_channels(pruned, example, amount)
        else:
            masked = _prune_magnitude(pruned, amount)
        acc_pruned = _accuracy(pruned, val)
        epochs, samples, seconds = 0, 0, 0.0
        if train_data is not None and finetune_epochs > 0:
            t0 = time.perf_counter()
            samples = _finetune(pruned, train_data, finetune_epochs, lr, batch_size, max_train_samples, seed)
            epochs, seconds = finetune_epochs, time.perf_counter() - t0
        for module, name in masked:
            torch.nn.utils.prune.remove(module, name)
        pruned.eval()
        acc_after = _accuracy(pruned, val) if epochs else acc_pruned
        if example is not None:
            with torch.no_grad():
                got, want = pruned(example).shape, original(example).shape
            if got != want:
                raise PruneError(f"pruned model output shape {list(got)} differs from {list(want)}: please report "
                                 "this model; use method='magnitude' meanwhile")
        removed = sum(a - b for a, b in channels.values())
        total = sum(a for a, _ in channels.values())
        sparsity = removed / total if method == "structured" else _zero_fraction(masked)
        raw_b, gz_b = _state_dict_sizes(original)
        raw_a, gz_a = _state_dict_sizes(pruned)
        note = ("structured pruning removed channels: the layers are smaller, dense runtimes run fewer FLOPs"
                if method == "structured" else
                "magnitude pruning only sets weights to zero: dense runtimes (ONNX Runtime, TFLite, OpenVINO, Core ML) "
                "run at the same speed and the raw file keeps its size; only a compressed file shrinks")
        report = PruneReport(
            method=method, amount=float(amount), params_before=params_before, params_after=_count(pruned),
            nonzero_params_after=_count(pruned, nonzero=True), sparsity=float(sparsity), channels=channels,
            accuracy_before=acc_before, accuracy_pruned=acc_pruned, accuracy_after=acc_after,
            state_dict_bytes_before=raw_b, state_dict_bytes_after=raw_a, gzip_bytes_before=gz_b,
            gzip_bytes_after=gz_a, finetune_epochs=epochs, finetune_samples=samples,
            finetune_seconds=round(seconds, 2), note=note)
        return PruneResult(pruned, report, example)
    finally:
        torch.set_num_threads(previous_threads)


# --- structured: find what reads each conv's channels, then rebuild the layers smaller -------------------------

def _prune_channels(model: Any, example: Any, amount: float) -> dict[str, tuple[int, int]]:
    torch = require("torch", "torch")
    from torch import fx, nn
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except (TypeError, RuntimeError, NotImplementedError, AttributeError) as exc:
        raise PruneError(f"cannot trace {type(model).__name__} with torch.fx ({str(exc).splitlines()[0][:120]}): "
                         "structured pruning needs a traceable model; use method='magnitude'") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]
    if not convs:
        raise PruneError(f"{type(model).__name__} has no Conv2d layer: structured pruning removes conv channels; "
                         "use method='magnitude'")
    if len({n.target for n in convs}) != len(convs):
        raise PruneError("a Conv2d module is called more than once: structured pruning cannot rewrite shared "
                         "layers safely; use method='magnitude'")
    keep_out: dict[str, Any] = {}
    keep_in: dict[str, Any] = {}  # conv / linear / batchnorm name -> kept input-feature indices
    for node in convs:
        conv = modules[node.target]
        if conv.groups != 1:
            raise PruneError(f"layer {node.target!r} is a grouped/depthwise conv (groups={conv.groups}): structured "
                             "pruning cannot rewrite it safely; use method='magnitude'")
        n_keep = max(1, conv.out_channels - int(conv.out_channels * amount + 1e-9))
        scores = conv.weight.detach().abs().sum(dim=(1, 2, 3))
        keep = torch.sort(torch.topk(scores, n_keep).indices).values
        keep_out[node.target] = keep
        for kind, name, hw in _readers(node, modules):
            if kind == "linear":
                keep = (keep_out[node.target][:, None] * hw + torch.arange(hw)[None, :]).reshape(-1)
                keep_in[name] = keep
            else:
                keep_in[name] = keep_out[node.target]
    sizes = {}
    for node in convs:
        conv = modules[node.target]
        sizes[node.target] = (conv.out_channels, len(keep_out[node.target]))
        _replace(model, node.target, _smaller_conv(conv, keep_out[node.target], keep_in.get(node.target)))
    for name, keep in keep_in.items():
        layer = modules[name]
        if isinstance(layer, nn.BatchNorm2d):
            _replace(model, name, _smaller_bn(layer, keep))
        elif isinstance(layer, nn.Linear):
            _replace(model, name, _smaller_linear(layer, keep))
    return sizes


def _readers(conv_node: Any, modules: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every layer whose input features are the conv's output channels: ("bn"|"conv"|"linear", name, H*W)."""
    from torch import nn

    owner = conv_node.target
    found: list[tuple[str, str, int]] = []
    frontier = [(conv_node, 0)]  # (node, H*W after a flatten, 0 before one)
    while frontier:
        node, hw = frontier.pop()
        for user in node.users:
            mod = modules.get(user.target) if user.op == "call_module" else None
            if hw == 0 and isinstance(mod, nn.BatchNorm2d):
                found.append(("bn", user.target, 0))
                frontier.append((user, 0))
            elif hw == 0 and isinstance(mod, nn.Conv2d):
                if mod.groups != 1:
                    raise PruneError(f"conv {owner!r} feeds grouped/depthwise conv {user.target!r}: structured "
                                     "pruning cannot rewrite it safely; use method='magnitude'")
                found.append(("conv", user.target, 0))
            elif hw and isinstance(mod, nn.Linear):
                found.append(("linear", user.target, hw))
            elif hw == 0 and _is_flatten(user, mod):
                shape = node.meta["tensor_meta"].shape
                if len(shape) != 4:
                    raise PruneError(f"conv {owner!r} output is flattened from rank {len(shape)}: cannot map "
                                     "channels to features; use method='magnitude'")
                frontier.append((user, int(shape[2] * shape[3])))
            elif _is_elementwise(user, mod) and (hw == 0 or not _is_pool(user, mod)):
                frontier.append((user, hw))
            else:
                what = user.target if user.op == "call_module" else getattr(user.target, "__name__", user.target)
                raise PruneError(f"conv {owner!r} output reaches {user.op} {what!r} (e.g. a residual add, concat or "
                                 "reshape), which structured pruning cannot rewrite safely; use method='magnitude'")
    return found


def _is_flatten(node: Any, mod: Any) -> bool:
    torch = require("torch", "torch")
    if mod is not None:
        return isinstance(mod, torch.nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if node.op == "call_function" and node.target is torch.flatten:
        return start == 1 and len(node.args) <= 2
    return node.op == "call_method" and node.target == "flatten" and start == 1 and len(node.args) <= 2


def _is_elementwise(node: Any, mod: Any) -> bool:
    if mod is not None:
        return type(mod).__name__ in _POOLS_AND_ACTIVATIONS and type(mod).__module__.startswith("torch.nn")
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in _ELEMENTWISE_FUNCTIONS and \
            getattr(node.target, "__module__", "").startswith("torch")
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _is_pool(node: Any, mod: Any) -> bool:
    name = type(mod).__name__ if mod is not None else str(getattr(node.target, "__name__", node.target))
    return "pool" in name.lower()


def _replace(model: Any, name: str, new: Any) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _smaller_conv(conv: Any, keep_out: Any, keep_in: Any) -> Any:
    torch = require("torch", "torch")
    weight = conv.weight.detach()[keep_out]
    if keep_in is not None:
        weight = weight[:, keep_in]
    new = torch.nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[keep_out])
    return new


def _smaller_bn(bn: Any, keep: Any) -> Any:
    torch = require("torch", "torch")
    new = torch.nn.BatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach()[keep])
            new.bias.copy_(bn.bias.detach()[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _smaller_linear(linear: Any, keep: Any) -> Any:
    torch = require("torch", "torch")
    new = torch.nn.Linear(len(keep), linear.out_features, linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight.detach()[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    return new


# --- magnitude, fine-tune, measurements ------------------------------------------------------------------------

def _prune_magnitude(model: Any, amount: float) -> list[tuple[Any, str]]:
    torch = require("torch", "torch")
    from torch.nn.utils import prune as tprune

    params = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if not params:
        raise PruneError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=float(amount))
    return params


def _zero_fraction(params: list[tuple[Any, str]]) -> float:
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in params)
    return zeros / sum(getattr(m, n).numel() for m, n in params)


def _finetune(model: Any, data: Any, epochs: int, lr: float, batch_size: int, limit: int | None, seed: int) -> int:
    torch = require("torch", "torch")
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    if not callable(data):
        x, y = _tensor(data[0]), _tensor(data[1]).long()
        if len(x) != len(y):
            raise PruneError(f"train_data has {len(x)} inputs but {len(y)} labels: pass matching arrays")
        n = min(len(x), limit or len(x))
    # cosine-decayed lr: per batch for arrays, per epoch for a batch callable (its length is unknown)
    t_max = epochs * -(-n // batch_size) if not callable(data) else epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, t_max))
    seen = 0
    model.train()
    for _ in range(epochs):
        if callable(data):
            batches: Batches = data()
        else:
            order = torch.randperm(len(x), generator=generator)[:n]
            batches = ((x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, n, batch_size))
        for bx, by in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(_tensor(bx)), _tensor(by).long())
            loss.backward()
            optimizer.step()
            seen += len(bx)
            if not callable(data):
                scheduler.step()
        if callable(data):
            scheduler.step()
    model.eval()
    return seen // epochs


def _accuracy(model: Any, val: tuple[Any, Any] | None) -> float | None:
    if val is None:
        return None
    torch = require("torch", "torch")
    x, y = val
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            correct += int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum())
    return correct / len(x)


def _count(model: Any, nonzero: bool = False) -> int:
    return sum(int((p != 0).sum()) if nonzero else p.numel() for p in model.parameters())


def _state_dict_sizes(model: Any) -> tuple[int, int]:
    torch = require("torch", "torch")
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, buf)
    raw = buf.getvalue()
    return len(raw), len(gzip.compress(raw, compresslevel=6, mtime=0))


def _tensor(value: Any) -> Any:
    torch = require("torch", "torch")
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32) if arr.dtype == np.float64 else arr))
