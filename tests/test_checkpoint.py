"""Training checkpoints: resharding across TP/DP, crash safety, one-line errors."""
from pathlib import Path

import pytest
import torch

from megaclip import distributed
from megaclip.checkpoint import CheckpointError, latest, write_model_checkpoint
from megaclip.checkpoint.model import init_model_from
from megaclip.checkpoint import files as checkpoint_files
from megaclip.checkpoint import training as checkpointing
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.model.state import full_state_dict
from megaclip.optim import build_optimizer, cosine_schedule
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, small_config

BATCH = 8


def build(*overrides):
    cfg = small_config(f"tp={distributed.tp_size()}", "model.optim.name=distributed_fused_adam", *overrides)
    distributed.seed_everything(11)
    model = CLIPModel(cfg.model)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    return cfg, dict(model=model, optimizer=optimizer, scheduler=cosine_schedule(optimizer, cfg.model.optim, 10), loader=None)


def saved_state(state):
    return {k: v for k, v in state.items() if k != "scheduler"}


def train_step(cfg, state, seed):
    images, tokens = fixed_batch(cfg, BATCH, seed=seed)
    per_rank = BATCH // distributed.dp_size()
    rows = slice(distributed.dp_rank() * per_rank, (distributed.dp_rank() + 1) * per_rank)
    loss = ClipLoss(group=distributed.dp_group())(*state["model"](images[rows], tokens[rows]))
    loss.backward()
    state["optimizer"].finish_gradients(1.0)
    state["optimizer"].step()
    state["scheduler"].step()
    state["optimizer"].zero_grad()
    return loss.item()


def features(cfg, model):
    images, tokens = fixed_batch(cfg, 4, seed=99)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def train_and_save(root):
    cfg, state = build()
    for step in range(2):
        train_step(cfg, state, seed=step)
    checkpointing.save(Path(root), 2, cfg=cfg, consumed_samples=2 * BATCH, keep=2, **saved_state(state))
    return features(cfg, state["model"]), train_step(cfg, state, seed=2)


def resume_and_continue(root):
    cfg, state = build()
    meta = checkpointing.resume(Path(root), cfg=cfg, **state)
    assert meta["step"] == 2
    return features(cfg, state["model"]), train_step(cfg, state, seed=2)


@pytest.mark.parametrize("world,tp", [(1, 1), (4, 4)], ids=["tp1", "tp4"])
def test_saved_at_tp2_dp2_loads_at_other_tp(tmp_path, world, tp):
    (ref_image, ref_text), ref_next_loss = run_distributed(train_and_save, 4, 2, str(tmp_path))[0]
    for (image, text), next_loss in run_distributed(resume_and_continue, world, tp, str(tmp_path)):
        # The weights load bitwise; another TP only sums the linears' products in another order. The
        # features are unit vectors: reordered fp32 sums over widths <= 64, through a few layers, move
        # them by tens of eps (1.2e-7), within 1e-6 + 1e-5 relative.
        torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text, ref_text, rtol=1e-5, atol=1e-6)
        # the resharded optimizer state (moments, master weights, step) continues the same run, to the
        # rounding above carried through one step (a wrong moment or step count moves it far more)
        assert next_loss == pytest.approx(ref_next_loss, rel=1e-5)


def save_then_crash_in_second_save(root):
    cfg, state = build()
    train_step(cfg, state, seed=0)
    checkpointing.save(Path(root), 1, cfg=cfg, consumed_samples=BATCH, keep=2, **saved_state(state))
    train_step(cfg, state, seed=1)
    writes = []

    def failing_save(obj, path):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")
        real_save(obj, path)

    real_save = checkpointing.save_torch
    checkpointing.save_torch = failing_save
    try:
        checkpointing.save(Path(root), 2, cfg=cfg, consumed_samples=2 * BATCH, keep=2, **saved_state(state))
    except CheckpointError:  # a failed write fails the save with one line
        pass
    finally:
        checkpointing.save_torch = real_save
    return len(writes)


def test_crash_during_save_leaves_previous_checkpoint(tmp_path):
    assert run_distributed(save_then_crash_in_second_save, 1, 1, str(tmp_path)) == [2]
    assert latest(tmp_path) == tmp_path / "step_0000001"
    assert not (tmp_path / "step_0000002").exists()
    assert run_distributed(resume_and_continue_from_1, 1, 1, str(tmp_path)) == [1]


def resume_and_continue_from_1(root):
    cfg, state = build()
    return checkpointing.resume(Path(root), cfg=cfg, **state)["step"]


def resume_with(root, overrides):
    cfg, state = build(*overrides)
    try:
        checkpointing.resume(Path(root), cfg=cfg, **state)
    except CheckpointError as e:
        return str(e)
    return None


def test_architecture_mismatch_and_truncated_file_are_one_line_errors(tmp_path):
    run_distributed(train_and_save, 1, 1, str(tmp_path))
    message = run_distributed(resume_with, 1, 1, str(tmp_path), ["model.vision.num_layers=3"])[0]
    assert message.startswith("checkpoint architecture differs from the config: model.vision.num_layers is 2")
    shard = tmp_path / "step_0000002" / "model" / "tp_00.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = run_distributed(resume_with, 1, 1, str(tmp_path), [])[0]
    assert message.startswith("checkpoint file unreadable:") and "\n" not in message


def test_partial_directories_are_not_checkpoints(tmp_path):
    (tmp_path / "step_0000005.partial" / "model").mkdir(parents=True)
    assert latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint_files.resolve(tmp_path)


def init_from_converted(root):
    cfg, state = build()
    distributed.seed_everything(1234)  # other weights than the checkpoint's
    model = CLIPModel(cfg.model)
    init_model_from(model, root, cfg.model, distributed.tp_size(), distributed.tp_rank())
    return features(cfg, model)


def test_init_from_a_model_only_checkpoint_at_another_tp(tmp_path):
    cfg = small_config()
    distributed.seed_everything(11)
    source = CLIPModel(cfg.model)  # TP=1, plain linears: no process group needed
    write_model_checkpoint(tmp_path, full_state_dict(source, cfg.model.text.vocab_size), cfg, tp=1)
    ref_image, ref_text = features(cfg, source)
    for image, text in run_distributed(init_from_converted, 2, 2, str(tmp_path)):
        # bitwise weights at TP 2 instead of 1: features to reordered-sum rounding, as above
        torch.testing.assert_close(image, ref_image, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text, ref_text, rtol=1e-5, atol=1e-6)
