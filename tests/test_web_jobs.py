"""The web app's training jobs and views, checked against independent computations."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from bnlab import reference
from bnlab.nn import NORM_KINDS
from bnlab.train.engine import batch_order
from bnlab.web import views
from bnlab.web.jobs import JobManager, Pair, TooManyJobs, WebData, torch_threads, weight_layers
from bnlab.web.schema import VIEWS, check_settings
from fakes import fake_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data() -> WebData:
    return WebData.from_dataset(fake_dataset(640, 300), test_size=200, probe_size=64)


def small(**changes) -> dict:
    return check_settings({"depth": 2, "width": 16, "batch_size": 32, **changes})


def kind_settings(kind: str) -> dict:
    return small(norm=kind, arch="cnn" if kind == "instance" else "mlp")


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_both_networks_start_from_the_same_weights(kind, data):
    pair = Pair(kind_settings(kind), data)
    plain, norm = weight_layers(pair.models["plain"]), weight_layers(pair.models["norm"])
    assert len(plain) == len(norm) > 0
    for a, b in zip(plain, norm):
        assert torch.equal(a.weight, b.weight)
        if a.bias is not None and b.bias is not None:
            assert torch.equal(a.bias, b.bias)
    assert pair.specs["plain"].norm == "none" and pair.specs["norm"].norm == kind


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_every_kind_trains_and_every_view_answers(kind, data):
    pair = Pair(kind_settings(kind), data)
    for _ in range(3):
        pair.train_step()
    out = pair.telemetry({})
    pre, inputs = out["layers"]["norm"]["pre"], out["layers"]["norm"]["in"]
    assert len(inputs) == len(pre) == len(out["layers"]["plain"]["pre"]) and None not in pre
    # the norm layers are where the kind puts them: everywhere, nowhere, or (instance) in the convolutions only
    assert [x is not None for x in inputs] == [kind != "none" and (kind != "instance" or i < 2) for i in range(len(pre))]
    assert views.bn_step(pair, _step_params(source="live"))["n"] >= 32
    modes = views.train_vs_eval(pair, {"layer": 0})
    assert modes["available"] == (kind in ("batch", "renorm", "ghost", "frozen"))
    assert len(views.landscape(pair, {"radius": 1.0, "points": 5, "seed": 0})["nets"]["norm"]["loss"]) == 5


def test_both_networks_see_the_same_batches_in_batch_order(data):
    pair = Pair(small(batch_size=200), data)
    seen = {name: [] for name in pair.models}
    for name, model in pair.models.items():
        model[0].register_forward_pre_hook(lambda m, inputs, name=name: seen[name].append(inputs[0].clone()))
    for _ in range(7):  # 640 examples in batches of 200: three per epoch, the last 40 are skipped
        pair.train_step()
    n = len(data.train_y)
    order = [batch_order(0, 0, epoch, n) for epoch in range(3)]
    expected = [order[s // 3][(s % 3) * 200:(s % 3 + 1) * 200] for s in range(7)]
    for step, idx in enumerate(expected):
        assert torch.equal(seen["plain"][step], data.train_x[idx])
        assert torch.equal(seen["norm"][step], data.train_x[idx])


def test_a_session_is_a_function_of_its_settings(data):
    """Same settings, same losses (dropout too), whatever else ran in between."""
    # dropout draws from torch's global generator: a worker left running by another test would draw too
    assert [t for t in threading.enumerate() if t.name == "bnlab-web-worker"] == []
    settings = small(dropout=0.3)
    a = Pair(settings, data)
    torch.set_rng_state(a.rng_state)
    first = [a.train_step() for _ in range(5)]
    b = Pair(settings, data)
    torch.manual_seed(123)  # another session drew from the global generator meanwhile
    torch.set_rng_state(b.rng_state)
    assert [b.train_step() for _ in range(5)] == first


def test_live_settings_act_on_the_running_networks(data):
    pair = Pair(small(), data)
    pair.train_step()
    pair.apply_live({"lr": 0.01, "bn_momentum": 0.3, "eps": 1e-3, "batch_size": 10})
    assert all(g["lr"] == 0.01 for opt in pair.optimizers.values() for g in opt.param_groups)
    norms = [m for m in pair.models["norm"].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.momentum == 0.3 and m.eps == 1e-3 for m in norms)
    x, _ = pair.next_batch()
    assert len(x) == 10
    pair.apply_live({"optimizer": "adam"})
    assert all(isinstance(o, torch.optim.Adam) and o.param_groups[0]["lr"] == 0.01 for o in pair.optimizers.values())


def test_telemetry_percentiles_and_histograms_match_the_activations(data):
    pair = Pair(small(), data)
    for _ in range(3):
        pair.train_step()
    before = [b.clone() for b in pair.models["norm"].buffers()]
    out = pair.telemetry({})
    model = copy.deepcopy(pair.models["norm"]).train()
    acts = [m for m in model if isinstance(m, nn.Sigmoid)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
    captured = {}
    for i, m in enumerate(acts + norms):
        m.register_forward_hook(lambda mod, inp, o, i=i: captured.__setitem__(i, inp[0].detach()))
    with torch.no_grad():
        model(data.probe_x)
    for layer, pre in enumerate(out["layers"]["norm"]["pre"]):
        values = captured[layer].flatten().numpy()
        np.testing.assert_allclose(pre["p"], np.percentile(values, [15, 50, 85]), rtol=1e-4, atol=1e-5)
        assert sum(pre["hist"]) == pytest.approx(1.0, abs=1e-3)
    for layer, inp in enumerate(out["layers"]["norm"]["in"]):
        values = captured[len(acts) + layer].flatten().numpy()
        np.testing.assert_allclose(inp["p"], np.percentile(values, [15, 50, 85]), rtol=1e-4, atol=1e-5)
    logits = pair.models["plain"].eval()(data.test_x)
    pair.models["plain"].train()
    assert out["test_acc"]["plain"] == pytest.approx(float((logits.argmax(1) == data.test_y).float().mean()))
    grads = [float(m.weight.grad.norm()) for m in weight_layers(pair.models["norm"])]
    assert out["grad_norm"]["norm"] == pytest.approx(grads)
    # measuring changed nothing: running statistics are where training left them
    for a, b in zip(pair.models["norm"].buffers(), before):
        assert torch.equal(a, b)


def _step_params(**changes) -> dict:
    return {**{name: f.default for name, f in VIEWS["bn_step"].items()}, **changes}


@pytest.mark.parametrize("source", ["synthetic", "live"])
def test_view1_numbers_are_the_reference(source, data):
    pair = Pair(small(), data)
    params = _step_params(source=source, batch_size=48, gamma=1.7, beta=-0.4, eps=0.01, skew=0.6, outliers=0.1)
    d = views.bn_step(pair, params)
    if source == "synthetic":
        x = views.synthetic_batch(params)
    else:  # the first BN layer's input, channel 0, computed here by a plain forward hook
        model = copy.deepcopy(pair.models["norm"]).train()
        g = torch.Generator().manual_seed(params["seed"])
        idx = torch.randperm(len(data.train_y), generator=g)[:48]
        got = []
        next(m for m in model if isinstance(m, nn.BatchNorm1d)).register_forward_hook(
            lambda m, inp, o: got.append(inp[0][:, 0].double().numpy()))
        with torch.no_grad():
            model(data.train_x[idx])
        x = got[0]
    mu, var = x.mean(), x.var()  # an independent one-liner, as in Flax's tests
    x_hat = (x - mu) / np.sqrt(var + 0.01)
    assert d["n"] == 48
    assert d["mean"] == pytest.approx(mu) and d["var"] == pytest.approx(var)
    np.testing.assert_allclose(d["examples"]["x_hat"], x_hat[:5], atol=1e-6)
    np.testing.assert_allclose(d["examples"]["y"], 1.7 * x_hat[:5] - 0.4, atol=1e-6)
    assert d["identity"]["gamma"] == pytest.approx(np.sqrt(var + 0.01))
    assert d["identity"]["max_abs_error"] < 1e-12
    y_ref, _, _ = reference.batch_norm_forward(x[:, None], np.array([1.7]), np.array([-0.4]),
                                               reference.RunningStats.initial(1), training=True, eps=0.01)
    assert d["y_std"] == pytest.approx(float(y_ref.std()))
    assert sum(d["hist"]["y"]["counts"]) == 48


def test_synthetic_batches_have_the_shape_asked_for():
    x = views.synthetic_batch(_step_params(batch_size=1024, mean=3.0, spread=2.0, skew=0.9, seed=1))
    assert x.mean() == pytest.approx(3.0, abs=0.2) and x.std() == pytest.approx(2.0, rel=0.1)
    assert ((x - x.mean()) ** 3).mean() > 0  # skewed to the right
    y = views.synthetic_batch(_step_params(batch_size=100, outliers=0.1, mean=0.0, spread=1.0))
    assert int((np.abs(y) >= 6.0 - 1e-9).sum()) == 10


def test_view3_compares_running_and_batch_statistics_without_moving_them(data):
    pair = Pair(small(), data)
    for _ in range(5):
        pair.train_step()
    before = [b.clone() for b in pair.models["norm"].buffers()]
    d = views.train_vs_eval(pair, {"layer": 1})
    assert all(torch.equal(a, b) for a, b in zip(before, pair.models["norm"].buffers()))
    bn = [m for m in pair.models["norm"] if isinstance(m, nn.BatchNorm1d)][1]
    assert d["available"] and d["layer"] == 1 and d["layers"] == 2
    np.testing.assert_allclose(d["running_mean"], bn.running_mean[:16].numpy(), atol=1e-5)
    model = copy.deepcopy(pair.models["norm"])
    x, y = data.test_x[:200], data.test_y[:200]
    with torch.no_grad():
        eval_acc = float((model.eval()(x).argmax(1) == y).float().mean())
        train_acc = float((model.train()(x[:128]).argmax(1) == y[:128]).float().mean())  # one batch of 128
    assert d["eval_mode_acc"] == pytest.approx(eval_acc)
    assert d["train_mode_acc"][d["batch_sizes"].index(128)] == pytest.approx(train_acc)
    assert views.train_vs_eval(Pair(small(norm="layer"), data), {"layer": 0})["available"] is False


def test_view4_surface_is_centred_on_the_weights_and_projects_the_path(data):
    pair = Pair(small(), data)
    for _ in range(20):
        pair.train_step()
    d = views.landscape(pair, {"radius": 0.5, "points": 5, "seed": 3})
    x, y = data.probe_x[:128], data.probe_y[:128]
    for name, model in pair.models.items():
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(copy.deepcopy(model).eval()(x), y))
        assert d["nets"][name]["loss"][2][2] == pytest.approx(loss, rel=1e-4)
        assert d["nets"][name]["path"][-1] == [0.0, 0.0, pair.step]
    # a snapshot placed at centre + 0.3 d1 - 0.2 d2 is projected back to (0.3, -0.2)
    from bnlab.probes import filter_normalized_directions

    d1, d2 = filter_normalized_directions(pair.models["norm"], seed=3)
    flat = lambda d: torch.cat([t.flatten() for t in d.values()])  # noqa: E731
    pair.path["norm"].clear()
    pair.path["norm"].append((7, pair.flat_params("norm") + 0.3 * flat(d1) - 0.2 * flat(d2)))
    (a, b, step), _ = views.landscape(pair, {"radius": 0.5, "points": 5, "seed": 3})["nets"]["norm"]["path"]
    assert (a, b, step) == (pytest.approx(0.3, abs=1e-4), pytest.approx(-0.2, abs=1e-4), 7)


def test_thread_count_leaves_a_core_to_the_event_loop():
    assert [torch_threads(c) for c in (1, 2, 4, 8)] == [1, 1, 3, 7]


# -- the job manager -------------------------------------------------------------------------------


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.fixture
def manager():
    m = JobManager(max_jobs=2, load=lambda name: fake_dataset(640, 300, name), threads=1)
    yield m
    m.shutdown()


def start(job, **settings):
    job.submit({"type": "settings", "values": {"depth": 1, "width": 16, "batch_size": 32, **settings}})
    job.submit({"type": "command", "action": "start"})


def test_jobs_time_slice_and_a_job_stops_when_its_tab_closes(manager):
    a, b = manager.open(), manager.open()
    start(a)
    start(b, norm="layer")
    wait_for(lambda: a.steps_trained > 20 and b.steps_trained > 20)
    assert a.pair.specs["norm"].norm == "batch" and b.pair.specs["norm"].norm == "layer"
    manager.close(a)
    time.sleep(0.3)  # the slice that was running when it closed ends (a slice is ~20 ms)
    steps = a.steps_trained
    time.sleep(0.3)
    assert a.steps_trained == steps and manager.live_jobs == 1
    later = b.steps_trained
    wait_for(lambda: b.steps_trained > later + 10)  # the other one goes on


def test_sessions_are_bounded(manager):
    manager.open(), manager.open()
    with pytest.raises(TooManyJobs, match="at most 2"):
        manager.open()


def test_a_failing_job_reports_and_the_others_go_on():
    calls = threading.Event()

    def load(name):
        if name == "fashion":
            calls.set()
            raise RuntimeError("disk on fire")
        return fake_dataset(640, 300, name)

    manager = JobManager(load=load, threads=1)
    try:
        bad, good = manager.open(), manager.open()
        start(bad, dataset="fashion")
        start(good)
        wait_for(lambda: any(m["type"] == "error" for m in list(bad._outbox)))
        error = next(m for m in bad.take_outbox() if m["type"] == "error")
        assert error["where"] == "job" and "disk on fire" in error["message"] and bad.state == "error"
        wait_for(lambda: good.steps_trained > 10)
        bad.submit({"type": "settings", "values": {"dataset": "mnist"}})  # the page recovers by changing it
        bad.submit({"type": "command", "action": "start"})
        wait_for(lambda: bad.steps_trained > 5)
    finally:
        manager.shutdown()


def test_pause_reset_and_an_invalid_combination(manager):
    job = manager.open()
    start(job)
    wait_for(lambda: job.steps_trained > 5)
    job.submit({"type": "command", "action": "pause"})
    wait_for(lambda: job.state == "paused")
    time.sleep(0.05)
    steps = job.pair.step
    time.sleep(0.2)
    assert job.pair.step == steps > 0
    job.submit({"type": "command", "action": "reset"})
    wait_for(lambda: job.pair.step == 0 and any(m["type"] == "rebuilt" for m in job.take_outbox()))
    job.submit({"type": "settings", "values": {"norm": "instance"}})  # the MLP cannot: refused, nothing changes
    wait_for(lambda: any(m["type"] == "error" and "instance" in m["message"] for m in job.take_outbox()))
    assert job.settings["norm"] == "batch"
