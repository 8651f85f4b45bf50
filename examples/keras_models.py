"""Keras models shared by the examples, tests and benchmarks (Keras 3 / TensorFlow imported on first call)."""

from __future__ import annotations

from typing import Any

__all__ = ["build_keras_fashion_cnn"]


def build_keras_fashion_cnn(num_classes: int = 10) -> Any:
    """Return the Keras twin of `torch_models.FashionCNN`: input (N, 28, 28, 1) float32 in [0, 1] (NHWC).

    conv3x3(32)-BN-ReLU-maxpool, conv3x3(64)-BN-ReLU-maxpool, dense 128 ReLU, dense `num_classes` logits.
    BatchNormalization uses momentum 0.9: the default 0.99 leaves chance-level accuracy after a short run.
    The batch dimension is left free (convert with input shape [1, 28, 28, 1] for edge targets).
    """
    import keras

    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="fashion_cnn")
