#!/usr/bin/env bash
# Two CPU ranks (gloo, DDP), gradient accumulation 2, compiled, across the LoRA phase switch: the trainer with
# train.compile_mode reduce-overhead (gradient buffers kept and zeroed in place; on a CPU no CUDA graphs are
# recorded) against compile_mode default, on the tests' tiny model and 64 demo scenes. Prints each step's loss and
# gradient norm from both runs; they should agree. About 4 minutes on 2 cores (CPU compilation).
#     bash bench/ddp_compile_modes_cpu.sh [out_dir]      (in the activated venv)
set -u
OUT=${1:-/tmp/ddp_compile_modes}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
TINY=(--config configs/demo.yaml --model.vision.image_size 28 --model.compressor.hidden_dim 24
      --model.compressor.embed_dim 16 --model.text.hidden_size 32 --model.text.num_heads 2 --model.text.max_length 12
      --model.text.vocab_size 320 --model.fusion.num_heads 2 --model.loss.embed_dim 16 --model.loss.queue_size 32
      --data.demo_image_size 32 --data.demo_val_size 4 --data.num_workers 0 --data.val_path ""
      --train.batch_size 4 --train.log_every 1 --train.warmup_steps 3 --train.save_every 100 --train.keep_last 10
      --train.lora_warmup_epochs 1 --data.train_path "$OUT/demo64" --data.demo_train_size 64 --train.epochs 2
      --train.grad_accum_steps 2 --train.compile true)
for mode in default reduce-overhead; do
  rm -rf "${OUT:?}/$mode"
  python -m torch.distributed.run --standalone --nproc_per_node=2 src/train_stage1_vision_language.py "${TINY[@]}" \
      --train.compile_mode "$mode" --train.log_dir "$OUT/$mode/logs" --train.checkpoint_dir "$OUT/$mode/ckpt" \
      > "$OUT/$mode.out" 2>&1 || { echo "$mode failed: $OUT/$mode.out"; exit 1; }
done
python - "$OUT" <<'PY'
import json, sys
def steps(mode):
    return {r["step"]: r for r in map(json.loads, open(f"{sys.argv[1]}/{mode}/logs/steps.jsonl"))}
a, b = steps("default"), steps("reduce-overhead")
print("step  loss default / reduce-overhead      grad norm default / reduce-overhead")
for s in sorted(a):
    print(f"{s:4d}  {a[s]['loss']:.6f} / {b[s]['loss']:.6f}      {a[s]['grad_norm']:.6f} / {b[s]['grad_norm']:.6f}")
PY
