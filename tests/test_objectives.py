"""model.loss picks the objective: the scalars each one adds to the model, unknown names and another
objective's checkpoint refused in one line before any process starts; the sigmoid loss in fp32."""
import math

import pytest
import torch

from megaclip.config import ConfigError, config_from_argv
from megaclip.config_checks import validate
from megaclip.model import CLIPModel
from megaclip.objectives import ClipObjective, SigLipObjective, build_objective
from megaclip.sigmoid_loss import sigmoid_loss
from tests.helpers import fixed_batch, small_config
from tests.test_config import fake_checkpoint


def test_clip_is_the_default_and_unchanged():
    cfg = small_config()
    model = CLIPModel(cfg.model)
    assert cfg.model.loss == "clip" and isinstance(build_objective(cfg.model, None), ClipObjective)
    assert [n for n, _ in model.named_parameters()][0] == "logit_scale" and not hasattr(model, "logit_bias")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_siglip_adds_its_bias_with_the_configured_initial_values():
    cfg = small_config("model.loss=siglip", "model.siglip.init_logit_bias=-5")
    model = CLIPModel(cfg.model)
    assert [n for n, _ in model.named_parameters()][:2] == ["logit_scale", "logit_bias"]
    assert model.logit_scale.exp().item() == pytest.approx(10.0) and model.logit_bias.item() == -5.0
    objective = build_objective(cfg.model, None)
    assert isinstance(objective, SigLipObjective)
    images, tokens = fixed_batch(cfg, 4)
    loss, terms = objective(model, images, tokens)
    loss.backward()
    assert terms == {"contrastive": loss}
    assert torch.isfinite(loss) and model.logit_bias.grad is not None and model.logit_scale.grad is not None


@pytest.mark.parametrize("name", ["softmax", "CLIP"])
def test_an_objective_not_available_is_one_line(name):
    with pytest.raises(ConfigError, match=f"model.loss '{name}' is not available \\(choose clip, siglip or catlip\\)") as e:
        validate(small_config(f"model.loss={name}", "model.vision.encoder_seq_length=null"), 1, data=False)
    assert "\n" not in str(e.value)


def test_resuming_with_another_objective_fails_before_start_up(tmp_path):
    fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000005", "model.loss=siglip")
    with pytest.raises(ConfigError, match="resuming from .*/step_0000005: checkpoint architecture differs from the "
                                          "config: model.loss is siglip in the checkpoint, clip in the config"):
        config_from_argv([f"exp_manager.exp_dir={tmp_path}/run"])
    config_from_argv([f"exp_manager.exp_dir={tmp_path}/run", "model.loss=siglip"])


def test_sigmoid_loss_stays_fp32_under_autocast():
    x, y = (torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(s)), dim=-1)
            for s in (0, 1))
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sigmoid_loss(x, y, scale, bias)
    assert torch.equal(under_autocast, sigmoid_loss(x, y, scale, bias))  # the same fp32 kernels on the same inputs


def test_the_monitor_logs_the_terms(tmp_path, capsys):
    """loss_<name> in steps.jsonl for every term; on the progress line only when there is more than one
    (a single term is the loss itself)."""
    import json

    from megaclip.monitor import TrainingMonitor

    cfg = small_config("exp_manager.create_tensorboard_logger=false")
    monitor = TrainingMonitor(cfg, exp_dir=str(tmp_path), max_steps=2, global_batch_size=8, devices=1, log_every=1,
                              enabled=True)
    one = monitor.step(1, loss=1.5, lr=0.1, skipped=dict, terms={"contrastive": 1.5})
    two = monitor.step(2, loss=2.0, lr=0.1, skipped=dict, terms={"contrastive": 1.25, "itm": 0.75})
    assert "loss_" not in one and "loss 2.0000 loss_contrastive 1.2500 loss_itm 0.7500 lr" in two
    logged = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert logged[0]["loss_contrastive"] == 1.5 and (logged[1]["loss_contrastive"], logged[1]["loss_itm"]) == (1.25, 0.75)
