"""The report's sections that explain the rules: the thresholds (the detector's cut, the classes, the duplicate
rule, the verdicts) and the removal list with its reasons."""

from __future__ import annotations

from html import escape

from scanner.report.load import Run
from scanner.report.markup import _badge, _fmt, _na, _section, _table

REASONS = {
    "duplicate": "a member of a duplicate group that is not the kept one",
    "dd_mem": "DD-Mem (flagged, low LID<sub>*</sub>) and in no duplicate group",
    "od_mem": "OD-Mem (flagged, the data manifold is not low-dimensional there, the model's is lower)",
    "replicated": "a generation of the model reproduces it",
}


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
    if a.get("verifier", "shift") == "affine":  # scanner/neighbours/verify.py
        return (f" Neighbours at cosine ≥ <b>{_fmt(a.get('align_min_cosine'))}</b> but below the threshold are "
                f"duplicates too when an affine map and a gain / bias carry one {a.get('align_size')} px thumbnail onto "
                f"the other explaining ≥ <b>{_fmt(a.get('verify_min_score'))}</b> of its variance, both thumbnails "
                f"carrying fine detail ≥ {_fmt(a.get('verify_min_detail'))} (a flipped, cropped, rotated, framed or "
                f"captioned copy): {c.get('linked', 0)} of {c.get('checked', 0)} such candidates were (link "
                f"<code>verified</code>).")
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
    body += (f"<p>Keys are in <code>{escape(run.out.uri('removal_list.txt'))}</code> (one a line) and "
             f"<code>removal_list.parquet</code> (key, shard, reason).</p>")
    if len(run.removal):
        head = run.removal.head(10)
        body += "<h3>First rows</h3>" + _table(list(head.columns), head.astype(object).values.tolist())
    return _section("removal", body)
