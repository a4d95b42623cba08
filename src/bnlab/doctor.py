"""``bnlab doctor``: find the batch-norm mistakes that no error message reports.

Each rule has an id, a severity (``info`` < ``warning`` < ``error``), why it matters and the fix;
:func:`check` returns one :class:`Finding` per rule and module it fires on. Some rules look at the
modules alone (buffers, momentum, placement); some need an example batch (a forward pass with hooks
on copies of the model: the same module called twice); some need the training setup (the loader's
batches, gradient accumulation, whether the model is meant for inference).

Where a rule cites a number, it is the claims lab's measurement on MNIST (``docs/claims.md``), not a slogan.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["check", "Finding", "RULES", "SEVERITIES", "to_text", "to_json", "to_sarif", "worst"]

SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    module: str  # the module's path in the model ("" for the model itself)
    message: str  # what was found, here
    why: str
    fix: str


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    title: str
    why: str
    fix: str


RULES = {r.id: r for r in [
    Rule("BN001", "error", "batch norm in training mode for inference",
         "in training mode a batch norm normalizes with the batch's own statistics and moves its running "
         "averages: predictions depend on what else is in the batch (the claims lab measured 46.2 [44.6, 47.9] "
         "points of test accuracy lost at evaluation batches of 2, claim 9)", "call model.eval() before inference"),
    Rule("BN002", "warning", "frozen parameters, moving statistics",
         "γ and β no longer train, but the layer is in training mode, so its running mean and variance keep "
         "following each batch: the 'frozen' layer still changes", "call bnlab.nn.freeze_batchnorm(model), or put "
         "these layers in eval mode after every model.train()"),
    Rule("BN003", "error", "a batch of one sample per channel",
         "training batch norm needs more than one value per channel: the loader's last batch has one sample, "
         "and training stops with a ValueError at the end of the epoch", "DataLoader(..., drop_last=True), or a "
         "batch size that divides the dataset"),
    Rule("BN004", "warning", "small batches with batch norm",
         "batch statistics of fewer than 8 samples are noisy and bias the running averages (the claims lab: BN "
         "lost 58.9 [52.2, 65.5] points of test accuracy from batch 32 to batch 2, where GroupNorm/LayerNorm was "
         "58.1 [51.4, 64.7] points better, claim 8)", "a larger batch, or "
         "GroupNorm / LayerNorm (bnlab.nn.make_norm('group', C)), or batch renorm"),
    Rule("BN005", "info", "bias before batch norm",
         "the batch norm subtracts the mean right away, so the preceding layer's bias has no effect: a wasted "
         "parameter (and weight decay on nothing)", "bias=False on the Linear/Conv before the batch norm"),
    Rule("BN006", "warning", "batch norm on the output logits",
         "normalizing the logits fixes their scale, which the loss needs to express confidence (seed 000: "
         "'Don't use on output layers'; claim 14 measures it)", "remove the batch norm after the last layer"),
    Rule("BN007", "info", "batch norm after the activation",
         "the common placement is linear → BN → activation; after the activation is a valid choice (the claims "
         "lab found no consistent winner: ReLU +0.12 [−0.02, +0.25] points before, sigmoid −0.78 [−0.92, −0.64], "
         "claim 7)", "nothing required; measure both if it matters"),
    Rule("BN008", "error", "non-finite running statistics",
         "a NaN or Inf in running_mean/running_var makes every inference output of the channel NaN; one "
         "overflowing batch is enough", "recompute them (bnlab.tools.recompute_bn_stats) and train with "
         "bnlab.nn.BatchNorm(skip_nonfinite_update=True) under fp16"),
    Rule("BN009", "error", "running variance not positive",
         "a variance ≤ 0 (with a small eps) divides by ~0 at inference", "recompute the statistics "
         "(bnlab.tools.recompute_bn_stats)"),
    Rule("BN010", "warning", "momentum in the other framework's convention",
         "torch's momentum is the weight of the new batch (0.1), Keras' of the old average (0.99): a Keras value "
         "in a torch layer makes the running averages follow only the last batch or two",
         "bnlab convert-momentum 0.99 --from keras; or bnlab.nn.BatchNorm(convention='keras')"),
    Rule("BN011", "warning", "one batch norm module called twice",
         "its running statistics average two different distributions, and at inference both calls get that "
         "mixture", "one batch norm per call site"),
    Rule("BN012", "warning", "no running statistics",
         "with track_running_stats=False the layer normalizes with the batch's statistics in eval mode too, so "
         "inference depends on the batch", "track_running_stats=True, unless that is what you want"),
    Rule("BN013", "warning", "gradient accumulation with batch norm",
         "accumulating gradients over micro-batches does not enlarge the batch batch norm sees: it normalizes "
         "each micro-batch (the claims lab: 8 accumulated micro-batches of 4 lost 4.1 [3.6, 4.6] points against "
         "one batch of 32, claim 12)", "larger real batches, GroupNorm, or ghost BN over a large batch"),
    Rule("BN014", "error", "batch size not a multiple of the ghost batch",
         "ghost batch norm splits each batch into virtual batches of a fixed size; any other batch size fails",
         "a batch size that is a multiple of virtual_batch_size, and drop_last=True"),
]}


def _batch_norms(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _finding(rule_id: str, module: str, message: str) -> Finding:
    r = RULES[rule_id]
    return Finding(r.id, r.severity, module, message, r.why, r.fix)


_ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.ReLU6, nn.Mish)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _sequence(model: nn.Module, example_batch) -> list[tuple[str, nn.Module]] | None:
    """The leaf modules in call order (a forward pass with hooks on a copy), or None without a batch."""
    if example_batch is None:
        return None
    probe = copy.deepcopy(model)
    order: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in probe.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append((names[mod], mod)))
             for m in probe.modules() if not list(m.children())]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            probe(example_batch)
    finally:
        for h in hooks:
            h.remove()
    return order


_ACTIVATION_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.gelu,
                         nn.functional.silu, nn.functional.leaky_relu, nn.functional.elu, nn.functional.relu6,
                         torch.nn.functional.mish, torch.relu_}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh", "sigmoid_", "tanh_"}


def _is_batch_norm(module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _traced(model: nn.Module):
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to what the structure proves
        return None


def _is_activation(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ACTIVATIONS)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _flow_rules(model: nn.Module, graph) -> list[Finding]:
    """The placement rules from a torch.fx graph: what really feeds each batch norm, functional ops included."""
    import torch.fx

    modules = dict(model.named_modules())
    findings, calls = [], {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for target, count in calls.items():
        if _is_batch_norm(modules[target]) and count > 1:
            findings.append(_finding("BN011", target, f"called {count} times in one forward pass"))
    for node in graph.nodes:
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, torch.fx.Node) and out.op == "call_module" and _is_batch_norm(modules[out.target]):
                src = out.args[0] if out.args else None
                if isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules[src.target], _WEIGHTED):
                    findings.append(_finding("BN006", out.target, "the model's output is this batch norm of the logits"))
        if node.op != "call_module" or not _is_batch_norm(modules[node.target]):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            continue
        producer = modules.get(src.target) if src.op == "call_module" else None
        if isinstance(producer, _WEIGHTED) and producer.bias is not None and len(src.users) == 1:
            findings.append(_finding("BN005", src.target, f"{type(producer).__name__} with bias=True feeds {node.target}"))
        if _is_activation(src, modules):
            findings.append(_finding("BN007", node.target, f"follows the activation {src.target if src.op != 'call_function' else src.target.__name__}"))
    return findings


def _structure_rules(model: nn.Module, order) -> list[Finding]:
    """Placement rules: from the data flow when torch.fx traces the model, else only what the structure
    proves (neighbours inside an ``nn.Sequential``), plus a module called twice from the recorded calls."""
    graph = _traced(model)
    if graph is not None:
        return _flow_rules(model, graph)
    findings = []
    if order is not None:
        counts: dict[str, int] = {}
        for name, _ in order:
            counts[name] = counts.get(name, 0) + 1
        for name, count in counts.items():
            if _is_batch_norm(model.get_submodule(name) if name else model) and count > 1:
                findings.append(_finding("BN011", name, f"called {count} times in one forward pass"))
    for _, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        prefix = next(n for n, m in model.named_modules() if m is container)
        children = [(f"{prefix}.{n}" if prefix else n, m) for n, m in container.named_children()]
        for (prev_name, prev), (name, module) in zip(children, children[1:]):
            if not _is_batch_norm(module):
                continue
            if isinstance(prev, _WEIGHTED) and prev.bias is not None:
                findings.append(_finding("BN005", prev_name, f"{type(prev).__name__} with bias=True feeds {name}"))
            if isinstance(prev, _ACTIVATIONS):
                findings.append(_finding("BN007", name, f"follows the activation {prev_name} ({type(prev).__name__})"))
    if isinstance(model, nn.Sequential):
        top = list(model.named_children())
        if len(top) > 1 and _is_batch_norm(top[-1][1]) and isinstance(top[-2][1], _WEIGHTED):
            findings.append(_finding("BN006", top[-1][0], "the last module normalizes the logits"))
    return findings


def _module_rules(model: nn.Module, inference: bool) -> list[Finding]:
    findings = []
    for name, bn in _batch_norms(model):
        if inference and bn.training:
            findings.append(_finding("BN001", name, "in training mode"))
        params = [p for p in (bn.weight, bn.bias) if p is not None]
        if bn.training and bn.track_running_stats and params and not any(p.requires_grad for p in params):
            findings.append(_finding("BN002", name, "requires_grad=False on γ/β, but the layer is in training mode"))
        for buffer in ("running_mean", "running_var"):
            value = getattr(bn, buffer)
            if value is not None and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                findings.append(_finding("BN008", name, f"{bad} non-finite value(s) in {buffer}"))
        if bn.running_var is not None and torch.isfinite(bn.running_var).all() and (bn.running_var <= 0).any():
            findings.append(_finding("BN009", name, f"min running_var {float(bn.running_var.min()):.3g}"))
        convention = getattr(bn, "convention", "torch")
        if bn.momentum is not None:
            if convention == "torch" and bn.momentum >= 0.5:
                findings.append(_finding("BN010", name, f"momentum={bn.momentum:g} in a torch-convention layer "
                                                        f"(Keras' {bn.momentum:g} is torch's {1 - bn.momentum:.3g})"))
            if convention == "keras" and bn.momentum < 0.5:
                findings.append(_finding("BN010", name, f"momentum={bn.momentum:g} in a Keras-convention layer "
                                                        f"(torch's {bn.momentum:g} is Keras' {1 - bn.momentum:.3g})"))
        if not bn.track_running_stats:
            findings.append(_finding("BN012", name, "track_running_stats=False"))
    return findings


def _batch_rules(model: nn.Module, batch_sizes: list[int], dataset_size: int | None, drop_last: bool,
                 accumulate: int) -> list[Finding]:
    from bnlab.nn import GhostBatchNorm1d, GhostBatchNorm2d

    findings = []
    norms = _batch_norms(model)
    if not norms:
        return findings
    first = norms[0][0]
    if dataset_size is not None and batch_sizes and not drop_last and dataset_size % batch_sizes[0] == 1:
        findings.append(_finding("BN003", first, f"{dataset_size} samples in batches of {batch_sizes[0]} leave a "
                                                 "last batch of 1"))
    if batch_sizes and min(batch_sizes) < 8:
        findings.append(_finding("BN004", first, f"batches of {min(batch_sizes)}"))
    if accumulate > 1:
        findings.append(_finding("BN013", first, f"gradients accumulated over {accumulate} micro-batches"))
    for name, bn in norms:
        if isinstance(bn, (GhostBatchNorm1d, GhostBatchNorm2d)):
            v = bn.virtual_batch_size
            odd = sorted({b for b in batch_sizes if b > v and b % v})
            if odd:
                findings.append(_finding("BN014", name, f"batch size {odd[0]} with virtual_batch_size={v}"))
    return findings


def check(model: nn.Module, example_batch: torch.Tensor | None = None, loader: Iterable | None = None, *,
          inference: bool = False, accumulate: int = 1) -> list[Finding]:
    """Every finding for ``model``, most severe first.

    Args:
        model: the model as you are about to use it (its modes matter).
        example_batch: an input batch; enables the rules that need a forward pass (call order, a module
            called twice). The pass runs on a copy, without gradients; nothing of ``model`` changes.
        loader: a ``torch.utils.data.DataLoader`` (or anything with ``batch_size``, ``drop_last`` and a
            ``dataset``): its batch sizes and its last batch.
        inference: the model is about to serve predictions (then training mode is an error).
        accumulate: gradient accumulation steps in your training loop.
    """
    batch_sizes = []
    dataset_size, drop_last = None, False
    if loader is not None:
        batch_size = getattr(loader, "batch_size", None)
        drop_last = bool(getattr(loader, "drop_last", False))
        dataset = getattr(loader, "dataset", None)
        dataset_size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        if batch_size:
            batch_sizes.append(int(batch_size))
    if example_batch is not None and not batch_sizes:
        batch_sizes.append(int(example_batch.shape[0]))
    findings = _module_rules(model, inference)
    findings += _structure_rules(model, _sequence(model, example_batch))
    findings += _batch_rules(model, batch_sizes, dataset_size, drop_last, accumulate)
    return sorted(findings, key=lambda f: (-SEVERITIES.index(f.severity), f.rule, f.module))


def to_text(findings: list[Finding]) -> str:
    if not findings:
        return "no batch-norm problems found"
    lines = []
    for f in findings:
        lines += [f"{f.severity.upper():<7s} {f.rule} {f.module or '(model)'}: {RULES[f.rule].title}: {f.message}",
                  f"        why: {f.why}", f"        fix: {f.fix}"]
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    lines.append(", ".join(f"{n} {s}(s)" for s, n in counts.items() if n))
    return "\n".join(lines)


def to_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=2, ensure_ascii=False)


def to_sarif(findings: list[Finding], artifact: str = "") -> str:
    """SARIF 2.1.0, for code-scanning dashboards and CI annotations."""
    level = {"info": "note", "warning": "warning", "error": "error"}
    rules = [{"id": r.id, "name": r.title, "shortDescription": {"text": r.title}, "fullDescription": {"text": r.why},
              "help": {"text": r.fix}, "defaultConfiguration": {"level": level[r.severity]}} for r in RULES.values()]
    results = [{"ruleId": f.rule, "level": level[f.severity],
                "message": {"text": f"{f.module or '(model)'}: {f.message}. Fix: {f.fix}"},
                "locations": [{"logicalLocations": [{"fullyQualifiedName": f.module or "(model)", "kind": "module"}],
                               **({"physicalLocation": {"artifactLocation": {"uri": artifact}}} if artifact else {})}]}
               for f in findings]
    return json.dumps({"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
                       "runs": [{"tool": {"driver": {"name": "bnlab doctor", "rules": rules}}, "results": results}]},
                      indent=2, ensure_ascii=False)


def worst(findings: list[Finding]) -> str | None:
    return max((f.severity for f in findings), key=SEVERITIES.index, default=None)

