"""Structured configuration: dataclass schema -> omegaconf, YAML files, dotted overrides, aliases.

Keys follow the CLIP training guide (``model.vision.*``, ``model.text.*``, ``model.optim.*``,
``trainer.*``, ``exp_manager.*``). ``validate`` turns every bad combination into one ``ConfigError``
line before any process group starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: found by any install (top-level configs/ links here)
DEFAULT_CONFIG = "clip_tiny"

# Short command-line names for the keys people change most often.
ALIASES = {
    "tp": "model.tensor_model_parallel_size",
    "gbs": "model.global_batch_size",
    "mbs": "model.micro_batch_size",
    "lr": "model.optim.lr",
    "steps": "trainer.max_steps",
    "precision": "trainer.precision",
    "seed": "model.seed",
}


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message is one line."""


@dataclass
class TowerConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    encoder_seq_length: int = 16
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu | quick_gelu (OpenAI weights)
    activations_checkpoint_granularity: Optional[str] = None  # null | full
    activations_checkpoint_method: Optional[str] = None  # uniform (chunks of k layers) | block (first k layers)
    activations_checkpoint_num_layers: int = 1
    drop_path_rate: float = 0.0  # stochastic depth (train only): the last layer's rate, rising from 0 at the first
    use_flash_attention: bool = False  # flash-attn's kernel when installed, on CUDA, in bf16/fp16; else SDPA (said once)


@dataclass
class VisionConfig(TowerConfig):
    encoder_seq_length: Optional[int] = None  # number of patches; derived from the image when null
    patch_dim: int = 8
    img_h: int = 32
    img_w: int = 32
    num_channels: int = 3
    class_token_length: int = 1
    global_average_pool: bool = False
    drop_patch_rate: float = 0.0  # patch dropout (train only): share of each image's patches left out
    image_mean: Optional[List[float]] = None
    image_std: Optional[List[float]] = None


@dataclass
class TokenizerConfig:
    library: str = "sentencepiece"
    model: Optional[str] = None  # None: the tokenizer written next to the synthetic shards


@dataclass
class TextConfig(TowerConfig):
    vocab_size: int = 64
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class OptimConfig:
    name: str = "fused_adam"
    lr: float = 1e-3
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    # gradients are reduced over DP in buckets of at most this many MB of fp32 gradient, each started
    # as soon as backward has produced it (overlap_grad_sync) or all after backward
    bucket_size_mb: float = 40.0
    overlap_grad_sync: bool = True
    # distributed_fused_adam: each bucket's all-gather after the update is waited for only before the
    # first forward that uses its weights, instead of at the end of the step
    overlap_param_sync: bool = False
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class ZeroShotConfig:
    synthetic: Optional[str] = "colour"  # colour | shape | null: zero-shot classes on the synthetic val split
    folder: Optional[str] = None  # image folder, one subfolder per class (sorted order = class index)
    shards: Any = None  # webdataset split whose samples carry a class label in label_key
    label_key: str = "cls"
    classes: Optional[str] = None  # class names file: one per line, or index<TAB>name
    templates: Optional[str] = None  # null: OpenAI's ImageNet templates shipped with megaclip
    # also a logistic regression on the labelled images' features: fitted on half, scored on the rest
    linear_probe: bool = True


