"""The data of views 1, 3 and 4, computed for one session's networks by calling bnlab's own code.

* ``bn_step`` (view 1): :func:`bnlab.reference.batch_norm_forward` on one
  feature of a batch, taken from a live layer or drawn from a distribution the
  user shapes;
* ``train_vs_eval`` (view 3): batch vs running statistics of a norm layer, and
  accuracy in train mode (batch statistics) vs eval mode (running statistics)
  as the evaluation batch size changes, through :func:`bnlab.probes.probe_output`;
* ``landscape`` (view 4): :func:`bnlab.probes.loss_surface` of both networks
  along filter-normalized directions, with the recent optimizer path projected
  onto the same plane.

Each returns plain JSON-ready data. They run on the worker thread, between steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bnlab import reference
from bnlab.probes import filter_normalized_directions, loss_surface, probe_output

__all__ = ["compute", "bn_step", "train_vs_eval", "landscape", "synthetic_batch", "EVAL_BATCH_SIZES"]

EVAL_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
EXAMPLES = 5  # example values shown step by step in view 1


def compute(view: str, job, params: dict) -> dict:
    return {"bn_step": bn_step, "train_vs_eval": train_vs_eval, "landscape": landscape}[view](job.pair, params)


def _round(values, digits: int = 6) -> list:
    return [None if not math.isfinite(v) else round(float(v), digits) for v in np.asarray(values, dtype=float).ravel()]


def _histogram(values: np.ndarray, bins: int = 24) -> dict:
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {"edges": _round(edges), "counts": counts.tolist()}


def synthetic_batch(params: dict) -> np.ndarray:
    """``batch_size`` values with the given mean and standard deviation, skew and share of outliers.

    The shape is a skew-normal (``skew`` is its δ in (-1, 1)) standardized to mean 0 and
    standard deviation 1, then scaled; outliers replace a share of the values with points
    6 standard deviations out, on alternating sides.
    """
    rng = np.random.default_rng(params["seed"])
    n, delta = params["batch_size"], params["skew"]
    z = delta * np.abs(rng.standard_normal(n)) + math.sqrt(1 - delta**2) * rng.standard_normal(n)
    mean_z = delta * math.sqrt(2 / math.pi)
    z = (z - mean_z) / math.sqrt(1 - mean_z**2)
    x = params["mean"] + params["spread"] * z
    k = int(round(params["outliers"] * n))
    if k:
        where = rng.choice(n, size=k, replace=False)
        x[where] = params["mean"] + 6 * params["spread"] * np.where(np.arange(k) % 2 == 0, 1.0, -1.0)
    return x


def _live_batch(pair, params: dict) -> tuple[np.ndarray, str]:
    """One feature of a real batch: the input of a norm layer of the normalized network
    (or of an activation, when the kind has no layer), on ``batch_size`` training examples."""
    blocks = pair.hidden_layers("norm")
    layer = min(params["layer"], len(blocks) - 1)
    block = blocks[layer]
    module, what = (block["norm"], "input of the norm layer") if "norm" in block else (
        block["activation"], "input of the activation (this network has no norm layer)")
    g = torch.Generator().manual_seed(params["seed"])
    idx = torch.randperm(len(pair.data.train_y), generator=g)[: params["batch_size"]]
    _, (captured,) = probe_output(pair.models["norm"], pair.data.train_x[idx], capture=[module])
    unit = min(params["unit"], captured.shape[1] - 1)
    # a convolution's channel is normalized over N, H and W: all its values form the batch
    values = captured[:, unit].reshape(-1).double().numpy()
    return values, f"layer {layer + 1}, unit {unit}: {what}, {len(idx)} training images, step {pair.step}"


def bn_step(pair, params: dict) -> dict:
    """Batch norm of one feature, step by step, by the NumPy reference."""
    if params["source"] == "live":
        x, described = _live_batch(pair, params)
    else:
        x, described = synthetic_batch(params), "synthetic"
    gamma, beta, eps = params["gamma"], params["beta"], params["eps"]
    y, cache, _ = reference.batch_norm_forward(x[:, None], np.array([gamma]), np.array([beta]),
                                               reference.RunningStats.initial(1), training=True, eps=eps)
    mu, var = float(cache.batch_mean[0]), float(cache.batch_var[0])
    # the identity: gamma = sqrt(var + eps), beta = mu undoes the normalization
    g_id, b_id = math.sqrt(var + eps), mu
    y_id, _, _ = reference.batch_norm_forward(x[:, None], np.array([g_id]), np.array([b_id]),
                                              reference.RunningStats.initial(1), training=True, eps=eps)
    k = min(EXAMPLES, len(x))
    return {
        "source": described, "n": int(cache.count), "mean": mu, "var": var, "std": math.sqrt(var),
        "inv_std": float(cache.inv_std[0]), "gamma": gamma, "beta": beta, "eps": eps,
        "examples": {"x": _round(x[:k]), "centered": _round(cache.centered[:k, 0]),
                     "x_hat": _round(cache.x_hat[:k, 0]), "y": _round(y[:k, 0])},
        "x_hat_mean": float(cache.x_hat.mean()), "x_hat_std": float(cache.x_hat.std()),
        "y_mean": float(y.mean()), "y_std": float(y.std()),
        "hist": {"x": _histogram(x), "x_hat": _histogram(cache.x_hat[:, 0]), "y": _histogram(y[:, 0])},
        "identity": {"gamma": g_id, "beta": b_id, "max_abs_error": float(np.abs(y_id[:, 0] - x).max())},
    }


def _running_norm_layers(pair) -> list[torch.nn.Module]:
    return [b["norm"] for b in pair.hidden_layers("norm")
            if "norm" in b and getattr(b["norm"], "running_mean", None) is not None]


def train_vs_eval(pair, params: dict) -> dict:
    """Batch vs running statistics of one norm layer; accuracy in train vs eval mode per batch size."""
    layers = _running_norm_layers(pair)
    if not layers:
        return {"available": False,
                "reason": f"'{pair.settings['norm']}' keeps no running statistics: it normalizes every example "
                          "the same way in training and inference, so there is nothing to compare"}
    model, data = pair.models["norm"], pair.data
    layer = min(params["layer"], len(layers) - 1)
    module = layers[layer]
    _, (captured,) = probe_output(model, data.probe_x, capture=[module])
    dims = [d for d in range(captured.dim()) if d != 1]
    channels = min(64, captured.shape[1])
    stats = {
        "batch_mean": _round(captured.mean(dim=dims)[:channels]),
        "batch_var": _round(captured.var(dim=dims, unbiased=False)[:channels]),
        "running_mean": _round(module.running_mean[:channels]),
        "running_var": _round(module.running_var[:channels]),
    }
    x, y = data.test_x[:512], data.test_y[:512]
    eval_acc = {name: _accuracy(pair.models[name], x, y, len(x), train_mode=False) for name in pair.models}
    train_acc = [_accuracy(model, x, y, b, train_mode=True) for b in EVAL_BATCH_SIZES]
    return {"available": True, "layer": layer, "layers": len(layers), "channels": channels,
            "batch_examples": len(data.probe_x), "step": pair.step, **stats,
            "batch_sizes": list(EVAL_BATCH_SIZES), "train_mode_acc": train_acc,
            "eval_mode_acc": eval_acc["norm"], "plain_acc": eval_acc["plain"], "examples": len(x)}


def _accuracy(model, x, y, batch: int, *, train_mode: bool) -> float | None:
    if batch > len(x):
        return None
    correct = 0
    try:
        for start in range(0, len(x) - batch + 1, batch):  # whole batches only: each one's statistics count
            logits, _ = probe_output(model, x[start : start + batch], train_mode=train_mode)
            correct += int((logits.argmax(1) == y[start : start + batch]).sum())
    except (ValueError, RuntimeError):  # e.g. a ghost size that does not divide the batch
        return None
    return correct / (len(x) // batch * batch)


def landscape(pair, params: dict) -> dict:
    """Loss surfaces of both networks on the probe batch, and each one's recent path on its plane."""
    x, y = pair.data.probe_x[:128], pair.data.probe_y[:128]
    out = {"step": pair.step, "radius": params["radius"], "nets": {}}
    for name, model in pair.models.items():
        d1, d2 = filter_normalized_directions(model, seed=params["seed"])
        coords, losses = loss_surface(model, x, y, radius=params["radius"], points=params["points"],
                                      directions=(d1, d2))
        out["coords"] = _round(coords)
        out["nets"][name] = {"loss": [_round(row, 5) for row in losses], "path": _project(pair, name, d1, d2)}
    return out


def _project(pair, name: str, d1: dict, d2: dict) -> list[list[float]]:
    """Least-squares coordinates (a, b) of each recent weight snapshot minus the current weights
    in the plane of ``d1`` and ``d2`` (they are not exactly orthogonal)."""
    u = torch.cat([t.flatten() for t in d1.values()]).double()
    v = torch.cat([t.flatten() for t in d2.values()]).double()
    gram = torch.tensor([[u @ u, u @ v], [u @ v, v @ v]], dtype=torch.float64)
    center = pair.flat_params(name).double()
    path = []
    for step, snapshot in pair.path[name]:
        delta = snapshot.double() - center
        a, b = torch.linalg.solve(gram, torch.stack([u @ delta, v @ delta])).tolist()
        path.append([round(a, 5), round(b, 5), step])
    path.append([0.0, 0.0, pair.step])
    return path
