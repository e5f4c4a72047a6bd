"""toolchain.data: the three spec forms and every validation error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from toolchain.data import DataSplit, check_input_shape, load_data

# The shared data folder lies beside the repository (CI puts a copy of shared/ there too).
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
CIFAR10_DIR = MNIST_DIR.parent / "cifar10"


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _pair(tmp_path: Path, x=None, y=None, x_test=None, y_test=None) -> str:
    rng = np.random.default_rng(0)
    x = rng.random((6, 3, 4, 4), dtype=np.float32) if x is None else x
    y = np.arange(6) % 3 if y is None else y
    train = _npz(tmp_path / "train.npz", x=x, y=y)
    test = _npz(tmp_path / "test.npz", x=x if x_test is None else x_test,
                y=y if y_test is None else y_test)
    return f"npz:{train},{test}"


def test_digits_split() -> None:
    data = load_data("digits")
    assert isinstance(data, DataSplit) and data.name == "digits"
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert np.array_equal(np.bincount(data.y_test), np.bincount(data.y_test, minlength=10))
    assert min(np.bincount(data.y_test)) >= 35  # stratified: every class ~36 times
    assert not data.x_train.flags.writeable and not data.y_test.flags.writeable
    again = load_data("digits")
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y_test, data.y_test)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="../shared/data/mnist is not beside the repo")
def test_mnist_real_data() -> None:
    data = load_data(f"mnist:{MNIST_DIR}")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert 0.0 == data.x_test.min() and data.x_test.max() == 1.0
    assert set(np.unique(data.y_test)) == set(range(10))


@pytest.mark.skipif(not CIFAR10_DIR.is_dir(), reason="../shared/data/cifar10 is not beside the repo")
def test_cifar10_real_data() -> None:
    data = load_data(f"cifar10:{CIFAR10_DIR}")
    assert data.name == f"cifar10:{CIFAR10_DIR}"
    assert data.x_train.shape == (20000, 3, 32, 32) and data.x_test.shape == (10000, 3, 32, 32)
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert data.x_test.flags.c_contiguous and not data.x_test.flags.writeable
    assert 0.0 == data.x_test.min() and data.x_test.max() == 1.0
    assert set(np.unique(data.y_test)) == set(range(10))
    with np.load(CIFAR10_DIR / "cifar10_test.npz") as raw:  # channel c of pixel (i, j)
        assert data.x_test[7, 2, 5, 30] == np.float32(raw["x"][7, 5, 30, 2]) / np.float32(255)


def test_npz_used_as_stored(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(6, 3, 4, 4)).astype(np.float64)
    data = load_data(_pair(tmp_path, x=x, y=np.array([0, 1, 2, 0, 1, 2], np.uint8)))
    assert np.array_equal(data.x_train, x.astype(np.float32))
    assert data.y_train.dtype == np.int64 and list(data.y_train) == [0, 1, 2, 0, 1, 2]
    check_input_shape(data, (3, 4, 4))
    with pytest.raises(InputError, match=r"\(3, 4, 4\).*expects input shape \(1, 8, 8\)"):
        check_input_shape(data, (1, 8, 8))


@pytest.mark.parametrize("spec, message", [
    ("cifar100:x", "unknown data spec 'cifar100:x': use 'digits', 'mnist:DIR', 'cifar10:DIR'"),
    ("cifar10", "'cifar10:DIR' needs a directory"),
    ("cifar10:/nonexistent/dir", "cifar10 data directory /nonexistent/dir not found"),
    ("digits:foo", "takes no argument"),
    ("mnist:", "needs a directory"),
    ("mnist:/nonexistent/dir", "not found"),
    ("npz:only_one.npz", "must name two files"),
    ("npz:/nonexistent/a.npz,/nonexistent/b.npz", "a.npz not found"),
])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_data(spec)


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((6, 3, 4, 4), np.int32)), "x must be a float array, got dtype int32"),
    (dict(y=np.arange(5)), "x has 6 samples but y has 5 labels"),
    (dict(y=np.array([0, 1, -2, 0, 1, 2])), "labels y must be >= 0, found -2"),
    (dict(y=np.array([0, 1, 1.5, 0, 1, 2])), "labels y must be integers, got non-integer"),
    (dict(y=np.array(list("abcdef"))), "labels y must be integers, got dtype <U1"),
    (dict(x=np.full((6, 3, 4, 4), np.nan, np.float32)), "x contains NaN or Inf"),
    (dict(x=np.full((6, 3, 4, 4), np.inf, np.float32)), "x contains NaN or Inf"),
    (dict(x_test=np.zeros((6, 3, 5, 5), np.float32)), r"train samples have shape \(3, 4, 4\) "
                                                     r"but test samples \(3, 5, 5\)"),
])
def test_npz_validation(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        load_data(_pair(tmp_path, **change))
    assert "\n" not in str(err.value)


def test_npz_missing_key_and_corrupt_file(tmp_path: Path) -> None:
    train = _npz(tmp_path / "train.npz", images=np.zeros((2, 3), np.float32), y=np.zeros(2))
    with pytest.raises(InputError, match=r"missing array\(s\) \['x'\]; found \['images', 'y'\]"):
        load_data(f"npz:{train},{train}")
    bad = tmp_path / "bad.npz"
    bad.write_text("not an npz")
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_data(f"npz:{bad},{bad}")


def test_mnist_validation(tmp_path: Path) -> None:
    x, y = np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
    _npz(tmp_path / "mnist_train.npz", x=x, y=y)
    with pytest.raises(InputError, match="mnist_test.npz not found"):
        load_data(f"mnist:{tmp_path}")
    _npz(tmp_path / "mnist_test.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(InputError, match=r"x must be uint8 \(N, 28, 28\), got float32"):
        load_data(f"mnist:{tmp_path}")
    _npz(tmp_path / "mnist_test.npz", x=x, y=y)
    data = load_data(f"mnist:{tmp_path}")
    assert data.x_test.shape == (4, 1, 28, 28) and data.x_test.dtype == np.float32


def test_cifar10_layout_and_validation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 9, 3, 3, 1], np.uint8)
    _npz(tmp_path / "cifar10_train.npz", x=x, y=y)
    with pytest.raises(InputError, match="cifar10_test.npz not found"):
        load_data(f"cifar10:{tmp_path}")
    for bad, got in ((x.transpose(0, 3, 1, 2), r"uint8 \(5, 3, 32, 32\)"),
                     (x.astype(np.float32), r"float32 \(5, 32, 32, 3\)"),
                     (x[..., 0], r"uint8 \(5, 32, 32\)")):
        _npz(tmp_path / "cifar10_test.npz", x=bad, y=y)
        with pytest.raises(InputError, match=r"x must be uint8 \(N, 32, 32, 3\) RGB, got " + got):
            load_data(f"cifar10:{tmp_path}")
    _npz(tmp_path / "cifar10_test.npz", x=x, y=y.astype(np.float32))
    with pytest.raises(InputError, match="y must be an integer array, got dtype float32"):
        load_data(f"cifar10:{tmp_path}")
    _npz(tmp_path / "cifar10_test.npz", x=x[:3], y=y)
    with pytest.raises(InputError, match="x has 3 samples but y has 5 labels"):
        load_data(f"cifar10:{tmp_path}")
    _npz(tmp_path / "cifar10_test.npz", x=x, y=y)
    data = load_data(f"cifar10:{tmp_path}")
    want = np.moveaxis(x, 3, 1).astype(np.float64) / 255.0
    assert data.x_test.shape == (5, 3, 32, 32) and data.x_test.dtype == np.float32
    np.testing.assert_array_equal(data.x_test, want.astype(np.float32))
    assert list(data.y_train) == [0, 9, 3, 3, 1] and data.y_train.dtype == np.int64
