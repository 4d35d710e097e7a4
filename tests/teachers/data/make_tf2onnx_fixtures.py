"""Regenerate the real tf2onnx teacher fixtures next to this file (needs TensorFlow and tf2onnx,
which the project does not install: run it in a separate environment, e.g.
``python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu tf2onnx``).

Written with tensorflow-cpu 2.21.0 and tf2onnx 1.17.0. Two small Keras CNNs with random weights
(the tests compare computations, not accuracy), each the way Keras users export classifiers:
- ``keras_cnn_tf2onnx_opset13.onnx``: NHWC float input of raw pixels in [0, 255], a Rescaling
  layer, Conv/BatchNorm/ReLU blocks, global pooling, Dense, Softmax output; opset 13.
- ``keras_cnn_tf2onnx_opset9_gray.onnx``: 1-channel 20x28 input in [0, 1], no BatchNorm, Softmax;
  opset 9 (the oldest tf2onnx writes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx

HERE = Path(__file__).resolve().parent


def _randomise_bn(model: tf.keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            n = gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n),
                               rng.normal(0, 0.5, n), rng.uniform(0.5, 1.5, n)])


def rgb_model() -> tf.keras.Model:
    inp = tf.keras.Input((32, 32, 3), name="image")
    x = tf.keras.layers.Rescaling(1 / 255.0)(inp)
    for ch in (8, 16):
        x = tf.keras.layers.Conv2D(ch, 3, padding="same", use_bias=False)(x)
        x = tf.keras.layers.BatchNormalization()(x)
        x = tf.keras.layers.ReLU()(x)
        x = tf.keras.layers.MaxPooling2D(pool_size=2)(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(10, activation="softmax")(x)
    return tf.keras.Model(inp, out)


def gray_model() -> tf.keras.Model:
    inp = tf.keras.Input((20, 28, 1), name="image")
    x = tf.keras.layers.Conv2D(6, 3, padding="valid", activation="relu")(inp)
    x = tf.keras.layers.AveragePooling2D(pool_size=2)(x)
    x = tf.keras.layers.Flatten()(x)
    out = tf.keras.layers.Dense(4, activation="softmax")(x)
    return tf.keras.Model(inp, out)


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    for name, model, opset in (("keras_cnn_tf2onnx_opset13.onnx", rgb_model(), 13),
                               ("keras_cnn_tf2onnx_opset9_gray.onnx", gray_model(), 9)):
        _randomise_bn(model, rng)
        spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image"),)
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=str(HERE / name))
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
