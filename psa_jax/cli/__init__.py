"""``psa-jax`` command line: one module per subcommand here parses arguments and calls library
functions, nothing more; library modules hold no argparse.

``info`` builds a config's models with random weights and runs them once, end to end.

Errors: psa_jax's own (:class:`~psa_jax.core.errors.PsaJaxError`: bad input, named) print one
line ``psa-jax <command>: error: ...`` and exit 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from psa_jax.core.errors import EXIT_BAD_INPUT, PsaJaxError


def _info(args: argparse.Namespace) -> int:
    from psa_jax.config import load_config
    from psa_jax.models.smoke import run_models

    report = run_models(load_config(args.config), seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psa-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="build a config's models (random weights) and run them once")
    info.add_argument("--config", default="configs/tiny.py", help="path to a configs/*.py file")
    info.add_argument("--seed", type=int, default=0)
    info.set_defaults(func=_info)
    # Each subcommand's module imports its stage only when the parser is built.
    from psa_jax.cli import bench, data, demo, eval, export, sample, sweep, train

    for module in (data, train, sample, eval, export, demo, bench, sweep):
        module.register(sub)
    return parser


COMPILATION_CACHE_ENV = "PSA_JAX_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def compilation_cache_dir() -> str | None:
    """Where the ``psa-jax`` program keeps compiled XLA programs between commands, None: off.

    ``$PSA_JAX_COMPILATION_CACHE``: ``0``/``off`` turns the cache off, any other value is the
    folder; unset, ``<$PSA_JAX_CACHE or ~/.cache/psa_jax>/jax_compilation_cache``. A cache
    folder that JAX already has (``$JAX_COMPILATION_CACHE_DIR``) is kept."""
    import jax

    setting = os.environ.get(COMPILATION_CACHE_ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not setting:
        from psa_jax.data.prepare import CACHE_ENV

        setting = os.path.join(
            os.environ.get(CACHE_ENV) or "~/.cache/psa_jax", "jax_compilation_cache"
        )
    return os.path.abspath(os.path.expanduser(setting))


def _use_compilation_cache() -> None:
    """JAX's persistent compilation cache for this process: a command's second run loads its
    compiled sampler, encoders and steps instead of compiling them (the same executables, so
    the same results). Every program is kept, however quickly it compiled, unless
    ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise."""
    import jax

    path = compilation_cache_dir()
    if path is None or path == jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


CPU_DEVICES_ENV = "PSA_JAX_CPU_DEVICES"


def cpu_devices(command_default: int | None = None) -> int | None:
    """How many JAX devices the ``psa-jax`` program splits a CPU host into, None: JAX's own
    setting (one device, or what ``XLA_FLAGS``/``JAX_NUM_CPU_DEVICES`` say; those win).

    ``$PSA_JAX_CPU_DEVICES=N``: N devices; unset: ``command_default`` (``psa-jax demo``: one
    per core, up to its batch of 8), else JAX's. XLA:CPU runs most of a step's ops on one core
    each, so a CPU's cores are used by data parallelism over devices, as on accelerators
    (the tiny DPO step: 1.35x on 2 cores; BENCHMARKS.md). Accelerator devices are unaffected.
    """
    setting = os.environ.get(CPU_DEVICES_ENV, "").strip()
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if "JAX_NUM_CPU_DEVICES" in os.environ:
        return None
    if not setting:
        return command_default
    try:
        count = int(setting)
    except ValueError:
        count = 0
    if count < 1:
        raise PsaJaxError(f"${CPU_DEVICES_ENV}={setting!r}: give a whole number of devices >= 1")
    return count


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def per_core_devices(chunk: int = 8) -> int:
    """A command's CPU split: one device per core, as many as divide its chunk (``chunk``
    images or pairs: sampling's default 8, the bench's step) so every device gets an equal
    share."""
    return math.gcd(cores(), chunk)


def _split_cpu(count: int | None) -> None:
    import jax

    if count is not None and count != jax.config.jax_num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", count)  # before any backend is initialised


HUGEPAGES_ENV = "PSA_JAX_HUGEPAGES"
_HUGETLB = "glibc.malloc.hugetlb"
# Set in the restarted program (and so in every process it starts): never a second restart,
# even where something rewrote GLIBC_TUNABLES on the way.
_RESTARTED_ENV = "PSA_JAX_HUGEPAGES_RESTARTED"
THP_ENABLED_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (``always``/``madvise``/``never``), None: unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def hugepage_environ(
    environ: dict[str, str], mode: str | None, libc: tuple[str, str]
) -> dict | None:
    """The environment to restart the program in so that glibc's malloc backs its large blocks
    with transparent huge pages, None: no restart (off, already set, or nothing to gain).

    Why: XLA:CPU allocates a step's temporaries afresh on every execution (posix_memalign from
    its worker threads; glibc serves blocks over 64 MiB there with a new mmap each time), so
    every step page-faults them in 4 KiB at a time: 38,800 faults and ~25% of the CPU time of
    the tiny DPO step on 2 devices. With ``glibc.malloc.hugetlb=1`` glibc asks for huge pages
    (madvise) on those blocks: ~1,000 faults, the step 15-17% faster, results bit-identical
    (BENCHMARKS.md). The setting only helps where the kernel's THP mode is ``madvise`` (under
    ``always`` the pages are huge already) and glibc reads it (2.35+). ``$PSA_JAX_HUGEPAGES=0``
    turns it off; a ``GLIBC_TUNABLES`` that already names it is the user's and is kept."""
    if environ.get(HUGEPAGES_ENV, "").strip().lower() in _OFF or mode != "madvise":
        return None
    if environ.get(_RESTARTED_ENV):
        return None
    name, version = libc
    try:
        new_enough = name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except ValueError:
        new_enough = False
    tunables = environ.get("GLIBC_TUNABLES", "")
    if not new_enough or _HUGETLB in tunables:
        return None
    tunables = ":".join(filter(None, [tunables, f"{_HUGETLB}=1"]))
    return {**environ, "GLIBC_TUNABLES": tunables, _RESTARTED_ENV: "1"}


