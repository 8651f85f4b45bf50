"""Calibration and validation data: ready tensors (.npy/.npz), an image folder, or Python data.

Everything becomes a :class:`SampleSet`: per input name, an array whose first axis is the sample
axis, each sample already in the model's input layout with a leading batch dimension of 1 removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import CalibrationError
from edge_sdk.preprocessing import IMAGE_SUFFIXES, Preprocessing, decode_image

__all__ = ["CalibrationSource", "SampleSet", "load_samples"]

CalibrationSource = str | Path | np.ndarray | Mapping[str, np.ndarray] | Iterable[Any] | Callable[[], Iterable[Any]]


@dataclass
class SampleSet:
    """Stacked samples: ``arrays[i]`` has shape (N, *input_shape[1:]) for the model's i-th input."""

    arrays: list[np.ndarray]
    names: list[str] | None = None
    origin: str = "python"
    batch: int = 1  # rows per model call: > 1 only for models with a fixed batch size (logreg_iris takes [3, 2])

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0]) // self.batch if self.arrays else 0

    def sample(self, i: int) -> list[np.ndarray]:
        """Sample ``i`` as a list of arrays of ``batch`` rows (batch-1 for almost every model), one per input."""
        b = self.batch
        return [a[i * b:(i + 1) * b] for a in self.arrays]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        for i in range(len(self)):
            yield self.sample(i)

    def take(self, n: int | None) -> SampleSet:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return SampleSet([a[:n * self.batch] for a in self.arrays], self.names, self.origin, self.batch)

    def split(self, n: int) -> tuple[SampleSet, SampleSet]:
        """The first ``n`` samples and the rest."""
        k = n * self.batch
        return (SampleSet([a[:k] for a in self.arrays], self.names, self.origin, self.batch),
                SampleSet([a[k:] for a in self.arrays], self.names, self.origin, self.batch))

    def with_batch(self, batch: int) -> SampleSet:
        """The same rows grouped ``batch`` per model call (a model whose batch size is fixed above 1)."""
        return SampleSet(self.arrays, self.names, self.origin, max(1, int(batch)))

    def check(self, input_shapes: list[list[int | None]], what: str) -> None:
        """Raise CalibrationError unless the samples fit the model's inputs."""
        if len(self.arrays) != len(input_shapes):
            raise CalibrationError(f"{what} data has {len(self.arrays)} input(s) but the model takes "
                                   f"{len(input_shapes)}: give one array per input (.npz with input names)")
        for arr, shape in zip(self.arrays, input_shapes, strict=True):
            want = list(shape[1:])
            got = list(arr.shape[1:])
            if len(want) != len(got) or any(w not in (None, -1) and w != g for w, g in zip(want, got, strict=True)):
                raise CalibrationError(
                    f"{what} samples have shape {['N', *got]} but the model input is {list(shape)}: "
                    f"give samples shaped (N, {', '.join(str(s) for s in want)})")
            if not np.isfinite(arr).all():
                raise CalibrationError(f"{what} data contains NaN or Inf: clean it before converting")


def _from_array(arr: np.ndarray, input_shape: list[int | None] | None, origin: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub":
        raise CalibrationError(f"{origin}: expected a numeric array, got dtype {arr.dtype}")
    # accept (N, 1, C, H, W) as well as (N, C, H, W) when the model shape is (1, C, H, W)
    if input_shape is not None and arr.ndim == len(input_shape) + 1 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if input_shape is not None and arr.ndim == len(input_shape) - 1:
        arr = arr[None]
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


def load_samples(
    source: CalibrationSource,
    *,
    input_shapes: list[list[int | None]] | None = None,
    input_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    limit: int | None = None,
    what: str = "calibration",
) -> SampleSet:
    """Load samples from a .npy/.npz file, an image folder, an array, a dict or an iterable/callable."""
    shape0 = input_shapes[0] if input_shapes else None
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise CalibrationError(f"{what} data {p} does not exist: give a .npy/.npz file or an image folder")
        if p.is_dir():
            return _from_folder(p, preprocessing, limit, what)
        if p.suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise CalibrationError(f"{what} file {p} is not a readable .npy ({exc})") from None
            return SampleSet([_from_array(arr, shape0, str(p))], None, str(p)).take(limit)
        if p.suffix == ".npz":
            try:
                with np.load(p, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
            except (ValueError, OSError) as exc:
                raise CalibrationError(f"{what} file {p} is not a readable .npz ({exc})") from None
            return _from_mapping(data, input_shapes, input_names, str(p)).take(limit)
        raise CalibrationError(f"{what} data {p} must be a .npy, .npz or a folder of images")
    if isinstance(source, np.ndarray):
        return SampleSet([_from_array(source, shape0, "array")]).take(limit)
    if isinstance(source, Mapping):
        return _from_mapping(dict(source), input_shapes, input_names, "mapping").take(limit)
    if callable(source):
        source = source()
    if isinstance(source, Iterable):
        items: list[list[np.ndarray]] = []
        for item in source:
            if isinstance(item, Mapping):
                item = [item[n] for n in input_names] if input_names else list(item.values())
            elif not isinstance(item, (list, tuple)):
                item = [item]
            items.append([np.asarray(x) for x in item])
            if limit is not None and len(items) >= limit:
                break
        if not items:
            raise CalibrationError(f"{what} iterable yielded no samples")
        arrays = []
        for k in range(len(items[0])):
            shape_k = input_shapes[k] if input_shapes and k < len(input_shapes) else None
            parts = [_from_array(it[k], shape_k, "iterable") for it in items]
            arrays.append(np.concatenate([x if x.ndim and shape_k and x.ndim == len(shape_k) else x[None]
                                          for x in parts]))
        return SampleSet(arrays, None, "iterable")
    raise CalibrationError(f"unsupported {what} source {type(source).__name__}: give a .npy/.npz path, "
                           "an image folder, an array or an iterable of arrays")


def _from_mapping(data: dict[str, np.ndarray], input_shapes: list | None, names: list[str] | None,
                  origin: str) -> SampleSet:
    keys = list(data)
    if names and all(n in data for n in names):
        keys = list(names)
    shapes = input_shapes or [None] * len(keys)
    return SampleSet([_from_array(data[k], s, origin) for k, s in zip(keys, shapes, strict=False)], keys, origin)


def _from_folder(folder: Path, pre: Preprocessing | None, limit: int | None, what: str) -> SampleSet:
    if pre is None or pre.size is None:
        raise CalibrationError(f"{what} folder {folder} needs declared preprocessing: pass --resize HxW "
                               "(and --mean/--std/--scale/--color/--layout as the model expects)")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    files = files[:limit] if limit else files
    tensors = [pre.apply(decode_image(f, grayscale=pre.color == "GRAY"))[0] for f in files]
    return SampleSet([np.stack(tensors)], None, str(folder))
