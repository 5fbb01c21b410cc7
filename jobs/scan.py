"""Entry point for a Ray cluster job: the same as `memscan scan`, run by the job's driver.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/scan.py --config configs/laion-sd15.yaml --shards '/data/{00000..09999}.tar' --out /shared/runs/x

Inside a submitted job RAY_ADDRESS is set, so memscan attaches to the cluster instead of starting
a local Ray. --out must be a path every node can write (a shared filesystem), since actors and the
driver may run on different machines.

Which memscan runs: the working dir's scanner/ when it has one (a checkout submitted with
--working-dir ., so the code you edited is the code that runs), else the memscan installed on the
cluster (`pip install memscan-*.whl` on every node; then the working dir needs only jobs/scan.py, and
`--config laion-sd15` names a shipped config).
"""

import sys
from pathlib import Path

_root = Path(__file__).resolve().parent.parent
if (_root / "scanner" / "__init__.py").is_file():
    sys.path.insert(0, str(_root))

from scanner.cli import main  # after choosing where scanner comes from

if __name__ == "__main__":
    sys.exit(main(["scan", *sys.argv[1:]]))
