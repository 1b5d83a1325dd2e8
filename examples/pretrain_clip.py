"""Pre-train CLIP: ``torchrun --nproc-per-node N examples/pretrain_clip.py [--config-name X] tp=2 ...``, the same as ``-m megaclip.pretrain``."""
import sys

from megaclip.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
