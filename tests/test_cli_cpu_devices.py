"""``$PSA_JAX_CPU_DEVICES``: the ``psa-jax`` program splits a CPU host into JAX devices before
JAX starts (data parallelism on CPU cores); explicit XLA/JAX settings win; bad values are
named errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from psa_jax import cli
from psa_jax.core.errors import PsaJaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def env(monkeypatch):
    for key in (cli.CPU_DEVICES_ENV, "JAX_NUM_CPU_DEVICES", "XLA_FLAGS"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_setting_and_precedence(env):
    assert cli.cpu_devices() is None  # JAX's own: one device
    assert cli.cpu_devices(4) == 4  # a command's default (the demo's)
    env.setenv(cli.CPU_DEVICES_ENV, "3")
    assert cli.cpu_devices(4) == 3
    env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert cli.cpu_devices(4) is None  # the user's XLA flag wins
    env.delenv("XLA_FLAGS")
    env.setenv("JAX_NUM_CPU_DEVICES", "5")
    assert cli.cpu_devices(4) is None
    env.delenv("JAX_NUM_CPU_DEVICES")
    for bad in ("0", "-1", "two", "1.5"):
        env.setenv(cli.CPU_DEVICES_ENV, bad)
        with pytest.raises(PsaJaxError, match="PSA_JAX_CPU_DEVICES"):
            cli.cpu_devices()


def test_demo_uses_one_device_per_core_up_to_its_batch():
    args = cli.build_parser().parse_args(["demo", "--out", "x"])
    assert args.cpu_devices == math.gcd(cli.cores(), 8)
    assert 8 % args.cpu_devices == 0
    assert getattr(cli.build_parser().parse_args(["info"]), "cpu_devices", None) is None


def _program(env_value: str | None) -> subprocess.CompletedProcess:
    code = (
        "import sys, jax; from psa_jax.cli import main; "
        "sys.argv = ['psa-jax', 'info', '--config', 'configs/tiny.py']; rc = main(); "
        "print('DEVICES', jax.device_count(), rc)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PSA_JAX_COMPILATION_CACHE="0")
    env.pop(cli.CPU_DEVICES_ENV, None)
    if env_value is not None:
        env[cli.CPU_DEVICES_ENV] = env_value
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
        timeout=600,
    )  # fmt: skip


def test_the_program_splits_the_cpu_before_jax_starts():
    proc = _program("3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEVICES 3 0" in proc.stdout
    proc = _program("none")
    assert "psa-jax info: error: $PSA_JAX_CPU_DEVICES='none'" in proc.stderr
