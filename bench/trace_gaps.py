"""Where the GPU waits: idle time in a PyTorch profiler Chrome trace, by what the host was doing.

    python bench/trace_gaps.py logs/profile/rank0_steps21-25.json --steps 5    # train.profile.dir's trace
    python bench/trace_gaps.py trace.json --top 30 --out gaps.txt

The GPU's busy time is the union of its kernels, copies and memsets over the trace's span of GPU work. Each gap
between two busy stretches is charged to the work that ends it: the kernel (or copy) that starts after the gap,
the API call that launched it, and the host operators around that call. A gap is

- ``host``: the launch call ended less than ``--slack_us`` before the work started, so the GPU had nothing queued
  and waited for the host (Python, dispatch, a CPU-side computation, a host sync before it);
- ``queued``: the work was launched well before it started, so it waited on something on the device (another
  stream, an event), or on a copy the trace does not show.

Prints the span, busy and idle time (per step with ``--steps``), the idle time by cause and by host operator, and
the largest gaps.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


class HostStacks:
    """The host spans (operators, user annotations, Python frames when profiled ``with_stack``) open at a moment on
    a thread, as a tree: each span's parent is the innermost span around it."""

    def __init__(self, events: list[dict]):
        by_thread: dict = defaultdict(list)
        for e in events:
            if e.get("cat") in HOST_CATEGORIES:
                by_thread[(e["pid"], e["tid"])].append((float(e["ts"]), -float(e["dur"]), e["name"]))
        self.threads = {}
        for key, spans in by_thread.items():
            spans.sort()  # by start, the longer (outer) span first
            starts = [s for s, _, _ in spans]
            ends = [s - d for s, d, _ in spans]
            names = [n for _, _, n in spans]
            parents, open_spans = [], []
            for i, (s, e) in enumerate(zip(starts, ends)):
                while open_spans and ends[open_spans[-1]] < e:
                    open_spans.pop()
                parents.append(open_spans[-1] if open_spans else -1)
                open_spans.append(i)
            self.threads[key] = (starts, ends, names, parents)

    def stack(self, pid, tid, ts: float) -> list[str]:
        """The spans open at ``ts``, outermost first."""
        if (pid, tid) not in self.threads:
            return []
        starts, ends, names, parents = self.threads[(pid, tid)]
        i = bisect.bisect_right(starts, ts) - 1
        while i >= 0 and ends[i] < ts:
            i = parents[i]
        out = []
        while i >= 0:
            out.append(names[i])
            i = parents[i]
        return out[::-1]

    def during(self, pid, tid, start: float, end: float, focus: str, samples: int = 200) -> dict[str, float]:
        """What the thread ran over [start, end], sampled: at each moment the innermost open span whose name holds
        ``focus`` (an annotation such as ``loravl: next batch``, or with ``with_stack`` a frame of one's own code),
        else the innermost operator."""
        out: dict[str, float] = defaultdict(float)
        n = max(1, min(samples, int(end - start)))
        for k in range(n):
            chain = self.stack(pid, tid, start + (k + 0.5) * (end - start) / n)
            label = next((name for name in reversed(chain) if focus and focus in name), None)
            out[label or (chain[-1] if chain else "(no host operator)")] += (end - start) / n
        return out

    def enclosing(self, pid, tid, ts: float) -> list[str]:
        """Operators and annotations (not Python frames) open at ``ts``, outermost first."""
        return [name for name in self.stack(pid, tid, ts) if not name.endswith(".py") and ".py(" not in name]


def short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def host_label(stack: list[str]) -> str:
    """The outermost and innermost host operators around a launch."""
    if not stack:
        return "(no host operator)"
    if len(stack) == 1:
        return short(stack[0])
    return f"{short(stack[0], 40)} > {short(stack[-1], 40)}"


