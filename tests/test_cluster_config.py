"""cluster.yaml (AWS) and cluster-local.yaml (own machines) pass Ray's own config validation.

Offline: `prepare_config` merges Ray's defaults for the provider, `validate_config` checks the
result against Ray's JSON schema (AWS bootstrap needs credentials, so only the schema is checked).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import ROOT


def _load(name: str) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(config, dict)
    return config


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_config_is_valid_and_keeps_senders_off_the_head() -> None:
    config = _validate(_load("cluster.yaml"))
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    senders = [t for name, t in config["available_node_types"].items()
               if name != config["head_node_type"]]
    assert len(senders) == 1 and senders[0]["max_workers"] >= senders[0]["min_workers"] >= 0
    # Every node installs bulkmail (with its pinned dependencies) from the synced repository.
    mount = next(iter(config["file_mounts"]))
    assert config["file_mounts"][mount] == "."
    assert any("pip install" in c and mount in c for c in config["worker_setup_commands"])
    assert any("pip install" in c and mount in c for c in config["head_setup_commands"])
    # The Ray image matches the pinned Ray.
    assert "ray:2.60.0-py311" in config["docker"]["image"]


def test_local_config_is_valid_and_keeps_senders_off_the_head() -> None:
    config = _validate(_load("cluster-local.yaml"))
    assert config["provider"]["type"] == "local"
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    (node_type,) = config["available_node_types"].values()
    assert node_type["max_workers"] == len(config["provider"]["worker_ips"])
    assert any("pip install" in c for c in config["worker_setup_commands"])


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_dashboard_is_never_bound_to_all_interfaces(name: str) -> None:
    text = " ".join(_load(name)["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text


@pytest.mark.parametrize("name, path, typo", [
    ("cluster.yaml", (), "max_worker"),
    ("cluster.yaml", ("available_node_types", "sender"), "min_worker"),
    ("cluster.yaml", ("docker",), "pull_befor_run"),
    ("cluster-local.yaml", (), "setup_comands"),
    ("cluster-local.yaml", ("auth",), "ssh_usr"),
])
def test_a_misspelt_key_fails_validation(name: str, path: tuple[str, ...], typo: str) -> None:
    config = _load(name)
    node = config
    for key in path:
        node = node[key]
    right = {"max_worker": "max_workers", "min_worker": "min_workers", "pull_befor_run": "pull_before_run",
             "setup_comands": "setup_commands", "ssh_usr": "ssh_user"}[typo]
    node[typo] = node.pop(right)
    with pytest.raises(jsonschema.ValidationError):
        _validate(config)

