"""Labelled image data for calibration and scoring: one spec string, one validated split.

Spec forms (``SPEC_FORMS``)::

    digits                    sklearn's bundled 8x8 digits, float32 (N, 1, 8, 8) in [0, 1],
                              fixed stratified 80/20 split (random_state=0)
    mnist:DIR                 DIR/mnist_train.npz and DIR/mnist_test.npz, uint8 ``x`` (N, 28, 28)
                              and ``y`` -> float32 (N, 1, 28, 28) = x / 255
    cifar10:DIR               DIR/cifar10_train.npz and DIR/cifar10_test.npz, uint8 ``x``
                              (N, 32, 32, 3) RGB and ``y`` -> float32 (N, 3, 32, 32) = x / 255
                              (any normalisation belongs to the model)
    npz:TRAIN.npz,TEST.npz    float ``x`` used as stored, integer ``y``

Every problem is a one-line ``InputError`` naming the file and what is wrong with it.
``x`` arrays are float32, ``y`` int64, all read-only.
"""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import InputError

SPEC_FORMS = "'digits', 'mnist:DIR', 'cifar10:DIR' or 'npz:TRAIN.npz,TEST.npz'"


@dataclass(frozen=True)
class DataSplit:
    """A named train/test split; x float32 (N, ...), y int64 (N,), read-only."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _readonly(arr: np.ndarray, dtype: type) -> np.ndarray:
    out = np.ascontiguousarray(arr, dtype=dtype)
    out.setflags(write=False)
    return out


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """int64 labels; refuses non-integer values, negative values and non-1-D arrays."""
    if y.ndim != 1:
        raise InputError(f"{where}: labels y must be 1-D, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise InputError(f"{where}: labels y must be integers, got non-integer values")
    elif y.dtype.kind not in "iu":
        raise InputError(f"{where}: labels y must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise InputError(f"{where}: labels y must be >= 0, found {y.min()}")
    return _readonly(y, np.int64)


def _checked(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (x, y) pair and return it as read-only float32 / int64."""
    if x.dtype.kind != "f":
        raise InputError(f"{where}: x must be a float array, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{where}: x must be (N, ...) with N > 0, got shape {x.shape}")
    if y.ndim != 1:
        raise InputError(f"{where}: labels y must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise InputError(f"{where}: x has {len(x)} samples but y has {len(y)} labels")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{where}: x contains NaN or Inf values")
    return _readonly(x, np.float32), _labels(y, where)


def _read_npz(path: Path, keys: tuple[str, ...] = ("x", "y")) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of an .npz file (never unpickling objects)."""
    if not path.is_file():
        raise InputError(f"data file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise InputError(f"{path}: missing array(s) {missing}; found {sorted(npz.files)}")
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError,
            zlib.error) as err:  # NotImplementedError: unknown zip version/compression
        raise InputError(f"{path}: not a readable .npz file ({err})") from None


def _split(name: str, train: tuple, test: tuple) -> DataSplit:
    (x_train, y_train), (x_test, y_test) = train, test
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(f"{name}: train samples have shape {x_train.shape[1:]} but test "
                         f"samples {x_test.shape[1:]}")
    return DataSplit(name, x_train, y_train, x_test, y_test)


def _digits(arg: str) -> DataSplit:
    """sklearn's bundled digits, pixel / 16, stratified 80/20 split."""
    if arg:
        raise InputError(f"data spec 'digits' takes no argument, got 'digits:{arg}'")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    return _split("digits", _checked(x_tr, y_tr, "digits train"),
                  _checked(x_te, y_te, "digits test"))


