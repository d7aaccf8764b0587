"""What a resumed run may change against the run it resumes. Its checkpoint's ``config.yaml`` is compared with the
current config: settings that would make the resumed run another run (model shapes, the batch, the data and its
order, the schedule's shape) stop it at start, naming each field; the others are allowed and logged.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, load_config
from .config_parsing import flatten

logger = logging.getLogger("loravl.train")

# Dotted fields (or whole sections, ending in ".") a resumed run may change. The learning rates are re-applied to
# the restored optimizer; everything else here does not enter the training's arithmetic or its data order.
MAY_CHANGE = (
    "train.epochs", "train.max_steps", "train.stop_at_step", "train.lr", "train.lora_lr", "train.max_bad_steps",
    "train.mixed_precision", "train.gradient_checkpointing", "train.use_ddp", "train.num_gpus", "train.cpu",
    "train.compile.", "train.checkpoint.", "train.logging.", "train.profile.",
    "data.num_workers", "data.prefetch_factor", "data.train_path", "data.val_path", "data.image_root",
    "data.max_skip_fraction", "model.vision.pretrained", "model.vision.attn_implementation", "model.text.tokenizer",
)


# How this start was asked for, not what the run is: never compared.
NOT_COMPARED = ("train.resume", "train.overwrite")

# Settings added since earlier releases whose default changes what a run computes. A checkpoint's config.yaml
# without one ran as the value here says, so a resume compares against that value, not today's default: resuming
# such a run asks for the setting it trained with, rather than silently changing its losses.
EARLIER_BEHAVIOUR = {"model.loss.same_caption_positive": False, "model.loss.text_lm_weight": 0.0}


def saved_config(folder: Path) -> RunConfig:
    """The checkpoint's run settings, with EARLIER_BEHAVIOUR for fields its config.yaml predates."""
    import yaml

    path = folder / "config.yaml"
    written = flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    earlier = [item for field, value in EARLIER_BEHAVIOUR.items() if field not in written
               for item in (f"--{field}", str(value).lower())]
    return load_config(path, earlier)


def _may_change(field: str) -> bool:
    return any(field == allowed or (allowed.endswith(".") and field.startswith(allowed)) for allowed in MAY_CHANGE)


def check_resume(folder: Path, cfg: RunConfig, saved_world_size: int, world_size: int,
                 at_epoch_end: bool) -> dict[str, tuple[Any, Any]]:
    """The fields that differ from the checkpoint's run, ``{field: (saved, now)}``, after checking that each may
    change; raises ``ConfigError`` naming those that may not. The world size may change only at an epoch's end
    (map-style data re-splits there; mid-epoch each rank's position belongs to the split it was saved with)."""
    saved = flatten(saved_config(folder).to_dict())
    now = flatten(cfg.to_dict())
    changed = {field: (saved.get(field), now.get(field)) for field in sorted(set(saved) | set(now))
               if saved.get(field) != now.get(field) and field not in NOT_COMPARED}
    fixed = [f"{field} ({old!r} -> {new!r})" for field, (old, new) in changed.items() if not _may_change(field)]
    if saved_world_size != world_size and not at_epoch_end:
        fixed.append(f"the number of processes ({saved_world_size} -> {world_size}; possible at an epoch's end)")
    if fixed:
        raise ConfigError(f"resuming {folder} with settings that would make it another run: {'; '.join(fixed)}. "
                          f"Resume with the checkpoint's settings (its config.yaml), or start a new run")
    for field, (old, new) in changed.items():
        logger.info("Resume: %s changed from %r to %r", field, old, new)
    if saved_world_size != world_size:
        logger.info("Resume: %d process(es) instead of %d, at an epoch's end: the next epoch is split anew",
                    world_size, saved_world_size)
    return changed
