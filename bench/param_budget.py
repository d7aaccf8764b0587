"""Parameter budget of the default model, counted by the code (LORA_ARCHITECTURE.md quotes this output).

python bench/param_budget.py [--image_size 224]

Builds the dinov2-base architecture with random weights (no download) and the default text model with a BPE
vocabulary of the default size (trained here on random words, since only its size matters for the count).
"""
import argparse
import random
import tempfile


import torch
from transformers import Dinov2Config

from loravl.config import ModelConfig, VisionConfig
from loravl.model import VisionLanguageModel
from loravl.text import CaptionTokenizer, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    cfg = ModelConfig()
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(40000)]
    tokenizer = CaptionTokenizer(train_tokenizer((" ".join(words[i:i + 8]) for i in range(0, 40000, 8)),
                                                 cfg.text.vocab_size), cfg.text.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     patch_size=14, image_size=518).save_pretrained(tmp)
        cfg.vision = VisionConfig(pretrained=tmp, random_init=True, image_size=args.image_size)
        torch.manual_seed(0)
        model = VisionLanguageModel(cfg, tokenizer)
    budget = model.parameter_budget()
    print(f"vocabulary: {len(tokenizer)} tokens")
    print(f"{'component':<18}{'parameters':>14}")
    for name, count in budget.items():
        print(f"{name:<18}{count:>14,}")
    model.set_lora_trainable(False)
    phase1 = sum(p.numel() for _, p in model.trainable_parameters())
    model.set_lora_trainable(True)
    phase2 = sum(p.numel() for _, p in model.trainable_parameters())
    print(f"{'trainable phase 1':<18}{phase1:>14,}")
    print(f"{'trainable phase 2':<18}{phase2:>14,}")
    print(f"{'all (w/o momentum)':<18}{sum(v for k, v in budget.items() if k != 'momentum_copies'):>14,}")
    print(model.vision.summary.format(max_listed=2))


if __name__ == "__main__":
    main()
