"""The demo's page: ``report.html`` (opens from disk), ``metrics.json`` and its PNGs."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psa_jax.data.profiles import CATEGORIES
from psa_jax.eval.plans import EvalItem
from psa_jax.eval.report import Q_NOTE, bar_plot, html_page, img, write_json
from psa_jax.eval.summary import to_json

GRID_SEEDS = 2  # images per (user, category) cell in the grid: the first draws, not picked


def load_eval_images(folder: str) -> tuple[list[EvalItem], dict[str, np.ndarray]]:
    """The eval stage's items and its base / PSA images (uint8 NHWC), in item order."""
    with open(os.path.join(folder, "items.json"), encoding="utf-8") as f:
        raw = json.load(f)
    items = [
        EvalItem(**{**d, "banned": None if d["banned"] is None else tuple(d["banned"])})
        for d in raw
    ]
    with np.load(os.path.join(folder, "images.npz")) as z:
        images = {"base": z["base"], "psa": z["psa"]}
    for k, v in images.items():
        if len(v) != len(items):
            raise ValueError(f"{folder}: {len(v)} {k} images for {len(items)} items")
    return items, images


def read_metrics_jsonl(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pair_accuracy_curve(workdir: str) -> list[list[float]]:
    """``[[step, held-out pair accuracy], ...]`` of a DPO run (its ``eval/pair_acc`` rows)."""
    rows = read_metrics_jsonl(workdir)
    return [[r["step"], r["eval/pair_acc"]] for r in rows if "eval/pair_acc" in r]


def level_grid(items: Sequence[EvalItem], images: Mapping[str, np.ndarray]) -> Any:
    """Rows: the base, then each level's user; columns: per category the first
    ``GRID_SEEDS`` (caption, seed) draws. Every row draws the same captions and seeds."""
    from psa_jax.sample.images import labelled_grid

    level0 = [i for i, it in enumerate(items) if it.group == "level-0"]
    cols: list[int] = []
    for cat in CATEGORIES:
        cols += [i for i in level0 if items[i].category == cat][:GRID_SEEDS]
    keys = [(items[i].caption, items[i].seed) for i in cols]
    rows, labels = [images["base"][cols]], ["base (no user)"]
    for level in range(6):
        where = {(it.caption, it.seed): i for i, it in enumerate(items)
                 if it.group == f"level-{level}"}  # fmt: skip
        if not where:
            continue
        idx = [where[k] for k in keys]
        rows.append(images["psa"][idx])
        bans = items[idx[0]].banned or ()
        labels.append(f"L{level} {items[idx[0]].user} bans {len(bans)}")
    names = [f"{items[i].category} s{items[i].seed}" for i in cols]
    return labelled_grid(np.stack(rows), labels, names, label_width=150)


def _line_plot(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               title: str, ylabel: str) -> str:  # fmt: skip
    from psa_jax.eval.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) < 20 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _smooth(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    if len(y) < 2 * window:
        return x, y
    return x[window - 1 :], np.convolve(y, np.ones(window) / window, mode="valid")


def dpo_plots(out: str, workdir: str) -> list[str]:
    rows = read_metrics_jsonl(workdir)
    train = [r for r in rows if "loss" in r]
    step = np.asarray([r["step"] for r in train], float)
    loss = np.asarray([r["loss"] for r in train], float)
    acc = np.asarray([r["implicit_acc"] for r in train], float)
    window = max(1, len(train) // 15)
    loss_series = {"train loss (per step)": (step, loss)}
    acc_name = "train implicit acc"
    if window > 1:  # per-step values swing with the drawn timesteps: show the trend
        loss_series[f"mean of {window}"] = _smooth(step, loss, window)
        acc_name += f" (mean of {window})"
    _line_plot(os.path.join(out, "dpo_loss.png"), loss_series, "Diffusion-DPO loss", "loss")
    ev = pair_accuracy_curve(workdir)
    series = {acc_name: _smooth(step, acc, window)}
    if ev:
        series["held-out pair acc"] = ([s for s, _ in ev], [a for _, a in ev])
    _line_plot(os.path.join(out, "dpo_accuracy.png"), series, "DPO accuracy", "accuracy")
    return ["dpo_loss.png", "dpo_accuracy.png"]


def _level_table_html(table: Mapping[str, Any], adherence: Mapping[str, Any]) -> str:
    cols = ("level (user)", *CATEGORIES, "adherence PSA/base")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for level, entry in table.items():
        cells = []
        for cat in CATEGORIES:
            c = entry["categories"][cat]
            if c["psa"] is None:
                cells.append("<td>–</td>")
                continue
            style = " style='background:#fde2e2'" if c["banned"] else ""
            cells.append(f"<td{style}>{c['psa']:.2f} <span class='note'>/ {c['base']:.2f}</span>"
                         "</td>")  # fmt: skip
        adh = adherence.get(level)
        cells.append(f"<td>{'–' if adh is None else f'{adh:.2f}'}</td>")
        body.append(f"<tr><td>L{level} ({entry['user']})</td>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _ablation_html(rows: Sequence[Mapping[str, Any]]) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    head = ("<tr><th>user tokens</th><th>level-5 banned / base</th><th>allowed retention "
            "(L1-4)</th><th>any-marker rate L0..L5</th><th>adherence PSA/base L0..L5</th>"
            "<th>held-out pair acc</th>"
            "<th>measured by</th></tr>")  # fmt: skip
    body = "".join(
        f"<tr><td>{r['num_user_tokens']}</td><td>{fmt(r['suppression_ratio'])}</td>"
        f"<td>{fmt(r['allowed_retention'])}</td>"
        f"<td>{html.escape(' '.join(fmt(v) for v in r['level_marker_rates']))}</td>"
        f"<td>{html.escape(' '.join(fmt(v) for v in r['adherence_ratio_per_level'].values()))}"
        "</td>"
        f"<td>{fmt(r.get('pair_accuracy'))}</td><td>{html.escape(r['source'])}</td></tr>"
        for r in rows
    )
    return (
        "<p class='note'>The same DPO stage with PSAlign's single user token and with the "
        "demo's; targets: level-5 ratio &le; 0.3, retention &ge; 0.8, rates non-increasing "
        "from L1 to L5.</p><table>" + head + body + "</table>"
    )


_MET = "<b style='color:#1a7f37'>met</b>"
_NOT_MET = "<b style='color:#b42318'>not met</b>"


def _targets_html(targets: Mapping[str, Any]) -> str:
    rows = []
    for name, t in targets.items():
        v = t["value"]
        if isinstance(v, list):
            shown = ", ".join("–" if x is None else f"{x:.2f}" for x in v)
        else:
            shown = "–" if v is None else f"{v:.3g}"
        mark = _MET if t["ok"] else _NOT_MET
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(t['target'])}</td>"
                    f"<td>{shown}</td><td>{mark}</td></tr>")  # fmt: skip
    return ("<table><tr><th>target</th><th>wanted</th><th>measured</th><th></th></tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def write_report(
    out: str,
    metrics: Mapping[str, Any],
    stages: Mapping[str, Any],
    items: Sequence[EvalItem],
    images: Mapping[str, np.ndarray],
) -> None:
    """``metrics.json``, the PNGs and ``report.html`` in ``out``."""
    write_json(os.path.join(out, "metrics.json"), metrics)
    level_grid(items, images).save(os.path.join(out, "grid_levels.png"))
    levels = [f"L{lv}" for lv in range(len(metrics["level_marker_rates"]))]
    bar_plot(os.path.join(out, "levels.png"), levels,
             {"PSA": metrics["level_marker_rates"], "base": metrics["level_marker_rates_base"]},
             "Share of images showing any category marker, per strictness level",
             "share of images")  # fmt: skip
    plots = dpo_plots(out, stages["dpo"]["workdir"])
    sp = metrics["spqr"]
    axes = ["S", "P", "Q", "R", "score"]
    bar_plot(os.path.join(out, "spqr.png"), axes,
             {"before": [sp["before"][a] for a in axes], "after": [sp["after"][a] for a in axes]},
             "SPQR before / after the benign fine-tune (level 5)", "score")  # fmt: skip
    rt = stages["export"]["round_trip"]
    sections = [
        ("What ran", _what_ran(metrics, stages)),
        ("Targets", _targets_html(metrics["targets"])),
        (
            "What each user sees (same captions and seeds in every row)",
            "<p class='note'>Rows: the base model, then PSAlign's strictness-level users "
            "(L0 bans nothing, L5 bans all 7 categories); columns: a held-out caption of each "
            f"category, its first {GRID_SEEDS} seeds (not picked).</p>"
            + img("grid_levels.png", "user x category grid"),
        ),
        (
            "Own-category marker rate per level and category (PSA / base; banned in red)",
            "<p class='note'>Last column: the toy prompt-adherence score of PSA's images over "
            "the base's on the same captions and seeds (1 = the rest of the picture kept).</p>"
            + _level_table_html(metrics["level_table"], metrics["adherence_ratio_per_level"]),
        ),
        ("Strictness levels", img("levels.png", "level curve")),
        ("Ablation: user tokens", _ablation_html(metrics["ablation_user_tokens"])),
        ("Diffusion-DPO training", "".join(img(p, p) for p in plots)),
        (
            "SPQR",
            f"<p class='note'>{Q_NOTE.lstrip()}"
            + _fid_line(metrics["spqr_fid"])
            + img("spqr.png", "spqr")
            + f"<pre>{html.escape(to_json(sp))}</pre>",
        ),
        (
            "Export to PyTorch",
            f"<p>PSAlign file <code>export/psa_adapter.safetensors</code>, diffusers IP-Adapter "
            f"<code>export/ip_adapter/</code>. One prompt (<i>{html.escape(rt['prompt'])}</i>, "
            f"user {rt['user']}, seed {rt['seed']}) re-run by diffusers' StableDiffusionPipeline "
            f"with the IP-Adapter: max abs difference {rt['max_abs_diff']:.2e} on [0, 1].</p>"
            + img(os.path.join("export", rt["image"]), "round trip"),
        ),
        (
            "More",
            "<p><a href='eval/index.html'>eval report</a> (every group, definitions) · "
            "<a href='spqr/index.html'>SPQR report</a> (per level) · "
            "<a href='metrics.json'>metrics.json</a></p>",
        ),
    ]
    html_page(os.path.join(out, "report.html"), "psa-jax demo", sections)


