"""How long a checkpoint save holds the training thread: the default model (dinov2-base config, random weights,
the default text model) with AdamW's moments filled, saved by ``loravl.checkpoint.Checkpointer`` written in place
and in the background, alternated. In the background the thread waits only for the copy to the CPU (into buffers
kept from the save before: the first save allocates them); the write's own time is what ``wait()`` then takes.

    python bench/checkpoint_stall.py --out stall.json [--dir /tmp/ckpt] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from loravl.checkpoint import Checkpointer, RNGState, TrainState
from loravl.weights import ModelWeights
from loravl.config import ModelConfig, RunConfig, VisionConfig
from loravl.model import VisionLanguageModel
from common import random_word_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="checkpoint_stall.json")
    p.add_argument("--dir", default="", help="where the checkpoints go (default: a new temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = RunConfig(model=ModelConfig())
    cfg.model.vision = VisionConfig(pretrained=str(ROOT / "configs" / "models" / "dinov2-base"), random_init=True)
    tokenizer = random_word_tokenizer(cfg.model.text.vocab_size, cfg.model.text.max_length)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg.model, tokenizer).to(device)
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments exist, as after any step
    directory = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_stall_"))
    rows = []
    # One checkpointer of each kind for the whole run, as in the trainer: the background one copies into the
    # buffers its first save allocated (repeat 0 holds that allocation).
    checkpointers = {background: Checkpointer(directory, keep_last=2, rank=0, world_size=1, background=background)
                     for background in (False, True)}
    for repeat in range(args.repeats):
        for background, checkpointer in checkpointers.items():
            step = 2 * repeat + int(background) + 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            folder = checkpointer.save(step, ModelWeights(model), shared={"optimizer": optimizer},
                                       per_rank={"rng": RNGState()}, train_state=TrainState(step=step),
                                       run_config=cfg.to_dict(),
                                       tokenizer=tokenizer)
            held = time.perf_counter() - started
            checkpointer.wait()
            total = time.perf_counter() - started
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            rows.append({"background": background, "repeat": repeat, "training_thread_held_s": held,
                         "until_written_s": total, "checkpoint_mb": size / 2**20})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