@dataclass
class DataConfig:
    synthetic_dir: Optional[str] = "data/synthetic"  # generated on first use when absent
    # a brace pattern, a directory of .tar files, a list of those, or a list of {shards, weight} sources
    # (weights need resampled); None: the synthetic split
    train_shards: Any = None
    val_shards: Any = None
    resampled: bool = False  # draw shards with replacement per (seed, dp rank, worker, epoch) instead of epochs
    shuffle_buffer: int = 1000  # samples
    shuffle_window: int = 4  # shards per shuffle window; a resume re-reads at most one window per worker
    num_workers: int = 0
    prefetch_factor: int = 2
    image_keys: List[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    caption_key: str = "txt"  # txt (a caption per line) | json:FIELD (a string or a list of strings)
    eval_batch_size: int = 256
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    synthetic_train_samples: int = 16384


@dataclass
class SigLipConfig:
    init_logit_scale: float = 2.302585092994046  # ln 10: the temperature t = exp(t') starts at 10
    init_logit_bias: float = -10.0


@dataclass
class CatLipConfig:
    # TSV from tools/build_synset_vocab.py; None: counted from the synthetic set's train captions
    vocabulary: Optional[str] = None


@dataclass
class FusionConfig:
    """Multimodal fusion layers after the text tower (megaclip.model.fusion), trained with image-text
    matching and captioning, used to re-rank retrieval. Widths are the text tower's."""
    num_layers: int = 0  # 0: no fusion layers
    num_attention_heads: Optional[int] = None  # None: the text tower's
    ffn_hidden_size: Optional[int] = None  # None: the text tower's
    causal: bool = False  # the fusion self-attention sees the whole caption unless set
    itm_weight: float = 1.0  # image-text matching on hard negatives
    lm_weight: float = 1.0  # causal captioning through the fusion layers; 0: off
    rerank_k: int = 16  # evaluation re-ranks each query's contrastive top-k by match probability


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    output_dim: int = 64
    tensor_model_parallel_size: int = 1
    micro_batch_size: Optional[int] = None  # None: global_batch_size / data-parallel size; less: accumulation
    global_batch_size: int = 64
    loss_block_size: int = 0  # clip, siglip: rows and columns of the logits per block of the tiled loss; 0: untiled
    loss: str = "clip"  # clip | siglip | catlip (megaclip.objectives)
    local_loss: bool = False  # clip only
    gather_with_grad: bool = True  # clip only
    siglip: SigLipConfig = field(default_factory=SigLipConfig)
    catlip: CatLipConfig = field(default_factory=CatLipConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    seed: int = 1234
    init_from: Optional[str] = None  # checkpoint (any TP) whose weights start a new run, e.g. a converted one
    linear_impl: str = "auto"  # auto | megatron | torch (plain nn.Linear, TP=1 only)
    transformer_impl: str = "local"  # local (linear_impl's linears) | te (transformer-engine's Linear; CUDA)
    fp8: str = "none"  # none | hybrid | e4m3: FP8 GEMMs by a transformer-engine recipe (transformer_impl=te)
    megatron_amp_O2: bool = False  # with trainer.precision=bf16: bf16 weights, fp32 master weights in the optimizer
    sequence_parallel: bool = False  # needs tp > 1: activations outside the TP linears split along the sequence
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    log_every_n_steps: int = 10
    val_check_interval: int = 50
    precision: str = "32"  # 32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each transformer layer (names, and so checkpoints, unchanged)
    compile_backend: str = "inductor"
    collective_timeout_s: float = 600.0  # longest wait for a peer rank in a collective before the run ends (exit 4)
    max_consecutive_nonfinite: int = 5  # non-finite steps in a row (each skips its update) before the run stops
    # the host reads the device (non-finite counts, stop signals, the save clock) every this many steps,
    # and on log and checkpoint steps: a stop signal or a due save waits for the next such step
    sync_every_n_steps: int = 5


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: only at the end of the run (and on a stop signal)
    every_n_minutes: float = 0  # also save when this much wall-clock time has passed since the last save; 0: off
    save_top_k: int = 2  # complete checkpoints kept (the newest)


@dataclass
class ExpManagerConfig:
    exp_dir: str = "runs/clip"
    resume_if_exists: bool = True  # continue from exp_dir/checkpoints/latest
    create_tensorboard_logger: bool = True  # scalars under exp_dir/tensorboard
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)


def load_config(config_name: str = DEFAULT_CONFIG, overrides: List[str] = ()) -> DictConfig:
    """Schema <- megaclip/configs/<config_name>.yaml <- ``key=value`` overrides; unknown keys are errors."""
    path = Path(config_name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{config_name}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    dotlist = [_expand_alias(o) for o in overrides]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path), OmegaConf.from_dotlist(dotlist))
        OmegaConf.resolve(cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(_one_line(e)) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_from_argv(argv: List[str]) -> DictConfig:
    """``[--config-name NAME] key=value ...`` -> validated config (ConfigError on any problem)."""
    argv = list(argv)
    name = DEFAULT_CONFIG
    for flag in ("--config-name", "-c"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a config name")
            name = argv[i + 1]
            del argv[i:i + 2]
    cfg = load_config(name, argv)
    validate(cfg, world_size_from_env())
    from megaclip.preflight import validate_run

    validate_run(cfg)
    return cfg


def _expand_alias(override: str) -> str:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value")
    key, value = override.split("=", 1)
    return f"{ALIASES.get(key, key)}={value}"


def _one_line(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{first} (key: {key})" if key and key not in first else first


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(cfg: Any, world_size: int) -> int:
    return world_size // cfg.model.tensor_model_parallel_size


def micro_batch_size(cfg: Any, world_size: int) -> int:
    return cfg.model.micro_batch_size or cfg.model.global_batch_size // data_parallel_size(cfg, world_size)


def micro_batches(cfg: Any, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank (gradient accumulation when more than one)."""
    return cfg.model.global_batch_size // data_parallel_size(cfg, world_size) // micro_batch_size(cfg, world_size)


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
    if cfg.trainer.precision not in ("32", "bf16"):
        raise ConfigError(f"trainer.precision must be 32 or bf16, got '{cfg.trainer.precision}'")
    if m.megatron_amp_O2 and cfg.trainer.precision != "bf16":
        raise ConfigError("model.megatron_amp_O2=True needs trainer.precision=bf16")
    if m.sequence_parallel:
        _validate_sequence_parallel(m, tp, patches)
    if data:
        from megaclip.preflight import validate_data

        validate_data(m, dp)


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


def _validate_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"trainer.device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda":
        import torch  # cheap next to the run it saves; the data checks load it anyway

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but torch sees no GPU here "
                              f"(torch {torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''}); "
                              "use trainer.device=auto or cpu")
