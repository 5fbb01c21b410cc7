"""The HTML report: one self-contained file from a finished scan's outputs (method.md §4-§8).

    path = write_report(out_dir, truth_path=None)   # -> out_dir/report.html
    python -m scanner.report --out DIR [--truth truth.parquet]

Reads whatever exists of scores/*.parquet, duplicates.parquet, replications.parquet,
removal_list.parquet, errors.parquet, summary.json and metrics.json: a missing or unreadable input
is named in the report, never an error. Pixels are not stored by the scan, so the images shown
(at most MAX_THUMBS) are read back from the shards, one pass over only the shards that hold them.
CSS, plots (matplotlib, Agg) and thumbnails are inline (data: URIs), so the file can be mailed or
archived alone; nothing in it loads from the network and it runs no script.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.files import atomic_write_text
from scanner.schema import P_LAPLACE_PREFIX, SCORES_META, p_of_column, scores_schema

log = logging.getLogger("memscan")

TOP_K = 24  # at-risk samples shown
TOP_GROUPS = 12  # duplicate groups shown (largest first)
GROUP_MEMBERS = 8  # members shown per duplicate group
MATES = 3  # duplicate-group mates shown under an at-risk sample
TOP_REPS = 24  # replications shown
MAX_THUMBS = 200  # images read back from the shards, all sections together
THUMB_PX = 128  # thumbnails are decoded at min(THUMB_PX, shorter side) and scaled up by the browser
DPI = 100

SECTIONS = [
    ("summary", "Run summary"),
    ("metrics", "Detection metrics"),
    ("distributions", "Score distributions"),
    ("manifolds", "Model manifold vs data manifold"),
    ("at-risk", "Most at-risk samples"),
    ("duplicates", "Duplicate groups"),
    ("replications", "Replications"),
    ("thresholds", "Thresholds explained"),
    ("removal", "Removal list"),
]

DESCRIBE = {
    "lid_flipd": "LID<sub>θ</sub> by FLIPD: dimension of the model's manifold at the image",
    "lid_nb": "LID<sub>θ</sub> by the normal bundle (reference estimator)",
    "lid_lpca": "LID<sub>*</sub> by local PCA: dimension of the data manifold around the image",
    "lid_gap": "LID<sub>*</sub> − LID<sub>θ</sub> in raw dimensions (two estimators on different scales)",
    "lid_gap_rel": "how far LID<sub>θ</sub> falls below the corpus's typical LID<sub>θ</sub> for images of the same "
                   "LID<sub>*</sub>, over the median LID<sub>θ</sub> (OD-Mem)",
    "score_norm": "‖ε<sub>θ</sub>(x, t)‖ near the clean image: small on a sharp peak of the density",
    "score_norm_cal": "‖ε<sub>θ</sub>(x, t)‖ ÷ the same at the mirrored image: ≈ 1 for images that are only "
                      "simple, well below 1 on a memorized one",
    "loss_cal": "the denoising loss ‖ε<sub>θ</sub>(x<sub>t</sub>, t) − z‖² at noised copies of the image ÷ the same at "
                "its mirrored images: ≈ 1 unless the model denoises this very image almost exactly (memorized)",
    "cfg_norm": "‖ε(x<sub>t</sub>, c) − ε(x<sub>t</sub>, ∅)‖: large for memorized captions",
}
PLANTED_COLORS = {"unique": "#8c96a3", "no_caption": "#2ca02c", "exact_dup": "#1f77b4", "near_dup": "#17becf",
                  "repeated": "#d62728", "oversampled": "#ff7f0e", "corrupt": "#7f7f7f"}
MEM_COLORS = {"none": "#8c96a3", "dd": "#1f77b4", "od": "#d62728", "error": "#7f7f7f"}
REASONS = {
    "duplicate": "a member of a duplicate group that is not the kept one",
    "dd_mem": "DD-Mem (flagged, low LID<sub>*</sub>) and in no duplicate group",
    "od_mem": "OD-Mem (flagged, the data manifold is not low-dimensional there, the model's is lower)",
    "replicated": "a generation of the model reproduces it",
}


# --------------------------------------------------------------------------------------------------
# inputs


@dataclass
class Run:
    """What a scan left in out_dir; None where the input is absent (`missing` says why)."""

    out: Path
    scores: pd.DataFrame | None = None
    dups: pd.DataFrame | None = None
    reps: pd.DataFrame | None = None
    removal: pd.DataFrame | None = None
    errors: pd.DataFrame | None = None
    summary: dict = field(default_factory=dict)
    metrics: dict | None = None
    truth: pd.DataFrame | None = None
    missing: dict[str, str] = field(default_factory=dict)  # input -> why it is not shown
    thumbs: dict[str, str] = field(default_factory=dict)  # key -> data URI
    thumb_note: str | None = None

    @property
    def thresholds(self) -> dict:
        return self.summary.get("thresholds") or {}

    @property
    def detector(self) -> tuple[str | None, str]:
        t = self.thresholds
        cls = (self.summary.get("config") or {}).get("classify") or {}
        from scanner.columns import direction

        det = t.get("detector") or cls.get("detector")
        return det, t.get("direction") or cls.get("detector_direction") or (direction(det) if det else None) or "low"

    @property
    def ok(self) -> pd.DataFrame:
        """Scored rows (no error)."""
        if self.scores is None:
            return pd.DataFrame()
        return self.scores[self.scores["error"].isna()] if "error" in self.scores else self.scores


def _read_parquet(run: Run, name: str) -> pd.DataFrame | None:
    path = run.out / name
    if not path.exists():
        run.missing[name] = "not found"
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - a damaged file is reported, the rest of the report still renders
        run.missing[name] = f"unreadable: {type(e).__name__}: {e}"
        return None


def _read_json(run: Run, name: str) -> dict | None:
    path = run.out / name
    if not path.exists():
        run.missing[name] = "not found"
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        run.missing[name] = f"unreadable: {type(e).__name__}: {e}"
        return None


def load_run(out: Path, truth_path: Path | None = None) -> Run:
    run = Run(out=out)
    files = sorted((out / "scores").glob("*.parquet"))
    if files:
        try:
            run.scores = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        except Exception as e:  # noqa: BLE001
            run.missing["scores/*.parquet"] = f"unreadable: {type(e).__name__}: {e}"
    else:
        run.missing["scores/*.parquet"] = "not found"
    if run.scores is not None and "error" not in run.scores:
        run.scores["error"] = None
    run.dups = _read_parquet(run, "duplicates.parquet")
    run.reps = _read_parquet(run, "replications.parquet")
    run.removal = _read_parquet(run, "removal_list.parquet")
    run.errors = _read_parquet(run, "errors.parquet")
    run.summary = _read_json(run, "summary.json") or {}
    run.metrics = _read_json(run, "metrics.json")
    if truth_path is not None:
        truth_path = Path(truth_path)
        if truth_path.exists():
            try:
                run.truth = pd.read_parquet(truth_path)
            except Exception as e:  # noqa: BLE001
                run.missing[str(truth_path)] = f"unreadable: {type(e).__name__}: {e}"
        else:
            run.missing[str(truth_path)] = "truth file not found"
    return run


# --------------------------------------------------------------------------------------------------
# thumbnails: read back from the shards, only the keys shown


def _png_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.squeeze() if arr.shape[-1] == 1 else arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_uri(data: bytes) -> str | None:
    from PIL import Image

    from scanner.data.decode import DecodeError, decode_image

    try:
        w, h = Image.open(io.BytesIO(data)).size  # header only: decode at the image's own size when smaller
        arr, _, _ = decode_image(data, max(4, min(THUMB_PX, w, h)))
    except (DecodeError, OSError, ValueError):
        return None
    return _png_uri(arr)


def _shard_paths(run: Run) -> dict[str, str]:
    """Shard name -> path, from the scan's config; plus any shard recorded in the embeddings files."""
    from scanner.data.shards import ShardSpecError, expand_shards, shard_name

    paths: dict[str, str] = {}
    spec = ((run.summary.get("config") or {}).get("data") or {}).get("shards")
    if spec:
        try:
            paths.update({shard_name(p): p for p in expand_shards(spec)})
        except ShardSpecError as e:
            run.thumb_note = f"the shards in summary.json's config were not found ({e})"
    return paths


