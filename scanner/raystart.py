"""Starting or attaching to Ray: the one place every memscan job (scan, dedup, embedding) gets its Ray from."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("memscan")


def start_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Attach to `address` (or $RAY_ADDRESS), else start a local Ray on loopback; no-op when Ray is up."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        log.info("connected to the Ray cluster at %s", address)
    else:
        _loopback_only()
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                 logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
        log.info("started a local Ray on %s (loopback only, dashboard %s)", ray.nodes()[0]["NodeManagerAddress"],
                 "on" if dashboard else "off")
    ray.data.DataContext.get_current().enable_progress_bars = False  # memscan prints its own progress line
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's per-dataset INFO lines would break that line; -v keeps them
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _loopback_only() -> None:
    """Make a local Ray use 127.0.0.1 as its node address, so its servers are not reachable from the network.

    ray.init(_node_ip_address="127.0.0.1") is silently turned into the machine's routable address
    (services.resolve_ip_for_localhost). Ray itself uses loopback where it assumes a single-node
    machine (macOS, Windows), switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; its value is read
    when ray is imported, so it is also set on the already-imported constant. Checked by
    tests/test_scan.py::test_local_ray_listens_on_loopback_with_dashboard_off.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # also inherited by the workers Ray starts
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
