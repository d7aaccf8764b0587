"""Stage-1 vision-language pretraining.

    torchrun --nproc_per_node=8 src/train_stage1_vision_language.py [--config configs/X.yaml] [--key value ...]
    accelerate launch src/train_stage1_vision_language.py ...
    python src/train_stage1_vision_language.py --config configs/demo.yaml

Without --config the real recipe in configs/stage1.yaml is trained.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runs from a checkout without installing

from loravl.config import ConfigError, main_config  # noqa: E402


def main() -> None:
    cfg = main_config(default_path="configs/stage1.yaml")  # config errors exit here, before torch is imported
    from loravl.train import train

    try:
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
