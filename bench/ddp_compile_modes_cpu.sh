#!/usr/bin/env bash
# Two CPU ranks (gloo, DDP), gradient accumulation 2, compiled, across the LoRA phase switch: the trainer with each
# compile variant (train.compile_scope:train.compile_mode) against the first, on the tests' tiny model and 64 demo
# scenes. reduce-overhead keeps gradient buffers and zeroes them in place (on a CPU no CUDA graphs are recorded);
# scope forward compiles the whole training forward, with graph breaks at the cross-rank gathers. Prints each
# step's loss and gradient norm from every run; they should agree. About 2 minutes per variant on 2 cores.
#     bash bench/ddp_compile_modes_cpu.sh [out_dir] [variant ...]      (in the activated venv)
#     EXTRA_ARGS="--model.text.dropout 0" bash bench/ddp_compile_modes_cpu.sh ...   (more trainer overrides)
#     default variants: modules:default modules:reduce-overhead forward:default
set -u
OUT=${1:-/tmp/ddp_compile_modes}
shift || true
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(modules:default modules:reduce-overhead forward:default)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
TINY=(--config configs/demo.yaml --model.vision.image_size 28 --model.compressor.hidden_dim 24
      --model.compressor.embed_dim 16 --model.text.hidden_size 32 --model.text.num_heads 2 --model.text.max_length 12
      --model.text.vocab_size 320 --model.fusion.num_heads 2 --model.loss.embed_dim 16 --model.loss.queue_size 32
      --data.demo_image_size 32 --data.demo_val_size 4 --data.num_workers 0 --data.val_path ""
      --train.batch_size 4 --train.log_every 1 --train.warmup_steps 3 --train.save_every 100 --train.keep_last 10
      --train.lora_warmup_epochs 1 --data.train_path "$OUT/demo64" --data.demo_train_size 64 --train.epochs 2
      --train.grad_accum_steps 2 --train.compile true)
for variant in "${VARIANTS[@]}"; do
  scope=${variant%%:*} mode=${variant#*:} dir="$OUT/${variant/:/_}"
  rm -rf "${dir:?}"
  python -m torch.distributed.run --standalone --nproc_per_node=2 src/train_stage1_vision_language.py "${TINY[@]}" \
      --train.compile_scope "$scope" --train.compile_mode "$mode" --train.log_dir "$dir/logs" \
      --train.checkpoint_dir "$dir/ckpt" ${EXTRA_ARGS:-} > "$dir.out" 2>&1 || { echo "$variant failed: $dir.out"; exit 1; }
done
python - "$OUT" "${VARIANTS[@]}" <<'PY'
import json, sys
out, variants = sys.argv[1], sys.argv[2:]
runs = [{r["step"]: r for r in map(json.loads, open(f"{out}/{v.replace(':', '_')}/logs/steps.jsonl"))}
        for v in variants]
print("step  loss (" + " / ".join(variants) + ")      grad norm (same order)")
for s in sorted(runs[0]):
    print(f"{s:4d}  " + " / ".join(f"{r[s]['loss']:.6f}" for r in runs) + "      "
          + " / ".join(f"{r[s]['grad_norm']:.6f}" for r in runs))
PY
