"""The report's HTML pieces: escaped cells and tables, badges, image tags, a section card, and the stylesheet."""

from __future__ import annotations

import math
from html import escape

import numpy as np

from scanner.report.load import Run

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
