"""On a GPU: the GPU's share of decoding (loravl.data.gpu_decode) against the CPU path, and what it costs.

1. nvJPEG's decode against libjpeg-turbo's, the bench's 640x480 JPEGs: how many values differ, by how much.
2. The resize on the GPU against the CPU path's, from the same decoded images: must be pixel for pixel (TF32
   allowed in this process, as a user's script may allow it).
3. The whole GPU sample (decode, crop, resize, into the batch) against the CPU sample: the decode's difference.
4. ``decode_into``'s time for 16/32/64 JPEGs of a batch on an idle GPU: host and device milliseconds.

    python3 bench/gpu_decode_check.py --out $OUT/gpu_decode_check.json   # exits 1 if 2. fails
"""
import argparse, json, random, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import encoded_jpegs  # noqa: E402

from loravl.data.gpu_decode import decode_into, gpu_jpeg_frame, gpu_sample, pack_jpegs, resized_crops  # noqa: E402
from loravl.data.images import RandomResizedCropUint8, load_rgb_image  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jpegs", type=int, default=512)
    p.add_argument("--out", default="gpu_decode_check.json")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    files = encoded_jpegs(Path("/tmp/probe_jpegs"), args.jpegs)
    transform = RandomResizedCropUint8(224, (0.5, 1.0), hflip=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "jpegs": len(files)}

    cpu = [decode_jpeg(f, mode=ImageReadMode.RGB) for f in files]
    gpu = decode_jpeg(files, mode=ImageReadMode.RGB, device=dev)
    diff = torch.cat([(g.cpu().int() - c.int()).abs().flatten() for g, c in zip(gpu, cpu)])
    result["decode_nvjpeg_vs_libjpeg_turbo"] = {
        "max": diff.max().item(), "mean": diff.float().mean().item(),
        "fraction_differing": (diff > 0).float().mean().item(),
        "fraction_over_2": (diff > 2).float().mean().item()}

    samples, expected = [], []
    for k, data in enumerate(files):
        raw = bytes(data.numpy())
        frame = gpu_jpeg_frame(raw, max_pixels=10**8, min_size=2, target_size=317)
        assert frame is not None, k
        samples.append(gpu_sample(raw, frame, transform, random.Random(k)))
        expected.append(transform(load_rgb_image(raw, max_pixels=10**8, min_size=2, as_tensor=True),
                                  random.Random(k)))
    expected = torch.stack(expected)
    crops = torch.tensor([s["crop"] for s in samples])
    resized = resized_crops([c.to(dev) for c in cpu], crops.to(dev), 224).cpu()
    resize_diff = (resized.int() - expected.int()).abs()
    result["resize_gpu_vs_cpu_path"] = {"max": resize_diff.max().item(),
                                        "fraction_differing": (resize_diff > 0).float().mean().item()}

    got = []
    for start in range(0, len(samples), 64):
        part = samples[start:start + 64]
        batch = {"pixel_values": torch.zeros(len(part), 224, 224, 3, dtype=torch.uint8).permute(0, 3, 1, 2).to(dev),
                 **pack_jpegs(part)}
        decode_into(batch, batch)
        got.append(batch["pixel_values"].cpu())
    whole = (torch.cat(got).int() - expected.int()).abs()
    result["gpu_sample_vs_cpu_sample"] = {"max": whole.max().item(), "mean": whole.float().mean().item(),
                                          "fraction_differing": (whole > 0).float().mean().item()}

    timing = {}
    for k in (16, 32, 64):
        part = samples[:k]
        batch = {"pixel_values": torch.zeros(128, 224, 224, 3, dtype=torch.uint8).permute(0, 3, 1, 2).to(dev),
                 **pack_jpegs(part)}
        for _ in range(3):
            decode_into(batch, batch)
        torch.cuda.synchronize()
        host, device_ms = [], []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            start.record()
            decode_into(batch, batch)
            end.record()
            host.append(time.perf_counter() - t)
            torch.cuda.synchronize()
            device_ms.append(start.elapsed_time(end))
        timing[k] = {"host_ms": 1e3 * sorted(host)[10], "device_ms": sorted(device_ms)[10]}
    result["decode_into_ms"] = timing
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    ok = result["resize_gpu_vs_cpu_path"]["max"] == 0
    print("resize on the GPU", "PASSED: the CPU path's pixels" if ok else "FAILED: pixels differ")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
