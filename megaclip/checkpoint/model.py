"""Model checkpoints: each TP rank's parameter shard, keyed by TP rank only, so a checkpoint loads at
any TP size by unsharding to the full state and sharding again (megaclip.model.state)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from omegaconf import DictConfig, OmegaConf

from megaclip.checkpoint.files import CheckpointError, commit, load_torch, read_meta, resolve, save_torch, step_dir_name, temporary, write_meta
from megaclip.model.state import State, load_full_state_dict, load_local_state, shard_state, unshard_state


def model_shard_path(directory: Path, tp_rank: int) -> Path:
    return Path(directory) / "model" / f"tp_{tp_rank:02d}.pt"


def training_steps(root: Path) -> List[str]:
    """The step directories (complete or being written) of a training run under ``root``: those
    with per-rank training state, which model-only checkpoints lack."""
    return sorted(p.name for p in Path(root).glob("step_*") if (p / "train").is_dir())


def write_model_checkpoint(root, full: State, cfg: DictConfig, tp: int, meta: Dict = None) -> Path:
    """Write a model-only checkpoint at TP size ``tp`` from a full state (used by the converters)
    as ``root/step_0000000`` with ``root/latest`` pointing at it. CheckpointError for a ``root`` that
    holds a training run's checkpoints: repointing their ``latest`` would make the run unresumable."""
    run_steps = training_steps(root)
    if run_steps:
        raise CheckpointError(f"{root} holds a training run's checkpoints ({', '.join(run_steps[-2:])}); "
                              f"write the model elsewhere, e.g. {Path(root).parent / 'converted'}")
    final = Path(root) / step_dir_name((meta or {}).get("step", 0))
    staging = temporary(final)
    shutil.rmtree(staging, ignore_errors=True)
    for rank in range(tp):
        save_torch(shard_state(full, tp, rank), model_shard_path(staging, rank))
    cfg = OmegaConf.merge(cfg, {"model": {"tensor_model_parallel_size": tp}})
    write_meta(staging, cfg, {"step": 0, "consumed_samples": 0, "tensor_model_parallel_size": tp,
                              "data_parallel_size": 1, **(meta or {})})
    commit(final)
    return final


def read_full_model_state(path) -> Tuple[State, DictConfig]:
    """The full model state and the config of a checkpoint (step dir or root) saved at any TP size."""
    directory = resolve(path)
    meta, cfg = read_meta(directory)
    tp = meta["tensor_model_parallel_size"]
    shards = [load_torch(model_shard_path(directory, rank)) for rank in range(tp)]
    return unshard_state(shards, cfg.model.text.vocab_size), cfg


# The keys that decide the parameters' names and shapes; everything else may change between runs.
ARCHITECTURE = {
    "vision": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "patch_dim", "img_h", "img_w",
               "num_channels", "class_token_length"),
    "text": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size", "encoder_seq_length"),
}


def check_architecture(saved, current) -> None:
    """CheckpointError naming the first architecture key where two ``model`` configs differ."""
    differences = [(f"model.{tower}.{key}", saved[tower][key], current[tower][key])
                   for tower, keys in ARCHITECTURE.items() for key in keys if saved[tower][key] != current[tower][key]]
    if saved.output_dim != current.output_dim:
        differences.append(("model.output_dim", saved.output_dim, current.output_dim))
    # the objective decides the learned scalars (SigLIP's logit_bias); checkpoints older than the key are CLIP's
    if saved.get("loss", "clip") != current.loss:
        differences.append(("model.loss", saved.get("loss", "clip"), current.loss))
    if differences:
        key, was, now = differences[0]
        raise CheckpointError(f"checkpoint architecture differs from the config: {key} is {was} in the checkpoint, "
                              f"{now} in the config ({len(differences)} difference(s))")


def load_model_shards(model, directory: Path, meta: Dict, saved_cfg: DictConfig, tp: int, tp_rank: int) -> None:
    """Load a checkpoint's parameters into this rank's model, resharding if it was saved at another TP."""
    try:
        if meta["tensor_model_parallel_size"] == tp:
            load_local_state(model, load_torch(model_shard_path(directory, tp_rank)))
        else:
            load_full_state_dict(model, read_full_model_state(directory)[0], tp, tp_rank)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def load_model_for_inference(path, device: str = "cpu"):
    """A single-process model (plain linears) from a checkpoint saved at any TP, with any
    model.transformer_impl (its parameters are the same), in eval mode."""
    from megaclip.model import CLIPModel

    full, cfg = read_full_model_state(path)
    cfg = OmegaConf.merge(cfg, {"model": {"tensor_model_parallel_size": 1, "linear_impl": "torch", "sequence_parallel": False,
                                          "transformer_impl": "local", "fp8": "none"}})
    head = full.get("catlip_head.weight")  # CatLIP's class count is its vocabulary's, not the config's
    model = CLIPModel(cfg.model, None if head is None else head.shape[0])
    try:
        load_full_state_dict(model, full, 1, 0)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.to(device).eval(), cfg


def init_model_from(model, path, model_cfg, tp: int, tp_rank: int) -> Path:
    """Start a run from a checkpoint's weights only (a converted one, or another run's)."""
    directory = resolve(path)
    meta, saved_cfg = read_meta(directory)
    check_architecture(saved_cfg.model, model_cfg)
    load_model_shards(model, directory, meta, saved_cfg, tp, tp_rank)
    return directory
