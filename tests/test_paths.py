"""The XDG rule of bnlab._paths, and the three places that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnlab._paths import user_cache_path, user_data_path
from bnlab.data import default_data_dir
from bnlab.functional.compiled import _cache_dir
from bnlab.store import default_store_path

# (function, override variable, XDG variable, fallback under $HOME, entry name)
RULES = {
    "kernels": (_cache_dir, "BNLAB_KERNEL_CACHE", "XDG_CACHE_HOME", ".cache", "kernels"),
    "data": (default_data_dir, "BNLAB_DATA", "XDG_CACHE_HOME", ".cache", "data"),
    "store": (default_store_path, "BNLAB_STORE", "XDG_DATA_HOME", ".local/share", "runs.sqlite"),
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("XDG_CACHE_HOME", "XDG_DATA_HOME", *(rule[1] for rule in RULES.values())):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_override_then_xdg_then_home(rule, home, tmp_path, monkeypatch):
    function, env, xdg, fallback, name = RULES[rule]
    assert function() == home / fallback / "bnlab" / name
    monkeypatch.setenv(xdg, "")  # empty counts as unset
    assert function() == home / fallback / "bnlab" / name
    monkeypatch.setenv(xdg, str(tmp_path / "xdg"))
    assert function() == tmp_path / "xdg" / "bnlab" / name
    monkeypatch.setenv(env, "")
    assert function() == tmp_path / "xdg" / "bnlab" / name
    monkeypatch.setenv(env, str(tmp_path / "mine"))
    assert function() == tmp_path / "mine"  # the entry itself, not a parent of it
    monkeypatch.setenv(env, "~/elsewhere")
    assert function() == home / "elsewhere"


def test_cache_and_data_homes_are_separate(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert user_cache_path("x") == tmp_path / "cache" / "bnlab" / "x"
    assert user_data_path("x") == home / ".local" / "share" / "bnlab" / "x"  # XDG_CACHE_HOME is not data
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_data_path("x") == tmp_path / "data" / "bnlab" / "x"
    assert user_cache_path("x") == home / ".cache" / "bnlab" / "x"
    assert user_cache_path("x", env=None) == user_cache_path("x")
    assert isinstance(user_cache_path("x"), Path)