def _key_locations(run: Run, keys: list[str]) -> dict[str, str]:
    """key -> shard path for the keys that can be located."""
    loc: dict[str, str] = {}
    by_name = _shard_paths(run)
    if run.scores is not None and by_name:
        shard_of = dict(zip(run.scores["key"], run.scores["shard"]))
        loc.update({k: by_name[shard_of[k]] for k in keys if shard_of.get(k) in by_name})
    rest = set(keys) - set(loc)
    if rest:  # a dedup run made before dedup wrote scores/ (per-embedder parquet files) names each sample's shard file
        import pyarrow.parquet as pq

        for f in sorted((run.out / "embeddings").glob("**/*.parquet")):
            try:
                # `path`: the shard column holds the shard's name (files written before held the path there)
                col = "path" if "path" in pq.read_schema(f).names else "shard"
                emb = pd.read_parquet(f, columns=["key", col])
            except Exception as e:  # noqa: BLE001 - best effort: an unreadable file only costs thumbnails
                log.debug("report: skipping %s: %s", f, e)
                continue
            emb = emb[emb["key"].isin(rest)]
            loc.update({k: s for k, s in zip(emb["key"], emb[col]) if os.path.isfile(str(s))})
            rest -= set(emb["key"])
            if not rest:
                break
    return loc


def load_thumbnails(run: Run, keys: list[str]) -> None:
    """Fill run.thumbs for the first MAX_THUMBS of `keys` (priority order), reading each shard once."""
    from scanner.data.shards import iter_tar_samples

    keys = list(dict.fromkeys(k for k in keys if isinstance(k, str)))[:MAX_THUMBS]
    if not keys:
        return
    loc = _key_locations(run, keys)
    if not loc and run.thumb_note is None:
        run.thumb_note = "the shards could not be located (no data.shards in summary.json's config)"
    wanted: dict[str, set[str]] = {}
    for k, path in loc.items():
        wanted.setdefault(path, set()).add(k)
    for path, want in sorted(wanted.items()):
        samples = iter_tar_samples(path)
        try:
            for s in samples:
                if s["key"] in want:
                    want.discard(s["key"])
                    if s["image"]:
                        uri = _thumb_uri(s["image"])
                        if uri:
                            run.thumbs[s["key"]] = uri
                    if not want:
                        break
        finally:
            samples.close()


# --------------------------------------------------------------------------------------------------
# plots


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


# --------------------------------------------------------------------------------------------------
# HTML pieces


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return "–" if not np.isfinite(v) else f"{float(v):.4g}"
    return escape(str(v))


def _table(header: list[str], rows: list[list], cls: str = "", thead: str | None = None) -> str:
    """Cells are escaped unless they are given pre-rendered as ('html', markup); thead replaces the header row."""
    def cell(v):
        return v[1] if isinstance(v, tuple) and len(v) == 2 and v[0] == "html" else _fmt(v)

    head = thead or "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead>{head}</thead><tbody>{body}</tbody></table>'


def _na(what: str) -> str:
    return f'<p class="na">Not available: {what}</p>'


