"""Optimize without losing what the model knows: structured / magnitude pruning and knowledge distillation
(PyTorch). torch is imported inside the functions that need it (extra ``torch``)."""

from edge_sdk.optimize.distill import DistillResult, distill

__all__ = ["DistillResult", "distill"]
