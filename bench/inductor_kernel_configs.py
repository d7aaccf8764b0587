"""Which launch configuration inductor chose for its generated Triton kernels.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic python3 bench/throughput.py ...  # or the trainer: the compile to look at
    python3 bench/inductor_kernel_configs.py /tmp/ic sigmoid        # kernels whose name contains "sigmoid"
    python3 bench/inductor_kernel_configs.py /tmp/ic --compare /tmp/ic2   # where two compiles chose differently

Inductor gives a reduction over a short row (the 64 of a head dim, say) several candidate configurations and
times them when the compiled graph first runs; the winner goes to a ``.best_config`` file beside the kernel's
source in the cache, and later compiles with that cache reuse it. For each matching kernel this prints its
heuristic line (size hints, reduction hint) and the ``.best_config`` files in its folder (XBLOCK, num_warps).
``--compare`` takes a second cache and prints every kernel whose chosen configuration differs between the two. A
kernel's file is named by the hash of its source, and its ``.best_config`` by a hash of that name (and of the torch
build), in the same folder: the same kernel has the same relative paths in both caches. Its name in a kernel's
source carries its position in the graph (``..._64``), so only compiles of the same graph share many kernels.
The kernel's time in a step is in a profiler trace (``train.profile.dir``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

# Fields of a .best_config that say where it came from rather than what it is
BOOKKEEPING = ("configs_hash", "triton_cache_hash", "found_by_coordesc", "time_taken_ms")


def kernel_names(source_path: str) -> list[str]:
    return [line[4:line.index("(")] for line in open(source_path).read().splitlines() if line.startswith("def triton_")]


def folder_kernels(best_config_path: str) -> list[str]:
    """The kernels whose sources share a ``.best_config``'s folder (usually one): its name is a hash that cannot be
    traced back to its source here. A graph's module, which holds every kernel's source, is left out."""
    names = [kernel_names(path) for path in sorted(glob.glob(os.path.join(os.path.dirname(best_config_path), "*.py")))]
    return [n[0] for n in names if len(n) == 1]


def best_configs(cache_dir: str) -> dict[str, dict]:
    """Relative path of each ``.best_config`` in a cache -> its launch fields."""
    found = {}
    for path in glob.glob(os.path.join(cache_dir, "**", "*.best_config"), recursive=True):
        with open(path) as f:
            config = json.load(f)
        found[os.path.relpath(path, cache_dir)] = {k: v for k, v in config.items() if k not in BOOKKEEPING}
    return found


def compare(cache_a: str, cache_b: str) -> None:
    a, b = best_configs(cache_a), best_configs(cache_b)
    shared = sorted(set(a) & set(b))
    differ = [rel for rel in shared if a[rel] != b[rel]]
    print(f"{len(a)} tuned kernels in {cache_a}, {len(b)} in {cache_b}, {len(shared)} in both, "
          f"{len(differ)} chosen differently")
    for rel in differ:
        names = folder_kernels(os.path.join(cache_a, rel)) or ["(no kernel source in its folder)"]
        print(f"  {rel}: {' or '.join(names)[:110]}\n     {cache_a}: {a[rel]}\n     {cache_b}: {b[rel]}")


def show(cache_dir: str, name_contains: str) -> None:
    for path in sorted(glob.glob(os.path.join(cache_dir, "**", "*.py"), recursive=True)):
        lines = open(path).read().splitlines()
        defs = [n for n, line in enumerate(lines) if line.startswith("def triton_") and name_contains in line]
        if not defs:
            continue
        # A graph's module holds every kernel's source too; a kernel's own file holds one, with its .best_config
        print("==", path)
        for n in defs:
            start = max(i for i in range(n) if lines[i].strip().startswith("@triton_heuristics."))
            print("  ", lines[n][4:100], "\n     ", " ".join(line.strip() for line in lines[start:n])[:600])
        for best in sorted(glob.glob(os.path.join(os.path.dirname(path), "*.best_config"))):
            print("   best_config", os.path.basename(best), open(best).read()[:300])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir", help="TORCHINDUCTOR_CACHE_DIR of the compile")
    p.add_argument("name_contains", nargs="?", default="",
                   help="a part of the kernels' names (triton_per_fused_..._sigmoid_...)")
    p.add_argument("--compare", default="", help="a second cache: list the kernels chosen differently in the two")
    args = p.parse_args()
    if args.compare:
        compare(args.cache_dir, args.compare)
    elif args.name_contains:
        show(args.cache_dir, args.name_contains)
    else:
        p.error("give a name to look for, or --compare with a second cache")


if __name__ == "__main__":
    main()
