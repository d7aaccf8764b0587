"""bench/throughput.py runs the trainer's own step (so the two cannot drift apart again): its CPU smoke run goes
through both phases, and phase 2 trains the LoRA parameters the trainer's switch adds."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_bench_times_both_phases_of_the_trainers_step(tmp_path):
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--tiny", "--image_size", "32",
                           "--batch_size", "4", "--steps", "2", "--warmup", "1", "--no_flops", "--no_generate",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    phase1, phase2 = rows["step phase 1"], rows["step phase 2"]
    assert phase1["images_per_s"] > 0 and phase2["images_per_s"] > 0
    assert phase2["trainable_params"] > phase1["trainable_params"]  # unfreeze_lora added the LoRA group
