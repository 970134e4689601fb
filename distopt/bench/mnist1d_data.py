"""MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024) without a download.

If the ``mnist1d`` package is installed, its own ``make_dataset`` generates the data (the global
NumPy random state it reseeds is saved and restored). Otherwise :func:`make_dataset` below
reproduces it: the same ten 12-point templates and the same transform (random zero padding,
linear dilation to 72 points, scaling, cyclic translation, correlated noise on the padding,
i.i.d. noise, shear, subsampling to 40 points), drawing from a ``numpy.random.RandomState`` in the
same order as the package, so with the default arguments it gives the package's arrays (the test
suite compares both when the package is present). 4000 training and 1000 test sequences of
length 40, standardised.
"""
from __future__ import annotations

import numpy as np

ARGS = {"num_samples": 5000, "train_split": 0.8, "template_len": 12, "padding": (36, 60), "scale_coeff": 0.4,
        "max_translation": 48, "corr_noise_scale": 0.25, "iid_noise_scale": 2e-2, "shear_scale": 0.75,
        "final_seq_length": 40, "seed": 42}


def templates() -> dict[str, np.ndarray]:
    """The ten 1-D digit templates, whitened, starting and ending at 0, scaled by 1/6."""
    d = np.asarray([
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ], dtype=np.float64)
    d -= d.mean(1, keepdims=True)
    d /= d.std(1, keepdims=True)
    d -= d[:, :1]
    return {"x": d / 6.0, "t": np.linspace(-5, 5, d.shape[1]) / 6.0, "y": np.arange(10)}


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` on a 1-D array (mode 'reflect', truncate 4.0)."""
    radius = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, radius, mode="symmetric")
    return np.convolve(padded, k[::-1], mode="valid")


def _transform(x: np.ndarray, rng: np.random.RandomState, a: dict) -> np.ndarray:
    low, high = a["padding"]
    p = low + int(rng.rand() * (high - low + 1))
    new_x = np.concatenate([x + 1e-8, np.zeros(p)])
    new_x = _interpolate(new_x, a["template_len"] + a["padding"][-1])
    new_x *= 1 + a["scale_coeff"] * (rng.rand() - 0.5)
    k = rng.choice(a["max_translation"])
    new_x = np.concatenate([new_x[-k:], new_x[:-k]])
    mask = new_x != 0
    noise = _gaussian_filter(a["corr_noise_scale"] * rng.randn(*new_x.shape), 2)
    new_x = mask * new_x + (1 - mask) * noise
    new_x = new_x + a["iid_noise_scale"] * rng.randn(*new_x.shape)
    coeff = a["shear_scale"] * (rng.rand() - 0.5)
    new_x = new_x - coeff * np.linspace(-0.5, 0.5, len(new_x))
    return _interpolate(new_x, a["final_seq_length"])


def make_dataset(**overrides: object) -> dict[str, np.ndarray]:
    """The MNIST-1D arrays ``x, y, x_test, y_test`` generated in NumPy (see the module docstring)."""
    a = {**ARGS, **overrides}
    rng = np.random.RandomState(a["seed"])
    tpl = templates()
    xs, ys = [], []
    per_class = a["num_samples"] // 10
    for label in range(10):
        for _ in range(per_class):
            xs.append(_transform(tpl["x"][label], rng, a))
            ys.append(label)
    order = rng.permutation(len(ys))
    x, y = np.stack(xs)[order], np.asarray(ys)[order]
    x = (x - x.mean()) / x.std()
    n = int(len(y) * a["train_split"])
    return {"x": x[:n], "y": y[:n], "x_test": x[n:], "y_test": y[n:]}


def load(prefer_package: bool = True) -> tuple[dict[str, np.ndarray], str]:
    """(arrays, source): the ``mnist1d`` package's generator if installed, else :func:`make_dataset`."""
    if prefer_package:
        try:
            from mnist1d.data import get_dataset_args
            from mnist1d.data import make_dataset as package_make
        except ImportError:
            pass
        else:
            state = np.random.get_state()
            try:
                d = package_make(get_dataset_args())
            finally:
                np.random.set_state(state)
            return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}, "mnist1d package"
    return make_dataset(), "distopt generator"