def _started_as_program() -> bool:
    """True when this process is the ``psa-jax`` console script or ``python -m psa_jax.cli``
    (then restarting it re-runs exactly the command; a script that calls ``main()`` is not)."""
    first = os.path.normpath(sys.argv[0]) if sys.argv else ""
    return os.path.basename(first) == "psa-jax" or first.endswith(
        os.path.join("psa_jax", "cli", "__main__.py")
    )


def _restart_with_hugepages() -> None:
    """Re-execute the program (same process id, arguments and interpreter) with
    :func:`hugepage_environ`'s environment; glibc reads its tunables only at start-up."""
    import platform

    if not _started_as_program():
        return
    environ = hugepage_environ(dict(os.environ), thp_mode(), platform.libc_ver())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def main(argv: list[str] | None = None) -> int:
    """The ``psa-jax`` program. Run as the program (``argv`` None: the console script,
    ``python -m psa_jax.cli``), it restarts itself once with glibc's huge-page setting
    (:func:`hugepage_environ`), turns on the compilation cache
    (:func:`compilation_cache_dir`) and splits a CPU host into devices (:func:`cpu_devices`);
    a call with an explicit ``argv`` (tests, scripts) leaves the process and JAX's settings
    alone."""
    if argv is None:
        _restart_with_hugepages()
        _use_compilation_cache()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if argv is None:  # before the command starts JAX
            from psa_jax.cli.train import multi_process

            default = getattr(args, "cpu_devices", None)
            if callable(default):  # a split that depends on the command's flags (bench)
                default = default(args)
            if multi_process(args):
                default = None  # many processes split the work among themselves instead
            _split_cpu(cpu_devices(default))
        if getattr(args, "accepts_extra", False):  # train: --config.KEY=VALUE overrides
            return args.func(args, extra)
        return args.func(args)
    except PsaJaxError as e:
        print(f"psa-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
