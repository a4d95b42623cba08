"""Probes: measurements taken on a model during training that never change the training.

A probe is called by the engine at evaluation steps with the trainer and
returns per-model values (``{name: tensor of shape (K,)}``) that are stored as
metric series. Every probe here runs the stacked model through
:func:`torch.func.functional_call` on *copies* of its buffers (so batch-norm
running statistics and ``num_batches_tracked`` do not move) and restores the
global RNG state afterwards (so dropout masks and anything else drawn later
are the same as without the probe). The web app reuses these probes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnlab.tools import recompute_bn_stats

__all__ = ["probe_forward", "probe_output", "preactivation_percentiles", "layer_input", "gradient_ics", "landscape",
           "loss_surface", "filter_normalized_directions", "eval_accuracy", "accuracy_by_statistics"]


def probe_forward(model: nn.Module, x: Tensor, *, train_mode: bool = True,
                  capture: Sequence[nn.Module] = ()) -> list[Tensor]:
    """Run ``model`` on ``x`` without changing anything; return the inputs seen by the ``capture`` modules.

    ``train_mode=True`` normalizes with batch statistics, as the training
    network does (Ioffe & Szegedy plot the training network N_BN^tr).
    """
    return probe_output(model, x, train_mode=train_mode, capture=capture)[1]


def probe_output(model: nn.Module, x: Tensor, *, train_mode: bool = True,
                 capture: Sequence[nn.Module] = ()) -> tuple[Tensor, list[Tensor]]:
    """:func:`probe_forward` that also returns the model's output: ``(output, captured inputs)``.

    E.g. the accuracy of a network in train mode (batch statistics) without
    moving its running statistics or the RNG.
    """
    captured: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inputs, output: captured.append(inputs[0].detach()))
             for m in capture]
    try:
        state = {name: p for name, p in model.named_parameters()}
        state.update({name: b.clone() for name, b in model.named_buffers()})  # updates land in copies
        with _probing(model, train_mode=train_mode), torch.no_grad():
            output = torch.func.functional_call(model, state, (x,))
    finally:
        for h in hooks:
            h.remove()
    return output, captured


@contextlib.contextmanager
def _probing(*models: nn.Module, train_mode: bool):
    """The one way a probe touches models: in ``train_mode`` for the block, then each back in the mode
    it was in, and the global RNG (which dropout draws from) as it was, so training goes on as if the
    probe had not run."""
    modes = [m.training for m in models]
    with torch.random.fork_rng(devices=[]):
        try:
            for m in models:
                m.train(train_mode)
            yield
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)


def layer_input(model: nn.Module, kind: type[nn.Module], index: int = -1) -> nn.Module:
    """The ``index``-th module of type ``kind`` in ``model`` (default: the last one)."""
    found = [m for m in model.modules() if isinstance(m, kind)]
    if not found:
        raise ValueError(f"the model has no {kind.__name__} layer to probe")
    return found[index]


def preactivation_percentiles(probe_x: Tensor, *, activation: type[nn.Module] = nn.Sigmoid, unit: int = 0,
                              percentiles: Sequence[float] = (15, 50, 85)):
    """A probe: percentiles over ``probe_x`` of the input to the last ``activation`` layer, for one unit.

    This is Ioffe & Szegedy's Figure 1(b, c): the distribution of one sigmoid
    input of the last hidden layer over training, as {15, 50, 85}th percentiles.
    Returns metrics ``preact_p15`` etc., one value per stacked model.
    """
    qs = torch.tensor([p / 100 for p in percentiles])

    def probe(trainer) -> dict[str, Tensor]:
        model = trainer.model
        (inputs,) = probe_forward(model, probe_x, capture=[layer_input(model, activation)])
        values = inputs[..., unit]  # (B, K) when stacked, (B,) for a single model
        values = values.unsqueeze(1) if values.dim() == 1 else values
        q = torch.quantile(values.float(), qs, dim=0)  # (len(percentiles), K)
        return {f"preact_p{round(p)}": row for p, row in zip(percentiles, q)}

    return probe


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    from bnlab.models.fused import StackedLinear

    return [m for m in model.modules() if isinstance(m, (nn.Linear, StackedLinear))]


def _per_model(grad: Tensor, layer: nn.Module, k: int) -> Tensor:
    """Model k's slice of a (possibly stacked) weight gradient."""
    from bnlab.models.fused import StackedLinear

    if not isinstance(layer, StackedLinear):
        return grad  # a single, unstacked model
    return grad[:, k] if layer.shared_input else grad[k]


