"""The training loop: build everything from the config, step, log, evaluate, checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional


from megaclip import accumulation, distributed, errors, precision, run_lock, zeroshot
from megaclip.checkpoint import CheckpointError
from megaclip.checkpoint.model import init_model_from
from megaclip.checkpoint import training as checkpointing
from megaclip.config import ConfigError, micro_batches
from megaclip.data import prepare
from megaclip.data.eval_loader import build_eval_loader
from megaclip.data.loader import build_train_loader, skipped_across_ranks
from megaclip.data.samples import DataError
from megaclip.data.synset_vocab import SynsetVocabulary, run_vocabulary
from megaclip.data.tokenizer import build_tokenizer
from megaclip.data.transforms import transforms_from_config
from megaclip.evaluate import evaluate_retrieval
from megaclip.guard import NonFiniteError, StepGuard, install_stop_handlers, stop_signal_received
from megaclip.model import CLIPModel
from megaclip.monitor import TrainingMonitor
from megaclip.objectives import build_objective
from megaclip.optim import build_optimizer, cosine_schedule


@dataclass
class TrainResult:
    step: int = 0
    losses: List[float] = field(default_factory=list)
    evals: Dict[int, Dict[str, float]] = field(default_factory=dict)


@dataclass
class Data:
    train: object  # megaclip.data.loader.TrainLoader
    val: Callable  # a fresh pass over the held-out split
    tokenizer: object
    eval_transform: Callable
    synthetic_zeroshot: Optional[zeroshot.CaptionTask]
    vocabulary: Optional[SynsetVocabulary]  # CatLIP's classes


def build_data(cfg, world_size: int) -> Data:
    m = cfg.model
    prepare.ensure_synthetic(m)
    sources = prepare.resolve(m)
    tokenizer = build_tokenizer(m.text.tokenizer.library, sources.tokenizer_model, m.text.encoder_seq_length)
    if tokenizer.vocab_size > m.text.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is {m.text.vocab_size}")
    train_tf, eval_tf = transforms_from_config(m.vision)
    dp_rank, dp_size = distributed.dp_rank(), distributed.dp_size()
    vocabulary = run_vocabulary(m, sources.train_shards) if m.loss == "catlip" else None
    train = build_train_loader(sources.train_shards, m.data, dp_rank=dp_rank, dp_size=dp_size,
                               # the rank's whole batch: accumulation.step splits it into micro-batches
                               micro_batch_size=m.global_batch_size // dp_size, image_transform=train_tf,
                               tokenizer=vocabulary.multi_hot if vocabulary else tokenizer, seed=m.seed)

    def val():
        return build_eval_loader(sources.val_shards, m.data, dp_rank=dp_rank, dp_size=dp_size,
                                 batch_size=m.data.eval_batch_size, image_transform=eval_tf, tokenizer=tokenizer)

    uses_synthetic_val = m.data.val_shards is None and m.data.zeroshot.synthetic
    task = zeroshot.synthetic_task(m.data.zeroshot.synthetic) if uses_synthetic_val else None
    z = m.data.zeroshot
    if vocabulary and (z.folder or z.shards) and distributed.is_main():
        zeroshot.warn_unmapped_classes(vocabulary, zeroshot.read_class_names(z.classes))
    return Data(train, val, tokenizer, eval_tf, task, vocabulary)


def evaluate(model, data: Data, cfg, device, autocast) -> Dict[str, float]:
    """Retrieval on the val split, and on the labelled splits configured zero-shot classification and
    the linear probe; every DP rank evaluates its share. CatLIP has no text tower to retrieve with; it
    classifies straight from its head."""
    distributed.doing("evaluation")
    dp_group, z = distributed.dp_group(), cfg.model.data.zeroshot
    rerank_k = cfg.model.fusion.rerank_k if cfg.model.fusion.num_layers else 0  # re-ranked by the fusion layers
    metrics = {} if data.vocabulary else evaluate_retrieval(model, data.val(), device, autocast, dp_group, rerank_k)
    tasks = []
    if data.synthetic_zeroshot:
        task = data.synthetic_zeroshot
        tasks.append((f"synthetic_{z.synthetic}", task.classnames, task.templates, task.batches(data.val())))
    if z.folder or z.shards:
        batches = zeroshot.labelled_batches(folder=z.folder, shards=z.shards, data_cfg=cfg.model.data,
                                            image_transform=data.eval_transform, tokenizer=data.tokenizer,
                                            batch_size=cfg.model.data.eval_batch_size, label_key=z.label_key,
                                            dp_rank=distributed.dp_rank(), dp_size=distributed.dp_size())
        tasks.append(("classes", zeroshot.read_class_names(z.classes),
                      zeroshot.read_templates(z.templates or zeroshot.OPENAI_TEMPLATES), batches))
    for name, classes, templates, batches in tasks:
        if data.vocabulary:
            results = zeroshot.evaluate_head_zeroshot(model, data.vocabulary, classes, batches, device, autocast,
                                                      dp_group, probe=z.linear_probe)
        else:
            classifier = zeroshot.zeroshot_classifier(model, classes, templates, data.tokenizer, device, autocast, dp_group)
            results = zeroshot.evaluate_zeroshot(model, classifier, batches, device, autocast, dp_group, probe=z.linear_probe)
        metrics.update({f"zeroshot_{name}_{k}": results[k] for k in ("top1", "top5")})
        if z.linear_probe:
            metrics[f"probe_{name}_top1"] = results["probe_top1"]
    return metrics


def train(cfg, world_size: int) -> TrainResult:
    m, t = cfg.model, cfg.trainer
    install_stop_handlers()  # first: a preemption during start-up is honoured at the first step
    device = distributed.init(m.tensor_model_parallel_size, t.device, t.collective_timeout_s)
    run_lock.hold_for_run(cfg.exp_manager.exp_dir)  # before anything is written there
    distributed.seed_everything(m.seed)
    data = build_data(cfg, world_size)
    model = CLIPModel(m, len(data.vocabulary) if data.vocabulary else None)
    checkpoints = Path(cfg.exp_manager.exp_dir) / "checkpoints"
    resuming = cfg.exp_manager.resume_if_exists and checkpointing.latest(checkpoints) is not None
    if m.init_from and not resuming:  # before the optimizer copies the weights into its master weights
        init_model_from(model, m.init_from, m, distributed.tp_size(), distributed.tp_rank())
    model = precision.prepare_model(model, cfg).to(device)
    if t.compile:
        for tower in filter(None, (model.visual, model.text)):
            tower.transformer.compile_layers(t.compile_backend)
    optimizer = build_optimizer(model, m, distributed.dp_group(), distributed.tp_group())
    scheduler = cosine_schedule(optimizer, m.optim, t.max_steps)
    objective = build_objective(m, distributed.dp_group())
    autocast = precision.autocast(cfg, device)

    state = dict(model=model, optimizer=optimizer, loader=data.train)
    resumed = checkpointing.resume(checkpoints, cfg=cfg, scheduler=scheduler, **state) if resuming else None
    first_step = resumed["step"] + 1 if resumed else 1
    monitor = TrainingMonitor(cfg, exp_dir=cfg.exp_manager.exp_dir, max_steps=t.max_steps,
                              global_batch_size=m.global_batch_size, devices=world_size,
                              log_every=t.log_every_n_steps, start_step=first_step - 1)
    monitor.print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params per rank, "
                  f"tp={distributed.tp_size()} dp={distributed.dp_size()}, global batch {m.global_batch_size}, device {device}")
    if resumed:
        monitor.print(f"resumed from {checkpoints / checkpointing.step_dir_name(resumed['step'])}")
    elif m.init_from:
        monitor.print(f"weights from {m.init_from}")

    guard = StepGuard(max_consecutive_nonfinite=t.max_consecutive_nonfinite,
                      every_n_minutes=cfg.exp_manager.checkpoint.every_n_minutes, device=device)
    result, batches = TrainResult(), monitor.timed(iter(data.train))
    for step in range(first_step, t.max_steps + 1):
        distributed.doing("training", step)
        images, tokens = next(batches)
        with autocast:
            loss, terms = accumulation.step(objective, model, images, tokens, micro_batches(cfg, world_size), device,
                                            optimizer)
        every = cfg.exp_manager.checkpoint.every_n_steps
        saving = (every and step % every == 0) or step == t.max_steps
        # the host reads the device only every few steps, on log and on checkpoint steps (a stop waits)
        read = saving or step % t.log_every_n_steps == 0 or step % t.sync_every_n_steps == 0
        verdict = guard.check(step, loss, optimizer.finish_gradients(m.optim.grad_clip), read=read)
        optimizer.step(skip=verdict.skip)  # a non-finite step keeps the weights; the schedule and data move on
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        result.step = step
        monitor.step(step, loss=loss, lr=scheduler.get_last_lr()[0], nonfinite=verdict.nonfinite_steps, terms=terms,
                     skipped=lambda: skipped_across_ranks(data.train, device, distributed.dp_group()))
        if step % t.val_check_interval == 0 and step != t.max_steps:
            result.evals[step] = evaluate(model, data, cfg, device, autocast)
            monitor.evaluation(step, result.evals[step])
        if saving or verdict.save_due or verdict.stop:
            optimizer.wait_for_params()  # the weights' all-gathers, when they overlap the next forward
            checkpointing.save(checkpoints, step, cfg=cfg, consumed_samples=step * m.global_batch_size,
                               keep=cfg.exp_manager.checkpoint.save_top_k, loss=loss.item(), **state)
            guard.saved()
        if verdict.stop:
            monitor.print(f"preempted at step {step}: checkpoint saved, exiting")
            monitor.close()
            result.losses = list(monitor.losses.values())
            return result

    result.step = max(result.step, first_step - 1)
    final = result.evals[result.step] = evaluate(model, data, cfg, device, autocast)
    monitor.evaluation(result.step, final)
    skipped = skipped_across_ranks(data.train, device, distributed.dp_group())
    monitor.print(f"skipped input: {sum(skipped.values())} ({', '.join(f'{k} {v}' for k, v in skipped.items()) or 'none'})")
    monitor.close()
    result.losses = list(monitor.losses.values())
    last_loss = result.losses[-1] if result.losses else resumed["loss"]  # a finished run, resumed
    # CatLIP retrieves nothing: its zero-shot accuracy instead
    shown = [k for k in ("i2t_R@1", "t2i_R@1", "chance_R@1", "rerank_i2t_R@1", "rerank_t2i_R@1") if k in final] or [
        k for k in final if k.endswith("_top1")]
    monitor.print(f"final: step={result.step} loss={last_loss:.4f}" + "".join(f" {k}={final[k]:.4f}" for k in shown))
    return result


def main(cfg, world_size: int) -> int:
    """Train; an error the run understands ends this process with one line and README's exit code
    (errors.exit_with_error), anything else with its traceback."""
    try:
        train(cfg, world_size)
    except (ConfigError, CheckpointError, DataError) as e:
        fail(errors.one_line(e), errors.BAD_INPUT)
    except NonFiniteError as e:
        fail(errors.one_line(e), errors.NON_FINITE)
    except RuntimeError as e:
        failure = distributed.peer_failure(e)  # a collective timed out or lost its peer: one line
        if failure is None:
            raise
        # a lost connection is the echo of a peer's exit, whose own line says why
        fail(failure, errors.COLLECTIVE_FAILED, consequence="lost the connection" in failure)
    distributed.shutdown()
    return 0


def fail(message: str, code: int, consequence: bool = False):
    """errors.exit_with_error, told whether a stop signal (torchrun ending the job) came first."""
    errors.exit_with_error(message, code, consequence=consequence, stop_received=stop_signal_received() is not None)
