"""Image classification with a frozen (or not) vision backbone and one adapter: LoRA, LoRA-FA, BitFit, shallow
visual prompt tuning, full fine-tuning or a linear probe. ``python src/finetune_classifier.py --help``."""
from .adapters import (ADAPTERS, DEFAULT_LORA_TARGETS, DEFAULT_LR, LORA_PRESETS, AdapterSummary, ImageClassifier,
                       build_classifier, intended_trainable)
from .data import ClassificationData, load_classification_data, write_synthetic_imagefolder
from .loop import FinetuneConfig, FinetuneResult, run_finetune

__all__ = [
    "ADAPTERS", "DEFAULT_LORA_TARGETS", "DEFAULT_LR", "LORA_PRESETS", "AdapterSummary", "ImageClassifier",
    "build_classifier", "intended_trainable", "ClassificationData", "load_classification_data",
    "write_synthetic_imagefolder", "FinetuneConfig", "FinetuneResult", "run_finetune",
]
