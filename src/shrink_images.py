"""Write a copy of an image dataset with its images shrunk to the size training decodes, for hosts whose cores
cannot decode full-size photos as fast as the GPU trains (see ``loravl.data.shrink``).

    python src/shrink_images.py data/coco data/coco_317 --config configs/stage1.yaml
    python src/shrink_images.py shards/ shards_317/ --short_side 317

Then point ``data.train_path`` (or ``data.image_root``) at the copy.
"""
import sys

from loravl.cli import shrink as main

if __name__ == "__main__":
    sys.exit(main())
