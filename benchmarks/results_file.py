"""Where every benchmark's numbers land: results/NAME.json (the data) and results/NAME.md (the table the README
quotes), the table printed too. Imported by the bench_*.py scripts, which run from this folder."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, name: str, data: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
