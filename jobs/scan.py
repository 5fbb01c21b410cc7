"""Entry point for a Ray cluster job: the same as `memscan scan`, run by the job's driver.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/scan.py --config configs/laion-sd15.yaml --shards '/data/{00000..09999}.tar' --out /shared/runs/x

Inside a submitted job RAY_ADDRESS is set, so memscan attaches to the cluster instead of starting
a local Ray. --out must be a path every node can write (a shared filesystem), since actors and the
driver may run on different machines.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's scanner/ package

from scanner.cli import main

if __name__ == "__main__":
    sys.exit(main(["scan", *sys.argv[1:]]))
