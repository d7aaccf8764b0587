"""loravl: vision-language pretraining by adapting a frozen DINOv2 with LoRA.

    import loravl
    model, cfg = loravl.load_model("checkpoints/stage1/latest")
    loravl.caption(model, ["photo.jpg"])

Both are imported on first use, so that ``import loravl.config`` stays light (config errors come before torch).
"""
import importlib

__version__ = "0.1.0"

_LAZY = {"load_model": "loravl.loading", "export_model": "loravl.loading", "caption": "loravl.generate"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loravl' has no attribute {name!r}")
