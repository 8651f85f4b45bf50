"""Keras 2 semantics that Keras 3 changed, needed to rebuild old Keras 2 models in Keras 3 exactly."""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="edge_sdk_corpus")
def hard_sigmoid_k2(x: Any) -> Any:
    """Keras 2's hard_sigmoid, ``clip(0.2 x + 0.5, 0, 1)``. Keras 3's is ``relu6(x + 3) / 6`` (slope 1/6): an
    LSTM rebuilt with the Keras 3 one differs by up to 0.3 in softmax output (measured on shakkala)."""
    return keras.ops.clip(0.2 * x + 0.5, 0.0, 1.0)


def rebuild_sequential(old: Any, input_shape: tuple[int, ...]) -> keras.Sequential:
    """Rebuild a tf_keras Sequential of Embedding / Bidirectional(LSTM|GRU) / BatchNormalization / Dense in
    Keras 3 and copy its weights. Only the layer kinds the corpus needs are handled."""
    new = keras.Sequential([keras.Input(input_shape, dtype="float32")])
    for layer in old.layers:
        cfg = layer.get_config()
        kind = type(layer).__name__
        if kind == "Embedding":
            new.add(keras.layers.Embedding(cfg["input_dim"], cfg["output_dim"], mask_zero=cfg["mask_zero"]))
        elif kind == "Bidirectional":
            inner = cfg["layer"]["config"]
            rec = inner["recurrent_activation"]
            rnn = keras.layers.LSTM(inner["units"], activation=inner["activation"],
                                    recurrent_activation=hard_sigmoid_k2 if rec == "hard_sigmoid" else rec,
                                    use_bias=inner["use_bias"], return_sequences=inner["return_sequences"],
                                    unit_forget_bias=inner["unit_forget_bias"])
            if cfg["layer"]["class_name"] != "LSTM":
                raise NotImplementedError(cfg["layer"]["class_name"])
            new.add(keras.layers.Bidirectional(rnn, merge_mode=cfg["merge_mode"]))
        elif kind == "BatchNormalization":
            axis = cfg["axis"] if isinstance(cfg["axis"], int) else next(iter(cfg["axis"]))
            new.add(keras.layers.BatchNormalization(axis=axis, momentum=cfg["momentum"], epsilon=cfg["epsilon"],
                                                    center=cfg["center"], scale=cfg["scale"]))
        elif kind == "Dense":
            new.add(keras.layers.Dense(cfg["units"], activation=cfg["activation"], use_bias=cfg["use_bias"]))
        else:
            raise NotImplementedError(kind)
    new.set_weights(old.get_weights())
    return new
