"""A local S3 server for tests and benchmarks: moto's server mode in its own process on 127.0.0.1.

    with LocalS3() as s3:                                   # a free port; waits until the server answers
        url = s3.upload("corpus/shards", "bucket", "corpus")  # -> "s3://bucket/corpus"
        subprocess.run([..., "memscan", "scan", "--shards", url + "/{00000..00002}.tar", ...],
                       env={**os.environ, **s3.env})        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...

memscan, s3fs, boto3 and the aws CLI find it through the standard AWS environment (`env`), the way a user reaches
any S3-compatible store; `UNSET` are the variables of a developer's own setup that would otherwise win over it.
Its own process, so serving does not share the caller's interpreter lock (bench_storage times reads against it).
Used by tests/conftest.py (the `s3_server` fixture), benchmarks/bench_storage.py and benchmarks/cluster_check.py.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

# a developer's profile or session token would be used instead of the test credentials
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


class LocalS3:
    def __init__(self, log: str | Path | None = None, timeout: float = 60.0):
        """log: a file for the server's output (default: discarded). timeout: seconds to wait for it to answer."""
        self.log_path = Path(log) if log else None
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.endpoint = ""
        self.env: dict[str, str] = {}

    def start(self) -> LocalS3:
        with socket.socket() as s:  # a free port: moto's server prints the one it got only in its log
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        deadline = time.time() + self.timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    where = f": see {self.log_path}" if self.log_path else ""
                    raise RuntimeError(f"moto's S3 server did not start on {self.endpoint}{where}") from None
                time.sleep(0.2)

    def client(self):
        """A boto3 S3 client on this server, with its credentials (whatever the caller's environment holds)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.env["AWS_DEFAULT_REGION"])

    def upload(self, folder: str | Path, bucket: str, prefix: str = "") -> str:
        """Every file under `folder` (recursively) to s3://bucket/prefix/RELATIVE_PATH (the bucket is created when
        absent); returns the URL of the prefix, without a trailing slash."""
        s3 = self.client()
        if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=bucket)
        root = Path(folder)
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            s3.upload_file(str(f), bucket, "/".join(x for x in (prefix.strip("/"), f.relative_to(root).as_posix()) if x))
        return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def counted_s3_calls():
    """Counts the S3 API calls s3fs makes inside the block, by operation name (botocore's before-call event on the
    client fsspec's cached s3 filesystem uses, the one memscan's reads get): `with counted_s3_calls() as calls:`."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.connect()
    calls: Counter = Counter()

    def count(model=None, **_):
        calls[model.name] += 1

    fs.s3.meta.events.register("before-call.s3", count)
    try:
        yield calls
    finally:
        fs.s3.meta.events.unregister("before-call.s3", count)
