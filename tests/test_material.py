"""The real test material the other tests rely on: ImageNet MobileNetV2, photos, Fashion-MNIST, trained CNNs."""

from __future__ import annotations

import data
import numpy as np
import pytest


@pytest.mark.parametrize(("photo", "imagenet_class"), [("chelsea", 285), ("coffee", 967)])
def test_mobilenet_v2_classifies_real_photos(mobilenet_v2, photo, imagenet_class):
    import torch

    x = data.imagenet_preprocess(data.load_photo(photo))
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    with torch.no_grad():
        probs = mobilenet_v2(torch.from_numpy(x)).softmax(1)[0]
    assert int(probs.argmax()) == imagenet_class
    assert float(probs.max()) > 0.5


def test_mobilenet_v2_state_dict_keys_match_torchvision(mobilenet_v2_weights):
    import torch
    from torch_models import MobileNetV2

    state = torch.load(mobilenet_v2_weights, map_location="cpu", weights_only=True)
    assert set(state) == set(MobileNetV2().state_dict())
    assert "features.1.conv.0.0.weight" in state and "classifier.1.weight" in state
    assert mobilenet_v2_weights.stat().st_size > 13_000_000


def test_photo_crops_are_distinct_finite_and_normalised(photo_crops, mobilenet_v2):
    import torch

    assert photo_crops.shape == (240, 3, 224, 224) and photo_crops.dtype == np.float32
    assert np.isfinite(photo_crops).all()
    assert len({crop.tobytes() for crop in photo_crops}) == len(photo_crops)
    # ImageNet normalisation of real photos: roughly zero mean, unit spread per channel.
    assert np.all(np.abs(photo_crops.mean(axis=(0, 2, 3))) < 1.0)
    assert np.all((photo_crops.std(axis=(0, 2, 3)) > 0.5) & (photo_crops.std(axis=(0, 2, 3)) < 2.0))
    # Deterministic for a seed, different for another seed.
    again = data.photo_crops(n=8, seed=0)
    np.testing.assert_array_equal(again, photo_crops[:8])
    assert not np.array_equal(data.photo_crops(n=8, seed=1), again)
    # Varied enough to exercise a classifier: many distinct top-1 classes over the crops.
    with torch.no_grad():
        top1 = mobilenet_v2(torch.from_numpy(photo_crops[:80])).argmax(1).numpy()
    assert len(set(top1.tolist())) >= 10


@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_loads(split, count):
    x, y = data.load_fashion_mnist(split)
    assert x.shape == (count, 28, 28) and x.dtype == np.uint8
    assert y.shape == (count,)
    assert np.array_equal(np.unique(y), np.arange(10))
    assert np.all(np.bincount(y) == count // 10)
    assert x.max() == 255 and x.min() == 0


def test_fashion_tensors_layouts(fashion_test):
    x_nchw, y = fashion_test
    x_nhwc, y2 = data.fashion_tensors("test", "NHWC", n=100)
    assert x_nchw.shape == (10000, 1, 28, 28) and x_nchw.dtype == np.float32
    assert x_nhwc.shape == (100, 28, 28, 1)
    assert 0.0 <= x_nchw.min() and x_nchw.max() <= 1.0
    np.testing.assert_array_equal(x_nchw[:100, 0], x_nhwc[..., 0])
    np.testing.assert_array_equal(y[:100], y2)
    with pytest.raises(ValueError, match="layout"):
        data.fashion_tensors("test", "CHW")
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation")


def test_missing_fashion_files_name_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path)
    data._fashion_cached.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
            data.load_fashion_mnist("test")
    finally:
        monkeypatch.undo()
        data._fashion_cached.cache_clear()


def test_imagenet_preprocess_center_crop():
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, 250:350] = 255  # a white band in the middle survives the center crop
    x = data.imagenet_preprocess(image)
    assert x.shape == (1, 3, 224, 224)
    white = (1.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
    np.testing.assert_allclose(x[0, :, 112, 112], white, rtol=1e-5)
    np.testing.assert_allclose(x[0, :, 112, 0], -data.IMAGENET_MEAN / data.IMAGENET_STD, rtol=1e-5)


@pytest.mark.slow
def test_trained_torch_cnn_accuracy(fashion_torch_cnn, fashion_test):
    import torch

    x, y = fashion_test
    with torch.no_grad():
        accuracy = float((fashion_torch_cnn(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert accuracy >= 0.88
    fp32_bytes = sum(p.numel() * 4 for p in fashion_torch_cnn.parameters())
    layers = [m for m in fashion_torch_cnn.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    conv_fc = sum(m.weight.numel() for m in layers)
    assert conv_fc * 4 / fp32_bytes > 0.99  # weights dominate: int8 can reach <= 0.3x of fp32
    from train import cached_model

    reloaded = cached_model("torch")  # from the cache now: same weights
    for a, b in zip(reloaded.state_dict().values(), fashion_torch_cnn.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_trained_keras_cnn_accuracy(fashion_keras_cnn, fashion_test_nhwc):
    x, y = fashion_test_nhwc
    logits = fashion_keras_cnn.predict(x, batch_size=1000, verbose=0)
    assert float(np.mean(np.argmax(logits, axis=1) == y)) >= 0.88
    assert tuple(fashion_keras_cnn.input_shape) == (None, 28, 28, 1)
