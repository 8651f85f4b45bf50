"""A custom Keras layer for the --custom-objects test (importable as keras_custom_layer:ScaledTanh)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="edge_sdk_tests")
class ScaledTanh(keras.layers.Layer):
    """tanh(x * scale) with a learnt-looking constant scale: a layer Keras cannot rebuild without its class."""

    def __init__(self, scale: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return keras.ops.tanh(x * self.scale)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}
