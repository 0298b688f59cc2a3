"""What a run sets in its environment before Ray is imported (no Ray here): joining a Ray on
this machine, or one that wants a token, must not hang or fail for want of a variable. The CLI
tests that join the session's Ray run without either variable set (conftest.cli_env)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pipeline import ray_session
from pipeline.config import CampaignConfig
from pipeline.errors import UsageError
from pipeline.lab.sink import free_port

NAMES = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN",
         "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in NAMES:
        monkeypatch.setenv(name, "")  # recorded, so whatever prepare_import sets is undone
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token unless a test writes one
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no ray_current_cluster unless written
    return monkeypatch


def prepared(address: str | None) -> dict[str, str | None]:
    ray_session.prepare_import(CampaignConfig(input="x.parquet", address=address))
    return {n: os.environ.get(n) for n in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}


def test_a_ray_of_its_own_serves_loopback_with_a_token(env: pytest.MonkeyPatch) -> None:
    assert prepared(None) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001",
                                     "[::1]:6379"])
def test_joining_a_head_on_loopback_keeps_the_driver_on_loopback(
        env: pytest.MonkeyPatch, address: str) -> None:
    assert prepared(address) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": None}


def test_joining_another_machine_changes_nothing_without_a_token(env: pytest.MonkeyPatch) -> None:
    assert prepared("10.0.0.5:6379") == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None,
                                         "RAY_AUTH_MODE": None}


def test_joining_with_a_token_at_hand_presents_it(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    assert prepared("10.0.0.5:6379")["RAY_AUTH_MODE"] == "token"


def test_a_token_in_the_environment_counts_and_the_address_may_come_from_it(
        env: pytest.MonkeyPatch) -> None:
    env.setenv("RAY_AUTH_TOKEN", "t" * 32)
    env.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert prepared(None) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


def test_what_the_user_set_is_kept(env: pytest.MonkeyPatch) -> None:
    env.setenv("RAY_AUTH_MODE", "disabled")
    env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    assert prepared("127.0.0.1:6379") == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                                          "RAY_AUTH_MODE": "disabled"}


def test_an_address_where_nothing_listens_is_refused_naming_where_it_came_from(
        env: pytest.MonkeyPatch) -> None:
    port = free_port()
    with pytest.raises(UsageError, match=rf"^--address 127.0.0.1:{port}: no Ray cluster answers"):
        ray_session.check_address(CampaignConfig(input="x.parquet", address=f"127.0.0.1:{port}"))
    env.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(UsageError, match=r"^\$RAY_ADDRESS ray://127.0.0.1:"):
        ray_session.check_address(CampaignConfig(input="x.parquet"))


def test_a_listening_address_and_auto_pass_the_check(env: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        ray_session.check_address(CampaignConfig(input="x.parquet", address=f"127.0.0.1:{port}"))
    ray_session.check_address(CampaignConfig(input="x.parquet", address="auto"))
    ray_session.check_address(CampaignConfig(input="x.parquet"))  # a Ray of its own


def test_auto_is_the_ray_last_started_on_this_machine(env: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379\n")
    assert prepared("auto")["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_auto_on_the_primary_interface_or_unknown_changes_nothing(env: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    assert prepared("auto")["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] is None  # no file: Ray says so
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379\n")
    assert prepared("auto")["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] is None


def test_a_bare_ipv6_address_is_left_to_ray(env: pytest.MonkeyPatch) -> None:
    assert prepared("::1")["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] is None
    ray_session.check_address(CampaignConfig(input="x.parquet", address="::1"))  # not port 1


def test_a_token_path_that_does_not_exist_is_no_token(env: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert prepared("10.0.0.5:6379")["RAY_AUTH_MODE"] is None
    (tmp_path / "missing").write_text("t" * 32)
    assert prepared("10.0.0.5:6379")["RAY_AUTH_MODE"] == "token"


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "https://ray.example:443"])
def test_the_dashboards_address_is_refused_before_any_connect(env: pytest.MonkeyPatch,
                                                              address: str) -> None:
    env.setenv("RAY_ADDRESS", address)
    with pytest.raises(UsageError, match=r"^\$RAY_ADDRESS http.*not the dashboard's"):
        ray_session.check_address(CampaignConfig(input="x.parquet"))