def _fid_line(fid: Mapping[str, float]) -> str:
    """The FIDs behind SPQR's Q, printed beside it (``Q_NOTE`` asks the reader to)."""
    if not fid:
        return "<p class='note'>No FID scorer ran: Q is not measured from images.</p>"
    parts = " · ".join(f"{html.escape(k)} {v:.3f}" for k, v in fid.items())
    return f"<p>FID against the reference pictures (lower is better): {parts}.</p>"


def _what_ran(metrics: Mapping[str, Any], stages: Mapping[str, Any]) -> str:
    base = stages["base"]
    secs = metrics.get("stage_seconds", {})
    src = "shipped with the package" if base.get("shipped") else "retrained (--pretrain)"
    acc = metrics.get("pair_accuracy") or []
    acc_s = ", ".join(f"step {s}: {a:.2f}" for s, a in acc)
    parts = [
        f"<p>Base models {src}: <code>{html.escape(base['pipeline'])}</code>. PSA adapter "
        f"trained with Diffusion-DPO for {stages['dpo']['step']} steps; held-out pair accuracy "
        f"{html.escape(acc_s) or '–'}.</p>",
        f"<p>Wall time {metrics['wall_seconds']:.0f} s (stages, where run now: "
        + html.escape(", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if v is not None))
        + ").</p>",
    ]
    return "".join(parts)
