"""The report's plots (matplotlib on the Agg canvas, no pyplot state): score histograms by class, the LID scatter and
the dose-response, each returned as an inline PNG data URI."""

from __future__ import annotations

import base64
import functools
import io
import math

import numpy as np
import pandas as pd

from scanner.report.load import Run
from scanner.schema import P_LAPLACE_PREFIX, SCORES_META, p_of_column, scores_schema

DPI = 100


PLANTED_COLORS = {"unique": "#8c96a3", "no_caption": "#2ca02c", "exact_dup": "#1f77b4", "near_dup": "#17becf",
                  "repeated": "#d62728", "oversampled": "#ff7f0e", "corrupt": "#7f7f7f"}


MEM_COLORS = {"none": "#8c96a3", "dd": "#1f77b4", "od": "#d62728", "error": "#7f7f7f"}


RC = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 10,
      "axes.titleweight": "bold", "legend.frameon": False}


def _styled(fn):
    """Run a plotting function under the report's rcParams, restored afterwards."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)
    return wrapper


def _figure(figsize: tuple[float, float]):
    """A Figure on the Agg canvas, without pyplot: no global backend or figure list of the caller is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _fig_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _p_value(col: str) -> float:
    try:
        return p_of_column(col)
    except ValueError:
        return math.inf


def score_columns(df: pd.DataFrame) -> list[str]:
    """Numeric score columns present and not all-null, in reading order (the scores/ schema's)."""
    p_cols = [c for c in df.columns if c.startswith(P_LAPLACE_PREFIX) and not math.isinf(_p_value(c))]
    order = [c for c in scores_schema(p_cols).names if c not in SCORES_META]
    return [c for c in order if c in df and pd.to_numeric(df[c], errors="coerce").notna().any()]


def _groups(run: Run) -> tuple[pd.DataFrame, str, list[str], dict[str, str]]:
    """Scored rows with a `group` column: planted class when truth is given, else mem_class."""
    df = run.ok.copy()
    if run.truth is not None and {"key", "planted"} <= set(run.truth.columns):
        df = df.merge(run.truth[["key", "planted"]], on="key", how="left")
        df["group"] = df["planted"].fillna("not in truth")
        colors, label = dict(PLANTED_COLORS), "planted class"
    else:
        df["group"] = df["mem_class"].fillna("error") if "mem_class" in df else "all"
        colors, label = dict(MEM_COLORS), "mem_class"
    sizes = df["group"].value_counts()
    order = [g for g in colors if g in sizes.index] + [g for g in sizes.index if g not in colors]
    # The big background class first, so the small planted ones are drawn on top of it.
    order.sort(key=lambda g: -sizes[g] if g in ("unique", "none") else 0)
    for i, g in enumerate(order):
        colors.setdefault(g, f"C{i % 10}")
    return df, label, order, colors


@_styled
def histograms(run: Run) -> str | None:
    df, label, order, colors = _groups(run)
    cols = score_columns(df)
    if not cols:
        return None
    detector, direction = run.detector
    thr = run.thresholds.get("threshold")
    ncols = 3
    nrows = math.ceil(len(cols) / ncols)
    fig = _figure((11, 2.7 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, col in zip(axes.flat, cols):
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(float)
        fin = np.isfinite(v)
        if not fin.any():  # only infinities: nothing to bin
            ax.set_title(f"{col} (no finite values)")
            continue
        lo, hi = np.quantile(v[fin], [0.005, 0.995])
        if col == detector and thr is not None and np.isfinite(thr):
            lo, hi = min(lo, thr), max(hi, thr)
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        for g in order:
            gv = v[(df["group"] == g).to_numpy() & fin]
            if len(gv) < 2:
                continue
            gv = np.clip(gv, lo, hi)  # tails pile into the edge bins instead of vanishing
            big = g in ("unique", "none")
            ax.hist(gv, bins=bins, density=True, histtype="stepfilled" if big else "step", color=colors[g],
                    alpha=0.35 if big else 0.95, linewidth=1.6, label=f"{g} ({len(gv)})")
        if col == detector and thr is not None and np.isfinite(thr):
            ax.axvline(thr, color="#111", ls="--", lw=1.2)
            ax.axvspan(lo if direction == "low" else thr, thr if direction == "low" else hi, color="#d62728",
                       alpha=0.07, lw=0)
            # The label goes on the unflagged side, where the line does not cross it.
            ax.annotate(f"flag {'≤' if direction == 'low' else '≥'} {thr:.4g}", xy=(thr, 1),
                        xycoords=("data", "axes fraction"), xytext=(4 if direction == "low" else -4, -4),
                        textcoords="offset points", fontsize=8, va="top", color="#b3261e",
                        ha="left" if direction == "low" else "right",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
            ax.set_title(f"{col}  (detector)", color="#b3261e")
        else:
            ax.set_title(col)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(cols)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 7), bbox_to_anchor=(0.5, 1.0),
               title=f"{label} (samples)", fontsize=8, title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / (2.7 * nrows + 0.5)))
    return _fig_uri(fig)