def _badge(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f'<span class="badge {kind}-{escape(str(v))}">{escape(str(v))}</span>'


def _img(run: Run, key: str, cls: str = "thumb") -> str:
    uri = run.thumbs.get(key)
    if uri is None:
        return f'<div class="{cls} noimg" title="image not read back">no image</div>'
    return f'<img class="{cls}" src="{uri}" alt="{escape(key)}" title="{escape(key)}">'


def _short(text, n: int = 90) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return '<span class="muted">(no caption)</span>'
    text = str(text)
    short = text if len(text) <= n else text[:n - 1] + "…"
    return f'<span title="{escape(text)}">{escape(short)}</span>'


def _section(sid: str, body: str) -> str:
    title = dict(SECTIONS)[sid]
    return f'<section id="{sid}" class="card"><h2>{escape(title)}</h2>\n{body}\n</section>'


def _counts(run: Run) -> dict:
    c = dict(run.summary.get("counts") or {})
    if not c and run.scores is not None:  # no summary.json: count what the scores show
        c = {"seen": len(run.scores), "scored": int(run.scores["error"].isna().sum()),
             "errors": int(run.scores["error"].notna().sum())}
        for col in ("mem_class", "verdict"):
            if col in run.scores:
                c[col] = run.scores[col].value_counts().to_dict()
    return c


def section_summary(run: Run) -> str:
    c = _counts(run)
    parts = []
    if c:
        labels = {"seen": "samples seen", "scored": "scored", "embedded": "embedded", "errors": "errors (all stages)",
                  "shard_errors": "damaged shards", "duplicate_groups": "duplicate groups",
                  "duplicates": "duplicates (group members not kept)", "removed": "on the removal list"}
        rows = [[labels.get(k, k), c[k]] for k in labels if k in c]
        for k, kind in (("mem_class", "mem"), ("verdict", "verdict"), ("removed_by_reason", "reason")):
            if isinstance(c.get(k), dict) and c[k]:
                rows.append([k.replace("_", " "), ("html", " ".join(
                    f'<span class="nowrap">{_badge(n, kind)}&nbsp;{_fmt(v)}</span>' for n, v in sorted(c[k].items())))])
        parts.append('<div class="cols"><div><h3>Counts</h3>' + _table(["what", "count"], rows, "kv") + "</div>")
    else:
        parts.append('<div class="cols"><div><h3>Counts</h3>' + _na("neither summary.json nor scores") + "</div>")
    if run.errors is not None and len(run.errors):
        by = run.errors.groupby(run.errors["stage"].fillna("?")).size().sort_values(ascending=False)
        examples = run.errors.groupby(run.errors["stage"].fillna("?"))["error"].first()
        rows = [[s, n, ("html", _short(examples.get(s), 70))] for s, n in by.items()]
        parts.append("<div><h3>Errors by stage</h3>" + _table(["stage", "rows", "example"], rows) + "</div></div>")
    elif run.errors is not None:
        parts.append('<div><h3>Errors by stage</h3><p class="good">No errors.</p></div></div>')
    else:
        parts.append("<div><h3>Errors by stage</h3>" + _na("errors.parquet " + run.missing.get(
            "errors.parquet", "")) + "</div></div>")
    t = run.summary.get("timings_s") or {}
    cfg = run.summary.get("config") or {}
    facts = []
    if cfg:
        m = cfg.get("model") or {}
        facts += [["model", f"{m.get('kind', '?')}: {m.get('path') or '–'}"],
                  ["shards", ", ".join(map(str, (cfg.get("data") or {}).get("shards") or [])) or "–"]]
    if t:
        facts.append(["timings (s)", ", ".join(f"{k} {v}" for k, v in t.items())])
    if facts:
        parts.append("<h3>Run</h3>" + _table(["", ""], facts, "kv"))
    files = [("scores/*.parquet", "per-sample scores, class and verdict (one file per shard)"),
             ("duplicates.parquet", "duplicate groups"), ("replications.parquet", "generations matched to training"),
             ("removal_list.parquet", "samples to remove, with the reason (also removal_list.txt)"),
             ("errors.parquet", "failed samples and shards"), ("summary.json", "counts, thresholds, config"),
             ("metrics.json", "AUROC / TPR against planted truth (memscan evaluate)")]
    rows = []
    for name, what in files:
        status = run.missing.get(name)
        present = f'<span class="na">{escape(status)}</span>' if status else '<span class="good">✓</span>'
        rows.append([("html", f"<code>{escape(name)}</code>"), what, ("html", present)])
    parts.append(f"<h3>Files</h3><p>All paths are under <code>{escape(str(run.out))}</code>.</p>"
                 + _table(["file", "holds", "present"], rows))
    return _section("summary", "\n".join(parts))


def section_metrics(run: Run) -> str:
    if run.metrics is None:
        return _section("metrics", _na("metrics.json " + run.missing.get("metrics.json", "not found")
                                       + " — run <code>memscan evaluate --out DIR --truth truth.parquet</code>."))
    m = run.metrics
    comps = list((m.get("scores") or {}).keys())
    detector, _ = run.detector
    cols = []
    for comp in comps:
        cols += [c for c in m["scores"][comp] if c not in cols]
    known = score_columns(pd.DataFrame({c: [1.0] for c in cols}))  # the histograms' order
    cols = known + [c for c in cols if c not in known]
    rows = []
    for col in cols:
        name = f"<b>{escape(col)}</b> (detector)" if col == detector else escape(col)
        row: list = [("html", name)]
        for comp in comps:
            r = m["scores"][comp].get(col)
            if r is None:
                row += [None, None, None, None]
                continue
            auc = r.get("auroc")
            cls = "hi" if auc is not None and auc >= 0.9 else ("mid" if auc is not None and auc >= 0.7 else "")
            ci = r.get("auroc_ci")
            ci_s = f' <span class="muted">({_fmt(ci[0])}–{_fmt(ci[1])})</span>' if ci else ""
            row += [("html", f'<span class="{cls}">{_fmt(auc)}</span>{ci_s}'), r.get("tpr_at_1pct_fpr"),
                    r.get("tpr_at_0_1pct_fpr"), r.get("direction", "?")]
        rows.append(row)
    top = '<th rowspan="2">column</th>' + "".join(
        f'<th colspan="4" class="grp">{escape(c.replace("_vs_", " vs "))}</th>' for c in comps)
    sub = "".join('<th class="grp">AUROC (95% CI)</th><th>TPR@1%FPR</th><th>@0.1%</th><th>flags</th>' for _ in comps)
    body = ("<p>Each score column against planted truth: positives are the planted class, negatives the unique "
            "images. <i>flags</i> is the tail in which the column flags memorization, fixed by the method "
            "(scanner/columns.py), not chosen on this data: an AUROC below 0.5 means the column flags the wrong tail "
            "here. TPR@1%FPR is the share of positives caught when 1 % of unique images are flagged (@0.1%: when 0.1 % "
            "are). The intervals are a bootstrap over independent units: a planted group of copies counts once, so 480 "
            "repeated copies are 20 positives, not 480.</p>")
    body += (_table([], rows, "metrics", thead=f"<tr>{top}</tr><tr>{sub}</tr>") if rows
             else _na("metrics.json has no score columns"))
    d = m.get("duplicates")
    if d:
        body += ("<h3>Duplicate groups against planted groups</h3>"
                 + _table(["", ""], [["pair precision", d.get("pair_precision")],
                                     ["pair recall", d.get("pair_recall")]], "kv"))
    dose = m.get("dose_response") or []
    uri = dose_plot(dose)
    if uri:
        body += ("<h3>Dose-response</h3><p>The share of images flagged at this run's threshold against how many copies "
                 "of the image the corpus holds (planted dose groups, the repeated class, and unique images as one "
                 "copy): memorization should rise with copies.</p>"
                 f'<img class="plot" src="{uri}" alt="dose-response">'
                 + _table(["copies", "images", "groups", "flagged", "dd", "od"],
                          [[d["copies"], d["images"], d["units"], d["flagged"], d["dd"], d["od"]] for d in dose]))
    ct = m.get("mem_class_by_planted")
    if ct:
        classes = list(ct.keys())
        planted = list(dict.fromkeys(p for c in classes for p in ct[c]))
        rows = [[p] + [ct[c].get(p, 0) for c in classes] for p in planted]
        body += "<h3>mem_class by planted class</h3>" + _table(["planted"] + classes, rows)
    return _section("metrics", body)


def section_distributions(run: Run) -> str:
    if run.scores is None:
        return _section("distributions", _na("scores/*.parquet " + run.missing.get("scores/*.parquet", "")))
    uri = histograms(run)
    if uri is None:
        return _section("distributions", _na("no score column has values (a dedup-only run, or every sample failed)"))
    split = "planted class (truth file given)" if run.truth is not None else "mem_class (no truth file given)"
    detector, direction = run.detector
    cols = score_columns(run.ok)
    desc = "".join(f"<li><code>{escape(c)}</code>: {DESCRIBE.get(c, _p_desc(c))}{_flags(c)}</li>" for c in cols)
    return _section("distributions", (
        f"<p>Per-class densities (each class normalized to area 1, so small classes stay visible), split by {split}. "
        f"Values beyond the 0.5–99.5th percentiles are piled into the edge bins. The dashed line on "
        f"<code>{escape(str(detector))}</code> is the detector threshold; the shaded side is flagged "
        f"({escape(direction)} values).</p>"
        f'<img class="plot" src="{uri}" alt="score histograms"><ul class="desc">{desc}</ul>'))


def _flags(col: str) -> str:
    from scanner.columns import direction

    d = direction(col)
    return f" <i>(flags memorization when {'low' if d == 'low' else 'high'})</i>" if d else ""


def _p_desc(col: str) -> str:
    if col.startswith("p_laplace_"):
        p = _p_value(col)
        if p < 2:
            tail = "strongly negative (low) on the sharp, isolated density peaks memorized images sit on"
        elif p > 2:
            tail = ("closer to 0 (high) at memorized images: the factor |s|<sup>p−2</sup> vanishes where the score "
                    "is small, so the direction flips for p > 2 (method.md §9)")
        else:
            tail = "the plain Laplacian of log p: the weakest of the three on the demo"
        return f"Δ<sub>p</sub> log p<sub>t</sub> at p = {p:g}: {tail}"
    return ""


def section_manifolds(run: Run) -> str:
    expl = ("<p class=\"lead\">The manifold memorization hypothesis (method.md §4) compares two local dimensions. "
            "<b>DD-Mem</b> (data-driven): LID<sub>*</sub> is itself low — the data is low-dimensional there, e.g. "
            "many copies or near-copies of one image — so the fix is to <b>deduplicate</b>. "
            "<b>OD-Mem</b> (overfitting-driven): the model's manifold is lower-dimensional than the data's "
            "(LID<sub>θ</sub> &lt; LID<sub>*</sub>) — the model overfit an image the data does not repeat — so "
            "<b>regularize</b>, or take it out of the fine-tuning set.</p>")
    if run.scores is None:
        return _section("manifolds", expl + _na("scores/*.parquet " + run.missing.get("scores/*.parquet", "")))
    uri = manifold_scatter(run)
    if uri is None:
        return _section("manifolds", expl + _na("lid_flipd and lid_lpca both need values (local PCA needs "
                                                "model-space vectors; a run without a model has none)"))
    lpca_low, margin = run.thresholds.get("lpca_low"), run.thresholds.get("gap_margin") or 0.0
    note = (f"Left of the dashed line (lid_lpca &lt; {_fmt(lpca_low)}), or in a group of byte copies, a flagged "
            "sample is DD-Mem; otherwise, below the dotted line ("
            f"<code>lid_gap_rel</code> &gt; {_fmt(margin)}) it is OD-Mem, above it it stays "
            "flagged without a class. "
            if lpca_low is not None else "")
    return _section("manifolds", expl + f'<img class="plot" src="{uri}" alt="LID scatter">'
                    "<p>The two LIDs are not on one scale: local PCA counts at most <code>lpca_k</code> directions "
                    "and FLIPD every direction the noise at t<sub>0</sub> does not swamp. The dotted line puts them on "
                    "one: for each LID<sub>*</sub>, the median LID<sub>θ</sub> the model gives the corpus's images of "
                    "that LID<sub>*</sub>. A sample below it is lower-dimensional to the model than images whose data "
                    "neighbourhood has the same dimension. "
                    f"{note}Only samples the detector flags get a class at all, so the colours are not a partition "
                    "of the plane.</p>")


def _at_risk(run: Run) -> tuple[pd.DataFrame, str | None, str]:
    detector, direction = run.detector
    df = run.ok
    if df.empty or detector not in df or not pd.to_numeric(df[detector], errors="coerce").notna().any():
        return pd.DataFrame(), detector, direction
    df = df.assign(rank_score=pd.to_numeric(df[detector], errors="coerce")).dropna(subset=["rank_score"])
    df = df.sort_values(["rank_score", "key"], ascending=[direction == "low", True])
    # one card per risk: a duplicate group's most extreme member stands for the group (24 copies of one image
    # are one risk, not 24), every ungrouped image for itself
    group = df["key"].map(_group_of(run))
    unit = np.where(group.notna(), "g" + group.astype("Int64").astype(str), "k" + df["key"].astype(str))
    return df[~pd.Series(unit, index=df.index).duplicated()].head(TOP_K), detector, direction


def _group_of(run: Run) -> dict[str, int]:
    return {} if run.dups is None else dict(zip(run.dups["key"], run.dups["group_id"]))


def _mates(run: Run, key: str) -> list[str]:
    g = _group_of(run).get(key)
    if g is None:
        return []
    d = run.dups[run.dups["group_id"] == g]
    d = d.sort_values(["keep", "similarity"], ascending=[False, False])
    return [k for k in d["key"] if k != key][:MATES]


def _planted(run: Run) -> dict[str, str]:
    if run.truth is None or "planted" not in run.truth:
        return {}
    return dict(zip(run.truth["key"], run.truth["planted"]))


def section_at_risk(run: Run) -> str:
    top, detector, direction = _at_risk(run)
    if top.empty:
        return _section("at-risk", _na(f"no values in the detector column {detector!r}"
                                       if run.scores is not None else "scores/*.parquet not found"))
    group_of, planted = _group_of(run), _planted(run)
    replicated = set()
    if run.reps is not None and len(run.reps):
        replicated = set(run.reps.loc[run.reps["replicated"].astype(bool), "matched_key"])
    cards = []
    for rank, r in enumerate(top.itertuples(index=False), 1):
        key = r.key
        extra = []
        if key in planted:
            extra.append(_badge(planted[key], "planted"))
        if key in replicated:
            extra.append('<span class="badge verdict-confirmed">replicated</span>')
        mates = ""
        if key in group_of:
            g = run.dups[run.dups["group_id"] == group_of[key]]
            imgs = "".join(_img(run, k, "mini") for k in _mates(run, key))
            mates = (f'<div class="mates"><span>dup group {_fmt(group_of[key])}: {len(g)} copies, one card</span>'
                     f'<div class="minis">{imgs}</div></div>')
        cards.append(
            f'<figure class="item">{_img(run, key)}<figcaption>'
            f'<div class="rank">#{rank} <code>{escape(str(key))}</code></div>'
            f'<div class="cap">{_short(getattr(r, "caption", None), 70)}</div>'
            f'<div class="score">{escape(detector)} = <b>{_fmt(r.rank_score)}</b></div>'
            f'<div>{_badge(getattr(r, "mem_class", None), "mem")} {_badge(getattr(r, "verdict", None), "verdict")} '
            f'{" ".join(extra)}</div>{mates}</figcaption></figure>')
    thr = run.thresholds.get("threshold")
    head = (f"<p>The {len(top)} samples with the {'lowest' if direction == 'low' else 'highest'} "
            f"<code>{escape(detector)}</code> (the detector; flagged at {'≤' if direction == 'low' else '≥'} "
            f"{_fmt(thr)}), most extreme first, one card per risk: a duplicate group is shown once, by its most "
            f"extreme member, with its copy count and mates under it.</p>")
    return _section("at-risk", head + _thumb_note(run) + f'<div class="grid">{"".join(cards)}</div>')


def _thumb_note(run: Run) -> str:
    return f'<p class="na">Images not shown: {escape(run.thumb_note)}.</p>' if run.thumb_note else ""


def _top_groups(run: Run) -> pd.DataFrame:
    if run.dups is None or not len(run.dups):
        return pd.DataFrame(columns=["group_id", "n"])
    sizes = run.dups.groupby("group_id").size().rename("n").reset_index()
    return sizes.sort_values(["n", "group_id"], ascending=[False, True]).head(TOP_GROUPS)


def _group_members(run: Run, gid) -> pd.DataFrame:
    d = run.dups[run.dups["group_id"] == gid]
    return d.sort_values(["keep", "similarity", "key"], ascending=[False, False, True])


def section_duplicates(run: Run) -> str:
    if run.dups is None:
        return _section("duplicates", _na("duplicates.parquet " + run.missing.get("duplicates.parquet", "")
                                          + " (neighbours disabled?)"))
    if not len(run.dups):
        return _section("duplicates", '<p class="good">No duplicate groups found.</p>')
    n_groups = run.dups["group_id"].nunique()
    captions = dict(zip(run.scores["key"], run.scores["caption"])) if run.scores is not None else {}
    planted = _planted(run)
    rows = []
    for gid, n in _top_groups(run).itertuples(index=False):
        d = _group_members(run, gid)
        links = ""
        if "link" in d:
            links = ", ".join(f"{escape(str(k))}" for k in sorted(set(d["link"].dropna().astype(str))))
        members = []
        for m in d.head(GROUP_MEMBERS).itertuples(index=False):
            kept = bool(m.keep)
            label = "kept" if kept else _fmt(m.similarity)
            title = escape(str(captions.get(m.key) or ""))
            tag = " · " + escape(str(planted[m.key])) if m.key in planted else ""
            members.append(f'<figure class="member{" kept" if kept else ""}" title="{title}">'
                           f'{_img(run, m.key, "mthumb")}<figcaption><code>{escape(str(m.key))}</code><br>'
                           f'{label}{tag}</figcaption></figure>')
        more = f'<div class="more">+{n - GROUP_MEMBERS} more</div>' if n > GROUP_MEMBERS else ""
        kept_key = d.loc[d["keep"].astype(bool), "key"]
        cap = _short(captions.get(kept_key.iloc[0]) if len(kept_key) else None, 60) if captions else ""
        rows.append(f'<div class="group"><div class="ghead"><b>group {_fmt(gid)}</b> · {n} members'
                    f'{" · linked by " + links if links else ""}{" · " + cap if cap else ""}</div>'
                    f'<div class="strip">{"".join(members)}{more}</div></div>')
    head = (f"<p>{_fmt(n_groups)} groups, {_fmt(len(run.dups))} samples in them; the {len(rows)} largest below. "
            f"The kept member (green) stays in the corpus; the number under each other member is its cosine "
            f"similarity to the kept one.</p>")
    return _section("duplicates", head + _thumb_note(run) + "".join(rows))


def section_replications(run: Run) -> str:
    if run.reps is None:
        return _section("replications", _na("replications.parquet " + run.missing.get("replications.parquet", "")
                                            + " (set neighbours.generations &gt; 0 to generate and match images)"))
    reps = run.reps
    if not len(reps):
        return _section("replications", '<p class="good">No generations were matched.</p>')
    n_rep = int(reps["replicated"].astype(bool).sum())
    info = ((run.summary.get("neighbours") or {}).get("replications")) or {}
    thr = info.get("threshold", ((run.summary.get("config") or {}).get("neighbours") or {}).get("rep_threshold"))
    gen_dir = run.out / "replications"
    shown = reps.sort_values(["replicated", "similarity", "gen_id"], ascending=[False, False, True]).head(TOP_REPS)
    stored = any((gen_dir / f"gen_{g}.png").is_file() for g in shown["gen_id"])
    rows = []
    for r in shown.itertuples(index=False):
        gen_png = gen_dir / f"gen_{r.gen_id}.png"
        if gen_png.is_file():
            try:
                data = base64.b64encode(gen_png.read_bytes()).decode("ascii")
                gen = f'<img class="thumb" src="data:image/png;base64,{data}" alt="generation {_fmt(r.gen_id)}">'
            except OSError:
                gen = '<div class="thumb noimg">unreadable</div>'
        else:
            gen = '<div class="thumb noimg">not stored</div>'
        badge = ('<span class="badge verdict-confirmed">replicated</span>' if r.replicated
                 else '<span class="badge verdict-clear">below threshold</span>')
        rows.append(f'<div class="rep"><figure>{gen}<figcaption>generation {_fmt(r.gen_id)}<br>seed {_fmt(r.seed)}'
                    f'</figcaption></figure><div class="arrow">→<br><b>{_fmt(r.similarity)}</b></div>'
                    f'<figure>{_img(run, r.matched_key)}<figcaption>training <code>{escape(str(r.matched_key))}'
                    f'</code></figcaption></figure><div class="repinfo">{badge}<div class="cap">'
                    f'{_short(r.caption, 120)}</div></div></div>')
    head = (f"<p>{_fmt(len(reps))} generations from training captions; <b>{n_rep}</b> replicate a training image "
            f"(nearest training image at cosine ≥ {_fmt(thr)}). Highest similarity first; the number between the "
            f"images is their cosine similarity.</p>")
    if not stored:
        head += ('<p class="muted">Generated images are not stored by this run (no '
                 '<code>replications/gen_*.png</code>)'
                 ": only the matched training image is shown.</p>")
    return _section("replications", head + _thumb_note(run) + f'<div class="reps">{"".join(rows)}</div>')


def _calibrated_cut(t: dict, detector: str, direction: str, thr: float) -> str:
    c = t["calibration"]
    share = c.get("flagged_share_of_corpus")
    m = c.get("members")
    members = ""
    if m:
        sign = "−" if direction == "low" else "+"
        members = (f". The cut must also flag no more than {_fmt(c['fpr'] * 100)} % of the corpus's ordinary "
                   f"members (<code>classify.calibration_members</code>): its median {_fmt(m['median'])} {sign} "
                   f"{_fmt(m['z'])} × {_fmt(m['scale'])} (1.4826 × the MAD) = {_fmt(m['cut'])}, "
                   + ("stricter than the held-out cut " + _fmt(c.get("heldout_cut")) + ", so it applies and flags "
                      + _fmt((c.get("flagged_share_of_heldout") or 0) * 100) + " % of the held-out images"
                      if m.get("binding") else "looser than the held-out cut, which applies"))
    held = c.get("heldout_cut", thr)
    return (f"every sample with <code>{escape(detector)}</code> {'≤' if direction == 'low' else '≥'} <b>{_fmt(thr)}</b>. "
            f"The held-out cut {_fmt(held)} flags {_fmt(c['fpr'] * 100)} % of {c['images']} held-out images the model "
            "never trained on "
            f"(<code>classify.calibration_shards</code>: {escape(', '.join(c.get('shards') or []))}; their median "
            f"{_fmt(c.get('median'))}): a false-positive rate on non-members, so the cut means the same under any "
            "model" + (f". Estimated from {c['images']} images, the rate it applies to non-members lies in "
                       f"{_fmt(c['fpr_interval'][0] * 100)}–{_fmt(c['fpr_interval'][1] * 100)} % (95 %; more held-out "
                       "images narrow it)" if c.get("fpr_interval") else "") + members
            + (f". The cut flags {_fmt(share * 100)} % of this corpus" if share is not None else ""))


def section_thresholds(run: Run) -> str:
    t = run.thresholds
    detector, direction = run.detector
    parts = []
    if t.get("rule"):
        parts.append(f'<p>The rule this run used:</p><pre class="rule">{escape(t["rule"])}</pre>')
    elif t.get("note"):
        parts.append(f"<p>{escape(t['note'])}.</p>")
    else:
        parts.append(_na("summary.json has no thresholds"))
    thr, q = t.get("threshold"), t.get("quantile")
    if detector and thr is not None:
        side = "lowest" if direction == "low" else "highest"
        how = (f"the {_fmt(q * 100)} % of scored samples with the {side} <code>{escape(detector)}</code>, i.e. "
               f"every sample at {'or below' if direction == 'low' else 'or above'} <b>{_fmt(thr)}</b> on this run "
               "(the quantile is recomputed on each run, so the value moves with the corpus)"
               if q is not None else _calibrated_cut(t, detector, direction, thr) if t.get("calibration") else
               f"every sample with <code>{escape(detector)}</code> {'≤' if direction == 'low' else '≥'} "
               f"<b>{_fmt(thr)}</b> (a fixed threshold from the config)")
        parts.append(f"<p><b>Detector.</b> One model column flags a sample as memorized: {how}.</p>")
        lpca_low, gap = t.get("lpca_low"), t.get("gap_margin")
        parts.append(f"<p><b>Class.</b> A flagged sample with LID<sub>*</sub> (<code>lid_lpca</code>) below "
                     f"<b>{_fmt(lpca_low)}</b>, or in a duplicate group holding byte-identical copies, is <b>dd</b> "
                     "(DD-Mem: the data is low-dimensional there: local PCA sees copies only where an image has "
                     "about <code>lpca_k</code> of them, the byte copies are copies at any scale); otherwise, "
                     f"when <code>lid_gap_rel</code> (the corpus's median LID<sub>θ</sub> among images of the same "
                     f"LID<sub>*</sub> − its LID<sub>θ</sub>, ÷ the median LID<sub>θ</sub>) &gt; {_fmt(gap)}, it is "
                     "<b>od</b> (OD-Mem: the model's manifold dropped below what the data's dimension there gets "
                     "elsewhere); a flagged sample that neither LID explains stays <b>none</b> (its verdict is still "
                     "suspected). Unflagged samples are <b>none</b>.</p>")
    nb = run.summary.get("neighbours") or {}
    nbt = nb.get("thresholds") or (t if "dup_threshold" in t else {})  # memscan dedup: its own summary
    ncfg = (run.summary.get("config") or {}).get("neighbours") or {}
    dup_thr = nbt.get("dup_threshold", ncfg.get("dup_threshold"))
    if dup_thr is not None or nbt.get("keep_rule"):
        parts.append(f"<p><b>Duplicates.</b> Two images are duplicates when their copy-detection embeddings have "
                     f"cosine ≥ <b>{_fmt(dup_thr)}</b>. Byte-identical and perceptual-hash copies group "
                     f"transitively (they are the same picture); near-duplicates do not chain: each joins the group "
                     f"of the first linked image in keep-rule order, so every member is within the threshold of "
                     f"the kept image (smallest: {_fmt((nb.get('groups') or {}).get('min_similarity_to_kept_embedding_links'))}). "
                     f"Kept member: {escape(str(nbt.get('keep_rule', '–')))}.{_aligned_sentence(nbt, nb)}</p>")
    parts.append(
        "<h3>Verdicts</h3><dl class=\"verdicts\">"
        f"<dt>{_badge('confirmed', 'verdict')}</dt><dd>the geometry flags it <i>and</i> a neighbour confirms it: "
        "it is in a duplicate group, or a generation replicates it.</dd>"
        f"<dt>{_badge('suspected', 'verdict')}</dt><dd>the geometry flags it, no neighbour confirms it (yet).</dd>"
        f"<dt>{_badge('duplicate', 'verdict')}</dt><dd>not flagged, but a non-kept member of a duplicate group: "
        "neighbours only.</dd>"
        f"<dt>{_badge('clear', 'verdict')}</dt><dd>neither.</dd></dl>")
    parts.append(
        "<h3>Removal rule</h3><ol class=\"rule-list\">"
        "<li><b>duplicate</b>: every member of a duplicate group except the kept one;</li>"
        "<li><b>dd_mem</b>: DD-Mem samples not already in a duplicate group (for those, deduplication is the fix and "
        "the kept copy stays);</li>"
        "<li><b>od_mem</b>: all OD-Mem samples;</li>"
        "<li><b>replicated</b>: every training image a generation replicates.</li></ol>"
        "<p>A sample that meets several is listed once, under the first reason above.</p>")
    return _section("thresholds", "\n".join(parts))


def _aligned_sentence(nbt: dict, nb: dict) -> str:
    """The pixel check of near-misses, when the scan ran it (summary.json neighbours.thresholds.aligned)."""
    a = nbt.get("aligned")
    if not a:
        return ""
    c = nb.get("aligned_candidates") or {}
    return (f" Neighbours at cosine ≥ <b>{_fmt(a.get('align_min_cosine'))}</b> but below the threshold are duplicates "
            f"too when their {a.get('align_size')} px thumbnails differ by RMSE ≤ <b>{_fmt(a.get('align_max_rmse'))}"
            f"</b> at some shift of at most {a.get('align_max_shift')} px (a moved copy): {c.get('linked', 0)} of "
            f"{c.get('checked', 0)} such candidates were (link <code>aligned</code>).")


def section_removal(run: Run) -> str:
    if run.removal is None:
        return _section("removal", _na("removal_list.parquet " + run.missing.get("removal_list.parquet", "")))
    counts = run.removal["reason"].value_counts()
    rows = [[("html", _badge(r, "reason")), ("html", REASONS.get(r, "")), int(counts.get(r, 0))]
            for r in list(REASONS) + [r for r in counts.index if r not in REASONS]]
    rows.append([("html", "<b>total</b>"), "", len(run.removal)])
    body = _table(["reason", "meaning", "samples"], rows)
    body += (f"<p>Keys are in <code>{escape(str(run.out / 'removal_list.txt'))}</code> (one a line) and "
             f"<code>removal_list.parquet</code> (key, shard, reason).</p>")
    if len(run.removal):
        head = run.removal.head(10)
        body += "<h3>First rows</h3>" + _table(list(head.columns), head.astype(object).values.tolist())
    return _section("removal", body)


CSS = """
:root { --fg:#1d2430; --muted:#667085; --line:#e4e7ec; --bg:#f4f6f9; --card:#fff; --accent:#3451b2; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1100px; margin:0 auto; padding:24px 16px 48px; }
header h1 { margin:0 0 4px; font-size:26px; letter-spacing:-.01em; }
header p { margin:0; color:var(--muted); }
nav { margin:14px 0 18px; display:flex; flex-wrap:wrap; gap:6px; }
nav a { text-decoration:none; color:var(--accent); background:#fff; border:1px solid var(--line);
  border-radius:999px; padding:3px 11px; font-size:13px; }
nav a:hover { background:#eef2ff; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 22px;
  margin:0 0 18px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
h2 { margin:0 0 10px; font-size:19px; }
h3 { margin:16px 0 6px; font-size:14px; color:#344054; }
p { margin:6px 0 10px; }
code { font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; background:#f2f4f7; padding:1px 4px;
  border-radius:4px; }
pre.rule { white-space:pre-wrap; background:#f8f9fb; border:1px solid var(--line); border-radius:6px;
  padding:8px 12px; font:12.5px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
table { border-collapse:collapse; font-size:13px; margin:4px 0 10px; }
th, td { padding:4px 10px; text-align:left; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f8f9fb; font-weight:600; color:#344054; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
td:not(:first-child) { font-variant-numeric:tabular-nums; }
table.kv td:first-child { color:var(--muted); white-space:nowrap; }
table.kv thead { display:none; }
table.metrics td, table.metrics th { text-align:right; }
table.metrics td:first-child, table.metrics th:first-child { text-align:left; }
.hi { color:#067647; font-weight:600; } .mid { color:#b54708; }
.cols { display:grid; grid-template-columns:minmax(0,1fr) minmax(0,1fr); gap:24px; }
.na { color:#b54708; background:#fffaeb; border:1px solid #fedf89; border-radius:6px; padding:6px 10px; }
.good { color:#067647; } .muted { color:var(--muted); }
.lead { font-size:14.5px; }
img.plot { width:100%; height:auto; display:block; margin:8px 0; }
ul.desc { margin:4px 0; padding-left:20px; color:#475467; font-size:13px; }
img.thumb, img.mthumb, img.mini { image-rendering:pixelated; image-rendering:crisp-edges; display:block;
  border-radius:4px; background:#eee; }
.thumb { width:112px; height:112px; } .mthumb { width:72px; height:72px; } .mini { width:30px; height:30px; }
.noimg { display:flex; align-items:center; justify-content:center; background:#f2f4f7; color:#98a2b3;
  font-size:11px; border-radius:4px; text-align:center; }
.mini.noimg { font-size:0; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(160px,1fr)); gap:12px; }
figure { margin:0; }
figure.item { border:1px solid var(--line); border-radius:8px; padding:10px; display:flex; flex-direction:column;
  align-items:center; background:#fcfcfd; }
figure.item figcaption { width:100%; font-size:12px; margin-top:6px; }
.rank { font-weight:600; } .cap { color:#475467; margin:2px 0; overflow-wrap:anywhere; }
.score { margin:2px 0 4px; }
.mates { margin-top:6px; color:var(--muted); font-size:11px; }
.minis { display:flex; gap:4px; margin-top:2px; }
.nowrap { white-space:nowrap; }
th.grp { border-left:1px solid var(--line); }
table.metrics th { text-align:center; }
.badge { display:inline-block; padding:0 7px; border-radius:999px; font-size:11px; font-weight:600;
  background:#f2f4f7; color:#344054; border:1px solid #e4e7ec; line-height:18px; }
.mem-od, .verdict-confirmed, .reason-od_mem, .reason-replicated { background:#fef3f2; color:#b42318;
  border-color:#fecdca; }
.mem-dd, .verdict-duplicate, .reason-duplicate, .reason-dd_mem { background:#eff8ff; color:#175cd3;
  border-color:#b2ddff; }
.verdict-suspected { background:#fffaeb; color:#b54708; border-color:#fedf89; }
.planted-repeated { background:#fef3f2; color:#b42318; } .planted-oversampled { background:#fff6ed; color:#c4320a; }
.planted-exact_dup, .planted-near_dup { background:#eff8ff; color:#175cd3; }
.group { border-top:1px solid var(--line); padding:10px 0; }
.ghead { font-size:13px; margin-bottom:6px; color:#344054; }
.strip { display:flex; gap:8px; flex-wrap:wrap; align-items:flex-start; }
figure.member { border:2px solid transparent; border-radius:6px; padding:3px; text-align:center; font-size:11px;
  color:var(--muted); }
figure.member code { font-size:10.5px; padding:0; background:none; }
figure.member.kept { border-color:#32d583; background:#ecfdf3; color:#067647; font-weight:600; }
.more { align-self:center; color:var(--muted); font-size:12px; padding:0 6px; }
.reps { display:grid; grid-template-columns:repeat(auto-fill,minmax(500px,1fr)); gap:12px; }
.rep { display:flex; gap:10px; align-items:center; border:1px solid var(--line); border-radius:8px; padding:10px;
  background:#fcfcfd; }
.rep figcaption { font-size:11px; color:var(--muted); text-align:center; margin-top:3px; }
.arrow { text-align:center; color:var(--muted); font-size:12px; min-width:48px; }
.repinfo { flex:1; font-size:12px; min-width:0; }
dl.verdicts { display:grid; grid-template-columns:max-content 1fr; gap:4px 12px; margin:6px 0; }
dl.verdicts dd { margin:0; }
footer { color:var(--muted); font-size:12px; text-align:center; }
@media (max-width:760px) { .cols { grid-template-columns:1fr; } }
"""


def render(run: Run) -> str:
    sections = [("summary", section_summary), ("metrics", section_metrics),
                ("distributions", section_distributions), ("manifolds", section_manifolds),
                ("at-risk", section_at_risk), ("duplicates", section_duplicates),
                ("replications", section_replications), ("thresholds", section_thresholds),
                ("removal", section_removal)]
    body = []
    for sid, fn in sections:
        try:
            body.append(fn(run))
        except Exception as e:  # noqa: BLE001 - one section's failure must not cost the reader the others
            log.warning("report: section %s failed: %s: %s", sid, type(e).__name__, e)
            body.append(_section(sid, f'<p class="na">This section failed to render: {escape(type(e).__name__)}: '
                                        f"{escape(str(e))}</p>"))
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title in SECTIONS)
    c = _counts(run)
    sub = (f"{_fmt(c.get('seen'))} samples · {_fmt(c.get('scored'))} scored · {_fmt(c.get('removed'))} on the "
           f"removal list" if c else "no summary")
    version = ((run.summary.get("versions") or {}).get("memscan")) or ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>memscan report — {escape(run.out.name)}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>memscan report</h1><p><code>{escape(str(run.out))}</code> · {sub}</p></header>"
            f"<nav>{nav}</nav>{''.join(body)}"
            f"<footer>memscan {escape(str(version))} · written by <code>memscan report</code> from the files above; "
            f"self-contained, no scripts.</footer></main></body></html>\n")


