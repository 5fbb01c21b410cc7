"""One progress line for work that streams shards: shards done of total (tqdm's ETA), images, images/s.

    scan:  37%|███▋      | 24/64 [01:10<01:57,  2.90s/shard, 5,976 images, 85.3 img/s]

Written to stderr; `--no-progress` (progress=False) turns it off, e.g. in CI logs.
"""

from __future__ import annotations

import sys
import time


class ShardProgress:
    def __init__(self, total: int, desc: str, enabled: bool = True):
        from tqdm import tqdm

        self.images, self.t0 = 0, time.time()
        self.bar = tqdm(total=total, unit="shard", desc=desc, disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr)

    def update(self, shards: int, images: int) -> None:
        """`shards` more shards and `images` more images done (increments, like tqdm's update)."""
        self.images += images
        self.bar.update(shards)
        rate = self.images / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.images:,} images, {rate:.1f} img/s", refresh=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
