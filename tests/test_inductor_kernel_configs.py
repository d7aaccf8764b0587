"""bench/inductor_kernel_configs.py on two hand-written inductor caches: which kernels were tuned differently."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("inductor_kernel_configs", ROOT / "bench" / "inductor_kernel_configs.py")
inductor_kernel_configs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inductor_kernel_configs)


def write_kernel(cache: Path, rel: str, name: str, config: dict | None) -> None:
    """As inductor lays a kernel out: its source named by a hash, its .best_config by another, in one folder."""
    folder, source_hash = rel.split("/")
    source = cache / folder / f"c{source_hash}.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(f"@triton_heuristics.persistent_reduction(size_hints={{'x': 512}})\n@triton.jit\n"
                      f"def {name}(in_out_ptr0, in_ptr0, xnumel, r0_numel, XBLOCK: tl.constexpr):\n    pass\n")
    if config is not None:
        (cache / folder / f"{source_hash[::-1]}.best_config").write_text(json.dumps(config))


def test_compare_lists_only_the_kernels_tuned_differently(tmp_path, capsys):
    a, b = tmp_path / "trainer", tmp_path / "bench"
    # Where a config was chosen and how long tuning took differ run to run; only the launch fields count
    write_kernel(a, "x1/x1merge", "triton_per_fused_merge_0", {"XBLOCK": 1, "num_warps": 2, "time_taken_ms": 9})
    write_kernel(b, "x1/x1merge", "triton_per_fused_merge_0", {"XBLOCK": 8, "num_warps": 2, "time_taken_ms": 3})
    write_kernel(a, "y2/y2norm", "triton_per_fused_norm_1", {"XBLOCK": 8, "num_warps": 4, "configs_hash": "p"})
    write_kernel(b, "y2/y2norm", "triton_per_fused_norm_1", {"XBLOCK": 8, "num_warps": 4, "configs_hash": "q"})
    write_kernel(a, "z3/z3only", "triton_poi_fused_add_2", {"XBLOCK": 256, "num_warps": 4})
    # A graph's module in the merge kernel's folder holds several kernels' sources: not the kernel's own
    (a / "x1" / "cgraphmodule.py").write_text("def triton_per_fused_merge_0(x):\n    pass\ndef triton_poi_fused_add_2(x):\n")
    inductor_kernel_configs.compare(str(a), str(b))
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"3 tuned kernels in {a}, 2 in {b}, 2 in both, 1 chosen differently"
    assert "x1/egrem1x.best_config: triton_per_fused_merge_0\n" in out and "{'XBLOCK': 1, 'num_warps': 2}" in out
    assert "{'XBLOCK': 8, 'num_warps': 2}" in out
    assert "norm_1" not in out and "add_2" not in out