def gradient_ics(probe_x: Tensor, probe_y: Tensor, *, lr: float, layer_index: int = -2):
    """A probe: Santurkar et al.'s internal covariate shift (Definition 2.1) at one layer.

    G is the gradient of the layer's weight on a fixed batch; G' is the same
    gradient after every *earlier* layer has taken its SGD step (``W - lr·grad``)
    on that batch, the layer itself and later ones unchanged. Returns, per
    model, ``ics_l2 = ||G - G'||``, ``ics_rel = ||G - G'|| / ||G||`` and
    ``ics_cos = cos(G, G')``. The step is exact for plain SGD (momentum 0).
    Runs on copies of the buffers and restores the RNG, like every probe here.
    """
    from bnlab.models.fused import per_model_cross_entropy

    def loss_and_grads(model, state, names):
        logits = torch.func.functional_call(model, state, (probe_x,))
        logits = logits if logits.dim() == 3 else logits.unsqueeze(1)
        loss = per_model_cross_entropy(logits, probe_y).sum()
        return torch.autograd.grad(loss, [state[n] for n in names])

    def probe(trainer) -> dict[str, Tensor]:
        model = trainer.model
        layers = _weight_layers(model)
        target = layers[layer_index]
        names = [n for n, _ in model.named_parameters()]
        target_name = next(n for n, p in model.named_parameters() if p is target.weight)
        earlier = names[: names.index(target_name)]
        with _probing(model, train_mode=True):
            params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
            buffers = lambda: {n: b.clone() for n, b in model.named_buffers()}  # noqa: E731
            grads = loss_and_grads(model, {**params, **buffers()}, earlier + [target_name])
            stepped = {n: (params[n] - lr * g).detach().requires_grad_(True) for n, g in zip(earlier, grads[:-1])}
            (after,) = loss_and_grads(model, {**params, **stepped, **buffers()}, [target_name])
        before = grads[-1]
        l2, rel, cos = [], [], []
        for k in range(trainer.k):
            g, g2 = _per_model(before, target, k).flatten(), _per_model(after, target, k).flatten()
            diff = torch.linalg.vector_norm(g - g2)
            l2.append(diff)
            rel.append(diff / torch.linalg.vector_norm(g).clamp_min(1e-12))
            cos.append(torch.nn.functional.cosine_similarity(g, g2, dim=0))
        return {"ics_l2": torch.stack(l2), "ics_rel": torch.stack(rel), "ics_cos": torch.stack(cos)}

    return probe


def _loss_and_grad(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, *, grad: bool = True):
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # batch statistics; running stats untouched
    leaves = {n: p.detach().requires_grad_(grad) for n, p in params.items()}
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, {**leaves, **buffers}, (x,)), y)
    if not grad:
        return loss.detach(), None
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def _flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors.values()])


def landscape(probe_x: Tensor, probe_y: Tensor, *, lr: float, multipliers: Sequence[float] = (0.5, 1, 2, 4),
              lengths: Sequence[float] = ()):
    """A probe: Santurkar et al.'s §3.2 measurements along the gradient, per model.

    With g the gradient on a fixed batch and θ_η = θ − η·g for η = lr × each multiplier:
    ``loss_range`` = max − min of L(θ_η); ``grad_change`` = max ‖∇L(θ_η) − g‖ (gradient
    predictiveness: small is predictive); ``beta_eff`` = max ‖∇L(θ_η) − g‖ / ‖η·g‖ (effective
    smoothness); ``step_length`` = ‖lr·g‖, how far one SGD step moves the weights.

    Matched η compares the two networks at the same learning rate, so a network whose gradient is
    small also moves less. ``lengths`` adds the same measurement at matched *distances*:
    θ_d = θ − d·g/‖g‖ for each d, giving ``loss_range_at_length`` and ``grad_change_at_length``.
    Batch norm runs in train mode on copies of its buffers; the RNG is restored.
    """

    def along_gradient(model, params, g, loss0, steps):
        """Loss range and largest gradient change over θ − s·g for each scale s in ``steps``."""
        g_flat = _flat(g)
        losses, changes, betas = [loss0], [], []
        for s in steps:
            moved = {n: p.detach() - s * g[n] for n, p in params.items()}
            loss, grad = _loss_and_grad(model, moved, probe_x, probe_y)
            change = torch.linalg.vector_norm(_flat(grad) - g_flat)
            losses.append(loss)
            changes.append(change)
            betas.append(change / (s * torch.linalg.vector_norm(g_flat)).clamp_min(1e-12))
        losses = torch.stack(losses)
        return losses.max() - losses.min(), torch.stack(changes).max(), torch.stack(betas).max()

    def probe(trainer) -> dict[str, Tensor]:
        out = {"loss_range": [], "grad_change": [], "beta_eff": [], "step_length": []}
        if lengths:
            out.update(loss_range_at_length=[], grad_change_at_length=[])
        models = trainer.write_back()  # single models: per-model norms need no stacked slicing
        with _probing(*models, train_mode=True):
            for model in models:
                params = dict(model.named_parameters())
                loss0, g = _loss_and_grad(model, params, probe_x, probe_y)
                g_norm = torch.linalg.vector_norm(_flat(g))
                loss_range, change, beta = along_gradient(model, params, g, loss0, [lr * m for m in multipliers])
                out["loss_range"].append(loss_range)
                out["grad_change"].append(change)
                out["beta_eff"].append(beta)
                out["step_length"].append(lr * g_norm)
                if lengths:
                    scales = [d / g_norm.clamp_min(1e-12) for d in lengths]
                    loss_range, change, _ = along_gradient(model, params, g, loss0, scales)
                    out["loss_range_at_length"].append(loss_range)
                    out["grad_change_at_length"].append(change)
        return {name: torch.stack(values) for name, values in out.items()}

    return probe


