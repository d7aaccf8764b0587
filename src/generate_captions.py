"""Caption images with a trained loravl model.

    python src/generate_captions.py --checkpoint checkpoints/stage1/latest --images a.jpg photos/ "more/*.png"

Prints ``path<TAB>caption`` per image (errors on stderr); see ``loravl.generate`` for the options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from loravl.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
