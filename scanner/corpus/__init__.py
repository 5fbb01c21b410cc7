"""The corpus-wide steps of a scan, out of core: nothing here holds every row or every vector.

The stages leave one part file per shard (parts/NAME.parquet, vectors/NAME.npy, embeddings/NAME.npy).
Every corpus step streams those files shard by shard and keeps its working set under
`corpus.memory_gb`:

- store.py    the part files as one table addressed by global row ids (shard offset + row), read a
              shard or a set of ids at a time;
- spill.py    a disk shuffle: records partitioned into files, read back one partition at a time;
- search.py   k nearest neighbours of every row: exact (blocked, streaming) while that is cheap, else an
              inverted file on disk (k-means lists, one list in memory at a time), with recall@k measured
              on held-out queries against exact search;
- groups.py   duplicate links out of core (repeated keys, byte copies, pHash near-copies by
              multi-index hashing) and groups that do not chain (scanner.neighbours.dedup.leader_groups).

What stays in memory grows with the number of images that have a duplicate link or a removal
reason, never with the corpus: edges, group members and the removal list.
"""
