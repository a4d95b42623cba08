"""Claims 9 and 11: BN after training. Forgetting ``model.eval()``, and what to do with BN when fine-tuning."""

from __future__ import annotations

import copy

import torch

from bnlab.experiments.claims import protocols
from bnlab.experiments.claims.base import Arm, Claim, ClaimContext, ClaimResult, Criterion, Rule
from bnlab.experiments.claims.common import preset, values
from bnlab.stats import mean_ci, welch_diff
from bnlab.tools import recompute_bn_stats
from bnlab.train import prepare_data
from bnlab.train.runner import StartFrom, trained_models


def _pretrained(ctx: ClaimContext):
    """Claim 1's torch-mlp BN models (shared through the store: trained once for claims 1, 9, 11, 14)."""
    spec, cfg = preset("torch-mlp", protocols.QUICK_EPOCHS if ctx.quick else None)
    spec = spec.with_(norm="batch")
    return spec, cfg, ctx.train("trains-faster", Arm("torch-mlp/BN", spec, cfg))


def _length(ctx: ClaimContext) -> str:
    return f"{protocols.QUICK_EPOCHS} epoch" if ctx.quick else "5 epochs"


# -- 9. Train mode vs eval mode at inference ----------------------------------------------------------------


@torch.no_grad()
def _accuracy(model, x, y, batch) -> float:
    correct = 0
    for start in range(0, len(x), batch):
        correct += (model(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum().item()
    return correct / len(x)


TRAIN_VS_EVAL = Rule((Criterion(f"test accuracy in eval mode − in train mode with evaluation batches of "
                                f"{protocols.EVAL_BATCHES[0]}", 0.01, unit="points", scale=100),),
                     evidence=lambda n: [n["drop_by_eval_batch"][str(protocols.EVAL_BATCHES[0])]])


def _train_vs_eval(ctx: ClaimContext) -> ClaimResult:
    spec, cfg, summary = _pretrained(ctx)
    data = prepare_data(ctx.dataset(cfg.dataset), cfg, spec)
    batches = protocols.EVAL_BATCHES
    eval_acc, train_acc = [], {b: [] for b in batches}
    for model in trained_models(ctx.store, summary["group_id"]):
        model.eval()
        eval_acc.append(_accuracy(model, data.test_x, data.test_y, 1000))
        forgot = copy.deepcopy(model).train()  # a copy: batch statistics, and its running stats may move
        for b in batches:
            train_acc[b].append(_accuracy(forgot, data.test_x, data.test_y, b))
    numbers = {
        "eval_mode_acc": mean_ci(eval_acc).to_dict(),
        "train_mode_acc_by_eval_batch": {str(b): mean_ci(v).to_dict() for b, v in train_acc.items()},
        "drop_by_eval_batch": {str(b): welch_diff(eval_acc, train_acc[b]).to_dict() for b in batches},
    }
    plot = ctx.figure("train-vs-eval", "lines_with_ci",
                      series={"model left in train mode": [(b, mean_ci(train_acc[b]).to_dict()) for b in batches]},
                      title="Test accuracy of a BN model evaluated in train mode", xlabel="evaluation batch size",
                      ylabel="test accuracy (%)", logx=True, scale=100.0,
                      hline=("eval mode (running statistics)", mean_ci(eval_acc).mean))
    protocol = (f"the torch-mlp BN models of claim 1 ({_length(ctx)}), evaluated on the test set in eval mode and, as "
                f"if model.eval() were forgotten, in train mode with evaluation batches of {list(batches)}")
    return ctx.result("train-vs-eval", protocol, "test accuracy lost by evaluating in train mode", numbers,
                      {"torch-mlp/BN": [r["run_id"] for r in summary["per_seed"]]}, [plot])


# -- 11. Frozen BN in transfer learning --------------------------------------------------------------------

TREATMENTS = ("updating", "frozen", "re-estimated, then frozen")


def _reestimate(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Precise statistics on ``REESTIMATE_BATCHES`` random batches of the new task's training set."""
    g = torch.Generator().manual_seed(0)
    batches = [x[torch.randint(len(x), (batch_size,), generator=g)] for _ in range(protocols.REESTIMATE_BATCHES)]
    recompute_bn_stats(model, batches)


def _finetune(ctx: ClaimContext, spec, cfg, pretrained_group: str, treatment: str) -> dict:
    """Claim 1's MNIST models fine-tuned on Fashion-MNIST with one BN treatment, through the run store."""
    from bnlab.nn import freeze_batchnorm

    def prepare(trainer) -> None:
        if treatment == "re-estimated, then frozen":
            _reestimate(trainer.model, trainer.data.train_x, cfg.batch_size)
        if treatment != "updating":
            freeze_batchnorm(trainer.model)
            trainer.reset_optimizer()  # the frozen affine is not trained

    start = StartFrom(pretrained_group, f"BN {treatment}", prepare)
    return ctx.train("frozen-transfer", Arm(f"fine-tune/{treatment}", spec, cfg), start_from=start)


FROZEN_TRANSFER = Rule((Criterion("test accuracy on the new task, fine-tuned with frozen BN − with updating BN", 0.005,
                                  unit="points", scale=100),),
                       evidence=lambda n: [n["frozen_minus_updating"]])


def _frozen_transfer(ctx: ClaimContext) -> ClaimResult:
    spec, cfg, pretrained = _pretrained(ctx)
    steps = protocols.FINETUNE_STEPS[ctx.protocol_name]
    tune_cfg = cfg.with_(dataset="fashion", epochs=None, steps=steps, eval_every=steps)
    tuned = {t: _finetune(ctx, spec, tune_cfg, pretrained["group_id"], t) for t in TREATMENTS}
    accs = {t: values(summary, "final_test_acc") for t, summary in tuned.items()}
    numbers = {"fashion_test_acc": {t: mean_ci(v).to_dict() for t, v in accs.items()},
               "frozen_minus_updating": welch_diff(accs["frozen"], accs["updating"]).to_dict(),
               "reestimated_minus_updating": welch_diff(accs["re-estimated, then frozen"], accs["updating"]).to_dict()}
    plot = ctx.figure("frozen-transfer", "bars_with_ci", groups=["Fashion-MNIST test accuracy"],
                      series={t: [iv] for t, iv in numbers["fashion_test_acc"].items()},
                      title="Fine-tuning an MNIST model on Fashion-MNIST: what to do with BN",
                      ylabel="test accuracy (%)", scale=100.0)
    protocol = (f"claim 1's torch-mlp BN models (MNIST, {_length(ctx)}) fine-tuned on Fashion-MNIST for {steps} steps "
                "(SGD lr 0.01, momentum 0.9, batch 64), all weights trainable, with BN updating, BN frozen "
                f"(freeze_batchnorm), or BN statistics re-estimated on {protocols.REESTIMATE_BATCHES} Fashion batches "
                "(`bnlab.tools.recompute_bn_stats`) then frozen; the fine-tuning runs start from claim 1's checkpoint "
                "and are kept in the run store")
    return ctx.result("frozen-transfer", protocol, "Fashion-MNIST test accuracy", numbers,
                      {"pretrained torch-mlp/BN": [r["run_id"] for r in pretrained["per_seed"]],
                       **{f"fine-tune/{t}": [r["run_id"] for r in s["per_seed"]] for t, s in tuned.items()}}, [plot])


TRAIN_VS_EVAL_CLAIM = Claim(
    "train-vs-eval", 9, "Forgetting model.eval() costs accuracy",
    "seed 000, 'Pitfall 1: Forgetting Training vs. Inference Mode'; seed 004: 'During inference, it uses moving "
    "averages learned during training'",
    TRAIN_VS_EVAL,
    "no published number; pytorch/pytorch#5406 and #4741 report the symptom",
    _train_vs_eval)

FROZEN_TRANSFER_CLAIM = Claim(
    "frozen-transfer", 11, "Keep BN frozen when transferring to a new task",
    "seed 000: 'Transfer learning: Keep BatchNorm layers frozen initially'",
    FROZEN_TRANSFER,
    "no MNIST→Fashion number published; detectron2 and torchvision freeze BN when fine-tuning detectors "
    "(batches of 1–2 images per GPU), Keras' fine-tuning guide keeps BN in inference mode",
    _frozen_transfer)
