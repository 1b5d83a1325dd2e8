"""Checkpoints: atomic step directories, model shards loadable at any TP, full training state.

    <exp_dir>/checkpoints/
      latest                      name of the newest complete step directory (updated last)
      step_0000100/
        meta.json                 step, consumed samples, the TP/DP layout it was saved at
        config.yaml               the resolved config
        model/tp_00.pt ...        each TP rank's parameter shard
        optim/tp_00_dp_00.pt ...  optimizer state by parameter name and element range
        train/rank_00000.pt ...   per-rank RNG states and data-loader position
"""
from megaclip.checkpoint.files import CheckpointError, latest, read_meta, resolve  # noqa: F401
from megaclip.checkpoint.model import read_full_model_state, write_model_checkpoint  # noqa: F401
