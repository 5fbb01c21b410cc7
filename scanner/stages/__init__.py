"""The scan's stages. Each declares what it reads and writes and gets its own typed config section
(base.Stage); the pipeline (scanner.pipeline) runs them as one Ray Data job:

    read (a task per shard: opened once, each image decoded once) -> embed (actor) -> score (actors) -> sink (driver:
    one part file per shard)

cluster.py decides where they run: Ray itself, actor counts and CPU / GPU shares (plan, from what the cluster has),
and the device each actor ends up on.
"""
