"""docs/outputs.md is generated from scanner/schema.py and scanner/columns.py: every table and column users rely on
is described, and the file in the repository is what the generator writes."""

from pathlib import Path

from scanner.columns import outputs_markdown
from scanner.schema import DUPLICATES, ERRORS, REMOVAL, REPLICATIONS, scores_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "outputs.md"


def test_outputs_doc_is_the_generated_one():
    assert DOC.read_text() == outputs_markdown(), "regenerate it: python -m scanner.columns > docs/outputs.md"


def test_every_column_of_every_table_has_a_meaning():
    text = outputs_markdown()
    for schema in (scores_schema(["p_laplace_1"]), DUPLICATES, REPLICATIONS, REMOVAL, ERRORS):
        for f in schema:
            row = next(ln for ln in text.splitlines() if ln.startswith(f"| `{f.name}` |"))
            assert not row.endswith("|  |"), f"{f.name} has no meaning"
    assert "`link`" in text and "`aligned`" in text  # the column the old README table left out
