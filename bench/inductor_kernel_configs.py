"""Which launch configuration inductor chose for its generated Triton kernels.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic python3 bench/throughput.py ...  # or the trainer: the compile to look at
    python3 bench/inductor_kernel_configs.py /tmp/ic sigmoid        # kernels whose name contains "sigmoid"

Inductor gives a reduction over a short row (the 64 of a head dim, say) several candidate configurations and
times them when the compiled graph first runs; the winner goes to a ``.best_config`` file beside the kernel's
source in the cache, and later compiles with that cache reuse it. For each matching kernel this prints its
heuristic line (size hints, reduction hint) and the ``.best_config`` files in its folder (XBLOCK, num_warps).
The kernel's time in a step is in a profiler trace (``train.profile_dir``, ``throughput.py --profile_dir``).
"""
from __future__ import annotations

import argparse
import glob
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir", help="TORCHINDUCTOR_CACHE_DIR of the compile")
    p.add_argument("name_contains", help="a part of the kernels' names (triton_per_fused_..._sigmoid_...)")
    args = p.parse_args()
    for path in sorted(glob.glob(os.path.join(args.cache_dir, "**", "*.py"), recursive=True)):
        lines = open(path).read().splitlines()
        defs = [n for n, line in enumerate(lines) if line.startswith("def triton_") and args.name_contains in line]
        if not defs:
            continue
        # A graph's module holds every kernel's source too; a kernel's own file holds one, with its .best_config
        print("==", path)
        for n in defs:
            start = max(i for i in range(n) if lines[i].strip().startswith("@triton_heuristics."))
            print("  ", lines[n][4:100], "\n     ", " ".join(line.strip() for line in lines[start:n])[:600])
        for best in sorted(glob.glob(os.path.join(os.path.dirname(path), "*.best_config"))):
            print("   best_config", os.path.basename(best), open(best).read()[:300])

if __name__ == "__main__":
    main()
