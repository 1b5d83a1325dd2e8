"""A non-finite loss or gradient norm skips the update on every rank and is counted; too many in a row
stop the run (exit code 3); a checkpoint is never written from non-finite weights."""
import copy
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from megaclip import distributed
from megaclip.checkpoint import latest
from megaclip.checkpoint import training as checkpointing
from megaclip.config import ConfigError, load_config
from megaclip.config_checks import validate
from megaclip.guard import NonFiniteError, StepGuard
from megaclip.losses import ClipLoss
from megaclip.model import CLIPModel
from megaclip.optim import build_optimizer, cosine_schedule
from megaclip.optim.adamw import adam_step_count
from tests.distributed import run_distributed
from tests.helpers import fixed_batch, small_config
from tests.test_resume import ENV, ROOT, command

BATCH = 8


def build(optimizer_name):
    cfg = small_config(f"model.optim.name={optimizer_name}")
    distributed.seed_everything(3)
    model = CLIPModel(cfg.model)
    optimizer = build_optimizer(model, cfg.model, distributed.dp_group(), distributed.tp_group())
    return cfg, model, optimizer, cosine_schedule(optimizer, cfg.model.optim, 10)


def snapshot(model, optimizer):
    """Everything an update changes: weights, and the optimizer's master weights, moments and step."""
    return copy.deepcopy({"model": {n: p.detach() for n, p in model.named_parameters()},
                          "optimizer": optimizer.state_slices(model), "adam_step": adam_step_count(optimizer)})


def guarded_step(cfg, model, optimizer, scheduler, guard, step, *, report_nan_loss_on=None, inf_grad_on=None):
    """The loop's step on this rank's share of a fixed batch; a rank may report a NaN loss (its
    gradients stay finite) or put an inf into one gradient before the reduction."""
    images, tokens = fixed_batch(cfg, BATCH, seed=step)
    per_rank = BATCH // distributed.dp_size()
    rows = slice(distributed.dp_rank() * per_rank, (distributed.dp_rank() + 1) * per_rank)
    loss = ClipLoss(group=distributed.dp_group())(*model(images[rows], tokens[rows]))
    rank = torch.distributed.get_rank()
    # poisoned as backward makes it: its DP reduction may start before backward returns
    poisoned = next(model.parameters()).register_hook(poison_first_element) if rank == inf_grad_on else None
    loss.backward()
    if poisoned:
        poisoned.remove()
    reported = loss + float("nan") if rank == report_nan_loss_on else loss
    verdict = guard.check(step, reported, optimizer.finish_gradients(cfg.model.optim.grad_clip))
    optimizer.step(skip=verdict.skip)  # skipped on the device, as the loop does
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return not verdict.skip.item()


def poison_first_element(grad):
    grad = grad.clone()
    grad.view(-1)[0] = float("inf")
    return grad


def skip_and_count(optimizer_name):
    cfg, model, optimizer, scheduler = build(optimizer_name)
    guard = StepGuard(max_consecutive_nonfinite=3, every_n_minutes=0, device=torch.device("cpu"))
    out = {"applied": [guarded_step(cfg, model, optimizer, scheduler, guard, 1)]}
    before = snapshot(model, optimizer)
    out["applied"] += [guarded_step(cfg, model, optimizer, scheduler, guard, 2, report_nan_loss_on=1),
                       guarded_step(cfg, model, optimizer, scheduler, guard, 3, inf_grad_on=0)]
    out["unchanged"] = _equal(snapshot(model, optimizer), before)
    out["counted"] = (guard.nonfinite_steps, guard.consecutive)
    out["applied"].append(guarded_step(cfg, model, optimizer, scheduler, guard, 4))
    out["changed_after"] = not _equal(snapshot(model, optimizer), before)
    out["after_finite"] = (guard.nonfinite_steps, guard.consecutive, scheduler.last_epoch)
    for step in (5, 6, 7):
        try:
            guarded_step(cfg, model, optimizer, scheduler, guard, step, report_nan_loss_on=0)
        except NonFiniteError as e:
            out["error"] = (step, str(e))
            break
    return out


