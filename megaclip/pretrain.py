"""Pre-train CLIP, the main job: ``torchrun --nproc-per-node N -m megaclip.pretrain [--config-name X] tp=2 ...``
(also the ``megaclip-pretrain`` command and examples/pretrain_clip.py).

The config is checked against the world size before any process group starts; a bad one ends the run
with one line and exit code 2 (megaclip.errors says which rank prints it). Relative paths in a config,
such as the synthetic set's data/synthetic and the runs' runs/, are relative to the working directory.
"""
import gc
import sys

from megaclip.config import ConfigError, config_from_argv, world_size_from_env
from megaclip.errors import exit_with_error


def main(argv=None) -> int:
    try:
        cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        exit_with_error(str(e))
    from megaclip.train import main as train  # megatron-core and the model load only once the config is sound

    code = train(cfg, world_size_from_env())
    # Everything torch and megatron-core imported would otherwise be walked by the collector at
    # interpreter exit: 2-5 s per process, measured, for nothing (the run is over, its files closed).
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
