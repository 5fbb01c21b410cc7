"""--out in object storage: a scheme memscan cannot write is refused at once, and never becomes a local folder.

Elsewhere, on a local S3 server (moto's server mode, on 127.0.0.1): that a bucket holds everything a local --out holds
(the same files, completion markers and tables) is checked on the README's own S3 dedup command
(tests/test_readme_commands.py); that a scan killed while it writes to a bucket resumes there, in tests/test_scan.py
(beside the other kill tests, against their clean reference run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _memscan(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scanner", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                                 "PYTHONUNBUFFERED": "1"})


def test_an_unwritable_scheme_is_refused_at_once_and_never_becomes_a_folder(tmp_path):
    for out in ("http://127.0.0.1:9/out", "pipe:cat", "s3:bucket/out", "ftp://host/out"):
        proc = _memscan(["dedup", "--shards", str(tmp_path), "--out", out], cwd=tmp_path)
        text = proc.communicate(timeout=60)[0]
        assert proc.returncode == 2, (out, text)
        assert "memscan cannot write to" in text or "write a URL as" in text, text
    assert list(tmp_path.iterdir()) == []  # no folder named `http:`, `pipe:cat` or `s3:` appeared
