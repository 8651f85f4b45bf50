"""The retraining pipeline's train entry point for the Fashion-MNIST CNN (`[train] entry = "retrain_fashion:train"`).

Fine-tunes the current `FashionCNN` (its state_dict, the `current_model` path the pipeline passes) on the gathered
data: the original training rows plus the labelled device samples (`data.is_sample`), the samples repeated
`sample_repeat` times per epoch so that a few thousand drifted images weigh against tens of thousands of original
ones. Adam with a cosine-decayed learning rate, channels-last, one intra-op thread (see examples/train.py: two
spinning OpenMP threads on a busy 2-core machine were 10x slower).

`epochs=0` returns the current model unchanged (a "v2" that cannot beat v1: the gate refuses it). Returns
`(model, figures)`; the pipeline saves the model's state_dict and converts it with the model class the current
version was converted with.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["train"]


def train(data: Any, current_model: Path | None, *, epochs: int = 1, lr: float = 5e-4, batch_size: int = 64,
          sample_repeat: int = 4, max_original: int | None = None, seed: int = 0, threads: int = 1) -> tuple[Any, dict]:
    """Fine-tune `FashionCNN` from `current_model` (a state_dict; a fresh net when None) on `data`."""
    import torch

    if __package__:
        from .torch_models import FashionCNN
    else:
        from torch_models import FashionCNN

    torch.manual_seed(seed)
    model = FashionCNN()
    if current_model is not None:
        model.load_state_dict(torch.load(current_model, map_location="cpu", weights_only=True), strict=True)
    if epochs <= 0:
        return model.eval(), {"epochs": 0, "note": "current model returned unchanged"}
    rng = np.random.default_rng(seed)
    original = np.flatnonzero(~data.is_sample)
    if max_original is not None and len(original) > max_original:
        original = np.sort(rng.choice(original, max_original, replace=False))
    samples = np.flatnonzero(data.is_sample)
    index = np.concatenate([original, np.repeat(samples, max(1, sample_repeat))])
    x, y = torch.from_numpy(np.ascontiguousarray(data.inputs)), torch.from_numpy(data.labels.astype(np.int64))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * -(-len(index) // batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        loss_fn = torch.nn.CrossEntropyLoss()
        losses = []
        for _ in range(epochs):
            model.train()
            order = torch.from_numpy(rng.permutation(index))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx].contiguous(memory_format=torch.channels_last)), y[idx])
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
        model = model.to(memory_format=torch.contiguous_format).eval()
    finally:
        torch.set_num_threads(previous_threads)
    return model, {"epochs": epochs, "rows_per_epoch": len(index), "original_rows": len(original),
                   "sample_rows": len(samples), "sample_repeat": sample_repeat, "lr": lr,
                   "final_loss": round(float(np.mean(losses[-50:])), 4), "seconds": round(time.perf_counter() - t0, 1)}
