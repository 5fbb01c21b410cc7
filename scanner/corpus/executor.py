"""Where a corpus step's work runs: in this process for a small corpus, as Ray Data tasks on the cluster above.

Every step is written once, as plain functions over numpy batches (dicts of equal-length columns), against a
table the executor holds: a batch here (LocalExecutor), a Ray Dataset there (RayExecutor).

    t = ex.from_items(map_fn, items)          # map_fn(item) -> batch(es) for every item (a shard index); on Ray one
                                              # task an item, or several a task past four a cluster CPU
    t = ex.shuffle(t, key, parts, reduce_fn)  # hash shuffle by `key`; every record of a key meets in one
                                              # reduce_fn(batch) call (a call may hold several keys)
    t = ex.map(t, fn); t = ex.union(a, b)
    ex.write(t, out, "corpus/step/x")         # parquet files under --out (local or object storage)
    t = ex.read(out, "corpus/step/x"); for b in ex.batches(t): ...

LocalExecutor runs them here and shuffles in memory: a corpus below corpus.ray_min_rows (a few hundred thousand
rows), where a Ray Data job's fixed cost of seconds would exceed the work. RayExecutor runs each map and reduce
as a Ray Data task anywhere on the cluster, each declaring the memory it may use, and shuffles with Ray Data's
hash repartition (its object store spills to disk when a shuffle outgrows memory); `parts` is chosen by the step
so that one partition fits its share of corpus.memory_gb. The reduce functions sort what they emit, so a step's
output does not depend on where it ran.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger("memscan")

Batch = dict  # column name -> numpy array, all of one length


def concat(batches: Iterable[Batch]) -> Batch | None:
    """One batch of all `batches` (None when there are none)."""
    batches = [b for b in batches if b]
    if not batches:
        return None
    return {c: np.concatenate([np.asarray(b[c]) for b in batches]) for c in batches[0]}


def size(batch: Batch | None) -> int:
    if not batch:
        return 0
    return len(next(iter(batch.values())))


def _as_batches(result) -> Iterator[Batch]:
    if result is None:
        return
    if isinstance(result, dict):
        yield result
    else:
        yield from result


class LocalExecutor:
    """Every task in this process; a table is one batch (or None when empty)."""

    kind = "local"

    def from_items(self, map_fn: Callable, items: Iterable) -> Batch | None:
        return concat(b for it in items for b in _as_batches(map_fn(it)))

    def from_batch(self, b: Batch | None) -> Batch | None:
        return b if size(b) else None

    def shuffle(self, t: Batch | None, key: str, parts: int, reduce_fn: Callable) -> Batch | None:
        del key, parts  # one partition: the whole (small) corpus fits
        return None if not size(t) else concat(_as_batches(reduce_fn(t)))

    def map(self, t: Batch | None, fn: Callable) -> Batch | None:
        return None if not size(t) else concat(_as_batches(fn(t)))

    def union(self, *ts) -> Batch | None:
        return concat(t for t in ts if size(t))

    def batches(self, t: Batch | None) -> Iterator[Batch]:
        if size(t):
            yield t

    def count(self, t) -> int:
        return size(t)

    def materialize(self, t):
        return t

    def write(self, t: Batch | None, out, rel: str) -> int:
        """t as OUT/rel/part-0.parquet (nothing when empty). Returns the rows written."""
        if not size(t):
            return 0
        import pyarrow as pa

        out.write_parquet(f"{rel}/part-00000.parquet", pa.table(t))
        return size(t)

    def read(self, out, rel: str, columns: list[str] | None = None) -> Batch | None:
        import pyarrow as pa

        files = out.names(rel, ".parquet")
        if not files:
            return None
        tables = [out.parquet_file(f"{rel}/{f}").read(columns=columns) for f in files]
        t = pa.concat_tables(tables)
        return {c: t.column(c).to_numpy() for c in t.column_names}


class RayExecutor:
    """Maps and reduces as Ray Data tasks on the cluster; a table is a (lazy) Ray Dataset."""

    kind = "ray"

    def __init__(self, task_memory_bytes: int | None = None):
        """task_memory_bytes: what each task tells Ray's scheduler it needs (Ray places no more tasks on a node
        than its memory holds)."""
        self.memory = task_memory_bytes
        self._max_tasks: int | None = None

    def _tasks(self, n_items: int) -> int:
        """How many tasks from_items spreads n_items over: one an item up to four a cluster CPU, then several items
        a task, one after another. Each Ray Data task costs tens of milliseconds to schedule and start, so a
        thousand shards as a thousand tasks on a small node cost more than the work of a step that reads a few
        columns of each (an --against scan's old shards); four a CPU still balance the load."""
        import ray

        if self._max_tasks is None:
            self._max_tasks = max(1, 4 * int(ray.cluster_resources().get("CPU", 1)))
        return max(1, min(n_items, self._max_tasks))

    def _opts(self) -> dict:
        return {"num_cpus": 1, **({"memory": self.memory} if self.memory else {})}

    def from_items(self, map_fn: Callable, items: Iterable):
        import ray

        items = list(items)
        ds = ray.data.from_items([{"item": it} for it in items], override_num_blocks=self._tasks(len(items)))
        return ds.map_batches(functools.partial(_map_items, map_fn), batch_size=None, **self._opts())

    def from_batch(self, b: Batch | None):
        """A table of one batch made here (a small result: an exact search's links)."""
        import ray

        if not size(b):
            return None
        return ray.data.from_items([{"x": 0}]).map_batches(functools.partial(_const, b), batch_size=None)

    def shuffle(self, t, key: str, parts: int, reduce_fn: Callable):
        if t is None:
            return None
        t = t.repartition(max(1, int(parts)), keys=[key])
        return t.map_batches(functools.partial(_apply, reduce_fn), batch_size=None, **self._opts())

    def map(self, t, fn: Callable):
        if t is None:
            return None
        return t.map_batches(functools.partial(_apply, fn), batch_size=None, **self._opts())

    def union(self, *ts):
        ts = [t for t in ts if t is not None]
        if not ts:
            return None
        return ts[0] if len(ts) == 1 else ts[0].union(*ts[1:])

    def batches(self, t) -> Iterator[Batch]:
        if t is None:
            return
        for b in t.iter_batches(batch_size=None, batch_format="numpy"):
            if size(b):
                yield dict(b)

    def count(self, t) -> int:
        return 0 if t is None else t.count()

    def materialize(self, t):
        return None if t is None else t.materialize()

    def write(self, t, out, rel: str) -> int:
        """t as parquet files under OUT/rel, one or more per block, written by the tasks themselves (the data
        never passes through the driver). Returns the rows written."""
        if t is None:
            return 0
        stats = t.map_batches(functools.partial(_write_block, out, rel), batch_size=None, **self._opts())
        return int(sum(int(np.sum(b["rows"])) for b in self.batches(stats)))

    def read(self, out, rel: str, columns: list[str] | None = None):
        import ray

        files = out.names(rel, ".parquet")
        if not files:
            return None
        paths = [out.path(f"{rel}/{f}") for f in files]
        return ray.data.read_parquet(paths, filesystem=out._arrow_fs(), columns=columns)


def _const(b: Batch, _batch: Batch) -> Batch:
    return b


def _map_items(map_fn: Callable, batch: Batch) -> Iterator[Batch]:
    """map_fn of every item; a task whose items gave only empty batches yields one of them (its columns, no rows):
    a task that yields nothing leaves a block without a schema, which a later shuffle cannot concatenate."""
    empty, yielded = None, False
    for it in batch["item"]:
        for b in _as_batches(map_fn(it.item() if hasattr(it, "item") else it)):
            if size(b):
                yielded = True
                yield b
            elif b:
                empty = b
    if not yielded and empty is not None:
        yield empty


def _apply(fn: Callable, batch: Batch) -> Iterator[Batch]:
    if size(batch):
        for b in _as_batches(fn(dict(batch))):
            if size(b):
                yield b


def _write_block(out, rel: str, batch: Batch) -> Batch:
    import uuid

    import pyarrow as pa

    n = size(batch)
    if n:
        out.write_parquet(f"{rel}/part-{uuid.uuid4().hex}.parquet", pa.table(dict(batch)))
    return {"rows": np.array([n], np.int64)}


def choose(n_rows: int, ray_min_rows: int, executor: str, task_memory_bytes: int | None = None):
    """The executor for a corpus of n_rows: corpus.executor (local, ray) or auto (ray from ray_min_rows rows, when a
    Ray is up: the scan's, or a cluster's)."""
    kind = executor
    if kind == "auto":
        import ray

        kind = "ray" if n_rows >= ray_min_rows and ray.is_initialized() else "local"
    if kind == "ray":
        return RayExecutor(task_memory_bytes)
    return LocalExecutor()


def parts_for(total_bytes: int, budget_bytes: int, share: int = 8, minimum: int = 1) -> int:
    """Partitions of a shuffle of total_bytes so that one partition takes at most budget / share (a reduce works
    on a few times its input)."""
    per = max(budget_bytes // share, 1 << 20)
    return max(minimum, -(-int(total_bytes) // per))
