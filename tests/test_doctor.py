"""bnlab doctor: every rule fires on a model made to trigger it and stays silent on its corrected twin."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.doctor import RULES, check, to_json, to_sarif, to_text


def mlp(**bn):
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8, **bn), nn.ReLU(), nn.Linear(8, 3))


class Loader:
    def __init__(self, batch_size, dataset_size, drop_last=False):
        self.batch_size, self.drop_last, self.dataset = batch_size, drop_last, range(dataset_size)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(6, 8, bias=False), nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.b(torch.relu(self.bn(self.a(x)))))


class Once(Twice):
    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn2(self.b(torch.relu(self.bn(self.a(x))))).relu()


def frozen_but_training():
    model = mlp()
    for p in model[1].parameters():
        p.requires_grad_(False)
    return model


def poisoned(value):
    model = mlp()
    model[1].running_var[2] = value
    return model


X = torch.randn(16, 6)
CASES = {  # rule: (what triggers it, its corrected twin), each as check()'s arguments
    "BN001": (dict(model=mlp(), inference=True), dict(model=mlp().eval(), inference=True)),
    "BN002": (dict(model=frozen_but_training()), dict(model=bnn.freeze_batchnorm(frozen_but_training()))),
    "BN003": (dict(model=mlp(), loader=Loader(32, 65)), dict(model=mlp(), loader=Loader(32, 65, drop_last=True))),
    "BN004": (dict(model=mlp(), loader=Loader(4, 64)), dict(model=mlp(), loader=Loader(32, 64))),
    "BN005": (dict(model=nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))),
              dict(model=mlp())),
    "BN006": (dict(model=nn.Sequential(nn.Linear(6, 3, bias=False), nn.BatchNorm1d(3))), dict(model=mlp())),
    "BN007": (dict(model=nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))),
              dict(model=mlp())),
    "BN008": (dict(model=poisoned(float("nan"))), dict(model=mlp())),
    "BN009": (dict(model=poisoned(-1.0)), dict(model=poisoned(0.5))),
    "BN010": (dict(model=mlp(momentum=0.99)), dict(model=nn.Sequential(
        nn.Linear(6, 8, bias=False), bnn.BatchNorm1d(8, momentum=0.99, convention="keras"), nn.ReLU()))),
    "BN011": (dict(model=Twice(), example_batch=X), dict(model=Once(), example_batch=X)),
    "BN012": (dict(model=mlp(track_running_stats=False)), dict(model=mlp())),
    "BN013": (dict(model=mlp(), accumulate=8), dict(model=mlp(), accumulate=1)),
    "BN014": (dict(model=nn.Sequential(nn.Linear(6, 8, bias=False), bnn.GhostBatchNorm1d(8, virtual_batch_size=16)),
                   loader=Loader(40, 400)),
              dict(model=nn.Sequential(nn.Linear(6, 8, bias=False), bnn.GhostBatchNorm1d(8, virtual_batch_size=16)),
                   loader=Loader(48, 480))),
}


def test_every_rule_has_a_case():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_a_rule_fires_on_its_trigger_and_not_on_the_fix(rule):
    trigger, fixed = CASES[rule]
    fired = [f for f in check(**trigger) if f.rule == rule]
    assert fired, f"{rule} did not fire"
    assert all(f.why == RULES[rule].why and f.fix == RULES[rule].fix and f.message for f in fired)
    assert not [f for f in check(**fixed) if f.rule == rule], f"{rule} fired on the corrected model"


def test_a_clean_model_and_the_model_is_left_unchanged():
    model = mlp()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert check(model, X, Loader(32, 640, drop_last=True), inference=True) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert to_text([]) == "no batch-norm problems found"


def test_findings_come_most_severe_first_and_export():
    findings = check(poisoned(float("nan")), inference=True, accumulate=4)
    severities = [f.severity for f in findings]
    assert severities == sorted(severities, key=("info", "warning", "error").index, reverse=True)
    text = to_text(findings)
    assert "ERROR   BN008 1: non-finite running statistics" in text and "fix:" in text
    assert {f["rule"] for f in json.loads(to_json(findings))} == {f.rule for f in findings}
    sarif = json.loads(to_sarif(findings, "model.py"))
    assert sarif["version"] == "2.1.0"
    results = sarif["runs"][0]["results"]
    assert {r["ruleId"] for r in results} == {f.rule for f in findings} and results[0]["level"] == "error"
    assert {r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]} == set(RULES)


def test_doctor_command(tmp_path, capsys):
    from bnlab.cli.main import main

    (tmp_path / "models.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def bad():\n    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.99))\n"
        "def good():\n    m = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU())\n    return m.eval()\n")
    target = str(tmp_path / "models.py")
    assert main(["doctor", f"{target}:bad", "--input-shape", "8,4", "--fail-on", "warning"]) == 1
    out = capsys.readouterr().out
    assert "BN010" in out and "BN006" in out and "BN005" in out
    assert main(["doctor", f"{target}:bad"]) == 0  # warnings only: below the default --fail-on error
    capsys.readouterr()
    assert main(["doctor", f"{target}:good", "--inference", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["doctor", f"{target}:missing"]) == 2
    assert "no function 'missing'" in capsys.readouterr().err
    assert main(["doctor", "nofile.py:f"]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse's own exit for a malformed flag
        main(["doctor", f"{target}:bad", "--input-shape", "8,x"])
    assert exc.value.code == 2 and "comma-separated sizes" in capsys.readouterr().err


class Functional(nn.Module):
    """Activations as functions between modules: only the data flow shows what feeds each batch norm."""

    def __init__(self, relu_before_bn: bool):
        super().__init__()
        self.relu_before_bn = relu_before_bn
        self.fc, self.bn, self.out = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        h = self.bn(torch.relu(h)) if self.relu_before_bn else torch.relu(self.bn(h))
        return self.out(h)


def test_the_data_flow_decides_placement_rules_through_functional_activations():
    after = {f.rule for f in check(Functional(relu_before_bn=True), X)}
    assert "BN007" in after and "BN005" not in after  # the ReLU between makes the bias matter
    before = {f.rule for f in check(Functional(relu_before_bn=False), X)}
    assert "BN005" in before and "BN007" not in before
