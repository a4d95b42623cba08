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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["probe_forward", "preactivation_percentiles", "layer_input"]


def probe_forward(model: nn.Module, x: Tensor, *, train_mode: bool = True,
                  capture: Sequence[nn.Module] = ()) -> list[Tensor]:
    """Run ``model`` on ``x`` without changing anything; return the inputs seen by the ``capture`` modules.

    ``train_mode=True`` normalizes with batch statistics, as the training
    network does (Ioffe & Szegedy plot the training network N_BN^tr).
    """
    captured: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inputs, output: captured.append(inputs[0].detach()))
             for m in capture]
    rng = torch.get_rng_state()
    was_training = model.training
    try:
        state = {name: p for name, p in model.named_parameters()}
        state.update({name: b.clone() for name, b in model.named_buffers()})  # updates land in copies
        model.train(train_mode)
        with torch.no_grad():
            torch.func.functional_call(model, state, (x,))
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
        for h in hooks:
            h.remove()
    return captured


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
