"""bf16 training with float32 master weights, without autocast's per-step weight casts.

Under ``torch.autocast(dtype=bfloat16)`` each training step casts every float32
weight to bfloat16 for its matmul and casts the bfloat16 weight gradient back to
float32 for the optimizer. For the stacked models of the engine those two casts
move more memory than the optimizer itself. :class:`MasterWeightOptimizer`
removes them: the stacked layers compute with a bfloat16 *shadow* of their weight
(see ``bnlab.models.fused._training_weight``), and one compiled pass per weight
(``csrc/master_weights.cpp``) reads the shadow's bf16 gradient, updates the
float32 weight and the optimizer state as torch's fused SGD/Adam do, and writes
the new shadow.

The numbers are those of autocast: the shadow is the float32 weight rounded to
bfloat16 (round to nearest even, as autocast casts), the bf16 gradient is
widened exactly, and the update is torch's formula in float32 (for SGD bit for
bit with ``SGD(fused=True)`` on the machines tested; for Adam to float32
round-off, torch's tail loop rounds differently). The float32
weights stay the model's parameters, so checkpoints, ``write_back`` and
evaluation are unchanged, and the optimizer's state dict is torch's own.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from bnlab.functional.compiled import build_extension

__all__ = ["MasterWeightOptimizer", "master_weight_kernels_available"]

_SOURCES = [Path(__file__).parent / "csrc" / "master_weights.cpp"]


def master_weight_kernels_available() -> bool:
    """Build (once per machine) and load the master-weight optimizer kernels."""
    # no implicit fused multiply-adds: the kernel places its fma calls where torch's fused SGD
    # (as compiled in the wheel) has them, which makes the SGD update bit-identical to torch's here
    return build_extension("bnlab_train_kernels", _SOURCES,
                           ("bnlab_train::sgd_master_step", "bnlab_train::adam_master_step"),
                           cflags=("-ffp-contract=off",))


class MasterWeightOptimizer(torch.optim.Optimizer):
    """Wraps a torch SGD or Adam optimizer over a model whose large layers compute with bf16 shadows.

    It is a ``torch.optim.Optimizer`` to everything that drives one, such as the LR schedulers of
    ``torch.optim.lr_scheduler``: ``param_groups``, ``state`` and ``defaults`` *are* the wrapped
    optimizer's (the same objects, also after ``load_state_dict`` replaces them), so a scheduler's
    change of ``lr``, ``momentum`` or ``betas`` reaches both the wrapped optimizer and the compiled
    master-weight step, which reads them from the param group at every step. ``step`` carries
    torch's step hooks (``register_step_pre_hook``/``register_step_post_hook``) and the patch a
    scheduler puts on it to see that the optimizer stepped first.

    Args:
        inner: ``torch.optim.SGD`` (no dampening, no Nesterov) or ``torch.optim.Adam`` (no
            amsgrad) over all the model's parameters. It steps every parameter that has a
            gradient; the shadowed weights have none (their shadows do), and are stepped here
            with the same hyperparameters and the same state entries.
        layers: modules with a float32 ``weight`` parameter and a ``compute_weight`` attribute,
            which gets the shadow.
    """

    # Optimizer.__init__ is not called: it would build new param groups (and refuse parameters
    # already in ``inner``), where a scheduler must see and change the wrapped optimizer's own.
    def __init__(self, inner: torch.optim.Optimizer, layers: list[nn.Module]):
        # exact types: AdamW is an Adam subclass with another weight decay
        if type(inner) not in (torch.optim.SGD, torch.optim.Adam):
            raise TypeError(f"master weights support torch.optim.SGD and Adam, not {type(inner).__name__}")
        if len(inner.param_groups) != 1:
            raise ValueError("master weights expect a single parameter group")
        group = inner.param_groups[0]
        unsupported = [key for key in ("dampening", "nesterov", "maximize", "amsgrad", "decoupled_weight_decay",
                                       "capturable", "differentiable") if group.get(key)]
        if unsupported:
            raise ValueError(f"master-weight {type(inner).__name__} does not support {', '.join(unsupported)}")
        self.inner = inner
        self.layers = list(layers)
        # the per-instance attributes Optimizer.__init__ would set, but for the groups and state
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()  # step runs the step hooks, as every torch optimizer's does
        for layer in self.layers:
            layer.compute_weight = layer.weight.detach().to(torch.bfloat16).requires_grad_(True)
            layer.compute_weight_version = layer.weight._version

    # Properties, not copies: inner.load_state_dict replaces its param_groups and state objects.
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    @property
    def pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(float32 weight, bf16 shadow)`` of every shadowed layer."""
        return [(layer.weight, layer.compute_weight) for layer in self.layers]

    def add_param_group(self, param_group: dict) -> None:
        raise ValueError("master weights expect a single parameter group")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for _, shadow in self.pairs:
            shadow.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.inner.step()  # everything but the shadowed weights
        # read at every step: a scheduler changes lr (and momentum or betas) in this dict
        group = self.inner.param_groups[0]
        sgd = isinstance(self.inner, torch.optim.SGD)
        for layer, (master, shadow) in zip(self.layers, self.pairs):
            if shadow.grad is None:
                continue
            state = self.inner.state[master]
            if sgd:
                self._sgd_step(master, shadow, state, group)
            else:
                self._adam_step(master, shadow, state, group)
            # The kernel wrote both in place behind autograd's back: bump their versions so that a
            # graph saved before this step cannot silently read the new values, then record the
            # master's version, under which the shadow is its rounding.
            torch.autograd.graph.increment_version([master, shadow])
            layer.compute_weight_version = master._version
        return loss

    def detach_shadows(self) -> None:
        """Stop the layers from computing with the shadows (before this optimizer is replaced)."""
        for layer in self.layers:
            layer.compute_weight = None

    @staticmethod
    def _sgd_step(master, shadow, state, group) -> None:
        momentum = float(group["momentum"])
        buffer = state.get("momentum_buffer")
        first = buffer is None
        if momentum != 0 and first:
            buffer = state["momentum_buffer"] = torch.empty_like(master, memory_format=torch.preserve_format)
        torch.ops.bnlab_train.sgd_master_step(master, buffer if momentum != 0 else None, shadow.grad, shadow,
                                              float(group["lr"]), momentum, float(group["weight_decay"]), first)

    @staticmethod
    def _adam_step(master, shadow, state, group) -> None:
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        torch.ops.bnlab_train.adam_master_step(master, state["exp_avg"], state["exp_avg_sq"], shadow.grad, shadow,
                                               float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                                               float(group["weight_decay"]), int(state["step"].item()))

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict (torch's own layout), through this optimizer's hooks."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.inner.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        # Weights loaded into the model bump their version counters, so each layer re-rounds its
        # shadow on its next training forward (bnlab.models.fused._training_weight): nothing to do here.
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.inner.load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # Optimizer's own pickling keeps only defaults, state and param_groups, which here belong to
    # ``inner``; keep the wrapper's attributes instead (but not a scheduler's patch of ``step``).
    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
