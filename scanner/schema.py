"""Every user-facing table's columns, their Arrow types and their order, in one place.

A table is written through `to_arrow(df, schema)`, so a column has the same type in every file of a
table whatever its values: a shard whose rows all have a null `error` still writes `error: string`.
Without that, pandas wrote such a column as Arrow `null` and `pd.read_parquet("out/scores")` (the
README's own example) failed with "Unsupported cast from string to null".

    scores/SHARD.parquet     scores_schema(p_columns)
    duplicates.parquet       DUPLICATES
    replications.parquet     REPLICATIONS
    removal_list.parquet     REMOVAL
    errors.parquet           ERRORS
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

STR, F32, I64, BOOL = pa.string(), pa.float32(), pa.int64(), pa.bool_()

P_LAPLACE_PREFIX = "p_laplace_"
# text columns of the batches that flow between stages
# (url, download_sha256: img2dataset's KEY.json, null on every row of a shard not written by img2dataset)
TEXT_COLUMNS = ("key", "shard", "caption", "error", "error_stage", "sha256", "embed_error", "split", "url",
                "download_sha256")
BINARY_COLUMNS = ("preview", "png")
INFO_PREFIX = "stage_info_"  # a stage's JSON record on a batch's first row (scanner.stages.base)


def p_column(p: float) -> str:
    """Column name of Delta_p: 1 -> "p_laplace_1", 1.5 -> "p_laplace_1_5", 0.25 -> "p_laplace_0_25"."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0 or not math.isfinite(p):
        raise ValueError(f"p must be a finite number > 0, got {p!r}")
    p = float(p)
    return P_LAPLACE_PREFIX + format(p, "g").replace(".", "_").replace("-", "m").replace("+", "")


def p_of_column(name: str) -> float:
    """The inverse of p_column: "p_laplace_1_5" -> 1.5. Raises ValueError for any other name."""
    if not name.startswith(P_LAPLACE_PREFIX):
        raise ValueError(f"{name!r} is not a p-Laplace column ({P_LAPLACE_PREFIX}<p>)")
    return float(name.removeprefix(P_LAPLACE_PREFIX).replace("_", ".").replace("m", "-"))


# scores/: interface columns first, the configured p-Laplace columns, then the rest (docs/outputs.md)
SCORES_FIRST = [("key", STR), ("shard", STR), ("caption", STR), ("width", I64), ("height", I64),
                ("lid_flipd", F32), ("lid_nb", F32), ("lid_lpca", F32), ("lid_gap", F32),
                ("lid_gap_rel", F32)]
# img2dataset's KEY.json, carried from the read stage (null / -1 without one): the url a data team's list holds
SOURCE = [("url", STR), ("original_width", I64), ("original_height", I64), ("download_sha256", STR)]
SCORES_LAST = [("score_norm", F32), ("score_norm_cal", F32), ("loss_cal", F32), ("cfg_norm", F32), ("mem_class", STR),
               ("verdict", STR), ("error", STR), *SOURCE]
# columns of scores/ that are not scores (everything else numeric is a score column)
SCORES_META = frozenset({"key", "shard", "caption", "width", "height", "mem_class", "verdict", "error",
                         *(c for c, _ in SOURCE)})

# duplicates.parquet (docs/outputs.md), one row per member of a duplicate group:
#   key; group_id; similarity: cosine of the member's embedding to the kept member's; keep: the one member kept;
#   link: what joined the member: bytes (identical file bytes), phash (perceptual hash within phash_max_dist bits),
#     embedding (cosine >= dup_threshold), verified (a candidate below it whose thumbnails fit under an affine map:
#     scanner/neighbours/verify.py), aligned (the same by the older shift check, neighbours.verifier: shift);
#   score: the strength of that link: 1 for bytes, 1 - Hamming bits / 64 for phash, the cosine for embedding and
#     aligned, the verifier's share of variance explained for verified; null on the kept member;
#   precision: the pair precision measured at that link kind and score on held-out demo seeds
#     (scanner/neighbours/shipped/calibration.json, benchmarks/bench_copydet.py); 1 for bytes; null where no
#     calibration applies (another embedder or other settings than the calibrated ones) and on the kept member;
#   url: img2dataset's url of the member.
DUPLICATES = pa.schema([("key", STR), ("group_id", I64), ("similarity", F32), ("keep", BOOL), ("link", STR),
                        ("score", F32), ("precision", F32), ("url", STR), ("role", STR), ("scan", STR)])