@_styled
def dose_plot(dose: list[dict]) -> str | None:
    """Flagged share against the number of copies in the corpus (metrics.json dose_response), with the range
    over groups; the one-copy point is the unique images (the false-positive rate)."""
    if len(dose) < 2:
        return None
    k = np.array([d["copies"] for d in dose], float)
    f = np.array([d["flagged"] for d in dose])
    single = np.array([d["units"] == d["images"] for d in dose])  # one image per unit (unique): no group range
    lo = np.where(single, f, [d["flagged_units_min_max"][0] for d in dose])
    hi = np.where(single, f, [d["flagged_units_min_max"][1] for d in dose])
    dd = np.array([d.get("dd", np.nan) for d in dose])
    fig = _figure((5.6, 3.6))
    ax = fig.subplots()
    ax.fill_between(k, lo, hi, color="#d62728", alpha=0.12, lw=0, label="range over groups")
    ax.plot(k, f, "o-", color="#d62728", label="flagged")
    ax.plot(k, dd, "s--", color="#1f77b4", ms=4, label="classed dd")
    ax.set_xscale("log", base=2)
    ax.set_xticks(k, [str(int(v)) for v in k])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("copies of the image in the corpus (1 = unique images)")
    ax.set_ylabel("share of images")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _fig_uri(fig)


@_styled
def manifold_scatter(run: Run) -> str | None:
    """LID_theta (lid_flipd) against LID_* (lid_lpca, a count: jittered by up to 0.3 so the columns show), with the
    line the OD rule compares to: the corpus's typical LID_theta at each LID_*, lowered by gap_margin x the median
    LID_theta (below it: the OD side), and the DD line x = lpca_low."""
    df = run.ok
    if df.empty or not {"lid_flipd", "lid_lpca"} <= set(df.columns):
        return None
    x = pd.to_numeric(df["lid_lpca"], errors="coerce").to_numpy(float)
    y = pd.to_numeric(df["lid_flipd"], errors="coerce").to_numpy(float)
    fin = np.isfinite(x) & np.isfinite(y)
    if fin.sum() < 2:
        return None
    t = run.thresholds
    mf = (t.get("lid_medians") or {}).get("lid_flipd")
    typical = t.get("lid_flipd_typical")
    panels = [("mem_class", df["mem_class"].fillna("error").to_numpy() if "mem_class" in df else
               np.full(len(df), "none"), MEM_COLORS)]
    if run.truth is not None and {"key", "planted"} <= set(run.truth.columns):
        planted = df[["key"]].merge(run.truth[["key", "planted"]], on="key", how="left")["planted"]
        panels.append(("planted class", planted.fillna("not in truth").to_numpy(), PLANTED_COLORS))
    lpca_low, margin = t.get("lpca_low"), t.get("gap_margin") or 0.0
    xj = x + np.random.default_rng(0).uniform(-0.3, 0.3, len(x))
    fig = _figure((5.6 * len(panels), 4.3))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, labels, colors) in zip(axes.flat, panels):
        groups = list(dict.fromkeys(labels[fin]))
        groups.sort(key=lambda g: 0 if g in ("none", "unique") else 1)
        for i, g in enumerate(groups):
            m = fin & (labels == g)
            bg = g in ("none", "unique")
            ax.scatter(xj[m], y[m], s=8 if bg else 22, alpha=0.35 if bg else 0.9, color=colors.get(g, f"C{i}"),
                       label=f"{g} ({int(m.sum())})", edgecolors="none" if bg else "white", linewidths=0.4)
        if typical and mf and mf > 0:
            levels = np.arange(len(typical))
            line = np.array([np.nan if v is None else v for v in typical], float) - margin * mf
            ax.step(levels, line, where="mid", color="#d62728", ls=":", lw=1.3)
            ax.annotate("typical LID$_\\theta$ at this LID$_*$; below: OD side", xy=(levels[-1], line[-1]),
                        xytext=(-4, 6), textcoords="offset points", ha="right", fontsize=8, color="#d62728")
        if lpca_low is not None:
            ax.axvline(lpca_low - 0.5 if float(lpca_low).is_integer() else lpca_low, color="#1f77b4", ls="--", lw=1.1)
            ax.annotate(f"left: lid_lpca < {lpca_low:g}", xy=(lpca_low, 0), xycoords=("data", "axes fraction"),
                        xytext=(4, 4), textcoords="offset points", fontsize=8, color="#1f77b4")
        ax.set_xlabel("lid_lpca  (LID$_*$: directions of the data around the image)")
        ax.set_ylabel("lid_flipd  (LID$_\\theta$: the model's dimension there)")
        ax.set_title(f"coloured by {title}")
        ax.legend(fontsize=8, loc="best", markerscale=1.2)
    fig.tight_layout()
    return _fig_uri(fig)
