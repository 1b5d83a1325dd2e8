"""The checks a config passes before any process group starts: ``validate`` turns every setting or
combination that cannot run at a world size into one ``ConfigError`` line.
"""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import OmegaConf

from megaclip.config import ConfigError


def validate(cfg: Any, world_size: int, data: bool = True) -> None:
    """Raise ConfigError (one line) for any configuration that cannot run at this world size;
    ``data=False`` leaves out the data settings (for runs on random batches)."""
    _validate_ranges(cfg)
    m = cfg.model
    tp = m.tensor_model_parallel_size
    if world_size % tp:
        raise ConfigError(f"world size {world_size} is not divisible by tensor_model_parallel_size {tp}")
    for name in ("vision", "text"):
        _validate_tower(name, m[name], tp)
    v = m.vision
    if v.img_h != v.img_w:
        raise ConfigError(f"model.vision image {v.img_h}x{v.img_w}: only square images are supported (img_h == img_w)")
    if v.img_h % v.patch_dim:
        raise ConfigError(f"model.vision image {v.img_h}x{v.img_w} is not divisible by patch_dim {v.patch_dim}")
    patches = (v.img_h // v.patch_dim) * (v.img_w // v.patch_dim)
    if v.encoder_seq_length not in (None, patches):
        raise ConfigError(f"model.vision.encoder_seq_length {v.encoder_seq_length} != {patches} patches of a {v.img_h}x{v.img_w} image (set it to null)")
    if tp > 1 and m.linear_impl == "torch":
        raise ConfigError("model.linear_impl=torch is single-device only; use auto or megatron with tp > 1")
    if m.linear_impl not in ("auto", "megatron", "torch"):
        raise ConfigError(f"model.linear_impl must be auto, megatron or torch, got '{m.linear_impl}'")
    if m.transformer_impl != "local" or m.fp8 != "none":
        from megaclip.model.te_linear import transformer_impl_problem  # imports torch: only when asked for

        problem = transformer_impl_problem(m.transformer_impl, m.fp8)
        if problem:
            raise ConfigError(problem)
    dp = world_size // tp
    if m.global_batch_size % dp:
        raise ConfigError(f"model.global_batch_size {m.global_batch_size} is not divisible by data-parallel size {dp} (world {world_size} / tp {tp})")
    rank_batch = m.global_batch_size // dp
    if m.micro_batch_size is not None and rank_batch % m.micro_batch_size:
        raise ConfigError(
            f"model.micro_batch_size {m.micro_batch_size} does not divide the per-rank batch {rank_batch} (global_batch_size "
            f"{m.global_batch_size} / data-parallel size {dp}): accumulation needs a whole number of micro-batches")
    if m.loss not in ("clip", "siglip", "catlip"):
        raise ConfigError(f"model.loss '{m.loss}' is not available (choose clip, siglip or catlip)")
    if m.loss == "catlip" and m.catlip.vocabulary is None and m.data.train_shards is not None:
        raise ConfigError("model.catlip.vocabulary is not set (tools/build_synset_vocab.py writes one from the train shards)")
    if m.loss == "catlip" and m.loss_block_size:
        raise ConfigError("model.loss_block_size tiles the contrastive losses (clip, siglip); catlip's has no "
                          "batch x batch logits to tile (set it to 0)")
    if m.fusion.num_layers:
        _validate_fusion(m, tp)
    _validate_synthetic_objects(m)
    if m.optim.name not in ("fused_adam", "distributed_fused_adam"):
        raise ConfigError(f"model.optim.name '{m.optim.name}' is not supported (choose fused_adam or distributed_fused_adam)")
    for key in ("max_steps", "log_every_n_steps", "val_check_interval", "max_consecutive_nonfinite", "sync_every_n_steps"):
        if cfg.trainer[key] < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {cfg.trainer[key]}")
    if cfg.exp_manager.checkpoint.every_n_minutes < 0:
        raise ConfigError(f"exp_manager.checkpoint.every_n_minutes must be >= 0 (0: off), got {cfg.exp_manager.checkpoint.every_n_minutes}")
    if cfg.trainer.collective_timeout_s <= 0:
        raise ConfigError(f"trainer.collective_timeout_s must be > 0 seconds, got {cfg.trainer.collective_timeout_s}")
    _validate_device(cfg.trainer.device)
    if cfg.trainer.compile:
        _validate_compile_backend(cfg.trainer.compile_backend)
    if cfg.trainer.precision not in ("32", "bf16"):
        raise ConfigError(f"trainer.precision must be 32 or bf16, got '{cfg.trainer.precision}'")
    if m.megatron_amp_O2 and cfg.trainer.precision != "bf16":
        raise ConfigError("model.megatron_amp_O2=True needs trainer.precision=bf16")
    if m.sequence_parallel:
        _validate_sequence_parallel(m, tp, patches)
    if data:
        from megaclip.preflight import validate_data

        validate_data(m, dp)
        from megaclip.data.prepare import synthetic_kind_problem

        problem = synthetic_kind_problem(m)
        if problem:
            raise ConfigError(problem)


def _validate_tower(name: str, t: Any, tp: int) -> None:
    key = f"model.{name}"
    if t.hidden_size % t.num_attention_heads:
        raise ConfigError(f"{key}.hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
    if t.num_attention_heads % tp:
        allowed = [d for d in range(1, t.num_attention_heads + 1) if t.num_attention_heads % d == 0]
        heads = _nearest_heads(t.hidden_size, t.num_attention_heads, tp)
        hint = f"; or use num_attention_heads={heads}, which tp {tp} can split" if heads else ""
        raise ConfigError(f"{key}.num_attention_heads {t.num_attention_heads} is not divisible by "
                          f"tensor_model_parallel_size {tp} (possible tp: {allowed}{hint})")
    if t.ffn_hidden_size % tp:
        raise ConfigError(f"{key}.ffn_hidden_size {t.ffn_hidden_size} is not divisible by tensor_model_parallel_size {tp}")
    if t.activations_checkpoint_granularity not in (None, "full"):
        raise ConfigError(f"{key}.activations_checkpoint_granularity must be null or full, got '{t.activations_checkpoint_granularity}'")
    if t.activations_checkpoint_granularity and t.activations_checkpoint_method not in ("uniform", "block"):
        raise ConfigError(f"{key}.activations_checkpoint_method must be uniform or block, got '{t.activations_checkpoint_method}'")
    if t.activation not in ("gelu", "quick_gelu"):
        raise ConfigError(f"{key}.activation must be gelu or quick_gelu, got '{t.activation}'")


def _validate_sequence_parallel(m: Any, tp: int, patches: int) -> None:
    if tp == 1:
        raise ConfigError("model.sequence_parallel=True needs tensor_model_parallel_size > 1")
    # The text tower pads its sequence to a multiple of tp (exact under causal attention); the vision
    # tower attends both ways, so its length must divide as it is.
    seq = m.vision.class_token_length + patches
    if seq % tp:
        fits = [c for c in range(1, 4 * tp + 1) if (c + patches) % tp == 0][0]
        raise ConfigError(f"model.sequence_parallel: vision sequence {m.vision.class_token_length} class token(s) + {patches} "
                          f"patches = {seq} is not divisible by tp {tp} (e.g. model.vision.class_token_length={fits})")
    if m.vision.drop_patch_rate:
        from megaclip.model.regularisers import kept_patch_count

        try:
            kept_patch_count(patches, m.vision.drop_patch_rate, m.vision.class_token_length, tp)
        except ValueError as e:
            raise ConfigError(f"model.vision.drop_patch_rate {m.vision.drop_patch_rate} {e}") from None


def _validate_fusion(m: Any, tp: int) -> None:
    if m.loss not in ("clip", "siglip"):
        raise ConfigError(f"model.fusion.num_layers needs a contrastive loss (clip or siglip), not model.loss={m.loss}")
    from megaclip.model.fusion import fusion_config  # the text tower's settings where the fusion keys are null

    fusion = fusion_config(m)
    if fusion.hidden_size % fusion.num_attention_heads:  # the fusion layers are as wide as the text tower
        raise ConfigError(f"model.fusion.num_attention_heads {fusion.num_attention_heads} does not divide the text "
                          f"width model.text.hidden_size {fusion.hidden_size}")
    _validate_tower("fusion", fusion, tp)
    if m.fusion.itm_weight and m.global_batch_size < 2:
        raise ConfigError("model.fusion.itm_weight > 0 draws each sample's negative from the others: global_batch_size must be >= 2")
    if m.sequence_parallel and not m.fusion.causal and m.text.encoder_seq_length % tp:
        raise ConfigError(f"model.sequence_parallel: the fusion layers attend both ways, so the text length "
                          f"{m.text.encoder_seq_length} must divide by tp {tp} (or set model.fusion.causal=true)")


def _validate_synthetic_objects(m: Any) -> None:
    d = m.data
    if d.synthetic_objects not in (1, 2):
        raise ConfigError(f"model.data.synthetic_objects must be 1 or 2, got {d.synthetic_objects}")
    if d.synthetic_objects == 1 or d.synthetic_dir is None:
        return
    if d.zeroshot.synthetic and d.val_shards is None:
        raise ConfigError(f"model.data.zeroshot.synthetic={d.zeroshot.synthetic} names the one object of an image; the "
                          "two-object synthetic set (model.data.synthetic_objects=2) has none: set it to null")
    from megaclip.data.synthetic import longest_caption_tokens  # the data's modules only where they are used

    longest = longest_caption_tokens(2)
    if d.train_shards is None and m.text.encoder_seq_length < longest:
        raise ConfigError(f"model.text.encoder_seq_length {m.text.encoder_seq_length} cuts the two-object synthetic "
                          f"captions (up to {longest} tokens): set it to {longest} or more")


def _nearest_heads(width: int, heads: int, tp: int) -> Optional[int]:
    """The head count closest to ``heads`` that divides ``width`` and that ``tp`` divides (for g/14's 22
    heads at tp 4 this is 16, open_clip's variant)."""
    candidates = [h for h in range(tp, width + 1, tp) if width % h == 0]
    return min(candidates, key=lambda h: (abs(h - heads), h)) if candidates else None


# The range of every numeric key (None, where a key allows it, is not checked): each bound is what the
# code that reads the key needs, e.g. a global batch of 0 never completes a step and hangs the run.
_TOWER_RANGES = [(key, ">=", 1) for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                           "encoder_seq_length", "activations_checkpoint_num_layers")] + [
    ("layernorm_epsilon", ">", 0), ("hidden_dropout", "in [0, 1)", None), ("attention_dropout", "in [0, 1)", None),
    ("drop_path_rate", "in [0, 1)", None)]
_RANGES = [(f"model.{tower}.{key}", op, bound) for tower in ("vision", "text") for key, op, bound in _TOWER_RANGES] + [
    ("model.vision.patch_dim", ">=", 1), ("model.vision.img_h", ">=", 1), ("model.vision.img_w", ">=", 1),
    ("model.vision.num_channels", ">=", 1), ("model.vision.class_token_length", ">=", 0),
    ("model.vision.drop_patch_rate", "in [0, 1)", None),
    ("model.text.vocab_size", ">=", 1), ("model.output_dim", ">=", 1), ("model.tensor_model_parallel_size", ">=", 1),
    ("model.global_batch_size", ">=", 1), ("model.micro_batch_size", ">=", 1), ("model.seed", "in [0, 2**32)", None),
    ("model.loss_block_size", ">=", 0),
    ("model.optim.lr", ">", 0), ("model.optim.weight_decay", ">=", 0), ("model.optim.eps", ">", 0),
    ("model.optim.grad_clip", ">=", 0), ("model.optim.bucket_size_mb", ">", 0), ("model.optim.sched.warmup_steps", ">=", 0), ("model.optim.sched.min_lr", ">=", 0),
    ("model.data.shuffle_buffer", ">=", 0), ("model.data.shuffle_window", ">=", 1), ("model.data.num_workers", ">=", 0),
    ("model.data.prefetch_factor", ">=", 1), ("model.data.eval_batch_size", ">=", 1),
    ("model.data.synthetic_train_samples", ">=", 1),
    ("model.fusion.num_layers", ">=", 0), ("model.fusion.num_attention_heads", ">=", 1),
    ("model.fusion.ffn_hidden_size", ">=", 1), ("model.fusion.itm_weight", ">=", 0), ("model.fusion.lm_weight", ">=", 0),
    ("model.fusion.rerank_k", ">=", 1),
    ("exp_manager.checkpoint.every_n_steps", ">=", 0), ("exp_manager.checkpoint.save_top_k", ">=", 1),
]
_WITHIN = {  # the ranges that are not a single bound
    "in [0, 1)": lambda x: 0 <= x < 1,
    "in [0, 2**32)": lambda x: 0 <= x < 2 ** 32,  # numpy's seed range
}


def _validate_ranges(cfg: Any) -> None:
    for key, op, bound in _RANGES:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        fits = _WITHIN[op](value) if bound is None else (value > bound if op == ">" else value >= bound)
        if not fits:
            raise ConfigError(f"{key} must be {op}{'' if bound is None else f' {bound}'}, got {value}")
    o = cfg.model.optim
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"model.optim.betas must be two values in [0, 1), got {list(o.betas)}")
    if o.sched.name != "cosine":
        raise ConfigError(f"model.optim.sched.name must be cosine (linear warmup, cosine decay), got '{o.sched.name}'")
    if o.sched.min_lr > o.lr:
        raise ConfigError(f"model.optim.sched.min_lr {o.sched.min_lr} is above model.optim.lr {o.lr}")
    v = cfg.model.vision
    if v.class_token_length == 0 and not v.global_average_pool:
        raise ConfigError("model.vision.class_token_length=0 needs model.vision.global_average_pool=true "
                          "(otherwise the first class token is the image feature)")


def _validate_compile_backend(backend: str) -> None:
    from torch._dynamo import list_backends  # only when compiling: the import takes seconds

    known = list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"trainer.compile_backend '{backend}' is not a torch.compile backend here; "
                          f"e.g. inductor (the default), aot_eager, eager")


def _validate_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"trainer.device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda":
        import torch  # cheap next to the run it saves; the data checks load it anyway

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but torch sees no GPU here "
                              f"(torch {torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''}); "
                              "use trainer.device=auto or cpu")