@torch.no_grad()
def filter_normalized_directions(model: nn.Module, *, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Two random directions in weight space, filter-normalized (Li et al. 2018), keyed by parameter name.

    Each direction is Gaussian, rescaled per filter (per output row of a weight,
    per entry of a bias) to the norm of the corresponding weights, so a step of
    1 along it means the same for every layer and for models with and without BN.
    """
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def direction():
        d = {}
        for n, p in params.items():
            r = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                r = r * (p.flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (p.dim() - 1))
            else:
                r = r * p.abs() / r.abs().clamp_min(1e-12)
            d[n] = r
        return d

    return direction(), direction()


@torch.no_grad()
def loss_surface(model: nn.Module, x: Tensor, y: Tensor, *, radius: float = 1.0, points: int = 21,
                 seed: int = 0, directions: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
                 ) -> tuple[Tensor, Tensor]:
    """Loss on a 2-D grid around the weights along two random, filter-normalized directions (Li et al. 2018).

    The directions are :func:`filter_normalized_directions` of ``seed`` unless
    given (e.g. to project an optimizer's path onto the same plane).
    Returns ``(coordinates, losses[points, points])``, ``losses[i, j]`` at
    ``coordinates[i]`` along the first direction and ``coordinates[j]`` along
    the second; eval mode (running statistics).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    d1, d2 = directions if directions is not None else filter_normalized_directions(model, seed=seed)
    coords = torch.linspace(-radius, radius, points)
    losses = torch.empty(points, points)
    buffers = dict(model.named_buffers())
    with _probing(model, train_mode=False):
        for i, a in enumerate(coords):
            for j, b in enumerate(coords):
                state = {n: params[n] + a * d1[n] + b * d2[n] for n in params}
                logits = torch.func.functional_call(model, {**state, **buffers}, (x,))
                losses[i, j] = nn.functional.cross_entropy(logits, y)
    return coords, losses


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int) -> Tensor:
    """Per-model accuracy of ``model`` as it is (its modes untouched): ``(K,)`` for a stacked model's
    ``(B, K, classes)`` logits, ``(1,)`` for a single model's ``(B, classes)``."""
    correct = 0
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        hits = logits.argmax(-1) == (target.unsqueeze(1) if logits.dim() == 3 else target)
        correct = correct + (hits.sum(0) if logits.dim() == 3 else hits.sum().unsqueeze(0))
    return correct.double() / len(x)


def eval_accuracy(x: Tensor, y: Tensor, *, name: str, chunk: int = 1000):
    """A probe: accuracy in eval mode (running statistics, no dropout) on fixed examples, as metric ``name``.

    E.g. the training-set accuracy over training, to draw the train–test gap as a curve.
    """

    def probe(trainer) -> dict[str, Tensor]:
        model = trainer.model
        with _probing(model, train_mode=False):
            return {name: _accuracy(model, x, y, chunk)}

    return probe


def _batch_norms_only_in_train_mode(model: nn.Module) -> nn.Module:
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return model


def accuracy_by_statistics(x: Tensor, y: Tensor, *, batch_size: int, reestimate_x: Tensor, reestimate_batches: int):
    """A probe: the accuracy on ``x`` of the same weights with three sources of batch-norm statistics.

    - ``acc_running``: eval mode, the running averages (what ``model.eval()`` uses);
    - ``acc_batch_stats``: each batch norm normalizes with the statistics of the evaluation batch
      (``batch_size`` examples at a time; every other module in eval mode);
    - ``acc_precise``: running statistics re-estimated (:func:`bnlab.tools.recompute_bn_stats`) on
      the first ``reestimate_batches`` batches of ``batch_size`` rows of ``reestimate_x``, then eval mode.

    If the three agree, the running averages are as good as the weights allow; if ``acc_running``
    lags the other two, the moving average has not caught up with the weights. Everything runs
    on copies of the model, so training goes on as if the probe had not run.
    """
    reestimate = [reestimate_x[i * batch_size : (i + 1) * batch_size] for i in range(reestimate_batches)]
    if len(reestimate[-1]) < batch_size:
        raise ValueError(f"reestimate_x has fewer than {reestimate_batches} batches of {batch_size} rows")

    def probe(trainer) -> dict[str, Tensor]:
        with _probing(trainer.model, train_mode=False):
            running = _accuracy(trainer.model, x, y, 1000)
            batch_stats = _accuracy(_batch_norms_only_in_train_mode(copy.deepcopy(trainer.model)), x, y, batch_size)
            precise = copy.deepcopy(trainer.model)
            recompute_bn_stats(precise, reestimate)
            precise_acc = _accuracy(precise.eval(), x, y, 1000)
        return {"acc_running": running, "acc_batch_stats": batch_stats, "acc_precise": precise_acc}

    return probe
