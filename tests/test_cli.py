"""The command line: `bootstrap` output accepted by the real `envoy --mode validate`, and the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import cli
from controlplane.runtime.envoy_process import envoy_binary
from tests.harness import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_ARGS = ["bootstrap", "--xds-address", "controlplane.controlplane-system.svc:18000",
                "--node-cluster", "gateway", "--node-id", "gateway"]


@pytest.mark.parametrize("extra", [[], ["--delta"]])
def test_bootstrap_is_valid_for_envoy(tmp_path, capsys, extra):
    assert cli.main(EXAMPLE_ARGS + extra) == 0
    config = tmp_path / "bootstrap.yaml"
    config.write_text(capsys.readouterr().out)
    validated = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)],
                               capture_output=True, text=True, timeout=60)
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_example_bootstrap_in_the_repo_is_current(capsys):
    cli.main(EXAMPLE_ARGS)
    assert (REPO / "envoy" / "bootstrap-ads.yaml").read_text() == capsys.readouterr().out, (
        "envoy/bootstrap-ads.yaml drifted: regenerate it with "
        f"`controlplane {' '.join(EXAMPLE_ARGS)} > envoy/bootstrap-ads.yaml`")


def test_bad_xds_address_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bootstrap", "--xds-address", "nocolon", "--node-cluster", "g"])
    assert "is not HOST:PORT" in capsys.readouterr().err


@pytest.mark.envoy
def test_demo_serves_traffic_through_a_real_envoy():
    ports = [str(free_port()) for _ in range(3)]
    demo = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "demo", "--check", "--xds-port", ports[0],
         "--listener-port", ports[1], "--admin-port", ports[2]],
        capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "'api-1'" in demo.stdout and "'api-2'" in demo.stdout
