"""Caption images with a trained loravl model (the console script ``loravl-caption`` is the same).

    python src/generate_captions.py --checkpoint checkpoints/stage1/latest --images a.jpg photos/ "more/*.png"

Prints ``path<TAB>caption`` per image (errors on stderr); see ``loravl.generate`` for the options.
"""
import sys

from loravl.cli import caption as main

if __name__ == "__main__":
    sys.exit(main())
