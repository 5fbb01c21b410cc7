"""A real multi-node Ray cluster on this machine: `ray start --head` and more `ray start --address` nodes, each its
own raylet, object store and --temp-dir, as separate machines would have (tests and benchmarks/cluster_check.py).

    with LocalCluster(tmp, nodes=[{"num_cpus": 2, "num_gpus": 0}, {"num_cpus": 1, "num_gpus": 1}]) as c:
        subprocess.run([..., "memscan", "scan", ...], env=c.env)      # RAY_ADDRESS = the head's GCS
        c.job_address                                                 # http://127.0.0.1:PORT for `ray job submit`

Each node runs under `ray start --block` in its own process group, and stopping kills those groups: never
`ray stop`, which would stop every Ray on the machine (another test's, another user's). Token authentication is
on (Ray's default for `ray start --head`): every node and every driver gets the same RAY_AUTH_TOKEN through the
environment, so nothing is written to ~/.ray. A node declared with num_gpus on a machine without one is how a
GPU worker under a CPU head is placed here: Ray schedules on what a node declares.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, work: Path, nodes: list[dict], dashboard: bool = False, timeout: float = 120.0):
        """nodes: one dict per node, the head first: num_cpus, num_gpus, resources (dict). dashboard: start the
        head's dashboard / job server (for `ray job submit`; needs ray[default])."""
        self.work = Path(work)
        self.nodes_spec = nodes
        self.dashboard = dashboard
        self.timeout = timeout
        self.port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.address = f"127.0.0.1:{self.port}"
        self.job_address = f"http://127.0.0.1:{self.dashboard_port}"
        self.client_address = f"ray://127.0.0.1:{self.client_port}"  # Ray Client, for a driver off the cluster

    def _start(self, i: int, spec: dict) -> None:
        args = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={spec.get('num_cpus', 1)}",
                f"--num-gpus={spec.get('num_gpus', 0)}", "--disable-usage-stats",
                f"--temp-dir={self.work / f'node{i}'}"]
        if spec.get("resources"):
            args.append(f"--resources={json.dumps(spec['resources'])}")
        if i == 0:
            args += ["--head", f"--port={self.port}", f"--include-dashboard={str(self.dashboard).lower()}",
                     f"--ray-client-server-port={self.client_port}"]
            if self.dashboard:
                args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            args.append(f"--address={self.address}")
        log = open(self.work / f"node{i}.log", "w")  # noqa: SIM115 - the process holds it until stop()
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self.env, start_new_session=True))

    def nodes(self) -> list[dict]:
        """ray.nodes() of the cluster, asked by a short-lived driver (the state API would need the dashboard):
        NodeID, Alive, Resources, NodeManagerAddress, ..."""
        code = (f"import json, logging, ray; ray.init(address={self.address!r}, logging_level=logging.ERROR, "
                "log_to_driver=False); print(json.dumps(ray.nodes()))")
        p = subprocess.run([sys.executable, "-c", code], env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=120, check=False)
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return []

    def start(self) -> LocalCluster:
        self.work.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(self.nodes_spec):  # the other nodes retry until the head answers
            self._start(i, spec)
        deadline = time.time() + self.timeout
        while sum(bool(n.get("Alive")) for n in self.nodes()) < len(self.nodes_spec):
            dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if time.time() > deadline or dead:
                self.stop()
                logs = "\n".join((self.work / f"node{i}.log").read_text()[-2000:] for i in dead or [0])
                raise RuntimeError(f"the ray nodes did not all come up (dead: {dead}):\n{logs}")
            time.sleep(0.5)
        self.env["RAY_ADDRESS"] = self.address
        return self

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every node's process group, SIGKILL what is left after `grace` seconds (a node drains for up
        to 30 s otherwise: nothing here needs draining)."""
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
