"""The score columns of scores/*.parquet: one registry of name, unit, the tail that flags memorization, meaning.

The direction is fixed here, from the method (docs/method.md §2-§5, §9), never chosen on the data: classify flags
in it, evaluate reports AUROC in it (below 0.5 when a column flags the wrong tail on some data: a warning,
not a flipped number) and the report explains it.
"""

from __future__ import annotations

from dataclasses import dataclass

from scanner.schema import P_LAPLACE_PREFIX, p_of_column


@dataclass(frozen=True)
class ScoreColumn:
    name: str
    unit: str
    direction: str  # "low" or "high": the tail that flags memorization
    meaning: str


REGISTRY = {c.name: c for c in (
    ScoreColumn("lid_flipd", "dimensions", "low",
                "LID of the model manifold by FLIPD: a memorized image sits where the model's manifold collapses"),
    ScoreColumn("lid_nb", "dimensions", "low", "LID of the model manifold by the normal bundle (reference estimator)"),
    ScoreColumn("lid_lpca", "dimensions", "low",
                "LID of the data manifold by local PCA of the nearest neighbours: low where the data repeats"),
    ScoreColumn("lid_gap", "dimensions", "high",
                "lid_lpca - lid_flipd: the raw difference of two estimators with different scales"),
    ScoreColumn("lid_gap_rel", "typical-image units", "high",
                "(the corpus's median lid_flipd among images of the same lid_lpca - lid_flipd) / the median lid_flipd: "
                "how far the model's manifold drops below what it is at images whose data has the same dimension "
                "(OD-Mem when flagged and above classify.gap_margin)"),
    ScoreColumn("score_norm", "noise-prediction norm", "low",
                "||eps(x, t)|| near the clean image: small on a sharp peak of the density"),
    ScoreColumn("score_norm_cal", "ratio", "low",
                "score_norm / the same at the mirrored images: ~1 unless memorized, well below 1 when memorized"),
    ScoreColumn("loss_cal", "ratio", "low",
                "the denoising loss at noised copies of the image / the same at its mirrored images: ~1 unless "
                "memorized, well below 1 when the model denoises this very image almost exactly"),
    ScoreColumn("cfg_norm", "noise-prediction norm", "high",
                "||eps(x_t, c) - eps(x_t, empty)||: large for memorized captions (Wen et al.)"),
)}


def score_column(name: str) -> ScoreColumn | None:
    """The registered column `name`; p_laplace_<p> for any p (low for p <= 2, high above: the factor
    |s|^(p-2) vanishes where the score is small, docs/method.md §9). None for an unregistered name."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(P_LAPLACE_PREFIX):
        try:
            p = p_of_column(name)
        except ValueError:
            return None
        return ScoreColumn(name, "log-density curvature", "low" if p <= 2 else "high",
                           f"p-Laplace of log p_t at p = {p:g}" + (" (flips to high for p > 2)" if p > 2 else ""))
    return None


def direction(name: str) -> str | None:
    c = score_column(name)
    return c.direction if c else None


def outputs_markdown() -> str:
    """docs/outputs.md: every table and column memscan writes, from the schemas above and scanner/columns.py."""
    from scanner.schema import (
        DUPLICATES,
        ERRORS,
        FILES,
        META_COLUMNS,
        OTHER_FILES,
        P_LAPLACE_PREFIX,
        REMOVAL,
        REPLICATIONS,
        TABLE_COLUMNS,
        scores_schema,
    )

    lines = ["# Outputs", "",
             ("Everything a scan or a dedup writes under `--out` (a local folder or an object-storage URL). The "
              "parquet tables read with pandas, pyarrow or duckdb (`select * from 'OUT/scores/*.parquet'`). Generated "
              "from `scanner/schema.py` and `scanner/columns.py` (`python -m scanner.columns > docs/outputs.md`); "
              "`tests/test_outputs_doc.py` fails when they disagree."), "",
             "| file | one row per |", "|---|---|"]
    lines += [f"| `{f}` | {row} |" for f, row, _ in FILES] + [f"| `{f}` | {what} |" for f, what in OTHER_FILES]
    schemas = {"scores_schema": scores_schema(["p_laplace_1", "p_laplace_2", "p_laplace_3"]), "DUPLICATES": DUPLICATES,
               "REPLICATIONS": REPLICATIONS, "REMOVAL": REMOVAL, "ERRORS": ERRORS}
    for f, row, schema_name in FILES:
        schema = schemas[schema_name]
        lines += ["", f"## `{f}`", "", f"One row per {row}.", "", "| column | type | meaning |", "|---|---|---|"]
        for field in schema:
            if schema_name == "scores_schema":
                c = score_column(field.name)
                what = META_COLUMNS.get(field.name) or (
                    f"{c.meaning} ({c.unit}; flags memorization when {c.direction})" if c else "")
                if field.name.startswith(P_LAPLACE_PREFIX):
                    what += "; one column per geometry.p_values entry"
            else:
                table = f.split(",")[0]
                what = TABLE_COLUMNS[table][field.name]
            lines.append(f"| `{field.name}` | {field.type} | {what} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(outputs_markdown(), end="")
