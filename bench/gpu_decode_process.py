"""Probe 4: nvJPEG in a second process (its own CUDA context) while this one replays a step-sized CUDA graph.

The first three probes decoded in the trainer's own process, and nvJPEG's batched decode waited there for the step's
queued work (BENCHMARKS.md, fourth session). A second process has its own context: the GPU time-slices the two, so
this measures what a decoding process costs the step and how many images it decodes meanwhile, unthrottled and at
fixed rates (the share of a loader's images it could take off the CPU workers).

    python3 bench/gpu_decode_process.py   # writes $OUT/nvjpeg_probe4.json
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import gpu_crops, probe_batches  # noqa: E402


def decoder(rate: float, crop: bool, batch: int, stop_file: Path) -> None:
    """The second process: decode (and crop) batches until ``stop_file`` exists, at most ``rate`` images/s (0: as
    fast as it goes); prints its counts as one JSON line."""
    from torchvision.io import ImageReadMode, decode_jpeg
    dev = torch.device("cuda")
    batches, boxes = probe_batches(batch, dev)
    for k in range(3):  # nvJPEG's handles and the crop's kernels, before the timed part
        imgs = decode_jpeg(batches[k], mode=ImageReadMode.RGB, device=dev)
        gpu_crops(imgs, boxes)
    torch.cuda.synchronize()
    print("ready", flush=True)
    sys.stdin.readline()
    images, host_s, t0, k = 0, 0.0, time.perf_counter(), 0
    while not stop_file.exists():
        t = time.perf_counter()
        imgs = decode_jpeg(batches[k % len(batches)], mode=ImageReadMode.RGB, device=dev)
        if crop:
            gpu_crops(imgs, boxes)
        torch.cuda.current_stream().synchronize()
        host_s += time.perf_counter() - t
        images += batch
        k += 1
        if rate:
            wait = t0 + images / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
    wall = time.perf_counter() - t0
    print(json.dumps({"images": images, "seconds": wall, "img_per_s": images / wall,
                      "host_ms_per_batch": host_s / max(k, 1) * 1e3}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decoder", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--crop", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--stop_file", default="")
    p.add_argument("--blocks", type=int, default=44, help="MLP blocks in the stand-in step (44: ~26 ms on an H200)")
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args()
    if args.decoder:
        return decoder(args.rate, bool(args.crop), args.batch, Path(args.stop_file))

    out = Path(os.environ.get("OUT", "/tmp"))
    dev = torch.device("cuda")
    B = 128
    x = torch.randn(B * 257, 768, device=dev, dtype=torch.bfloat16)
    w = torch.randn(768, 3072, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(3072, 768, device=dev, dtype=torch.bfloat16) * 0.02
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(3):
            (x @ w) @ w2
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(args.blocks):
            y = ((y @ w).relu() @ w2) * 0.01 + x

    def steps(n: int) -> dict:
        times = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            graph.replay()
            if i % 10 == 9:  # a host sync every 10 steps, as the trainer's logging has
                torch.cuda.synchronize()
                times.append(time.perf_counter())
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        gaps = [(b - a) / 10 * 1e3 for a, b in zip([t0] + times[:-1], times)]
        return {"ms_per_step": wall / n * 1e3, "worst_10_step_ms": max(gaps), "img_per_s": B * n / wall}

    results = {"alone_1": steps(args.steps)}
    print("alone", results["alone_1"], flush=True)
    stop = out / "nvjpeg_probe4.stop"
    for rate, crop in ((0, 1), (0, 0), (2000, 1), (1000, 1), (500, 1)):
        stop.unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, __file__, "--decoder", "--rate", str(rate), "--crop", str(crop),
                                  "--batch", str(args.batch), "--stop_file", str(stop)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(0.3)  # the decoder's first batches, before the step is timed
        row = steps(args.steps)
        stop.touch()
        row["decoder"] = json.loads(child.stdout.readline())
        child.wait()
        name = f"with_decoder_rate{rate or 'max'}_{'crop' if crop else 'decode_only'}"
        results[name] = row
        print(name, row, flush=True)
    results["alone_2"] = steps(args.steps)
    print("alone", results["alone_2"], flush=True)
    stop.unlink(missing_ok=True)
    (out / "nvjpeg_probe4.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
