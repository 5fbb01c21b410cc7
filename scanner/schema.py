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
BINARY_COLUMNS = ("preview",)
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
SCORES_LAST = [("score_norm", F32), ("score_norm_cal", F32), ("loss_cal", F32), ("cfg_norm", F32), ("mem_class", STR),
               ("verdict", STR), ("error", STR)]
# columns of scores/ that are not scores (everything else numeric is a score column)
SCORES_META = frozenset({"key", "shard", "caption", "width", "height", "mem_class", "verdict", "error"})

DUPLICATES = pa.schema([("key", STR), ("group_id", I64), ("similarity", F32), ("keep", BOOL), ("link", STR)])
REPLICATIONS = pa.schema([("gen_id", I64), ("caption", STR), ("seed", I64), ("matched_key", STR),
                          ("similarity", F32), ("replicated", BOOL)])
REMOVAL = pa.schema([("key", STR), ("shard", STR), ("reason", STR)])
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
