"""The console scripts (``pyproject.toml``) and the entry scripts in ``src/``: each parses its arguments and calls
one function. Heavy imports happen inside, so a config error is reported before torch loads."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def train(argv: Optional[Sequence[str]] = None) -> None:
    """``loravl-train`` / ``src/train_stage1_vision_language.py``: without ``--config``, configs/stage1.yaml."""
    from .config import ConfigError, main_config

    cfg = main_config(None if argv is None else list(argv), default_path="configs/stage1.yaml")
    from .integrity import CheckpointError
    from .train import train as run_training

    try:
        run_training(cfg)
    except ConfigError as e:
        _report_and_exit("config error", e)
    except CheckpointError as e:
        _report_and_exit("checkpoint error", e)


def _report_and_exit(kind: str, error: Exception) -> None:
    """A run that cannot start says why once (rank 0), on stderr and in training.log (the file users tail);
    the other ranks exit with the same status, silently."""
    import logging
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{kind}: {error}", file=sys.stderr)
        record = logging.LogRecord("loravl", logging.ERROR, __file__, 0, f"{kind}: {error}", None, None)
        for handler in logging.getLogger("loravl").handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    raise SystemExit(2)


def caption(argv: Optional[Sequence[str]] = None) -> int:
    """``loravl-caption`` / ``src/generate_captions.py``."""
    from .generate import main

    return main(argv)


def evaluate(argv: Optional[Sequence[str]] = None) -> int:
    """``loravl-evaluate`` / ``src/evaluate.py``."""
    from .evaluate import main

    return main(argv)


def babylm(argv: Optional[Sequence[str]] = None) -> int:
    """``loravl-babylm`` / ``src/evaluate_babylm.py``."""
    from .babylm import main

    return main(argv)


def finetune(argv: Optional[Sequence[str]] = None) -> int:
    """``loravl-finetune`` / ``src/finetune_classifier.py``."""
    from .finetune.cli import main

    return main(argv)


def shrink(argv: Optional[Sequence[str]] = None) -> int:
    """``loravl-shrink`` / ``src/shrink_images.py``."""
    from .data.shrink import main

    return main(argv)
