"""The report page: every section in one self-contained HTML file (inline CSS, plots and previews; no script,
nothing loaded from the network), written atomically.

    path = write_report(out_dir, truth_path=None)   # -> out_dir/report.html (memscan report --out DIR)
"""

from __future__ import annotations

import logging
from html import escape
from pathlib import Path

from scanner.report.load import Run, load_previews, load_run
from scanner.report.markup import CSS, SECTIONS, _counts, _fmt, _section
from scanner.report.rules import section_removal, section_thresholds
from scanner.report.samples import section_at_risk, section_duplicates, section_replications, wanted_keys
from scanner.report.sections import section_distributions, section_manifolds, section_metrics, section_summary

log = logging.getLogger("memscan")


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
            f"<title>memscan report — {escape(run.out.uri().rstrip('/').rsplit('/', 1)[-1])}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>memscan report</h1><p><code>{escape(str(run.out))}</code> · {sub}</p></header>"
            f"<nav>{nav}</nav>{''.join(body)}"
            f"<footer>memscan {escape(str(version))} · written by <code>memscan report</code> from the files above; "
            f"self-contained, no scripts.</footer></main></body></html>\n")


def write_report(out_dir, truth_path: Path | None = None) -> Path | str:
    """Write OUT/report.html from the scan outputs under out_dir (a local directory or an object-storage URL),
    whole. Returns its Path (its URL for an --out in object storage).

    truth_path: optional truth.parquet (key, planted, ...): histograms and the LID scatter are then
    split by planted class. Raises FileNotFoundError when out_dir is not a directory.
    """
    from scanner.storage import Out

    out = out_dir if isinstance(out_dir, Out) else Out(out_dir)
    if not out.isdir():
        raise FileNotFoundError(f"{out} is not a directory: pass the --out of a finished `memscan scan`")
    run = load_run(out, truth_path)
    try:
        load_previews(run, wanted_keys(run))
    except Exception as e:  # noqa: BLE001 - images are a nicety; the numbers still make the report
        log.warning("report: previews failed: %s: %s", type(e).__name__, e)
        run.thumb_note = f"reading previews/ failed ({type(e).__name__}: {e})"
    out.write_text("report.html", render(run))
    return out.local_path("report.html") if out.local else out.uri("report.html")
