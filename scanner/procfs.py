"""Linux /proc: this process's memory (memory_mb, for summary.json), the machine a run's numbers depend on
(machine, for summary.json and train_info.json), and the process tree below a pid: which
Ray processes (raylet, workers, actors) a memscan process started. Used by the fault tests (kill a scoring worker) and benchmarks/bench_scale.py
(memory of every process of a scan)."""

from __future__ import annotations

from pathlib import Path


def descendants(root: int) -> list[int]:
    """pids below `root` (children, grandchildren, ...); processes that exit meanwhile are skipped."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    """A process's command line as one string ("" when it is gone); Ray retitles a worker with what it runs
    (`ray::ScoreStage...`, `ray::IDLE`)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def memory_mb() -> dict:
    """This process's resident memory now and its high-water mark (MB, /proc/self/status VmRSS and VmHWM),
    for the log and summary.json. (getrusage's ru_maxrss is not used: Linux carries it over from the
    parent across fork and exec.)"""
    out = {"rss": None, "peak": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "peak"] = round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return out


def machine(threads: bool = True) -> dict:
    """What decides whether two runs agree bit for bit: the CPU, its core count, the vector instructions torch's CPU
    kernels use and (threads=True) this process's torch threads. A seeded run repeats itself exactly on one machine;
    another thread count or CPU capability changes a model's weights within 60 training steps
    (benchmarks/results/repro.md)."""
    import os
    import platform

    import torch

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    out = {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    if threads:
        out["torch_threads"] = torch.get_num_threads()
    return out
