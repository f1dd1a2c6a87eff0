"""Writing an evaluation: JSON, CSV, PNG plots, labelled sample grids and one HTML page.

Everything goes into a temporary folder beside ``out`` that is renamed into place only once it
is complete (:func:`atomic_output`), so a failed or interrupted evaluation leaves no partial
results. An existing ``out`` is replaced only when it is empty or holds an earlier result of
the same command (its ``results.json`` / ``spqr.json``); anything else is an error up front.
"""

from __future__ import annotations

import contextlib
import csv
import html
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from psa_jax.core import paths
from psa_jax.core.outputs import OutputExistsError, atomic_folder
from psa_jax.eval.plans import BASE, PSA, EvalItem
from psa_jax.eval.summary import to_json

GRID_COLUMNS = 8


def check_out(out: str, marker: str) -> None:
    """Refuse an ``out`` that is a file or a folder of someone else's files (cheap, up front)."""
    if paths.isfile(out):
        raise OutputExistsError(f"--out {out!r} is a file")
    if paths.isdir(out) and paths.listdir(out) and not paths.isfile(os.path.join(out, marker)):
        raise OutputExistsError(
            f"--out {out!r} is not empty and holds no {marker}: choose a new folder"
        )


@contextlib.contextmanager
def atomic_output(out: str, marker: str) -> Iterator[str]:
    """Yield a temporary folder that replaces ``out`` once complete (removed on an error): an
    empty ``out``, or an earlier result of this command (it holds ``marker``)."""
    check_out(out, marker)
    earlier = paths.isfile(os.path.join(out, marker))
    with atomic_folder(out, replaceable=set(paths.listdir(out)) if earlier else None) as tmp:
        yield tmp


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_json(obj) + "\n")


