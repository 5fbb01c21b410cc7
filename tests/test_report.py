"""The HTML report, on a synthetic finished scan over the tiny demo corpus (no model, no Ray)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scanner.report import load as report
from scanner.report import write_report

SCRIPT = "<script>alert(1)</script>"
HEADINGS = ["Run summary", "Detection metrics", "Score distributions", "Model manifold vs data manifold",
            "Most at-risk samples", "Duplicate groups", "Replications", "Thresholds explained", "Removal list"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_scan(corpus_dir, out, seed: int = 0) -> dict:
    """Write the outputs a finished scan leaves (scores/, duplicates, replications, removal list, errors,
    summary.json, metrics.json) for the demo corpus under corpus_dir; repeated and oversampled images get
    memorized-looking scores. Returns facts the tests check against."""
    rng = np.random.default_rng(seed)
    truth = pd.read_parquet(corpus_dir / "truth.parquet")
    rows = truth[truth["readable"]].reset_index(drop=True)
    n = len(rows)
    planted = rows["planted"].to_numpy()
    mem = np.isin(planted, ["repeated", "oversampled"])
    bad = planted == "corrupt"
    df = pd.DataFrame({
        "key": rows["key"], "shard": rows["shard"], "caption": [f"a caption for {k}" for k in rows["key"]],
        "width": 16, "height": 16,
        "lid_flipd": np.where(mem, rng.normal(20, 3, n), rng.normal(40, 5, n)),
        "lid_nb": np.nan,
        "lid_lpca": np.where(planted == "repeated", rng.uniform(0.5, 1.5, n), rng.normal(10, 2, n)),
        "p_laplace_1": rng.normal(0, 1, n) - 3 * mem, "p_laplace_2": rng.normal(0, 1, n) - 5 * mem,
        "score_norm": np.where(mem, rng.uniform(0.1, 0.4, n), rng.uniform(0.5, 1.5, n)),
        "cfg_norm": np.nan,
        "error": np.where(bad, "cannot decode image: UnidentifiedImageError", None),
    })
    df.loc[bad, ["lid_flipd", "lid_lpca", "p_laplace_1", "p_laplace_2", "score_norm"]] = np.nan
    df["lid_gap"] = df["lid_lpca"] - df["lid_flipd"]
    ok = df["error"].isna()
    thr = float(np.nanquantile(df.loc[ok, "score_norm"], 0.1))
    flagged = ok & (df["score_norm"] <= thr)
    df["mem_class"] = np.select([~ok, flagged & (df["lid_lpca"] < 2.0), flagged], [None, "dd", "od"], "none")
    lowest = df.loc[ok].sort_values("score_norm")["key"].iloc[0]
    df.loc[df["key"] == lowest, "caption"] = SCRIPT

    grouped = rows[rows["group_id"].notna()]
    dups = grouped[["key", "group_id", "planted"]].copy()
    dups["group_id"] = dups["group_id"].astype("int64")
    dups["keep"] = dups["key"] == dups.groupby("group_id")["key"].transform("min")
    dups["similarity"] = np.where(dups["keep"] | (dups["planted"] == "exact_dup"), 1.0,
                                  rng.uniform(0.93, 0.99, len(dups)))
    dups["link"] = np.where(dups["planted"] == "exact_dup", "sha256", "cosine")
    dups = dups[["key", "group_id", "similarity", "keep", "link"]].reset_index(drop=True)

    rep_keys = list(rows.loc[planted == "repeated", "key"][:3]) + [rows.loc[planted == "unique", "key"].iloc[0]]
    reps = pd.DataFrame({"gen_id": np.arange(4, dtype="int64"), "caption": ["a handwritten digit 3"] * 4,
                         "seed": np.arange(4, dtype="int64"), "matched_key": rep_keys,
                         "similarity": [0.99, 0.97, 0.95, 0.41], "replicated": [True, True, True, False]})
    in_group = df["key"].isin(set(dups["key"]))
    replicated = set(reps.loc[reps["replicated"], "matched_key"])
    df["verdict"] = np.select([~ok, flagged & (in_group | df["key"].isin(replicated)), flagged,
                               df["key"].isin(set(dups.loc[~dups["keep"], "key"]))],
                              [None, "confirmed", "suspected", "duplicate"], "clear")
    cols = ["key", "shard", "caption", "width", "height", "lid_flipd", "lid_nb", "lid_lpca", "lid_gap",
            "p_laplace_1", "p_laplace_2", "score_norm", "cfg_norm", "mem_class", "verdict", "error"]
    (out / "scores").mkdir(parents=True)
    for name, part in df[cols].groupby("shard"):
        part.reset_index(drop=True).to_parquet(out / "scores" / f"{name}.parquet", index=False)
    write_previews(corpus_dir, out)
    dups.to_parquet(out / "duplicates.parquet", index=False)
    reps.to_parquet(out / "replications.parquet", index=False)
    gen_dir = out / "replications"
    gen_dir.mkdir()
    gen_png = _png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (gen_dir / "gen_0.png").write_bytes(gen_png)  # generations 1-3 not stored: both layouts in one run

    removal = [(k, "duplicate") for k in dups.loc[~dups["keep"], "key"]]
    removal += [(k, "dd_mem") for k in df.loc[(df["mem_class"] == "dd") & ~in_group, "key"]]
    removal += [(k, "od_mem") for k in df.loc[df["mem_class"] == "od", "key"]]
    removal += [(k, "replicated") for k in sorted(replicated)]
    rem = pd.DataFrame(removal, columns=["key", "reason"]).drop_duplicates("key")
    rem.insert(1, "shard", rem["key"].map(dict(zip(df["key"], df["shard"]))))
    rem.to_parquet(out / "removal_list.parquet", index=False)
    (out / "removal_list.txt").write_text("".join(f"{k}\n" for k in rem["key"]))
    errors = df.loc[~ok, ["key", "shard", "error"]].assign(stage="decode")
    errors = pd.concat([errors, pd.DataFrame([{"key": None, "shard": rows["shard"].max(), "stage": "read",
                                               "error": "truncated or corrupt shard: ReadError"}])])
    errors[["key", "shard", "stage", "error"]].to_parquet(out / "errors.parquet", index=False)

    rule = (f"flagged when score_norm is <= {thr:.4g}; flagged and lid_lpca < 2.0 -> dd (data-driven: "
            "deduplicate); flagged otherwise -> od (overfitting-driven: regularize)")
    summary = {
        "counts": {"seen": n, "scored": int(ok.sum()), "errors": len(errors), "shard_errors": 1,
                   "duplicates": int((~dups["keep"]).sum()), "removed": len(rem),
                   "removed_by_reason": rem["reason"].value_counts().to_dict(),
                   "mem_class": df["mem_class"].value_counts().to_dict(),
                   "verdict": df["verdict"].value_counts().to_dict()},
        "thresholds": {"detector": "score_norm", "direction": "low", "threshold": thr, "quantile": 0.1,
                       "lpca_low": 2.0, "gap_margin": 0.0, "rule": rule},
        "neighbours": {"thresholds": {"dup_threshold": 0.93, "phash_max_dist": 2,
                                      "keep_rule": "keep the largest image, ties broken by the lowest key"},
                       "replications": {"generations": 4, "threshold": 0.93, "replicated": 3}},
        "timings_s": {"scoring": 1.0, "finalize": 0.5, "total": 1.5},
        "config": {"data": {"shards": [str(corpus_dir / "shards")]}, "model": {"kind": "pixel", "path": "/m"},
                   "classify": {"detector": "score_norm", "detector_direction": "low"},
                   "neighbours": {"dup_threshold": 0.93, "rep_threshold": 0.93}},
        "versions": {"memscan": "0.1.0"},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    col = {"auroc": 0.97, "tpr_at_1pct_fpr": 0.8, "direction": "low", "n_pos": 40, "n_neg": 60}
    metrics = {"scores": {"repeated_vs_unique": {"score_norm": col, "lid_flipd": {**col, "auroc": 0.912345}},
                          "oversampled_vs_unique": {"score_norm": {**col, "auroc": 0.75}}},
               "duplicates": {"pair_precision": 0.987654, "pair_recall": 0.999},
               "mem_class_by_planted": {"none": {"unique": 55, "repeated": 2}, "dd": {"repeated": 38}}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return {"threshold": thr, "lowest": lowest, "gen_png": gen_png, "df": df, "dups": dups, "removal": rem}


def write_previews(corpus_dir, out, size: int = 64) -> None:
    """previews/SHARD.parquet as the scan's sink writes them: the read stage's preview of every readable image."""
    from scanner.data.decode import DecodeError, open_image
    from scanner.data.shards import iter_tar_samples
    from scanner.stages.read import preview_bytes

    for shard in sorted((corpus_dir / "shards").glob("*.tar")):
        keys, previews = [], []
        for s in iter_tar_samples(str(shard)):
            if s["image"]:
                try:
                    previews.append(preview_bytes(open_image(s["image"])[0], size))
                except DecodeError:
                    continue
                keys.append(s["key"])
        (out / "previews").mkdir(exist_ok=True)
        pd.DataFrame({"key": keys, "preview": previews}).to_parquet(out / "previews" / f"{shard.stem}.parquet")


@pytest.fixture(scope="module")
def scan(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    facts = make_scan(tiny_corpus.out_dir, out)
    path = write_report(out, tiny_corpus.truth)
    return out, path.read_text(), facts


def n_images(text: str) -> int:
    return text.count("data:image/png;base64,")


def test_full_report_has_every_section_and_inline_images(scan):
    out, text, _ = scan
    assert (out / "report.html").is_file() and not (out / "report.html.tmp").exists()
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in text, h
    assert "Not available" not in text and "failed to render" not in text
    assert "split by planted class" in text
    # 2 plots + 24 at-risk thumbnails + duplicate-group strips + replication pairs.
    assert n_images(text) >= 2 + 24 + 20
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()


def test_numbers_and_rules_are_stated(scan):
    _, text, facts = scan
    assert f"{facts['threshold']:.4g}" in text  # the detector threshold this run used
    assert "every member of a duplicate group except the kept one" in text
    assert "DD-Mem samples not already in a duplicate group" in text
    assert "0.9877" in text and "0.9123" in text  # metrics.json: pair precision, an AUROC
    for reason, n in facts["removal"]["reason"].value_counts().items():
        assert re.search(rf"reason-{reason}\">{reason}</span></td><td>[^<]*</td><td>{n}</td>", text), reason


def test_captions_are_escaped(scan):
    _, text, _ = scan
    assert SCRIPT not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_at_risk_ranks_the_flagging_tail_first(scan):
    _, text, facts = scan
    m = re.search(r'<div class="rank">#1 <code>([^<]+)</code>', text)
    assert m and m.group(1) == facts["lowest"]


def test_stored_generation_shown_and_missing_ones_said(scan):
    _, text, facts = scan
    assert base64.b64encode(facts["gen_png"]).decode() in text
    assert "not stored" in text


def test_thumbnails_are_the_previews_the_scan_stored(scan, tiny_corpus, monkeypatch):
    """The report shows the previews the scan's read stage made from its one decode (previews/), bounded by
    MAX_THUMBS in priority order; it opens no shard (tests/test_imports.py checks it imports no shard reader)."""
    from scanner.data.decode import open_image
    from scanner.data.shards import iter_tar_samples
    from scanner.stages.read import preview_bytes

    out, _, facts = scan
    run = report.load_run(out)
    keys = list(facts["dups"]["key"][:6])
    monkeypatch.setattr(report, "MAX_THUMBS", 4)
    report.load_previews(run, keys)
    assert set(run.thumbs) == set(keys[:4])  # the bound holds, in priority order
    shard_of = dict(zip(facts["df"]["key"], facts["df"]["shard"]))
    shard = next(p for p in tiny_corpus.shards if p.stem == shard_of[keys[0]])
    sample = next(s for s in iter_tar_samples(str(shard)) if s["key"] == keys[0])
    want = preview_bytes(open_image(sample["image"])[0], 64)
    assert base64.b64decode(run.thumbs[keys[0]].split(",", 1)[1]) == want
    assert run.thumbs[keys[0]].startswith("data:image/png;base64,")  # 16 px demo images: a lossless PNG


def test_missing_inputs_render_with_a_note(scan, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan[0], out)
    for name in ("duplicates.parquet", "replications.parquet", "metrics.json"):
        (out / name).unlink()
    text = write_report(out).read_text()
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in text, h
    for name in ("duplicates.parquet", "replications.parquet", "metrics.json"):
        assert f"Not available: {name} not found" in text, name
    assert "failed to render" not in text
    assert n_images(text) >= 2 + 24  # plots and at-risk thumbnails still there
    assert "split by mem_class" in text and "split by planted class" not in text  # no truth file given


def test_dedup_run_shows_its_groups_from_previews(scan, tmp_path):
    """A `memscan dedup` folder (scores/ without score values, no metrics): the duplicate groups still show their
    images, from the previews the dedup scan stored."""
    out = tmp_path / "dedup"
    out.mkdir()
    for name in ("duplicates.parquet", "removal_list.parquet"):
        shutil.copy(scan[0] / name, out)
    shutil.copytree(scan[0] / "previews", out / "previews")
    (out / "scores").mkdir()
    for f in (scan[0] / "scores").glob("*.parquet"):
        pd.read_parquet(f, columns=["key", "shard", "caption", "width", "height", "error"]).to_parquet(
            out / "scores" / f.name)
    (out / "summary.json").write_text(json.dumps({
        "counts": {"seen": 10, "embedded": 10, "duplicate_groups": 8, "duplicates": 30, "removed": 30},
        "thresholds": {"dup_threshold": 0.9321, "keep_rule": "keep the largest image"}}))
    text = write_report(out).read_text()
    assert "failed to render" not in text
    dup_section = text[text.index('<section id="duplicates"'):text.index('<section id="replications"')]
    assert n_images(dup_section) >= 12 and "no image" not in dup_section
    assert "0.9321" in text and "keep the largest image" in text


def test_empty_dir_and_bad_dir(tmp_path):
    text = write_report(tmp_path).read_text()
    assert "Not available: scores/*.parquet not found" in text and "failed to render" not in text
    with pytest.raises(FileNotFoundError, match="not a directory"):
        write_report(tmp_path / "nope")


def test_a_scan_without_previews_says_so(scan, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan[0], out)
    shutil.rmtree(out / "previews")
    text = write_report(out).read_text()
    assert "Images not shown" in text and "data.preview_size: 0" in text
    assert "no image" in text and "failed to render" not in text


def test_report_command(tmp_path, capsys):
    from scanner.cli import main

    assert main(["report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file() and str(tmp_path / "report.html") in capsys.readouterr().out
    assert main(["report", "--out", str(tmp_path / "missing")]) == 2


def test_at_risk_shows_each_duplicate_group_once(scan):
    """One card per risk: the copies of one repeated image are one card (with the copy count), not many."""
    _, text, facts = scan
    keys = re.findall(r'<div class="rank">#\d+ <code>([^<]+)</code>', text)
    group_of = dict(zip(facts["dups"]["key"], facts["dups"]["group_id"]))
    groups = [group_of[k] for k in keys if k in group_of]
    assert groups, "no at-risk card is a duplicate group: the fixture must flag one"
    assert len(groups) == len(set(groups)), groups
    assert "copies, one card" in text


def test_dose_response_plotted_when_metrics_have_it(scan, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan[0], out)
    m = json.loads((out / "metrics.json").read_text())
    assert "Dose-response" not in scan[1]  # no dose groups, no section
    m["dose_response"] = [{"copies": k, "planted": ["dose"], "images": 4 * k, "units": 4, "flagged": f,
                           "flagged_units_min_max": [max(0.0, f - 0.2), min(1.0, f + 0.2)], "dd": f, "od": 0.0}
                          for k, f in ((1, 0.01), (2, 0.1), (8, 0.6), (32, 0.95))]
    (out / "metrics.json").write_text(json.dumps(m))
    text = write_report(out).read_text()
    assert "<h3>Dose-response</h3>" in text and 'alt="dose-response"' in text and "failed to render" not in text
    assert n_images(text) == n_images(scan[1]) + 1


def test_a_calibrated_cut_is_explained_as_a_false_positive_rate(scan, tmp_path):
    """A run whose cut came from held-out images says so: the FPR, how many images, where, what it flags here."""
    import shutil

    out, _, facts = scan
    run = tmp_path / "run"
    shutil.copytree(out, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["thresholds"].update({"quantile": None, "calibration": {
        "fpr": 0.01, "images": 500, "errors": 0, "shards": ["/data/heldout/00000.tar"], "seconds": 9.5,
        "median": 0.9941, "flagged_share_of_corpus": 0.0397, "fpr_interval": [0.0033, 0.0232]}})
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    assert "flags 1 % of 500 held-out images the model never trained on" in text
    assert "/data/heldout/00000.tar" in text and "The cut flags 3.97 % of this corpus" in text
    assert "the rate it applies to non-members lies in 0.33–2.32 % (95 %" in text
    assert f"{facts['threshold']:.4g}" in text and "a fixed threshold from the config" not in text
    assert "ordinary members" not in text  # a run without the members' cut

    # the members' cut, stricter than the held-out one: the report says which applies and what it flags
    summary["thresholds"]["calibration"].update({"heldout_cut": 0.8084, "flagged_share_of_heldout": 0.0035, "members": {
        "cut": 0.7457, "median": 0.9325, "scale": 0.08029, "z": 2.326, "rows": 2697, "binding": True}})
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    assert "The held-out cut 0.8084 flags 1 % of 500 held-out images" in text
    assert "no more than 1 % of the corpus's ordinary members" in text and "0.9325 − 2.326 × 0.08029" in text
    assert "stricter than the held-out cut 0.8084, so it applies and flags 0.35 % of the held-out images" in text