REPLICATIONS = pa.schema([("gen_id", I64), ("caption", STR), ("seed", I64), ("matched_key", STR),
                          ("similarity", F32), ("replicated", BOOL)])
REMOVAL = pa.schema([("key", STR), ("shard", STR), ("url", STR), ("reason", STR), ("matched_key", STR),
                     ("matched_url", STR)])
ERRORS = pa.schema([("key", STR), ("shard", STR), ("stage", STR), ("error", STR)])


def scores_schema(p_columns: list[str]) -> pa.Schema:
    """scores/ with these p-Laplace columns, ordered by p."""
    ps = sorted(p_columns, key=lambda c: (p_of_column(c), c))
    return pa.schema(SCORES_FIRST + [(c, F32) for c in ps] + SCORES_LAST)


def to_arrow(df, schema: pa.Schema) -> pa.Table:
    """The DataFrame's `schema` columns, in order, cast to their types (missing values become nulls).

    Raises ValueError naming a column the frame lacks: a table is never written with a column missing.
    """
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; it must have {schema.names}")
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def typed_block(batch: dict):
    """A stage's numpy batch -> the pyarrow Table it hands to Ray Data, text columns typed `string`.

    Ray Data stores batches between stages as Arrow. Left to infer, a text column that is None on every
    row of a batch (a shard with no error, no caption) became Arrow `null`, came back as float NaN, and a
    block of it could not be merged with one that had a string error. Typed here, where each stage
    produces its batch, None stays None downstream and nothing repairs it. Images and vectors become Ray's
    tensor columns.
    """
    from ray.data.extensions import ArrowTensorArray

    cols = {}
    for k, v in batch.items():
        if k in TEXT_COLUMNS or k.startswith(INFO_PREFIX):
            cols[k] = pa.array([None if x is None else str(x) for x in v], type=STR)
        elif k in BINARY_COLUMNS:
            cols[k] = pa.array([None if x is None else bytes(x) for x in v], type=pa.binary())
        elif isinstance(v, np.ndarray) and v.ndim > 1:
            cols[k] = ArrowTensorArray.from_numpy(v)
        else:
            cols[k] = pa.array(v)
    return pa.table(cols)


# ---- what every output holds, for docs/outputs.md (scanner.columns.outputs_markdown, `python -m scanner.columns > docs/outputs.md`)

