"""bench/trace_gaps.py on a hand-written Chrome trace: busy and idle time, and each gap charged to its cause."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("trace_gaps", ROOT / "bench" / "trace_gaps.py")
trace_gaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_gaps)


def event(cat, name, ts, dur, correlation=None, pid=1, tid=1):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": {}}
    if correlation is not None:
        e["args"]["correlation"] = correlation
    return e


def test_gaps_are_charged_to_the_host_or_the_device(tmp_path):
    host, gpu = dict(pid=1, tid=1), dict(pid=0, tid=7)
    events = [
        event("cpu_op", "step: forward", 0, 100, **host),
        event("cuda_runtime", "cudaGraphLaunch", 1, 4, correlation=1, **host),
        event("cpu_op", "Optimizer.step", 150, 60, **host),
        event("cpu_op", "aten::_fused_adamw_", 190, 10, **host),
        event("python_function", "src/loravl/train.py(300): train_step", 140, 80, **host),
        event("cuda_runtime", "cudaLaunchKernel", 195, 3, correlation=2, **host),  # launched late: host gap
        event("cuda_runtime", "cudaLaunchKernel", 20, 3, correlation=3, **host),  # launched early: queued gap
        event("kernel", "graph_kernel_a", 10, 50, correlation=1, **gpu),
        event("kernel", "graph_kernel_b", 40, 40, correlation=1, **gpu),  # overlaps a: union, no gap
        event("kernel", "adamw", 200, 10, correlation=2, **gpu),  # 120 us after b ends
        event("gpu_memcpy", "Memcpy DtoH", 240, 10, correlation=3, **gpu),  # 30 us after adamw
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    result = trace_gaps.analyse(trace_gaps.load_events(path), slack_us=5.0, min_gap_us=2.0)
    assert result["span_us"] == 240 and result["busy_us"] == 90 and result["idle_us"] == 150
    host_gap, queued_gap = result["gaps"]
    assert (host_gap["gap_us"], host_gap["cause"], host_gap["before"]) == (120, "host", "adamw")
    assert host_gap["where"] == "cudaLaunchKernel in Optimizer.step > aten::_fused_adamw_"
    assert (queued_gap["gap_us"], queued_gap["cause"]) == (30, "queued")
    # During the host gap (80-200 us) the host ran the end of the forward, Python, then the optimizer.
    # Time inside a frame of our own code (the focus, loravl/) goes to that frame, the rest to the operators.
    assert result["host_during_gaps"] == {"step: forward": 20, "(no host operator)": 40,
                                          "src/loravl/train.py(300): train_step": 60}
    assert result["api_calls"][("cudaLaunchKernel", "Optimizer.step > aten::_fused_adamw_")] == [1, 3, 3]
    text = trace_gaps.report(result, steps=2, top=5)
    assert "idle 0.150 ms (0.075 ms/step)" in text and "host 0.120 ms" in text
