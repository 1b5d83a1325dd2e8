"""Structured configuration: dataclass schema -> omegaconf, YAML files, dotted overrides, aliases.

Keys follow the CLIP training guide (``model.vision.*``, ``model.text.*``, ``model.optim.*``,
``trainer.*``, ``exp_manager.*``). ``megaclip.config_checks.validate`` turns every bad combination into
one ``ConfigError`` line before any process group starts.
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
    # 1: "a red circle at the top left"; 2: "... and a blue square on the right", the val split each
    # scene beside its colours' swap (a test of binding; its zero-shot synthetic task must be null)
    synthetic_objects: int = 1


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
    from megaclip.config_checks import validate  # imports this module, for ConfigError

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
