"""Ray Data stages: each declares what it reads and writes, loads its model once per actor in setup(), and
maps a numpy batch to the same rows with its columns added (base.Stage). The pipeline (scanner.pipeline)
wires them:

    read (tasks: each shard opened once, each image decoded once) -> embed -> score -> sink (part files)

base.plan is the one place that decides actor counts and CPU / GPU shares, for every actor stage.
"""
