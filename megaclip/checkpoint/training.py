"""Save and resume a training run: model shards, optimizer state, LR schedule, RNG states, data
position (the LR schedule is a function of the step). Every rank takes part; rank 0 renames the finished directory into place last, so a crash at
any moment leaves the previous checkpoint and ``latest`` as they were.

Resuming at the layout it was saved at restores everything exactly. At another TP or DP size the
model and optimizer state are resharded (every rank reads all shards: a one-off cost); RNG states and
the data position belong to the old layout and start afresh from the seed and the step.
"""
from __future__ import annotations

import math
import random
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaclip import distributed
from megaclip.checkpoint.files import (CheckpointError, commit, latest, load_torch, read_meta, save_torch,
                                       step_dir_name, temporary, write_failure, write_meta)
from megaclip.checkpoint.model import check_architecture, load_model_shards, model_shard_path
from megaclip.guard import require_finite
from megaclip.model.state import local_state, shard_state, unshard_state
from megaclip.optim.adamw import adam_step_count


def optim_path(directory: Path, tp_rank: int, dp_rank: int) -> Path:
    return directory / "optim" / f"tp_{tp_rank:02d}_dp_{dp_rank:02d}.pt"


def train_state_path(directory: Path, rank: int) -> Path:
    return directory / "train" / f"rank_{rank:05d}.pt"


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, *, model, optimizer, loader, cfg, consumed_samples: int, keep: int,
         loss: float = float("nan")) -> Path:
    """Write ``root/step_<step>`` (a collective: every rank calls it). Non-finite weights or optimizer
    state on any rank raise NonFiniteError on every rank before anything is written."""
    distributed.doing("checkpoint save", step)
    final = Path(root) / step_dir_name(step)
    staging = temporary(final)
    rank, tp_rank, dp_rank = dist.get_rank(), distributed.tp_rank(), distributed.dp_rank()
    writes_optim = optimizer.state_is_sharded or dp_rank == 0
    model_state, optim_state = local_state(model), optimizer.state_slices(model) if writes_optim else {}
    require_finite(step, {"model": model_state, "optimizer": optim_state}, next(model.parameters()).device)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
    dist.barrier()
    failure = None
    try:
        if dp_rank == 0:
            save_torch(model_state, model_shard_path(staging, tp_rank))
        if writes_optim:
            save_torch({"step": adam_step_count(optimizer), "slices": optim_state}, optim_path(staging, tp_rank, dp_rank))
        save_torch({"rng": rng_state(), "loader": loader.state_dict() if hasattr(loader, "state_dict") else None},
                   train_state_path(staging, rank))
        if rank == 0:
            write_meta(staging, cfg, {"step": step, "consumed_samples": consumed_samples, "loss": loss,
                                      "tensor_model_parallel_size": distributed.tp_size(),
                                      "data_parallel_size": distributed.dp_size(),
                                      "optimizer_sharded": bool(optimizer.state_is_sharded)})
    except OSError as e:  # a full disk, a quota, an I/O error
        failure = write_failure(e, root)
    # Every rank learns whether every part was written (a rank that failed alone would leave the
    # others waiting here), and all of them raise the first failure's line; nothing is committed.
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failure = next((f for f in failures if f), None)
    if failure:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(failure)
    if rank == 0:
        try:
            commit(final)
        except OSError as e:
            raise CheckpointError(write_failure(e, root)) from None
        prune(Path(root), keep)
    dist.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete step directories."""
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resume(root: Path, *, model, optimizer, scheduler, loader, cfg) -> Optional[Dict]:
    """Load the newest checkpoint under ``root`` into the run; returns its meta, or None if there is none."""
    directory = latest(root)
    if directory is None:
        return None
    meta, saved_cfg = read_meta(directory)
    check_architecture(saved_cfg.model, cfg.model)
    tp, dp, tp_rank, dp_rank = distributed.tp_size(), distributed.dp_size(), distributed.tp_rank(), distributed.dp_rank()
    same_layout = (meta["tensor_model_parallel_size"], meta["data_parallel_size"]) == (tp, dp)
    load_model_shards(model, directory, meta, saved_cfg, tp, tp_rank)
    optim = _optimizer_state_lookup(directory, meta, saved_cfg, same_layout, tp, tp_rank, dp_rank)
    optimizer.load_state_slices(model, optim["lookup"], optim["step"])
    # The LR schedule is a function of the step alone (and so survives a change of optimizer): set it
    # to the step. RNG states and the data position only mean something at the same layout.
    scheduler.last_epoch = meta["step"] - 1
    scheduler.step()
    if same_layout:
        train_state = load_torch(train_state_path(directory, dist.get_rank()))
        set_rng_state(train_state["rng"])
        if train_state["loader"] is not None:
            try:
                loader.load_state_dict(train_state["loader"])
            except ValueError as e:  # the data settings changed since the save: the stream starts afresh
                if distributed.is_main():
                    print(f"data position not restored: {e}", flush=True)
    else:
        distributed.seed_everything(cfg.model.seed + meta["step"])
    return meta


def _optimizer_state_lookup(directory, meta, saved_cfg, same_layout, tp, tp_rank, dp_rank) -> Dict:
    """``lookup(name) -> {key: flattened tensor of this TP rank's parameter}`` over the saved shards."""
    old_tp, old_dp = meta["tensor_model_parallel_size"], meta["data_parallel_size"]
    old_ranks = [(r, d) for r in range(old_tp) for d in (range(old_dp) if meta["optimizer_sharded"] else [0])]
    if same_layout:  # only the shards of this TP rank are needed
        old_ranks = [(r, d) for r, d in old_ranks if r == tp_rank]
    files = {rd: load_torch(optim_path(directory, *rd)) for rd in old_ranks}
    step = next(iter(files.values()))["step"]
    per_tp_rank = {r: _assemble([f["slices"] for (fr, _), f in files.items() if fr == r]) for r in {r for r, _ in files}}
    if same_layout:
        local = per_tp_rank[tp_rank]
    else:
        keys = next(iter(per_tp_rank[0].values())).keys()
        full = {k: unshard_state([{n: t[k] for n, t in per_tp_rank[r].items()} for r in range(old_tp)],
                                 saved_cfg.model.text.vocab_size) for k in keys}
        local = {}
        for k, tensors in full.items():
            for name, t in shard_state(tensors, tp, tp_rank).items():
                local.setdefault(name, {})[k] = t
    flat = {name: {k: t.reshape(-1) for k, t in entry.items()} for name, entry in local.items()}
    return {"step": step, "lookup": lambda name: _require(flat, name, directory)}


def _assemble(slice_files) -> Dict[str, Dict[str, torch.Tensor]]:
    """Join the element ranges that DP ranks saved into whole TP-local tensors, by name and key."""
    out, shapes = {}, {}
    for slices in slice_files:
        for name, entry in slices.items():
            shapes[name] = entry["shape"]
            whole = out.setdefault(name, {k: torch.zeros(math.prod(entry["shape"])) for k in entry if k not in ("range", "shape")})
            lo, hi = entry["range"]
            for k, tensor in whole.items():
                tensor[lo:hi] = entry[k].float()
    return {name: {k: t.view(shapes[name]) for k, t in entry.items()} for name, entry in out.items()}


def _require(flat, name, directory):
    if name not in flat:
        raise CheckpointError(f"optimizer state in {directory} has no entry for parameter {name}")
    return flat[name]
