"""Steps `tables` and `outputs`: the user-facing tables.

- `tables` (a task per shard): the shard's rows with LID_* (counted from its spectra at the cut's corpus level),
  lid_gap, lid_gap_rel, mem_class and verdict -> scores/NAME.parquet; its error rows and its removal rows (with
  their reason) -> corpus/tables/{errors,removal}/NAME.parquet; its counts.
- `outputs`: errors.parquet, removal_list.{parquet,txt} (every `duplicate` first, then dd_mem, od_mem, replicated;
  shard order within a reason), duplicates.parquet (shard order; group_id names the group: its kept image's row
  id), replications.parquet: streamed from the per-shard files, a row group at a time.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from scanner.corpus.classify import REMOVAL_ORDER, classify, lpca_count, removal_reasons, verdicts
from scanner.corpus.store import NEW, OLD, REFERENCE
from scanner.schema import DUPLICATES, ERRORS, P_LAPLACE_PREFIX, REMOVAL, REPLICATIONS, SOURCE, scores_schema

SCORE_COLUMNS = ("lid_flipd", "lid_nb", "score_norm", "score_norm_cal", "loss_cal", "cfg_norm")


def _tables_map(store, cfg, thresholds: dict, replicated: frozenset, p_cols: tuple, i: int) -> dict:
    from scanner.corpus.rows import masks, read_shard_file, repeated

    name = store.names[i]
    df = store.read(i)
    for c in ("error", "error_stage", "embed_error", "caption", "sha256"):
        if c not in df:
            df[c] = None
    for c, typ in SOURCE:
        if c not in df:
            df[c] = -1 if str(typ) == "int64" else None
    m = masks(store, i, df)
    has_key = m["has_key"]
    bad = df.loc[~has_key, ["key", "shard", "error"]].assign(stage="read")
    gids = store.offsets[i] + np.flatnonzero(has_key)
    df = df[has_key].reset_index(drop=True)
    rep_gids, rep_err = repeated(store)
    from scanner.corpus.rows import member

    for j in np.flatnonzero(member(rep_gids, gids)):
        if pd.isna(df.at[j, "error"]):
            df.at[j, "error_stage"], df.at[j, "error"] = "read", rep_err[int(gids[j])]
    counts = {"read": int(df["error_stage"].isin(["read", "decode"]).sum()), "embed": int(df["embed_error"].notna().sum()),
              "score": int((df["error_stage"] == "score").sum()), "shard_errors": len(bad)}
    lid = np.full(len(df), np.nan, np.float32)
    r = read_shard_file(store, "lid", i)
    if r is not None and len(r):
        lid[np.searchsorted(gids, r["gid"].to_numpy())] = lpca_count(np.stack(r["spec"].to_numpy()), thresholds, cfg)
    df["lid_lpca"] = lid
    df["lid_gap"] = df["lid_lpca"] - df["lid_flipd"] if "lid_flipd" in df else np.nan
    grp = read_shard_file(store, "groups", i)
    in_group = dropped = copies = reference = np.zeros(len(df), bool)
    matched_key, matched_url = np.full(len(df), None, object), np.full(len(df), None, object)
    if grp is not None and len(grp):
        pos = np.searchsorted(gids, grp["gid"].to_numpy())
        in_group, dropped, copies, reference = (np.zeros(len(df), bool) for _ in range(4))
        in_group[pos] = True
        drop = ~grp["keep"].to_numpy(bool)
        dropped[pos[drop]] = True
        copies[pos[grp["copy_group"].to_numpy(bool)]] = True
        ref = drop & (grp["kept_role"].to_numpy() == REFERENCE)
        reference[pos[ref]] = True
        matched_key[pos[drop]] = grp["kept_key"].to_numpy(dtype=object)[drop]
        if ref.any():  # a reference image's url, read from its part file (the few matched)
            kept = grp["group_id"].to_numpy(np.int64)[ref]  # a group is named by its kept row
            u = np.unique(kept)
            urls = store.gather_columns(u, ["url"])["url"].to_numpy(dtype=object)
            matched_url[pos[ref]] = urls[np.searchsorted(u, kept)]
    classify(df, cfg, thresholds, copies=copies)
    rep = df["key"].isin(replicated).to_numpy()
    verdicts(df, in_group, dropped, rep)
    for col in SCORE_COLUMNS:
        if col not in df:
            df[col] = np.nan
    store.out.write_parquet(f"scores/{name}.parquet", df, scores_schema(list(p_cols)))
    emb = df.loc[df["embed_error"].notna() & df["error"].isna(), ["key", "shard", "embed_error"]]
    errors = pd.concat([
        df.loc[df["error"].notna(), ["key", "shard", "error_stage", "error"]].rename(columns={"error_stage": "stage"}),
        bad, emb.rename(columns={"embed_error": "error"}).assign(stage="embed")], ignore_index=True)
    if len(errors):
        store.out.write_parquet(f"corpus/tables/errors/{name}.parquet", errors, ERRORS)
    reason = removal_reasons(df, in_group, dropped, rep, reference)
    grouped = reason.isin(["reference", "duplicate"]).to_numpy()
    rem = pd.DataFrame({"key": df["key"], "shard": df["shard"], "url": df["url"], "reason": reason,
                        "matched_key": np.where(grouped, matched_key, None),
                        "matched_url": np.where(grouped, matched_url, None)}
                       )[reason.notna().to_numpy()].sort_values("key")
    if len(rem):
        store.out.write_parquet(f"corpus/tables/removal/{name}.parquet", rem, REMOVAL)
    mc, vd, rr = df["mem_class"].value_counts(), df["verdict"].value_counts(), rem["reason"].value_counts()
    return {"shard": np.array([i], np.int64), "seen": np.array([len(df)], np.int64),
            "embedded": np.array([int(m["searched"].sum())], np.int64),
            "scored": np.array([int(df["error"].isna().sum())], np.int64),
            "errors": np.array([len(errors)], np.int64),
            **{f"stage_{k}": np.array([v], np.int64) for k, v in counts.items()},
            **{f"mem_{k}": np.array([int(mc.get(k, 0))], np.int64) for k in ("none", "dd", "od")},
            **{f"verdict_{k}": np.array([int(vd.get(k, 0))], np.int64)
               for k in ("confirmed", "suspected", "duplicate", "clear")},
            **{f"removed_{k}": np.array([int(rr.get(k, 0))], np.int64) for k in REMOVAL_ORDER}}


def _old_removal_map(store, i: int) -> dict:
    """--against with incremental.remove_old: an old scan's shard's rows that this scan's groups drop (a new image
    kept over them, or a reference image matched): removal rows only (the old scan's tables are its own)."""
    from scanner.corpus.rows import read_shard_file

    grp = read_shard_file(store, "groups", i)
    n = 0
    if grp is not None and len(grp):
        drop = ~grp["keep"].to_numpy(bool) & (grp["kept_role"].to_numpy() != OLD)
        g = grp[drop]
        if len(g):
            df = store.read(i, ["key", "shard", "url"])
            rows = g["gid"].to_numpy() - store.offsets[i]
            ref = g["kept_role"].to_numpy() == REFERENCE
            rem = pd.DataFrame({"key": df["key"].to_numpy(dtype=object)[rows],
                                "shard": df["shard"].to_numpy(dtype=object)[rows],
                                "url": df["url"].to_numpy(dtype=object)[rows],
                                "reason": np.where(ref, "reference", "duplicate"),
                                "matched_key": g["kept_key"].to_numpy(dtype=object),
                                "matched_url": None}).sort_values("key")
            store.out.write_parquet(f"corpus/tables/removal/{store.names[i]}.parquet", rem, REMOVAL)
            n = len(rem)
    return {"shard": np.array([i], np.int64), "removed_old": np.array([n], np.int64)}


def run_tables(ctx) -> dict:
    from scanner.corpus.executor import concat

    store, ex, cfg = ctx.store, ctx.executor, ctx.cfg
    thresholds = ctx.out.read_json("corpus/cut/thresholds.json") if ctx.out.exists("corpus/cut/thresholds.json") \
        else {"detector": cfg.classify.detector, "note": "no model scores", "threshold": None}
    replicated: frozenset = frozenset()
    if ctx.has("replications"):
        reps = ctx.out.read_parquet("corpus/replications/replications.parquet")
        replicated = frozenset(reps.loc[reps["replicated"], "matched_key"].dropna())
    p_cols = tuple(sorted(c for c in store.columns if c.startswith(P_LAPLACE_PREFIX)))
    ctx.out.remove("corpus/tables", recursive=True)
    # the tables of this scan's shards only: an --against scan's rows have their tables there, a reference set's none
    c = concat(ex.batches(ex.from_items(functools.partial(_tables_map, store, cfg, thresholds, replicated, p_cols),
                                        store.shards_of(NEW))))
    tot = {k: int(np.sum(v)) for k, v in c.items() if k != "shard"} if c else {}
    removed_old = 0
    if cfg.incremental.remove_old and store.shards_of(OLD):
        o = concat(ex.batches(ex.from_items(functools.partial(_old_removal_map, store), store.shards_of(OLD))))
        removed_old = int(np.sum(o["removed_old"])) if o else 0
    return {"counts": {
        "seen": tot.get("seen", 0), "embedded": tot.get("embedded", 0), "scored": tot.get("scored", 0) if cfg.model.kind != "none" else 0,
        "errors": tot.get("errors", 0), "shard_errors": tot.get("stage_shard_errors", 0),
        "removed_by_reason": {k: tot[f"removed_{k}"] for k in REMOVAL_ORDER if tot.get(f"removed_{k}")},
        "mem_class": {k: tot[f"mem_{k}"] for k in ("none", "dd", "od") if tot.get(f"mem_{k}")},
        "verdict": {k: tot[f"verdict_{k}"] for k in ("confirmed", "suspected", "duplicate", "clear")
                    if tot.get(f"verdict_{k}")}},
        "stage_errors": {k: tot.get(f"stage_{k}", 0) for k in ("read", "embed", "score")},
        "removed_old": removed_old,
        "thresholds": thresholds}


class TableWriter:
    """A parquet table streamed row group by row group into `out` (a scanner.storage.Out: a local NAME.tmp renamed
    at close, or an object that appears whole at close)."""

    def __init__(self, out, rel: str, schema):
        import pyarrow.parquet as pq

        self.out, self.rel, self.schema, self.rows = out, rel, schema, 0
        self.upload = out.writer(rel)
        self.w = pq.ParquetWriter(self.upload.f, schema)

    def write_table(self, t) -> None:
        if t.num_rows:
            self.w.write_table(t.select(self.schema.names).cast(self.schema))
            self.rows += t.num_rows

    def close(self) -> None:
        self.w.close()
        self.upload.commit()


def _stream(out, folder: str, names: list[str], writer: TableWriter, on_table=None) -> None:
    have = set(out.names(folder, ".parquet"))
    for n in names:
        if f"{n}.parquet" in have:
            t = out.parquet_file(f"{folder}/{n}.parquet").read()
            writer.write_table(t)
            if on_table is not None:
                on_table(t)


def run_outputs(ctx) -> dict:
    """The `outputs` step: every top-level table, streamed from the per-shard files."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out, names = ctx.out, ctx.store.names
    errors = TableWriter(out, "errors.parquet", ERRORS)
    _stream(out, "corpus/tables/errors", names, errors)
    errors.close()
    removal = TableWriter(out, "removal_list.parquet", REMOVAL)
    txt = out.writer("removal_list.txt")
    have = set(out.names("corpus/tables/removal", ".parquet"))
    for reason in REMOVAL_ORDER:
        for n in names:
            if f"{n}.parquet" in have:
                t = out.parquet_file(f"corpus/tables/removal/{n}.parquet").read()
                t = t.filter(pc.equal(t.column("reason"), reason))
                removal.write_table(t)
                txt.f.write("".join(f"{k}\n" for k in t.column("key").to_pylist()).encode("utf-8"))
    removal.close()
    txt.commit()
    info = {"errors": errors.rows, "removed": removal.rows}
    if ctx.has("groups"):
        from scanner.corpus.rows import read_shard_file

        store = ctx.store
        dups = TableWriter(out, "duplicates.parquet", DUPLICATES)
        with_new = None  # --against / --reference: the groups that hold a sample of this scan, with all members
        if store.incremental:
            with_new = np.unique(np.concatenate([np.zeros(0, np.int64)] + [
                g["group_id"].to_numpy(np.int64) for i in store.shards_of(NEW)
                if (g := read_shard_file(store, "groups", i, ["group_id"])) is not None]))
        role_names = {NEW: "new", OLD: "old", REFERENCE: "reference"}
        for i, n in enumerate(names):
            g = read_shard_file(store, "groups", i)
            if g is None or not len(g):
                continue
            if with_new is not None:
                g = g[np.isin(g["group_id"].to_numpy(np.int64), with_new)]
                if not len(g):
                    continue
            url = store.read(i, ["url"])["url"].to_numpy(dtype=object)[g["gid"].to_numpy() - store.offsets[i]]
            # scan: where an old or reference member's part file is (null for this scan's own)
            g = g.assign(url=url, role=role_names[int(store.roles[i])],
                         scan=None if store.roles[i] == NEW else store.source[i])
            dups.write_table(pa.Table.from_pandas(g[DUPLICATES.names], schema=DUPLICATES, preserve_index=False))
        dups.close()
        info["duplicate_rows"] = dups.rows
    if ctx.has("replications"):
        out.write_parquet("replications.parquet", out.read_parquet("corpus/replications/replications.parquet"),
                          REPLICATIONS)
    return info
