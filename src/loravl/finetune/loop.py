"""The fine-tuning run: build the classifier, train adapter + head with AdamW and a cosine schedule, report
train/val accuracy per epoch and test accuracy at the end."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..device import bf16_autocast, resolve_device
from .adapters import DEFAULT_LR, LORA_PRESETS, ImageClassifier, build_classifier
from .clip import CLIP_MEAN, CLIP_STD, is_clip_backbone
from .data import IMAGENET_MEAN, IMAGENET_STD, ClassificationData, load_classification_data


TIMING_WARMUP = 5  # steps left out of step_ms: the first ones allocate and autotune


@dataclass
class FinetuneConfig:
    data: str
    adapter: str = "lora"
    backbone: str = "facebook/dinov2-base"
    random_init: bool = False
    weights: Optional[str] = None  # a CLIP backbone's weights file
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: Optional[float] = None  # None: DEFAULT_LR[adapter]
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    preset: str = "medium"
    rank: Optional[int] = None  # None: from the preset
    alpha: Optional[int] = None
    lora_dropout: float = 0.1
    lora_targets: Optional[list[str]] = None  # None: attention and MLP projections
    num_prompts: int = 10  # prompt tokens (prompt), prefix length per layer (prefix)
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"
    download_root: str = "data/flowers102"

    def adapter_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.adapter]

    def lora_rank_alpha(self) -> tuple[int, int]:
        if self.preset not in LORA_PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(LORA_PRESETS)}, got {self.preset!r}")
        rank, alpha = LORA_PRESETS[self.preset]
        return (self.rank or rank, self.alpha or alpha)


@dataclass
class FinetuneResult:
    adapter: str
    trainable_params: int
    total_params: int
    test_accuracy: float
    best_val_accuracy: float
    train_seconds: float
    step_ms: Optional[float] = None  # median training step after the first TIMING_WARMUP steps
    peak_memory_gib: Optional[float] = None  # on a GPU: the run's peak allocated memory
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def train_step(model: ImageClassifier, optimizer: torch.optim.Optimizer, pixel_values: torch.Tensor,
               labels: torch.Tensor) -> tuple[float, int]:
    """One optimizer step; returns (loss, correct predictions)."""
    with bf16_autocast(pixel_values.device):
        logits = model(pixel_values)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((logits.argmax(dim=1) == labels).sum())


@torch.no_grad()
def evaluate(model: ImageClassifier, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    for pixel_values, labels in loader:
        pixel_values, labels = pixel_values.to(device), labels.to(device)
        with bf16_autocast(device):
            correct += int((model(pixel_values).argmax(dim=1) == labels).sum())
        seen += labels.numel()
    return correct / max(seen, 1)


def build_optimizer(model: ImageClassifier, adapter_lr: float, head_lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": head, "lr": head_lr}]
    if adapter:
        groups.append({"params": adapter, "lr": adapter_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def run_finetune(cfg: FinetuneConfig, data: Optional[ClassificationData] = None, log=print) -> FinetuneResult:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    normalization = (CLIP_MEAN, CLIP_STD) if is_clip_backbone(cfg.backbone) else (IMAGENET_MEAN, IMAGENET_STD)
    data = data or load_classification_data(cfg.data, cfg.image_size, cfg.seed, download_root=cfg.download_root,
                                            normalization=normalization)
    rank, alpha = cfg.lora_rank_alpha()
    model = build_classifier(cfg.backbone, data.num_classes, cfg.adapter, cfg.random_init, rank=rank, alpha=alpha,
                             lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets,
                             num_prompts=cfg.num_prompts, weights=cfg.weights, image_size=cfg.image_size).to(device)
    log(model.summary.format())

    generator = torch.Generator().manual_seed(cfg.seed)
    loader_kwargs = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    train_loader = DataLoader(data.train, shuffle=True, drop_last=len(data.train) > cfg.batch_size,
                              generator=generator, **loader_kwargs)
    val_loader = DataLoader(data.val, **loader_kwargs)
    test_loader = DataLoader(data.test, **loader_kwargs)

    optimizer = build_optimizer(model, cfg.adapter_lr(), cfg.head_lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs * len(train_loader), 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, step_seconds, start = [], [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum = correct = seen = 0
        for pixel_values, labels in train_loader:
            pixel_values, labels = pixel_values.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            step_start = time.perf_counter()
            loss, hits = train_step(model, optimizer, pixel_values, labels)  # .item() waits for the GPU
            step_seconds.append(time.perf_counter() - step_start)
            scheduler.step()
            loss_sum += loss * labels.numel()
            correct += hits
            seen += labels.numel()
        val_accuracy = evaluate(model, val_loader, device)
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "val_accuracy": val_accuracy}
        history.append(row)
        log(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}, "
            f"val acc {val_accuracy:.4f}")
    train_seconds = time.perf_counter() - start
    test_accuracy = evaluate(model, test_loader, device)
    log(f"test accuracy {test_accuracy:.4f} ({cfg.adapter}, {train_seconds:.1f}s of training)")
    timed = sorted(step_seconds[TIMING_WARMUP:])
    step_ms = 1000 * timed[len(timed) // 2] if timed else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return FinetuneResult(cfg.adapter, model.summary.trainable_params, model.summary.total_params, test_accuracy,
                          max((h["val_accuracy"] for h in history), default=0.0), train_seconds, step_ms, peak,
                          history)
