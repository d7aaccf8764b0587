"""Probe 5: the real phase-1 step with a share of each batch's JPEGs decoded on its own GPU (nvJPEG).

The loader's CPU workers fall short of the step on some hosts (BENCHMARKS.md, sixth and seventh sessions). Probes 2-4
timed nvJPEG against a stand-in step; this one runs the trainer's compiled step (CUDA graphs, bf16, frozen weights in
bf16) on synthetic batches and decodes ``k`` of every batch's 128 images on the GPU, cropped to 224 by
``throughput.gpu_crops``, written into the batch before its step. Decoding runs in a thread on a side stream, one
batch ahead (``thread``), or in the main thread right after the step is launched (``inline``). The figure is the
step's rate for each ``k``: what a loader that sends a share of its JPEGs to the GPU would cost the step.

    python3 bench/gpu_decode_share.py --out $OUT/gpu_decode_share.json
"""
import argparse, json, queue, sys, threading, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (ROOT, build_model, crop_boxes, encoded_jpegs, gpu_crops, make_optimizer,  # noqa: E402
                        model_config, random_word_tokenizer, synthetic_batch, train_step)

from loravl.config import ModelConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--shares", default="0,16,32,64,128,0", help="images decoded on the GPU per batch, in order")
    p.add_argument("--inline_shares", default="32", help="the same, decoded in the main thread")
    p.add_argument("--out", default="gpu_decode_share.json")
    args = p.parse_args()
    args.tiny = False
    from torchvision.io import ImageReadMode, decode_jpeg
    dev = torch.device("cuda")
    tokenizer = random_word_tokenizer(ModelConfig().text.vocab_size, ModelConfig().text.max_length)
    cfg = model_config(args, str(ROOT / "configs/models/dinov2-base"), "sdpa")
    model = build_model(args, cfg, tokenizer, dev, compile_encoder=False, compile_model=True,
                        model_mode="reduce-overhead", model_scope="forward", frozen_dtype=torch.bfloat16)
    optimizer = make_optimizer(model, dev)
    batches = [synthetic_batch(args, tokenizer, dev, seed=s) for s in range(4)]
    files = encoded_jpegs(Path("/tmp/probe_jpegs"), 2048)
    boxes = {k: crop_boxes(k, dev) for k in range(1, args.batch_size + 1)}

    def decode(k: int, n: int, stream: torch.cuda.Stream):
        """``k`` JPEGs decoded and cropped on ``stream``: the crops and the event that says they are done."""
        with torch.cuda.stream(stream):
            start = (n * k) % (len(files) - k)
            imgs = decode_jpeg(files[start:start + k], mode=ImageReadMode.RGB, device=dev)
            crops = gpu_crops(imgs, boxes[k])
            done = torch.cuda.Event()
            done.record(stream)
        return crops, done

    def step(n: int, item) -> None:
        batch = batches[n % 4]
        if item is not None:
            crops, done = item
            torch.cuda.current_stream().wait_event(done)
            crops.record_stream(torch.cuda.current_stream())
            batch["pixel_values"][:crops.shape[0]].copy_(crops)  # channels-last batch, channels-first crops
        train_step(model, optimizer, batch, torch.bfloat16)

    def run(k: int, mode: str) -> dict:
        side = torch.cuda.Stream()
        items: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        decode_s = [0.0]

        def producer():
            n = 0
            while not stop.is_set():
                t = time.perf_counter()
                item = decode(k, n, side)
                decode_s[0] += time.perf_counter() - t
                n += 1
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass

        thread = threading.Thread(target=producer, daemon=True) if k and mode == "thread" else None
        if thread:
            thread.start()
        item = decode(k, 0, side) if k and mode == "inline" else None
        for n in range(10):  # warm-up, and the thread's queue filled
            step(n, items.get() if thread else item)
        torch.cuda.synchronize()
        wait_s, t0 = 0.0, time.perf_counter()
        for n in range(args.steps):
            t = time.perf_counter()
            got = items.get() if thread else item
            wait_s += time.perf_counter() - t
            step(n, got)
            if k and mode == "inline":
                t = time.perf_counter()
                item = decode(k, n + 1, side)
                decode_s[0] += time.perf_counter() - t
            if n % 20 == 19:  # the trainer reads its metrics back every few steps
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        stop.set()
        if thread:
            thread.join()
        return {"gpu_images_per_batch": k, "mode": mode, "images_per_s": args.batch_size * args.steps / wall,
                "ms_per_step": wall / args.steps * 1e3, "queue_wait_ms_per_step": wait_s / args.steps * 1e3,
                "decode_host_ms_per_call": decode_s[0] / max(1, args.steps) * 1e3}

    for n in range(12):  # compile, CUDA graphs recorded
        step(n, None)
    torch.cuda.synchronize()
    rows = []
    plan = [(int(k), "thread") for k in args.shares.split(",")] + \
        [(int(k), "inline") for k in filter(None, args.inline_shares.split(","))]
    for k, mode in plan:
        rows.append(run(k, mode))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
