"""Sample keys are the corpus' primary key: a key that more than one sample carries is data to report, not a crash.

Merged crawls and re-downloaded shard sets repeat keys. Which copy is "the" sample cannot be decided,
so every copy becomes an error row naming the shards that hold the key; everything else is scored,
embedded and grouped as usual. `memscan scan` and `memscan dedup` both go through this one function.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from scanner.data.shards import shard_name


def repeated_key_errors(keys: Sequence, shards: Sequence) -> list[str | None]:
    """For row i: None, or the error text when keys[i] is carried by more than one row.

    keys: N sample keys (None for a damaged shard's own error row: never repeated); shards: N shard
    names or paths (named by shard_name in the message).
    """
    where: dict[str, list[str]] = defaultdict(list)
    for k, s in zip(keys, shards):
        if k is not None:
            where[k].append(shard_name(str(s)))
    out: list[str | None] = []
    for k in keys:
        names = where.get(k, []) if k is not None else []
        if len(names) < 2:
            out.append(None)
            continue
        counts = ", ".join(f"{n} ({names.count(n)}x)" if names.count(n) > 1 else n for n in sorted(set(names)))
        out.append(f"key {k!r} is repeated: {len(names)} samples carry it, in shards {counts}; keys must be unique "
                   "across the corpus, so no copy is scored")
    return out
