"""Knowledge distillation (PyTorch): train a small student on a teacher's temperature-softened outputs.

The student minimises ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)``
(Hinton et al., 2015): "coat 75%, pullover 20%, shirt 5%" teaches more than the label "coat". The teacher runs in
eval mode under ``torch.no_grad``; its logits are computed once per training example (one batched pass before the
first epoch, since the data is not augmented) and reused every epoch.

With ``baseline=True`` the same student, from the same initial weights, with the same seed, batch order, optimizer
and epochs, is also trained on the labels alone, so the report shows what distillation added.

Data is ``(x, y)`` arrays (float inputs in the model's layout, integer labels) or a folder of images in one
subfolder per class (sorted subfolder names are the classes), decoded with Pillow and `edge_sdk.preprocessing`.
torch is imported inside the functions (extra ``torch``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.errors import CalibrationError, SourceModelError
from edge_sdk.preprocessing import IMAGE_SUFFIXES, Preprocessing, decode_image

__all__ = ["DistillResult", "count_parameters", "distill", "distillation_loss", "import_class", "load_image_folder"]

Dataset = tuple[np.ndarray, np.ndarray] | str | Path


@dataclass
class DistillResult:
    """What `distill` produced: the trained student (eval mode) and the measured report.

    Accuracies are top-1 on ``val_data`` (None without it); ``baseline_*`` are set only with ``baseline=True``.
    ``epoch_losses`` are the mean training loss of each epoch (distillation loss for the student, cross-entropy
    for the baseline). ``train_seconds`` covers the teacher pass and the student's training, ``baseline_seconds``
    the labels-only run.
    """

    student: Any = field(repr=False)
    teacher_parameters: int
    student_parameters: int
    teacher_accuracy: float | None
    student_accuracy: float | None
    baseline_accuracy: float | None
    epoch_losses: list[float]
    baseline_epoch_losses: list[float] | None
    temperature: float
    alpha: float
    epochs: int
    seed: int
    train_size: int
    val_size: int
    train_seconds: float
    baseline_seconds: float | None = None
    class_names: list[str] | None = None

    @property
    def parameter_ratio(self) -> float:
        """Student parameters / teacher parameters."""
        return self.student_parameters / self.teacher_parameters

    @property
    def accuracy_ratio(self) -> float | None:
        """Student accuracy / teacher accuracy (None without validation data)."""
        if self.student_accuracy is None or not self.teacher_accuracy:
            return None
        return self.student_accuracy / self.teacher_accuracy

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (without the student module)."""
        d = asdict(self)
        d.pop("student")
        d["parameter_ratio"] = round(self.parameter_ratio, 4)
        d["accuracy_ratio"] = None if self.accuracy_ratio is None else round(self.accuracy_ratio, 4)
        return d

    def report(self) -> str:
        """A short human-readable report."""

        def pct(v: float | None) -> str:
            return "n/a (no validation data)" if v is None else f"{100 * v:.2f}%"

        lines = [
            f"distillation: T={self.temperature:g} alpha={self.alpha:g} epochs={self.epochs} seed={self.seed} "
            f"train={self.train_size} val={self.val_size} (trained in {self.train_seconds:.1f} s)",
            f"  parameters  teacher {self.teacher_parameters:,}  student {self.student_parameters:,} "
            f"({100 * self.parameter_ratio:.1f}% of the teacher)",
            f"  accuracy    teacher {pct(self.teacher_accuracy)}  student distilled {pct(self.student_accuracy)}"
            + ("" if self.accuracy_ratio is None else f" ({100 * self.accuracy_ratio:.1f}% of the teacher)"),
        ]
        if self.baseline_epoch_losses is not None:
            delta = ""
            if self.baseline_accuracy is not None and self.student_accuracy is not None:
                delta = f"  (distillation {100 * (self.student_accuracy - self.baseline_accuracy):+.2f} pp)"
            lines.append(f"  baseline    same student on labels only {pct(self.baseline_accuracy)}{delta}"
                         f" ({self.baseline_seconds or 0:.1f} s)")
        lines.append("  loss/epoch  distilled " + " ".join(f"{v:.4f}" for v in self.epoch_losses))
        if self.baseline_epoch_losses is not None:
            lines.append("  loss/epoch  labels-only " + " ".join(f"{v:.4f}" for v in self.baseline_epoch_losses))
        return "\n".join(lines)


