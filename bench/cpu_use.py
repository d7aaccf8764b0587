"""Where the cores went over a stretch of time: CPU time of this process's threads and of its child
processes (the data loader's workers), from Linux's /proc.

    before = cpu_use.snapshot(); ...; row.update(cpu_use.cores_used(before, cpu_use.snapshot()))
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: str) -> tuple[str, int, float]:
    """(name, parent pid, user + system CPU seconds) of a /proc stat file."""
    text = Path(path).read_text()
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is the state, the stat file's third field
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def descendants(root: int) -> dict[int, float]:
    """Every process under ``root``: pid -> CPU seconds so far."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                _, ppid, seconds = _stat(f"/proc/{entry}/stat")
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            parents[int(entry)], cpu[int(entry)] = ppid, seconds
    out, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parents.items():
            if ppid == pid and child not in out:
                out[child] = cpu[child]
                frontier.append(child)
    return out


def snapshot() -> dict:
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name, _, seconds = _stat(f"/proc/self/task/{tid}/stat")
        except OSError:
            continue
        threads[int(tid)] = (name, seconds)
    return {"time": time.perf_counter(), "threads": threads, "children": descendants(os.getpid())}


def cores_used(before: dict, after: dict) -> dict:
    """Cores busy on average between two snapshots: this process, its five busiest threads (the main thread
    first; the rest by tid, as thread names are often all "python"), its children."""
    wall = after["time"] - before["time"]
    per_thread = {tid: seconds - before["threads"].get(tid, (name, 0.0))[1]
                  for tid, (name, seconds) in after["threads"].items()}
    main = os.getpid()
    busiest = sorted((t for t in per_thread if t != main), key=per_thread.get, reverse=True)[:4]
    children = sum(s - before["children"].get(pid, 0.0) for pid, s in after["children"].items())
    return {"main_process_cores": round(sum(per_thread.values()) / wall, 2),
            "busiest_threads_cores": {("main" if t == main else f"{after['threads'][t][0]} {t}"):
                                      round(per_thread.get(t, 0.0) / wall, 2) for t in [main, *busiest]},
            "children_cores": round(children / wall, 2)}
