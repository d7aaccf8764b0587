"""The data layer: every supported caption format behind one loader.

    dataset = build_dataset(cfg.data, "train", cfg.model.vision.image_size)
    loader = build_dataloader(dataset, cfg.data, batch_size, train=True, seed=seed, rank=rank,
                              world_size=world_size, tokenize=tokenize)
    for epoch in ...:
        loader.set_epoch(epoch)
        for batch in loader: ...   # pixel_values, captions, image_ids, skipped (+ input_ids, attention_mask)

See data/README.md for the formats and folder layouts.
"""
from loravl.data.collate import CaptionCollator
from loravl.data.datasets import CaptionDataset, StreamingCaptionDataset
from loravl.data.demo import COLOURS, RELATIONS, SHAPES, demo_caption, ensure_demo_data
from loravl.data.formats import DataFormatError, RawRecord, open_source
from loravl.data.images import IMAGENET_MEAN, IMAGENET_STD, build_transform, load_rgb_image, to_rgb
from loravl.data.loader import CaptionLoader, build_dataloader, build_dataset
from loravl.data.skips import Skip, SkipCounter, TooManySkippedError, check_skip_fraction

__all__ = [
    "COLOURS", "RELATIONS", "SHAPES", "IMAGENET_MEAN", "IMAGENET_STD",
    "CaptionCollator", "CaptionDataset", "CaptionLoader", "DataFormatError", "RawRecord", "Skip", "SkipCounter",
    "StreamingCaptionDataset", "TooManySkippedError",
    "build_dataloader", "build_dataset", "build_transform", "check_skip_fraction", "demo_caption",
    "ensure_demo_data", "load_rgb_image", "open_source", "to_rgb",
]