def count_parameters(model: Any) -> int:
    """Number of parameters of a torch module (trainable or not; buffers excluded)."""
    return int(sum(p.numel() for p in model.parameters()))


def import_class(spec: str) -> Any:
    """Import ``package.module:Class``; raise SourceModelError naming what is wrong."""
    from edge_sdk.converters.source_common import import_class as _import_class

    return _import_class(spec, "model class")


def _first_conv_channels(model: Any) -> int | None:
    torch = require("torch", "torch", "knowledge distillation")
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels)
    return None


def load_image_folder(
    folder: str | Path, preprocessing: Preprocessing, class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load ``folder/<class>/<image>`` into (inputs (N, ...) float32, labels int64, class names).

    Classes are the sorted subfolder names, or `class_names` (then every subfolder must be one of them, so a
    validation folder gets the training folder's label indices).
    """
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"image folder {root} does not exist: give a folder with one subfolder per class")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise CalibrationError(f"{root} has no class subfolders: arrange images as {root}/<class>/<image>")
    names = list(class_names) if class_names is not None else found
    unknown = [n for n in found if n not in names]
    if unknown:
        raise CalibrationError(f"{root} has class folders {unknown} that the training data does not have")
    xs: list[np.ndarray] = []
    ys: list[int] = []
    grayscale = preprocessing.color == "GRAY"
    for name in found:
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            x = preprocessing.apply(decode_image(path, grayscale=grayscale))[0]
            if xs and x.shape != xs[0].shape:
                raise CalibrationError(f"{path} gives an input of shape {x.shape}, others {xs[0].shape}: "
                                       "set a resize size so every image has the same size")
            xs.append(x)
            ys.append(names.index(name))
    if not xs:
        raise CalibrationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), names


def _as_arrays(
    data: Dataset, what: str, preprocessing: Preprocessing, class_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    if isinstance(data, (str, Path)):
        return load_image_folder(data, preprocessing, class_names)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise CalibrationError(f"{what} must be (inputs, labels) arrays or an image folder path")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if len(x) != len(y) or len(x) == 0:
        raise CalibrationError(f"{what}: {len(x)} inputs but {len(y)} labels; give one integer label per input")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise CalibrationError(f"{what} labels must be a 1-D integer array (class indices), got {y.dtype} {y.shape}")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64), None


def _logits(model: Any, x: Any, batch_size: int) -> Any:
    torch = require("torch", "torch", "knowledge distillation")
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _accuracy(model: Any, x: Any, y: Any, batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    try:
        return int((_logits(model, x, batch_size).argmax(1) == y).sum()) / len(y)
    finally:
        model.train(was_training)


def distillation_loss(student_logits: Any, teacher_logits: Any, labels: Any, *, temperature: float = 4.0,
                      alpha: float = 0.7) -> Any:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)``.

    KL is averaged over the batch; the T^2 factor keeps the soft-target gradients on the scale of the label term.
    """
    torch = require("torch", "torch", "knowledge distillation")
    functional = torch.nn.functional
    ce = functional.cross_entropy(student_logits, labels)
    kl = functional.kl_div(functional.log_softmax(student_logits / temperature, dim=1),
                           functional.log_softmax(teacher_logits / temperature, dim=1),
                           reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def _train(model: Any, x: Any, y: Any, soft: Any | None, *, temperature: float, alpha: float, epochs: int,
           lr: float, batch_size: int, seed: int) -> list[float]:
    """Adam with a cosine-decayed lr; `soft` = teacher logits (distillation) or None (labels only)."""
    torch = require("torch", "torch", "knowledge distillation")
    functional = torch.nn.functional
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * -(-len(x) // batch_size))
    losses: list[float] = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            out = model(x[idx])
            if soft is None:
                loss = functional.cross_entropy(out, y[idx])
            else:
                loss = distillation_loss(out, soft[idx], y[idx], temperature=temperature, alpha=alpha)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    model.eval()
    return losses


def _check_options(temperature: float, alpha: float, epochs: int, lr: float, batch_size: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the teacher's soft targets) must be within [0, 1], not {alpha}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")


def distill(
    teacher: Any,
    student: Any,
    train_data: Dataset,
    *,
    val_data: Dataset | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 5,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    baseline: bool = False,
    preprocessing: Preprocessing | None = None,
    image_size: tuple[int, int] | None = None,
    threads: int | None = None,
) -> DistillResult:
    """Train `student` (a torch module, trained in place) on `teacher`'s softened outputs plus the labels.

    `train_data` / `val_data`: ``(x, y)`` arrays or an image folder with one subfolder per class. Folders are
    decoded with `preprocessing`, by default grayscale or RGB after the teacher's first Conv2d, scaled to [0, 1],
    NCHW, resized to `image_size` (H, W) when given. `baseline=True` also trains a copy of the initial student
    on the labels alone with the same budget and seed (reported, not returned). `threads` sets torch's intra-op
    threads for the call (1 is fastest on a busy small machine). Returns a `DistillResult`.
    """
    torch = require("torch", "torch", "knowledge distillation")
    _check_options(temperature, alpha, epochs, lr, batch_size)
    for name, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, torch.nn.Module):
            raise SourceModelError(f"the {name} must be a torch.nn.Module, not {type(model).__name__}")
    if preprocessing is None:
        gray = _first_conv_channels(teacher) == 1
        preprocessing = Preprocessing(size=image_size, color="GRAY" if gray else "RGB", layout="NCHW")
    x_np, y_np, class_names = _as_arrays(train_data, "train_data", preprocessing, None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    teacher_was_training = teacher.training
    started = time.perf_counter()
    try:
        x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
        teacher.eval()
        try:
            soft = _logits(teacher, x, 500)
        except RuntimeError as exc:
            raise CalibrationError(f"the teacher cannot run on train_data of shape {tuple(x.shape)} "
                                   f"({str(exc).splitlines()[0][:120]}): give inputs in the model's layout") from None
        num_classes = soft.shape[1]
        with torch.no_grad():
            student.eval()
            probe = student(x[:2])
        if probe.shape[1] != num_classes:
            raise SourceModelError(f"the student has {probe.shape[1]} outputs, the teacher {num_classes}: "
                                   "give both the same classes")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise CalibrationError(f"train_data labels span {int(y.min())}..{int(y.max())}, the models have "
                                   f"{num_classes} classes: labels must be class indices 0..{num_classes - 1}")
        initial = copy.deepcopy(student) if baseline else None
        options = dict(temperature=temperature, alpha=alpha, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        losses = _train(student, x, y, soft, **options)
        seconds = time.perf_counter() - started
        base_losses = _train(initial, x, y, None, **options) if initial is not None else None
        base_seconds = time.perf_counter() - started - seconds if initial is not None else None
        acc_t = acc_s = acc_b = None
        val_size = 0
        if val_data is not None:
            xv_np, yv_np, _ = _as_arrays(val_data, "val_data", preprocessing, class_names)
            xv, yv = torch.from_numpy(xv_np), torch.from_numpy(yv_np)
            val_size = len(xv)
            try:
                acc_t, acc_s = _accuracy(teacher, xv, yv), _accuracy(student, xv, yv)
            except RuntimeError as exc:
                raise CalibrationError(f"the models cannot run on val_data of shape {tuple(xv.shape)} "
                                       f"({str(exc).splitlines()[0][:120]}): give it the train_data's layout") from None
            acc_b = _accuracy(initial, xv, yv) if initial is not None else None
    finally:
        teacher.train(teacher_was_training)
        torch.set_num_threads(previous_threads)
    return DistillResult(
        student=student.eval(), teacher_parameters=count_parameters(teacher),
        student_parameters=count_parameters(student), teacher_accuracy=acc_t, student_accuracy=acc_s,
        baseline_accuracy=acc_b, epoch_losses=losses, baseline_epoch_losses=base_losses, temperature=temperature,
        alpha=alpha, epochs=epochs, seed=seed, train_size=len(x_np), val_size=val_size,
        train_seconds=round(seconds, 2), baseline_seconds=None if base_seconds is None else round(base_seconds, 2),
        class_names=class_names,
    )
