"""``$PSA_JAX_CPU_DEVICES``: the ``psa-jax`` program splits a CPU host into JAX devices before
JAX starts (data parallelism on CPU cores); explicit XLA/JAX settings win; bad values are
named errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
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


# glibc huge pages: the program restarts itself once with ``glibc.malloc.hugetlb=1`` so XLA's
# per-step temporaries fault in 2 MiB at a time (BENCHMARKS.md).
GLIBC = ("glibc", "2.36")


def test_hugepage_environ_adds_the_tunable_only_where_it_helps():
    new = cli.hugepage_environ({"A": "1"}, "madvise", GLIBC)
    assert new == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", cli._RESTARTED_ENV: "1"}
    assert cli.hugepage_environ({cli._RESTARTED_ENV: "1"}, "madvise", GLIBC) is None  # once
    kept = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert cli.hugepage_environ(kept, "madvise", GLIBC)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert (
        cli.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC) is None
    )
    assert cli.hugepage_environ({cli.HUGEPAGES_ENV: "0"}, "madvise", GLIBC) is None
    for mode in ("always", "never", None):  # huge already, or none to be had
        assert cli.hugepage_environ({}, mode, GLIBC) is None
    for libc in (("glibc", "2.34"), ("", ""), ("musl", "1.2")):  # no such tunable
        assert cli.hugepage_environ({}, "madvise", libc) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert cli.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert cli.thp_mode(str(path)) == "always"
    assert cli.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("argv0, restarts", [
    ("/venv/bin/psa-jax", True),
    (os.path.join(ROOT, "psa_jax", "cli", "__main__.py"), True),
    ("my_script.py", False),  # a script calling main() is not re-run
])  # fmt: skip
def test_the_program_restarts_itself_with_the_tunable(monkeypatch, argv0, restarts):
    calls = []

    class Restarted(Exception):
        pass

    def execve(path, args, environ):
        calls.append((path, args, environ))
        raise Restarted

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(cli, "thp_mode", lambda: "madvise")
    monkeypatch.setattr("platform.libc_ver", lambda: GLIBC)
    monkeypatch.setattr(sys, "argv", [argv0, "info"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, argv0, "info"])
    for key in ("GLIBC_TUNABLES", cli.HUGEPAGES_ENV, cli._RESTARTED_ENV):
        monkeypatch.delenv(key, raising=False)
    if not restarts:
        cli._restart_with_hugepages()
        assert calls == []
        return
    with pytest.raises(Restarted):
        cli.main()
    path, args, environ = calls[0]
    assert path == sys.executable and args == [sys.executable, argv0, "info"]
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    for key in ("GLIBC_TUNABLES", cli._RESTARTED_ENV):  # the restarted process
        monkeypatch.setenv(key, environ[key])
    cli._restart_with_hugepages()
    monkeypatch.setenv("GLIBC_TUNABLES", "")  # even if something dropped the tunable
    cli._restart_with_hugepages()
    assert len(calls) == 1


def test_sample_eval_and_spqr_split_the_cpu_like_the_demo():
    for command in (
        ["sample", "--out", "x"],
        ["eval", "--out", "x"],
        ["spqr", "--out", "x", "--profile", "lite"],
    ):
        args = cli.build_parser().parse_args(command)
        assert args.cpu_devices == math.gcd(cli.cores(), 8)


@pytest.mark.parametrize("cores", [2, 4, 6])
def test_bench_splits_the_cpu_as_its_batch_allows(monkeypatch, cores):
    """One device per core, as many as divide the step's pairs or images: the tiny train step
    (8 pairs) and a sampling batch (8 images) split; sd15-256's one pair, or --batch 1, not."""
    monkeypatch.setattr(cli, "cores", lambda: cores)

    def split(*argv: str) -> int:
        args = cli.build_parser().parse_args(["bench", *argv])
        return args.cpu_devices(args)

    assert split("--shape", "tiny") == math.gcd(cores, 8)
    assert split("--shape", "tiny", "--what", "sample") == math.gcd(cores, 8)
    assert split("--shape", "tiny", "--batch", "3") == math.gcd(cores, 3)
    assert split("--shape", "sd15-256") == 1
    assert split("--shape", "tiny", "--batch", "1") == 1


def test_the_program_samples_over_its_cpu_devices(tmp_path):
    """``psa-jax sample`` on 2 CPU devices splits each chunk over both (as many devices as
    divide the chunk); the images are one device's to within 1/255."""
    from psa_jax.sample.images import load_png

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PSA_JAX_COMPILATION_CACHE="0")
    said = {}
    for devices in ("1", "2"):
        cmd = [sys.executable, "-m", "psa_jax.cli", "sample", "--pretrained", "packaged:tiny-base",
               "--users", "base", "--prompt", "a tent", "--prompt", "a knife", "--steps", "3",
               "--batch-size", "2", "--out", str(tmp_path / devices)]  # fmt: skip
        proc = subprocess.run(cmd, env={**env, cli.CPU_DEVICES_ENV: devices}, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        said[devices] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert said["1"]["devices"] == 1 and said["2"]["devices"] == 2
    assert said["1"]["images"] == said["2"]["images"] == 2
    with open(tmp_path / "1" / "samples.jsonl", encoding="utf-8") as f:
        files = [json.loads(line)["file"] for line in f]
    for name in files:
        a = load_png(tmp_path / "1" / name).astype(int)
        b = load_png(tmp_path / "2" / name).astype(int)
        assert np.abs(a - b).max() <= 1


def test_sampling_mesh_uses_the_devices_that_divide_the_chunk():
    code = (
        "import jax; jax.config.update('jax_num_cpu_devices', 8); "
        "from psa_jax.core.parallel import sampling_mesh; "
        "print('MESH', sampling_mesh(8).size, sampling_mesh(6).size, sampling_mesh(1))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MESH 8 2 None" in proc.stdout