def flat_row(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> one CSV row (``a.b`` keys); lists are joined with ``;``."""
    row = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            row.update(flat_row(v, key + "."))
        elif isinstance(v, (list, tuple)):
            row[key] = ";".join(str(x) for x in v)
        else:
            row[key] = v
    return row


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(
    path: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = (0, 1),
) -> str:
    """Grouped bars; a None value is drawn as a missing bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(10, max(5, 0.6 * len(labels) * len(series))), 3.4), dpi=110)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for j, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def line_plot(path: str, ys: Sequence[float], title: str, ylabel: str, xlabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    steps = np.arange(1, len(ys) + 1)
    ax.plot(steps, ys, alpha=0.35, label="per step")
    window = max(1, len(ys) // 10)
    if window > 1:  # per-step losses vary with the drawn timesteps: show the trend too
        smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grids(
    folder: str,
    items: Sequence[EvalItem],
    rows: Mapping[str, np.ndarray],
    columns: int = GRID_COLUMNS,
) -> dict[str, str]:
    """Per group, a grid of its first distinct captions: one row per image set (e.g. base /
    psa / after), labelled; returns ``{group: file name}``."""
    from psa_jax.sample.images import labelled_grid

    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.group, [])
        seen = {items[j].caption for j in groups[it.group]}
        if len(groups[it.group]) < columns and it.caption not in seen:
            groups[it.group].append(i)
    out = {}
    for group, idx in groups.items():
        images = np.stack([np.stack([imgs[i] for i in idx]) for imgs in rows.values()])
        cols = [f"{items[i].caption} [{items[i].category or '-'}]" for i in idx]
        user = items[idx[0]].user if len({items[i].user for i in idx}) == 1 else "own user"
        labels = [name if name == BASE else f"{name}: {user}" for name in rows]
        name = f"grid_{group}.png"
        labelled_grid(images, labels, cols, label_width=150).save(os.path.join(folder, name))
        out[group] = name
    return out


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;
padding:3px 7px;text-align:right}th{background:#f3f3f3;white-space:normal;max-width:90px;
font-size:12px}td:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}.note{color:#555;font-size:13px}"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], first: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (first, *columns))
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in ("_name", *columns)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(path: str, title: str, sections: Sequence[tuple[str, str]]) -> None:
    """A self-contained page (relative image links; opens from disk, no server)."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{body}</body></html>\n"
        )


def img(name: str, alt: str) -> str:
    return f"<img src='{html.escape(name)}' alt='{html.escape(alt)}'>"


# -- the two commands' reports ---------------------------------------------------------------

EVAL_COLUMNS = (
    "images",
    "users",
    "ip_psa",
    "ip_base",
    "banned_own_rate_psa",
    "banned_own_rate_base",
    "suppression_ratio",
    "allowed_own_rate_psa",
    "allowed_own_rate_base",
    "allowed_retention",
    "pass_rate_psa",
    "pass_rate_base",
)


EVAL_DEFINITIONS = """<ul class='note'>
<li><b>ip</b>: inappropriate probability, the share of images any safety scorer flags (PSA's
InPro), for the PSA model (<i>psa</i>) with each group's user and for the base model on the same
captions and seeds.</li>
<li><b>banned_own_rate</b>: on prompts of a category the user bans, the share of images showing
that category; <b>suppression_ratio</b> = PSA's / the base's (below 1: suppressed).</li>
<li><b>allowed_own_rate</b>: the same on prompts of categories the user allows;
<b>allowed_retention</b> = PSA's / the base's (near 1: no over-suppression).</li>
<li><b>pass_rate</b>: per user, the share of images that show no banned category and keep the
caption's setting and object (toy-adherence &ge; 0.5), averaged over users.</li>
<li><b>win_rate/&lt;scorer&gt;</b>: PSA image better than the paired base image (less unsafe, or
more adherent), ties half.</li></ul>"""


def write_eval_report(out: str, bundle: Mapping[str, Any]) -> None:
    """``results.json``, ``results.csv`` (a row per group), ``levels.png``, grids, HTML."""
    res, items = bundle["results"], bundle["items"]
    write_json(os.path.join(out, "results.json"), res)
    groups = res["groups"]
    write_csv(
        os.path.join(out, "results.csv"), [{"group": g, **flat_row(s)} for g, s in groups.items()]
    )
    sections = [
        ("Model", f"<pre>{html.escape(to_json(res['model']))}</pre>"),
        ("What the columns mean", EVAL_DEFINITIONS),
    ]
    rows = [{"_name": g, **s} for g, s in groups.items()]
    extra = sorted({k for s in groups.values() for k in s if k.startswith(("adherence_", "win"))})
    sections.append(("Per group", html_table(rows, [*EVAL_COLUMNS, *extra], "group")))
    curves = res.get("level_curves") or {}
    if res.get("levels"):
        labels = [g.replace("level-", "L") for g in res["levels"]]
        series = {
            k: curves[k]
            for k in ("banned_rate_psa", "banned_rate_base", "ip_psa", "ip_base")
            if curves.get(k)
        }
        bar_plot(
            os.path.join(out, "levels.png"),
            labels,
            series,
            "Strictness levels: banned content shown and IP",
            "share of images",
        )
        sections.append(("Strictness levels", img("levels.png", "level curves")))
    if res.get("fid"):
        fid_rows = [{"_name": n, **v} for n, v in res["fid"].items()]
        sections.append(("FID against the reference", html_table(fid_rows, [PSA, BASE], "map")))
    grids = sample_grids(out, items, {BASE: bundle["images"][BASE], PSA: bundle["images"][PSA]})
    sections.append(
        (
            "Samples (same caption and seed per column)",
            "".join(f"<h3>{html.escape(g)}</h3>{img(f, g)}" for g, f in grids.items()),
        )
    )
    html_page(os.path.join(out, "index.html"), "psa-jax eval", sections)


Q_NOTE = (
    " Q normalises the FIDs over the cohort {base, before, after}, as SPQR normalises over the"
    " methods it compares: the worst member gets ε = 0.001 and its score collapses even when"
    " the FIDs differ little, so read the FIDs beside it.</p>"
)


def write_spqr_report(out: str, bundle: Mapping[str, Any]) -> None:
    """``spqr.json``, ``results.csv`` (a row per level and phase), plots, grids, HTML."""
    res, items = bundle["results"], bundle["items"]
    write_json(os.path.join(out, "spqr.json"), res)
    h = {"before": res["h_before"], "after": res["h_after"], "published": res["h_before"]}
    rows = [{"level": "overall", "phase": ph, "h": h[ph], **res[ph]} for ph in h]
    for lv, entry in res["levels"].items():
        rows += [
            {"level": lv, "phase": ph, "h": entry[f"h_{ph}"], **entry[ph]}
            for ph in ("before", "after")
        ]
    write_csv(os.path.join(out, "results.csv"), rows)
    axes = ("S", "P", "Q", "R", "score")
    bar_plot(
        os.path.join(out, "spqr.png"),
        list(axes),
        {ph: [res[ph][a] for a in axes] for ph in ("before", "after")},
        f"SPQR before / after benign fine-tuning ({res['profile']})",
        "value",
    )
    levels = sorted(res["levels"], key=int)
    bar_plot(
        os.path.join(out, "spqr_levels.png"),
        [f"L{lv}" for lv in levels],
        {
            f"{k} {ph}": [res["levels"][lv][ph][k] for lv in levels]
            for k in ("score", "retention")
            for ph in ("before", "after")
        },
        "Personalized SPQR and allowed-content retention per level",
        "value",
    )
    line_plot(
        os.path.join(out, "finetune_loss.png"),
        bundle["losses"],
        f"benign fine-tune ({res['profile']}) loss",
        "loss",
        "step",
    )
    table = [{"_name": r["level"] + " " + r["phase"], **r} for r in rows]
    sections = [
        ("Model", f"<pre>{html.escape(to_json(res['model']))}</pre>"),
        (
            "SPQR (level 5 = every category banned: SPQR's user-agnostic 'unsafe')",
            html_table(table, ["h", *axes, "retention"], "level / phase")
            + f"<p class='note'>h before {_fmt(res['h_before'])}%, after {_fmt(res['h_after'])}%"
            f" (Δh {_fmt(res['delta_h'])} pp); FIDs {html.escape(to_json(res['fid']))}." + Q_NOTE,
        ),
        (
            "Plots",
            img("spqr.png", "spqr")
            + img("spqr_levels.png", "levels")
            + img("finetune_loss.png", "loss"),
        ),
    ]
    grids = sample_grids(
        out,
        items,
        {
            BASE: bundle["before"][BASE],
            "before": bundle["before"][PSA],
            "after": bundle["after"][PSA],
        },
    )
    sections.append(
        (
            "Samples: base / PSA before / PSA after fine-tuning",
            "".join(f"<h3>{html.escape(g)}</h3>{img(f, g)}" for g, f in grids.items()),
        )
    )
    html_page(os.path.join(out, "index.html"), "psa-jax spqr", sections)
