"""Result rows, the psa_jax ratios, the printed table and the JSON document.

Every row has the same keys (:data:`TRAIN_FIELDS` / :data:`SAMPLE_FIELDS`); a value that does
not apply or cannot be measured is ``None`` and prints as ``n/a``. MFU's numerator is the
analytic model FLOPs (:mod:`psa_jax.bench.flops`), the same for every contestant, so MFU ratios
equal speed ratios; psa_jax's row also carries its compiled step's own XLA FLOP count.
"""

from __future__ import annotations

from typing import Any

from psa_jax.bench.measure import Contestant, Timing

COMMON = ("contestant", "shape", "what", "batch", "dtype", "device", "steps", "steps_per_s")
TAIL = (
    "median_step_ms",
    "step_ms",
    "compile_s",
    "first_call_s",
    "peak_memory_bytes",
    "peak_memory_source",
    "rss_peak_delta_bytes",
    "rss_peak_method",
    "model_flops_per_step",
    "extra_flops_per_step",
    "xla_flops_per_step",
    "achieved_tflops",
    "mfu",
    "loss",
    "notes",
    "psa_jax_ratio",
)
TRAIN_FIELDS = (*COMMON, "pairs_per_s", *TAIL)
SAMPLE_FIELDS = (*COMMON, "images_per_s", *TAIL)


def _value(v: Any) -> Any:
    return v() if callable(v) else v


def row(
    c: Contestant,
    t: Timing,
    *,
    shape: str,
    what: str,
    batch: int,
    dtype: str,
    flops: dict[str, float],
    peak_tflops: float | None,
) -> dict[str, Any]:
    """One contestant's result (ratio filled in later by :func:`add_ratios`)."""
    median = t.median_s
    mem, source = c.peak_memory()
    achieved = flops["model"] / median / 1e12
    extra = flops["extra"] if c.name == "torch-psalign" else 0.0
    out = {
        "contestant": c.name,
        "shape": shape,
        "what": what,
        "batch": batch,
        "dtype": dtype,
        "device": _value(c.info.get("device")),
        "steps": len(t.step_s),
        "steps_per_s": 1.0 / median,
        ("pairs_per_s" if what == "train" else "images_per_s"): batch / median,
        "median_step_ms": 1e3 * median,
        "step_ms": [round(1e3 * x, 3) for x in t.step_s],  # every timed step: the spread
        "compile_s": c.compile_s,
        "first_call_s": t.first_call_s,
        "peak_memory_bytes": mem,
        "peak_memory_source": source,
        "rss_peak_delta_bytes": t.rss_peak_delta,
        "rss_peak_method": t.rss_method,
        "model_flops_per_step": flops["model"],
        "extra_flops_per_step": extra,
        "xla_flops_per_step": c.flops_xla,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "loss": c.loss(),
        "notes": _value(c.info.get("notes", "")),
        "psa_jax_ratio": None,
    }
    return out


def failed_row(name: str, error: str, flops: dict[str, float], **meta: Any) -> dict[str, Any]:
    """A contestant that could not run: every field present, measurements None, the error in
    ``notes``."""
    key = "pairs_per_s" if meta["what"] == "train" else "images_per_s"
    out: dict[str, Any] = dict.fromkeys(TRAIN_FIELDS if key == "pairs_per_s" else SAMPLE_FIELDS)
    out.update(meta, contestant=name, notes=f"FAILED: {error}", steps=0,
               model_flops_per_step=flops["model"], peak_memory_source="n/a")  # fmt: skip
    return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``psa_jax_ratio`` = psa_jax's throughput / the row's, written ``<ratio>x``."""
    key = "pairs_per_s" if rows and "pairs_per_s" in rows[0] else "images_per_s"
    ours = next((r[key] for r in rows if r["contestant"] == "psa_jax"), None)
    for r in rows:
        r["psa_jax_ratio"] = f"{ours / r[key]:.2f}x" if ours and r.get(key) else None


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per contestant, then the notes and memory sources."""
    unit = "pairs/s" if rows and "pairs_per_s" in rows[0] else "images/s"
    key = "pairs_per_s" if unit == "pairs/s" else "images_per_s"
    head = [
        "contestant",
        "shape",
        "what",
        "batch",
        "dtype",
        "steps/s",
        unit,
        "median ms",
        "compile/1st s",
        "peak mem",
        "MFU",
        "psa_jax/x",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        compile_s = r["compile_s"] if r["compile_s"] is not None else r["first_call_s"]
        if r["steps_per_s"] is None:  # failed: the reason is in the notes below
            lines.append(f"| {r['contestant']} | {r['shape']} | {r['what']} | {r['batch']} | "
                         f"{r['dtype']} |" + " failed |" * 7)  # fmt: skip
            continue
        mem = _bytes(r["peak_memory_bytes"])
        if r["peak_memory_bytes"] is None and r["rss_peak_delta_bytes"] is not None:
            mem = f"RSS +{_bytes(r['rss_peak_delta_bytes'])}"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        cells = [
            r["contestant"],
            r["shape"],
            r["what"],
            str(r["batch"]),
            r["dtype"],
            _num(r["steps_per_s"], ".3g"),
            _num(r[key], ".3g"),
            _num(r["median_step_ms"], ".1f"),
            _num(compile_s, ".1f"),
            mem,
            mfu,
            r["psa_jax_ratio"] or "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        if r["steps_per_s"] is None:
            lines.append(f"- {r['contestant']}: {r['notes']}")
            continue
        xla = r["xla_flops_per_step"]
        flops = f"model {r['model_flops_per_step'] / 1e9:.4g} GFLOP/step"
        if xla:
            flops += f", XLA cost analysis {xla / 1e9:.4g}"
        if r["extra_flops_per_step"]:
            flops += f", + {r['extra_flops_per_step'] / 1e9:.4g} VAE/text (not in MFU)"
        lines.append(
            f"- {r['contestant']}: {r['notes']}; {flops}; memory: {r['peak_memory_source']}, "
            f"host RSS +{_bytes(r['rss_peak_delta_bytes'])} from build "
            f"({r['rss_peak_method'] or 'n/a'}); "
            f"loss {_num(r['loss'], '.4g')}"
        )
    return "\n".join(lines)