def _uint8_images(path: Path, layout: str, check: Callable[[np.ndarray], bool],
                  to_nchw: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of ``layout`` (checked by ``check``) -> float32 NCHW in [0, 1]."""
    arrays = _read_npz(path)
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.uint8 or not check(x):
        raise InputError(f"{path}: x must be uint8 {layout}, got {x.dtype} {x.shape}")
    if y.dtype.kind not in "iu":
        raise InputError(f"{path}: y must be an integer array, got dtype {y.dtype}")
    images = to_nchw(x).astype(np.float32, order="C")  # one C-order copy, scaled in place
    images /= 255.0
    return _checked(images, y, str(path))


def _mnist_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return _uint8_images(path, "(N, 28, 28)", lambda x: x.ndim == 3, lambda x: x[:, None])


def _cifar10_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """RGB (N, 32, 32, 3) -> (N, 3, 32, 32): channels first, as torch models take them."""
    return _uint8_images(path, "(N, 32, 32, 3) RGB", lambda x: x.ndim == 4 and x.shape[3] == 3,
                         lambda x: x.transpose(0, 3, 1, 2))


def _image_dir(kind: str, arg: str, part: Callable[[Path], tuple]) -> DataSplit:
    """DIR/<kind>_train.npz and DIR/<kind>_test.npz read by ``part``."""
    if not arg:
        raise InputError(f"data spec '{kind}:DIR' needs a directory, e.g. {kind}:data/{kind}")
    root = Path(arg)
    if root.exists() and not root.is_dir():
        raise InputError(f"{kind}:{root}: {root} is a file; {kind}:DIR needs the directory "
                         f"holding {kind}_train.npz and {kind}_test.npz")
    if not root.is_dir():
        raise InputError(f"{kind} data directory {root} not found")
    return _split(f"{kind}:{root}", part(root / f"{kind}_train.npz"),
                  part(root / f"{kind}_test.npz"))


def _mnist(arg: str) -> DataSplit:
    """MNIST from DIR/mnist_{train,test}.npz (uint8), scaled to [0, 1]."""
    return _image_dir("mnist", arg, _mnist_part)


def _cifar10(arg: str) -> DataSplit:
    """CIFAR-10 from DIR/cifar10_{train,test}.npz (uint8 RGB), scaled to [0, 1]."""
    return _image_dir("cifar10", arg, _cifar10_part)


def _npz_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays = _read_npz(path)
    return _checked(arrays["x"], arrays["y"], str(path))


def _npz(arg: str) -> DataSplit:
    """User arrays: npz:TRAIN.npz,TEST.npz with float x and integer y."""
    parts = [p for p in arg.split(",") if p]
    if len(parts) != 2:
        raise InputError(f"data spec 'npz:{arg}' must name two files: npz:TRAIN.npz,TEST.npz")
    return _split(f"npz:{arg}", _npz_part(Path(parts[0])), _npz_part(Path(parts[1])))


LOADERS: dict[str, Callable[[str], DataSplit]] = {"digits": _digits, "mnist": _mnist,
                                                  "cifar10": _cifar10, "npz": _npz}


def load_data(spec: str) -> DataSplit:
    """Load and validate the split named by ``spec`` (see ``SPEC_FORMS``)."""
    kind, _, arg = spec.partition(":")
    loader = LOADERS.get(kind.strip())
    if loader is None:
        raise InputError(f"unknown data spec {spec!r}: use {SPEC_FORMS}")
    return loader(arg.strip())


def check_input_shape(split: DataSplit, shape: tuple[int, ...]) -> None:
    """Raise ``InputError`` when the data's per-sample shape is not the model's input shape."""
    got = tuple(split.x_train.shape[1:])
    if got != tuple(shape):
        raise InputError(f"data {split.name} has samples of shape {got} but the model expects "
                         f"input shape {tuple(shape)}")


def check_labels(split: DataSplit, classes: int) -> None:
    """Raise ``InputError`` when a label is not a class index of a model with ``classes``
    outputs (labels are already checked to be integers >= 0)."""
    for part, y in (("train", split.y_train), ("test", split.y_test)):
        if y.size and int(y.max()) >= classes:
            raise InputError(f"data {split.name} {part} labels go up to {int(y.max())} but the "
                             f"model has {classes} outputs (labels must be 0..{classes - 1})")
