"""loravl: vision-language pretraining by adapting a frozen DINOv2 with LoRA."""

__version__ = "0.1.0"
