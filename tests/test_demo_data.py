"""`make demo` without the Debian Fashion-MNIST (macOS, a non-root user): examples/data.py falls back to the real
subset shipped as examples/fashion_mnist_subset.npz (issue 16), and that subset is the Debian data's first images."""

from __future__ import annotations

from pathlib import Path

import data  # examples/data.py (tests/conftest.py puts examples/ on sys.path)
import numpy as np
import pytest


@pytest.fixture
def no_debian_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "absent")
    data._fashion_cached.cache_clear()
    yield
    monkeypatch.undo()
    data._fashion_cached.cache_clear()


def test_subset_answers_when_the_debian_folder_is_absent(no_debian_dataset: None) -> None:
    x, y = data.load_fashion_mnist("train")
    assert x.shape == (6000, 28, 28) and x.dtype == np.uint8 and y.shape == (6000,)
    assert not x.flags.writeable and set(np.unique(y)) == set(range(10))
    xt, yt = data.fashion_tensors("test", "NHWC", n=2000)
    assert xt.shape == (2000, 28, 28, 1) and 0.0 <= xt.min() and xt.max() <= 1.0 and yt.dtype == np.int64


def test_subset_is_the_real_datasets_first_images(no_debian_dataset: None) -> None:
    sub_x, sub_y = data.load_fashion_mnist("test")
    data._fashion_cached.cache_clear()
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not (debian / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("the Debian dataset-fashion-mnist package is not installed here: nothing to compare with")
    full_x = data._read_idx(debian / "t10k-images-idx3-ubyte.gz")
    full_y = data._read_idx(debian / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(sub_x, full_x[:2000]) and np.array_equal(sub_y, full_y[:2000])


def test_an_empty_folder_still_names_the_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing folder without the files is a broken install, not "no dataset": no silent fallback."""
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path)
    data._fashion_cached.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
            data.load_fashion_mnist("test")
    finally:
        monkeypatch.undo()
        data._fashion_cached.cache_clear()
