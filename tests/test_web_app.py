"""The web app's HTTP routes and WebSocket sessions, through starlette's TestClient (no browser)."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from bnlab.experiments.claims import ClaimResult
from bnlab.report.claims_report import load_results
from bnlab.store import RunStore
from bnlab.web.app import create_app, dumps
from bnlab.web.jobs import JobManager
from fakes import fake_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store" / "runs.sqlite"
    with RunStore(path) as store:
        _, (run_id,) = store.create_group("key", [("bn", 0, {"model": {"norm": "batch"}, "train": {"dataset": "mnist"}})],
                                          100, "test")
        store.log_metrics(50, [(run_id, "test_acc", 0.9), (run_id, "train_loss", float("nan"))])
        store.log_metrics(100, [(run_id, "test_acc", 0.95)])
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    ClaimResult(claim="trains-faster", protocol="quick", protocol_text="p", seeds=3, statistic="s", numbers={},
                verdict="supported", reason="r", plots=[str(png), str(tmp_path / "gone.png")], runs={},
                wall_seconds=1.0).save(path.parent / "claims")
    return path


@pytest.fixture
def client(store_path):
    manager = JobManager(max_jobs=2, load=lambda name: fake_dataset(640, 300, name), threads=1)
    with TestClient(create_app(manager, store_path=store_path)) as c:
        yield c


def receive_until(ws, kind: str, limit: int = 500) -> dict:
    for _ in range(limit):
        message = json.loads(ws.receive_text())
        if message["type"] == kind:
            return message
    raise AssertionError(f"no {kind} message")


def test_page_and_assets_come_from_the_package_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and "uPlot.iife.min.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/vendor/uPlot.iife.min.js").status_code == 200
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2f..%2fpyproject.toml", "/etc/passwd",
                 "/api/claims/..%2f..%2fetc/plots/0", "/api/runs/..%2fx"):
        assert client.get(path).status_code == 404, path


def test_results_routes_read_the_store_and_serve_listed_plots_only(client, store_path):
    runs = client.get("/api/runs").json()["runs"]
    assert [(r["label"], r["norm"], r["dataset"]) for r in runs] == [("bn", "batch", "mnist")]
    series = client.get(f"/api/runs/{runs[0]['id']}").json()["series"]
    assert series["test_acc"] == {"steps": [50, 100], "values": [0.9, 0.95]}
    assert series["train_loss"]["values"] == [None]  # a NaN is sent as null
    assert client.get("/api/runs/abcdef123456").status_code == 404
    claims = {c["name"]: c for c in client.get("/api/claims").json()["claims"]}
    latest = load_results(store_path.parent / "claims")["trains-faster"]  # what the claims report shows
    assert claims["trains-faster"]["verdict"] == latest.verdict and claims["trains-faster"]["plots"] == 1
    assert claims["higher-lr"]["verdict"] is None
    plot = client.get("/api/claims/trains-faster/plots/0")
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(b"\x89PNG")
    for bad in ("/api/claims/trains-faster/plots/1", "/api/claims/higher-lr/plots/0", "/api/claims/x/plots/-1"):
        assert client.get(bad).status_code == 404, bad


def test_claim_figures_are_drawn_from_their_data_and_the_report_page_stands_alone(client, store_path):
    from bnlab.experiments.claims.base import figure

    series = {"BN": [[1, {"mean": 0.9, "low": 0.88, "high": 0.92}], [10, {"mean": 0.97, "low": 0.96, "high": 0.98}]]}
    ClaimResult(claim="higher-lr", protocol="full", protocol_text="p", seeds=5, statistic="s", numbers={},
                verdict="supported", reason="r", plots=[], runs={}, wall_seconds=1.0,
                figures=[figure("higher-lr.full.png", "lines_with_ci", series=series, title="t", xlabel="x",
                                ylabel="y")]).save(store_path.parent / "claims")
    claims = {c["name"]: c for c in client.get("/api/claims").json()["claims"]}
    assert claims["higher-lr"]["plots"] == 1
    plot = client.get("/api/claims/higher-lr/plots/0")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG") and len(plot.content) > 1000
    page = client.get("/claims/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<img alt="higher-lr" src="data:image/png;base64,' in page.text and "<table>" in page.text


def test_an_empty_store_is_not_created(tmp_path):
    path = tmp_path / "nothing" / "runs.sqlite"
    with TestClient(create_app(JobManager(threads=1), store_path=path)) as c:
        assert c.get("/api/runs").json() == {"runs": []}
    assert not path.exists() and not path.parent.exists()


def test_a_session_trains_and_answers_bad_messages_with_errors(client):
    with client.websocket_connect("/ws") as ws:
        ready = receive_until(ws, "ready")
        assert ready["settings"]["norm"] == "batch"
        ws.send_text(json.dumps({"type": "settings", "values": {"depth": 1, "width": 16}}))
        assert receive_until(ws, "settings")["rebuilt"] is True
        ws.send_text(json.dumps({"type": "command", "action": "start"}))
        while receive_until(ws, "status")["state"] != "running":  # (the settings change sent one too)
            pass
        tick = receive_until(ws, "tick")
        while not tick["steps"]:  # the rebuild's first measurement may come alone
            tick = receive_until(ws, "tick")
        for bad in ("{bad", json.dumps({"type": "settings", "values": {"lr": -1}}), "x" * 5000, b"\xff\xfe"):
            ws.send_text(bad) if isinstance(bad, str) else ws.send_bytes(bad)
            assert receive_until(ws, "error")["where"] == "message"
        ws.send_text(json.dumps({"type": "ping", "id": 42}))
        assert receive_until(ws, "pong")["id"] == 42
        steps = receive_until(ws, "tick")["steps"]
        assert steps and steps[-1] > tick["steps"][-1]  # still training


def test_sessions_beyond_the_limit_are_refused(client):
    with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
        receive_until(a, "ready"), receive_until(b, "ready")
        with client.websocket_connect("/ws") as c:
            error = json.loads(c.receive_text())
            assert error["type"] == "error" and "at most 2" in error["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                c.receive_text()
            assert closed.value.code == 1013
    with client.websocket_connect("/ws") as d:  # closed tabs free their slots
        receive_until(d, "ready")


def test_dumps_sends_non_finite_numbers_as_null():
    assert json.loads(dumps({"a": [1.0, math.nan, {"b": math.inf}], "c": -math.inf})) == {"a": [1.0, None, {"b": None}],
                                                                                       "c": None}


def test_serve_binds_to_loopback_unless_told_otherwise(monkeypatch, capsys):
    import uvicorn

    from bnlab.cli.main import main
    from bnlab.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err and started == []
    assert main(["serve", "--host", "0.0.0.0", "--allow-remote", "--port", "8123"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert main(["serve"]) == 0
    assert [(kw["host"], kw["port"]) for kw in started] == [("0.0.0.0", 8123), ("127.0.0.1", 8000)]
