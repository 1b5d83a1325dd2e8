"""Pre-train CLIP: ``torchrun --nproc-per-node N examples/pretrain_clip.py [--config-name X] tp=2 ...``

The config is checked against the world size before any process group starts; a bad one ends the run
with one line and exit code 2 (megaclip.errors says which rank prints it).
"""
import sys

from megaclip.config import ConfigError, config_from_argv, world_size_from_env
from megaclip.errors import exit_with_error

if __name__ == "__main__":
    try:
        cfg = config_from_argv(sys.argv[1:])
    except ConfigError as e:
        exit_with_error(str(e))
    from megaclip.train import main  # torch and megatron-core load only once the config is sound

    sys.exit(main(cfg, world_size_from_env()))