META_COLUMNS = {
    "key": "the sample's key (img2dataset's: 5-digit shard index + 4-digit index in the shard)",
    "shard": "the shard's name (its file name without .tar)",
    "caption": "the sample's KEY.txt (null without one)",
    "width": "the image's width in pixels, as decoded (-1 when it could not be read)",
    "height": "the image's height in pixels, as decoded (-1 when it could not be read)",
    "mem_class": "`dd` (data-driven memorization: LID_* low, or in a group of byte copies), `od` (overfitting-driven: "
                 "the model's LID far below what images of the same LID_* get), `none`; null on an error row",
    "verdict": "`confirmed` (flagged and a neighbour confirms: a duplicate group or a replication), `suspected` "
               "(flagged only), `duplicate` (a group member not kept, not flagged), `clear`; null on an error row",
    "error": "why this row has no scores (unreadable, undecodable, a repeated key, scoring failed); null when fine",
    "url": "img2dataset's KEY.json url (null without one)",
    "original_width": "img2dataset's KEY.json original_width (-1 without one)",
    "original_height": "img2dataset's KEY.json original_height (-1 without one)",
    "download_sha256": "img2dataset's KEY.json sha256 of the downloaded bytes (null without one)",
}
TABLE_COLUMNS = {
    "duplicates.parquet": {
        "key": "a member of a duplicate group",
        "group_id": "the group: the row id of its kept image (every member of a group has the same)",
        "similarity": "cosine of the member's embedding to the kept image's (1 for the kept one)",
        "keep": "true for the one member kept (largest image, then the one linked to the most, then lowest key)",
        "link": "what joined it: `bytes` (identical file), `phash` (perceptual hash within "
                "neighbours.phash_max_dist bits), `embedding` (cosine >= neighbours.dup_threshold), `verified` (a "
                "near-miss whose 32 px thumbnails fit under an affine map: a flipped, cropped, rotated, framed or "
                "captioned copy; neighbours.verifier affine), `aligned` (the same by the shift check, verifier shift)",
        "score": "the strength of that link: 1 for bytes, 1 - Hamming bits / 64 for phash, the cosine for embedding "
                 "and aligned, the verifier's share of variance explained for verified; null on the kept member",
        "precision": "the pair precision measured at that link kind and score on held-out demo seeds "
                     "(scanner/neighbours/shipped/calibration.json); 1 for bytes; null where no calibration applies "
                     "(another embedder or settings) and on the kept member",
        "url": "img2dataset's url of the member (null without one)",
        "role": "`new` (a sample of this scan), `old` (of a finished scan it was made --against: a group that links "
                "new images to old ones lists both) or `reference` (of a --reference set)",
        "scan": "the --out holding an old or reference member's part file (null for this scan's own samples)"},
    "replications.parquet": {
        "gen_id": "the generation's number (0..neighbours.generations - 1)",
        "caption": "the prompt it was generated from (a training caption; null for an unconditional model)",
        "seed": "its seed (geometry seed + gen_id): the generation can be remade alone",
        "matched_key": "the nearest training image by the copy-detection embedding",
        "similarity": "cosine of the generation to it",
        "replicated": "similarity >= neighbours.rep_threshold"},
    "removal_list.parquet": {
        "key": "a sample to remove (removal_list.txt: the same keys, one a line)",
        "shard": "its shard",
        "url": "img2dataset's url (null without one): what a url list is filtered by",
        "reason": "the first that applies: `duplicate` (a group member not kept), `dd_mem` (DD-Mem outside any "
                  "group), `od_mem`, `replicated` (a generation reproduces it); `reference` (in a duplicate group "
                  "with an image of a --reference set: an evaluation set's, an opt-out list's) comes first",
        "matched_key": "reason reference: the reference image it copies; reason duplicate: the kept image of its "
                       "group (null otherwise)",
        "matched_url": "reason reference: the reference image's img2dataset url (null without one, and for other "
                       "reasons)"},
    "errors.parquet": {
        "key": "the failed sample (null for a shard-level error: a missing, truncated or corrupt shard)",
        "shard": "its shard",
        "stage": "where it failed: read, decode, embed, score",
        "error": "why, in one sentence"},
}
FILES = [
    ("scores/SHARD.parquet", "sample (one file per input shard)", "scores_schema"),
    ("duplicates.parquet", "member of a duplicate group", "DUPLICATES"),
    ("replications.parquet", "generation matched to a training image", "REPLICATIONS"),
    ("removal_list.parquet, removal_list.txt", "sample to remove", "REMOVAL"),
    ("errors.parquet", "failed sample or shard", "ERRORS"),
]
OTHER_FILES = [
    ("summary.json", ("counts (seen, scored, embedded, errors, duplicates, removed by reason, classes, verdicts), the "
                      "thresholds and the rule that applied, the corpus steps' timings, the stages' devices and nodes, "
                      "the shards listed and missing, img2dataset's download counts (`downloads`: seen + failed = urls), "
                      "the config, versions and machine")),
    ("metrics.json", ("after `memscan evaluate`: per score column AUROC with intervals and TPR at 1 % / 0.1 % FPR; "
                      "duplicate pair and removal precision / recall per planted kind and edit")),
    ("report.html", ("one self-contained page: histograms, the LID scatter, at-risk samples, duplicate groups, "
                     "replications, thresholds explained")),
    ("parts/, vectors/, embeddings/, thumbs/, previews/, heldout/, generations/, corpus/",
     ("what the stages and the corpus steps keep for a rerun (resume) and for report.html: internal, their layout "
      "may change")),
]