def _wanted_keys(run: Run) -> list[str]:
    """Keys whose images the report shows, most important first (load_thumbnails keeps MAX_THUMBS)."""
    keys: list[str] = []
    top, _, _ = _at_risk(run)
    keys += list(top["key"]) if len(top) else []
    if run.dups is not None and len(run.dups):
        for k in list(keys):
            keys += _mates(run, k)
    if run.reps is not None and len(run.reps):
        shown = run.reps.sort_values(["replicated", "similarity", "gen_id"], ascending=[False, False, True])
        keys += list(shown["matched_key"].head(TOP_REPS))
    if run.dups is not None and len(run.dups):
        for gid in _top_groups(run)["group_id"]:
            keys += list(_group_members(run, gid)["key"].head(GROUP_MEMBERS))
    return keys


def write_report(out_dir: Path, truth_path: Path | None = None) -> Path:
    """Write out_dir/report.html from the scan outputs under out_dir (atomically). Returns its path.

    truth_path: optional truth.parquet (key, planted, ...): histograms and the LID scatter are then
    split by planted class. Raises FileNotFoundError when out_dir is not a directory.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory: pass the --out of a finished `memscan scan`")
    run = load_run(out, truth_path)
    try:
        load_thumbnails(run, _wanted_keys(run))
    except Exception as e:  # noqa: BLE001 - images are a nicety; the numbers still make the report
        log.warning("report: thumbnails failed: %s: %s", type(e).__name__, e)
        run.thumb_note = f"reading the shards failed ({type(e).__name__}: {e})"
    text = render(run)
    path = out / "report.html"
    atomic_write_text(text, path)
    return path


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="a finished scan's output directory; report.html is written there")
    p.add_argument("--truth", help="optional truth.parquet (key, planted): split the plots by planted class")
    return p


def cmd_report(args) -> int:
    path = write_report(Path(args.out), Path(args.truth) if args.truth else None)
    print(f"memscan report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m scanner.report", description=(
        "(Re)write report.html from a finished scan's outputs: one self-contained file.")))
    args = p.parse_args(argv)
    try:
        return cmd_report(args)
    except FileNotFoundError as e:
        print(f"memscan report: error: {e}", file=sys.stderr)
        return 2