def analyse(events: list[dict], slack_us: float, min_gap_us: float, focus: str = "loravl") -> dict:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: float(e["ts"]))
    if not gpu:
        raise SystemExit("no GPU kernels in this trace (profiled on a CPU, or without ProfilerActivity.CUDA)")
    launches = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    stacks = HostStacks(events)

    busy, gaps = 0.0, []
    host_during: dict[str, float] = defaultdict(float)  # what the host ran while the GPU waited for it
    span_start, covered_to = float(gpu[0]["ts"]), float(gpu[0]["ts"])
    prev_name = None
    for e in gpu:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if start > covered_to:
            gap = start - covered_to
            if gap >= min_gap_us:
                launch = launches.get(e.get("args", {}).get("correlation"))
                if launch is not None:
                    launch_end = float(launch["ts"]) + float(launch["dur"])
                    cause = "host" if start - launch_end < slack_us else "queued"
                    stack = stacks.enclosing(launch["pid"], launch["tid"], float(launch["ts"]))
                    if cause == "host":
                        for name, us in stacks.during(launch["pid"], launch["tid"], covered_to, start, focus).items():
                            host_during[name] += us
                    where = f"{launch['name']} in {host_label(stack)}"
                else:
                    cause, where = "queued", "(launch not in the trace)"
                gaps.append({"gap_us": gap, "cause": cause, "after": prev_name, "before": e["name"],
                             "where": where, "at_us": start - span_start})
            busy += end - start
        else:
            busy += max(0.0, end - covered_to)
        covered_to = max(covered_to, end)
        prev_name = e["name"]
    span = covered_to - span_start
    api_calls: dict = defaultdict(lambda: [0, 0.0, 0.0])  # CUDA API calls by name and caller: count, total, max
    for e in launches.values():
        key = (e["name"], host_label(stacks.enclosing(e["pid"], e["tid"], float(e["ts"]))))
        entry = api_calls[key]
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + float(e["dur"]), max(entry[2], float(e["dur"]))
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "gaps": gaps, "gpu_events": len(gpu),
            "host_during_gaps": dict(host_during), "api_calls": dict(api_calls)}


def report(result: dict, steps: int, top: int) -> str:
    lines = []

    def ms(us: float) -> str:
        return f"{us / 1e3:.3f} ms" + (f" ({us / 1e3 / steps:.3f} ms/step)" if steps else "")

    lines.append(f"GPU span {ms(result['span_us'])}, busy {ms(result['busy_us'])}, idle {ms(result['idle_us'])}; "
                 f"{result['gpu_events']} kernels and copies, {len(result['gaps'])} gaps listed")
    counted = sum(g["gap_us"] for g in result["gaps"])
    lines.append(f"idle in the gaps listed: {ms(counted)}")
    by_cause, by_where = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for g in result["gaps"]:
        by_cause[g["cause"]] += g["gap_us"]
        by_where[(g["cause"], g["where"])][0] += g["gap_us"]
        by_where[(g["cause"], g["where"])][1] += 1
    lines.append("")
    lines.append("idle by cause: " + ", ".join(f"{c} {ms(v)}" for c, v in sorted(by_cause.items())))
    lines.append("")
    lines.append(f"{'idle ms':>9} {'gaps':>6}  cause   launched by")
    for (cause, where), (us, n) in sorted(by_where.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / 1e3:>9.3f} {n:>6}  {cause:<7} {where}")
    lines.append("")
    lines.append("while the GPU waited for the host, the launching thread ran (sampled):")
    for name, us in sorted(result["host_during_gaps"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{us / 1e3:>9.3f} ms  {short(name)}")
    lines.append("")
    lines.append("CUDA API calls by host time (a long one blocks the host: a sync, an allocation, a large launch):")
    lines.append(f"{'total ms':>9} {'calls':>6} {'max us':>8}  call in caller")
    for (name, caller), (n, total, longest) in sorted(result["api_calls"].items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{total / 1e3:>9.3f} {n:>6} {longest:>8.1f}  {name} in {caller}")
    lines.append("")
    lines.append(f"{'gap us':>9} {'at ms':>9}  cause   before -> after the gap; launched by")
    for g in sorted(result["gaps"], key=lambda g: -g["gap_us"])[:top]:
        lines.append(f"{g['gap_us']:>9.1f} {g['at_us'] / 1e3:>9.3f}  {g['cause']:<7} {short(str(g['after']), 40)} -> "
                     f"{short(g['before'], 40)}; {g['where']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="a Chrome trace from torch.profiler (.json or .json.gz)")
    p.add_argument("--steps", type=int, default=0, help="steps in the trace, for per-step figures")
    p.add_argument("--slack_us", type=float, default=5.0,
                   help="a launch ending less than this before its work starts: the GPU waited for the host")
    p.add_argument("--min_gap_us", type=float, default=2.0, help="gaps shorter than this are not listed")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--focus", default="loravl",
                   help="charge host time to the innermost annotation or Python frame (traces with_stack) whose "
                        "name holds this")
    p.add_argument("--out", type=Path, help="also write the report here")
    args = p.parse_args()
    text = report(analyse(load_events(args.trace), args.slack_us, args.min_gap_us, args.focus), args.steps,
                  args.top)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
