"""The report's sections about the scores: the run summary, the detection metrics, the score distributions and the
two manifolds (docs/method.md §4)."""

from __future__ import annotations

from html import escape

import pandas as pd

from scanner.report.load import Run
from scanner.report.markup import _badge, _counts, _fmt, _na, _section, _short, _table
from scanner.report.plots import _p_value, dose_plot, histograms, manifold_scatter, score_columns

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
                    "is small, so the direction flips for p > 2 (docs/method.md §9)")
        else:
            tail = "the plain Laplacian of log p: the weakest of the three on the demo"
        return f"Δ<sub>p</sub> log p<sub>t</sub> at p = {p:g}: {tail}"
    return ""


def section_manifolds(run: Run) -> str:
    expl = ("<p class=\"lead\">The manifold memorization hypothesis (docs/method.md §4) compares two local dimensions. "
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
