"""The web protocol: every malformed or out-of-range message is refused with a reason, valid ones are typed."""

from __future__ import annotations

import json

import pytest

from bnlab.nn import NORM_KINDS
from bnlab.web.schema import (
    MAX_MESSAGE_BYTES,
    SETTINGS,
    VIEWS,
    ProtocolError,
    check_settings,
    default_settings,
    parse_message,
)

STEP_PARAMS = {name: f.default for name, f in VIEWS["bn_step"].items()}


def test_defaults_are_valid_and_every_norm_kind_is_offered():
    assert check_settings({}) == default_settings()
    assert set(SETTINGS["norm"].choices) == set(NORM_KINDS)
    for name, field in SETTINGS.items():
        assert field.check(name, field.default) == field.default


def test_valid_messages_come_back_typed():
    m = parse_message(json.dumps({"type": "settings", "values": {"lr": 1, "batch_size": 64.0, "norm": "ghost"}}))
    assert m["values"] == {"lr": 1.0, "batch_size": 64, "norm": "ghost"}
    assert type(m["values"]["lr"]) is float and type(m["values"]["batch_size"]) is int
    assert parse_message('{"type": "command", "action": "pause"}') == {"type": "command", "action": "pause"}
    v = parse_message(json.dumps({"type": "view", "view": "bn_step", "id": 3, "params": STEP_PARAMS}))
    assert v["id"] == 3 and v["params"] == STEP_PARAMS
    assert parse_message(b'{"type": "ping", "id": 0}') == {"type": "ping", "id": 0}


BAD = [
    ("{bad", "not JSON"),
    ("[]", "type is one of"),
    ('{"type": "launch"}', "type is one of"),
    ('{"type": "command"}', "missing key 'action'"),
    ('{"type": "command", "action": "start", "x": 1}', "unknown key 'x'"),
    ('{"type": "command", "action": "explode"}', "action must be one of"),
    ('{"type": "settings", "values": []}', "must be an object"),
    ('{"type": "settings", "values": {"path": "/etc/passwd"}}', "unknown settings key 'path'"),
    ('{"type": "settings", "values": {"lr": "fast"}}', "lr must be a number"),
    ('{"type": "settings", "values": {"lr": true}}', "lr must be a number"),
    ('{"type": "settings", "values": {"lr": 0}}', "lr must be in"),
    ('{"type": "settings", "values": {"lr": NaN}}', "lr must be in"),
    ('{"type": "settings", "values": {"lr": Infinity}}', "lr must be in"),
    ('{"type": "settings", "values": {"width": 1e400}}', "width must be"),
    ('{"type": "settings", "values": {"width": 10' + "0" * 400 + "}}", "width must be in"),
    ('{"type": "settings", "values": {"batch_size": 32.5}}', "batch_size must be an integer"),
    ('{"type": "settings", "values": {"batch_size": 1}}', "batch_size must be in"),
    ('{"type": "settings", "values": {"norm": "batchy"}}', "norm must be one of"),
    ('{"type": "settings", "values": {"norm": 3}}', "norm must be one of"),
    ('{"type": "view", "view": "files", "id": 1, "params": {}}', "view must be one of"),
    ('{"type": "view", "view": "landscape", "id": 1, "params": {"radius": 1}}', "misses 'points'"),
    ('{"type": "view", "view": "landscape", "id": -1, "params": {"radius": 1, "points": 5, "seed": 0}}', "id must be in"),
    ('{"type": "view", "view": "landscape", "id": 1, "params": {"radius": 1, "points": 99, "seed": 0}}',
     "points must be in"),
    ('{"type": "ping", "id": "x"}', "id must be a number"),
]


@pytest.mark.parametrize("text, reason", BAD, ids=[b[1] for b in BAD])
def test_bad_messages_are_refused_with_a_reason(text, reason):
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(")):
        parse_message(text)


def test_size_limit():
    padding = "x" * MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError, match="too large"):
        parse_message(json.dumps({"type": "ping", "id": 1, "pad": padding}))


def test_combinations_are_checked_against_the_current_settings():
    current = check_settings({"arch": "cnn"})
    assert check_settings({"norm": "instance"}, current)["norm"] == "instance"
    with pytest.raises(ProtocolError, match="instance norm"):
        check_settings({"norm": "instance"})  # on the default MLP
    with pytest.raises(ProtocolError, match="instance norm"):
        check_settings({"arch": "mlp"}, check_settings({"norm": "instance"}, current))
    ghost = check_settings({"norm": "ghost", "batch_size": 64})
    assert check_settings({"batch_size": 20}, ghost)["batch_size"] == 20
    with pytest.raises(ProtocolError, match="ghost batches of 32"):
        check_settings({"batch_size": 60}, ghost)
