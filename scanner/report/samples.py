"""The report's sections that show images: the most at-risk samples (one card per risk), the duplicate groups and
the replications; and the keys whose previews they need."""

from __future__ import annotations

import base64
from html import escape

import numpy as np
import pandas as pd

from scanner.report.load import GROUP_MEMBERS, MATES, TOP_GROUPS, TOP_K, TOP_REPS, Run
from scanner.report.markup import _badge, _fmt, _img, _na, _section, _short


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
    pngs = set(run.out.names("replications", ".png"))
    shown = reps.sort_values(["replicated", "similarity", "gen_id"], ascending=[False, False, True]).head(TOP_REPS)
    stored = any(f"gen_{g}.png" in pngs for g in shown["gen_id"])
    rows = []
    for r in shown.itertuples(index=False):
        if f"gen_{r.gen_id}.png" in pngs:
            try:
                data = base64.b64encode(run.out.read_bytes(f"replications/gen_{r.gen_id}.png")).decode("ascii")
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


def wanted_keys(run: Run) -> list[str]:
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