def _equal(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("optimizer_name", ["fused_adam", "distributed_fused_adam"])
def test_a_nonfinite_step_on_one_rank_is_skipped_on_every_rank_and_counted(optimizer_name):
    for rank, out in enumerate(run_distributed(skip_and_count, 2, 1, optimizer_name)):
        assert out["applied"] == [True, False, False, True], rank  # a NaN loss on rank 1, then an inf gradient on rank 0
        assert out["unchanged"], rank  # weights, master weights, moments and Adam's step count all untouched
        assert out["counted"] == (2, 2), rank
        assert out["changed_after"] and out["after_finite"] == (2, 0, 4), rank  # the schedule moved on all along
        step, message = out["error"]
        assert step == 7 and "3 consecutive steps (5 to 7" in message, (rank, message)


def save_with_nan_on_rank_1(root):
    cfg, model, optimizer, scheduler = build("distributed_fused_adam")
    state = dict(model=model, optimizer=optimizer, loader=None, cfg=cfg, keep=1)
    checkpointing.save(Path(root), 1, consumed_samples=BATCH, **state)
    if torch.distributed.get_rank() == 1:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    try:
        checkpointing.save(Path(root), 2, consumed_samples=2 * BATCH, **state)
    except NonFiniteError as e:
        return str(e)
    return None


def test_a_checkpoint_is_never_written_from_nonfinite_weights(tmp_path):
    messages = run_distributed(save_with_nan_on_rank_1, 2, 1, str(tmp_path))
    assert all(m and m.startswith("step 2: the weights or optimizer state are not finite") for m in messages), messages
    assert "on this rank" in messages[1] and "on another rank" in messages[0]
    # keep=1: a written step 2 would have pruned step 1
    assert latest(tmp_path) == tmp_path / "step_0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_a_diverging_run_stops_with_exit_code_3_and_keeps_its_last_good_checkpoint(tmp_path):
    # one process: every rank's agreement is tested above; here the whole run's outcome
    run_command = lambda *overrides: command(tmp_path / "data", run, "model.data.synthetic_train_samples=512", *overrides, nproc=1)
    run = tmp_path / "run"
    first = subprocess.run(run_command("steps=8"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    good = run / "checkpoints" / "step_0000008"
    before = digest(good)

    # lr 1e6 from step 9 on: the gradients turn non-finite within a step or two; no periodic save is
    # due before the end, so only a (refused) save of non-finite weights could have written anything
    diverging = subprocess.run(run_command("steps=24", "lr=1e6", "exp_manager.checkpoint.every_n_steps=1000",
                                           "trainer.log_every_n_steps=1"),
                               cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    errors = [line for line in diverging.stderr.splitlines() if line.startswith("megaclip: error:")]
    assert errors and re.fullmatch(r"megaclip: error: non-finite loss or gradient norm in 5 consecutive steps "
                                   r"\((\d+) to (\d+); trainer.max_consecutive_nonfinite=5\): stopped at step \2 .*", errors[0]), errors
    assert re.search(r"exitcode\s*:\s*3\b", diverging.stderr)  # the workers' code, in the launcher's report
    assert "final:" not in diverging.stdout  # no evaluation of a dead model
    stopped_at = int(re.search(r"stopped at step (\d+)", errors[0]).group(1))
    logged = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in logged) == stopped_at - 1  # the stopping step is not logged as done
    streak = [e["nonfinite"] for e in logged if e["step"] > stopped_at - 5]  # counted per step, in steps.jsonl
    assert len(streak) == 4 and streak == list(range(streak[0], streak[0] + 4)) and streak[0] >= 1, streak
    assert re.search(rf"^step {stopped_at - 1}/24 loss .* skipped 0 nonfinite {streak[-1]} mem", diverging.stdout, re.M)

    assert latest(run / "checkpoints") == good and digest(good) == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000008"]
    weights = torch.load(good / "model" / "tp_00.pt")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("override,expected", [
    ("trainer.max_consecutive_nonfinite=0", "trainer.max_consecutive_nonfinite must be >= 1, got 0"),
    ("exp_manager.checkpoint.every_n_minutes=-5", "exp_manager.checkpoint.every_n_minutes must be >= 0 (0: off), got -5.0"),
])
def test_the_guard_settings_are_validated(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(load_config("clip_tiny", [override]), world_size=1, data=False)
