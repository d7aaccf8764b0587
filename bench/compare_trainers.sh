#!/usr/bin/env bash
# The trainer of two source trees back to back on one GPU, same data and settings: does a change cost speed?
#   git archive <commit> src configs | (mkdir -p /tmp/before && tar -x -C /tmp/before)
#   bash bench/compare_trainers.sh /tmp/before . OUT_DIR
# Each tree's training.log lands in OUT_DIR/<before|after>/; the script prints the phase and img/s lines.
set -u
before=$1 after=$2 out=${3:-/tmp/compare_trainers}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
# 26,000 JPEGs at the size of a photo shrunk for 224 px crops: the loader keeps up, the step sets the pace.
PYTHONPATH=$here/../src:$here python3 -c "from common import write_jpegs; from pathlib import Path; \
write_jpegs(Path('/tmp/compare_jpegs'), 26000, size=(422, 317))"
for name in before after; do
  tree=$([ $name = before ] && echo "$before" || echo "$after")
  # Old flat option names: both old and new trees accept them.
  TORCHINDUCTOR_CACHE_DIR=/tmp/compare_cache_$name timeout 280 python3 -m torch.distributed.run --standalone \
    --nproc_per_node=1 "$tree/src/train_stage1_vision_language.py" --config "$tree/configs/stage1.yaml" \
    --model.vision.pretrained "$here/../configs/models/dinov2-base" --model.vision.random_init true \
    --data.format jsonl --data.train_path /tmp/compare_jpegs/manifest.jsonl --data.num_workers 15 \
    --train.batch_size 128 --train.max_steps 200 --train.lora_warmup_steps 100 --train.warmup_steps 10 \
    --train.log_every 20 --train.compile true --train.compile_mode reduce-overhead \
    --train.log_dir "$out/$name" --train.checkpoint_dir "/tmp/compare_ckpt_$name" --train.save_every 1000 \
    > "$out/${name}_stdout.txt" 2>&1
  echo "$name: exit $?"
  grep -E "Phase|img/s" "$out/$name/training.log" | cut -c1-200
done
