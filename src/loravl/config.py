"""Typed run configuration: one source of defaults, YAML files, command-line overrides.

Every component takes its own sub-config (``VisionConfig`` for the encoder, ``LossConfig`` for the losses, ...).
``load_config(path, overrides)`` builds a ``RunConfig`` and fails at start, naming the field, on an unknown key,
a wrong type or an impossible value (the generic reading of YAML and arguments is ``loravl.config_parsing``).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Union

import yaml

from .config_parsing import ConfigError, describe_options, from_dict, merge, upgrade_keys
from .config_parsing import parse_overrides as parse_overrides_for


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.1
    # Users write either transformers' old names (query/value) or the new ones (q_proj/v_proj); resolved against
    # the model in hand by loravl.lora.resolve_target_modules.
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    # lora | lora_fa (A frozen at its random init, only B trains)
    variant: str = "lora"
    # FastViT backbones only: LoRA goes on every dense (groups == 1) Conv2d of these stages, and target_modules
    # is not used. See docs/lora_variants.md.
    stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])

    def validate(self, prefix: str) -> None:
        _check(self.rank > 0, prefix, "rank", "must be > 0")
        _check(self.alpha > 0, prefix, "alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, prefix, "dropout", "must be in [0, 1)")
        _check(len(self.target_modules) > 0, prefix, "target_modules", "must name at least one module")
        _check(self.variant in ("lora", "lora_fa"), prefix, "variant", "must be 'lora' or 'lora_fa'")
        _check(len(self.stages) > 0 and len(set(self.stages)) == len(self.stages)
               and all(0 <= s <= 3 for s in self.stages), prefix, "stages",
               "must list distinct FastViT stage indices in 0..3")


@dataclass
class VisionConfig:
    # dinov2 (any Dinov2Model / Dinov2WithRegistersModel checkpoint) or a timm FastViT name such as fastvit_t8
    backbone: str = "dinov2"
    # Hub name on a user's machine or a local folder written by save_pretrained.
    pretrained: str = "facebook/dinov2-base"
    # Build from the checkpoint's config with random weights instead of loading them (benchmarks, offline runs).
    random_init: bool = False
    image_size: int = 224
    attn_implementation: str = "sdpa"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, prefix: str) -> None:
        _check(self.backbone == "dinov2" or self.backbone.startswith("fastvit_"), prefix, "backbone",
               "must be 'dinov2' or a timm FastViT name such as fastvit_t8")
        _check(self.image_size > 0, prefix, "image_size", "must be > 0")
        _check(bool(self.pretrained), prefix, "pretrained", "must name a model")
        _check(self.attn_implementation in ("sdpa", "eager"), prefix, "attn_implementation",
               "must be 'sdpa' or 'eager'")
        self.lora.validate(f"{prefix}.lora")


@dataclass
class CompressorConfig:
    hidden_dim: int = 384
    # vision_embed_dim: the width of every image token after compression
    embed_dim: int = 128
    dropout: float = 0.1

    def validate(self, prefix: str) -> None:
        _check(self.hidden_dim > 0, prefix, "hidden_dim", "must be > 0")
        _check(self.embed_dim > 0, prefix, "embed_dim", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, prefix, "dropout", "must be in [0, 1)")


@dataclass
class TextConfig:
    # A local tokenizer folder (HF format). None: train a byte-level BPE on the training captions and save it
    # with the checkpoints.
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    max_length: int = 40
    # 5 layers x 512 wide with cross-attention and an 8,192 BPE vocabulary: ~25M parameters
    num_layers: int = 5
    hidden_size: int = 512
    num_heads: int = 8
    dropout: float = 0.1

    def validate(self, prefix: str) -> None:
        _check(self.vocab_size >= 300, prefix, "vocab_size", "must be >= 300 (byte-level BPE needs 256 + specials)")
        _check(self.max_length >= 4, prefix, "max_length", "must be >= 4")
        _check(self.num_layers > 0, prefix, "num_layers", "must be > 0")
        _check(self.hidden_size > 0 and self.num_heads > 0 and self.hidden_size % self.num_heads == 0, prefix,
               "hidden_size", "must be a positive multiple of num_heads")
        _check(0.0 <= self.dropout < 1.0, prefix, "dropout", "must be in [0, 1)")


@dataclass
class FusionConfig:
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def validate(self, prefix: str) -> None:
        _check(self.num_layers >= 0, prefix, "num_layers", "must be >= 0")
        _check(self.num_heads > 0, prefix, "num_heads", "must be > 0")
        _check(self.mlp_ratio > 0, prefix, "mlp_ratio", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, prefix, "dropout", "must be in [0, 1)")


@dataclass
class MemoryConfig:
    """Larimar's generative pseudo-inverse memory (loravl.memory)."""

    enabled: bool = False
    # K slots of `dim` numbers each; an episode writes `episode_size` image-caption pairs.
    slots: int = 32
    dim: int = 128
    episode_size: int = 16
    # Standard deviation of the write noise (training only) and of the observation noise of sequential writes
    # and forgets.
    noise: float = 0.05
    # Weight of the KL term of the read weights against N(0, I).
    kl_weight: float = 0.1
    # true: training reads sample their weights with a learned variance (Larimar's generative read); false: the
    # weights' mean, as at inference (Larimar's deterministic_w). Sampled, the noise drowned the recall a demo
    # model learned (BENCHMARKS.md, memory rows).
    read_noise: bool = False
    # Ben-Israel-Cohen iterations per pseudo-inverse.
    pinv_steps: int = 15
    # In training, the share of an episode's pairs written with another image's caption: captions the pixels
    # cannot give, which the captioner can only recall from memory (BENCHMARKS.md, memory rows, chose it).
    swap_fraction: float = 0.75

    def validate(self, prefix: str) -> None:
        _check(self.slots > 0, prefix, "slots", "must be > 0")
        _check(self.dim > 0, prefix, "dim", "must be > 0")
        _check(self.episode_size > 0, prefix, "episode_size", "must be > 0")
        _check(self.noise > 0, prefix, "noise", "must be > 0")
        _check(self.kl_weight >= 0, prefix, "kl_weight", "must be >= 0")
        _check(self.pinv_steps > 0, prefix, "pinv_steps", "must be > 0")
        _check(0.0 <= self.swap_fraction <= 1.0, prefix, "swap_fraction", "must be in [0, 1]")


@dataclass
class LossConfig:
    # Width of the ITC embedding space both modalities are projected into.
    embed_dim: int = 256
    # The ITC image embedding: the compressed CLS token (cls), the mean of all compressed tokens (mean, as
    # open_clip's 'avg' pool), or attention pooling from a learned probe (attention, SigLIP's MAP head, with
    # image_pooling_heads heads); see loravl.pooling.
    image_pooling: str = "cls"
    image_pooling_heads: int = 4
    temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    queue_size: int = 4096
    momentum: float = 0.995
    # Momentum image features from an EMA copy of the encoder's LoRA weights (ALBEF's momentum encoder): in phase 2
    # a second encoder forward each step. Off: from the online encoder's output (identical in phase 1, where LoRA
    # is frozen). BENCHMARKS.md has what it costs and changes.
    momentum_encoder: bool = False
    # ALBEF's momentum distillation: the ITC target mixes alpha of the momentum model's similarities. Alpha ramps
    # from 0 over distill_alpha_ramp_steps optimizer steps (None: the first epoch, as ALBEF; 0: no ramp), while
    # the momentum model is as untrained as the online one.
    distill_alpha: float = 0.4
    distill_alpha_ramp_steps: Optional[int] = None
    # batch: hard negatives from the global batch; queue: from the ITC queue (which then keeps tokens and ids)
    itm_negatives: str = "batch"
    # A caption word for word the same as this pair's (another image's, in the batch or the queue) is a positive
    # in the ITC targets and never an ITM negative; false: only the pair's own image id counts (ALBEF).
    same_caption_positive: bool = True
    label_smoothing: float = 0.1
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0
    # Next-token loss of the text model read without the image (its unimodal pass, already run for ITC): trains
    # the language model that scores text alone (BabyLM's text tasks, the exported causal LM). 0: off.
    text_lm_weight: float = 0.0

    def validate(self, prefix: str) -> None:
        _check(self.embed_dim > 0, prefix, "embed_dim", "must be > 0")
        _check(self.image_pooling in ("cls", "mean", "attention"), prefix, "image_pooling",
               "must be 'cls', 'mean' or 'attention'")
        _check(self.image_pooling_heads > 0, prefix, "image_pooling_heads", "must be > 0")
        _check(0 < self.min_temperature <= self.temperature <= self.max_temperature, prefix, "temperature",
               "must lie in [min_temperature, max_temperature] and be > 0")
        _check(self.queue_size >= 0, prefix, "queue_size", "must be >= 0")
        _check(0.0 <= self.momentum < 1.0, prefix, "momentum", "must be in [0, 1)")
        _check(0.0 <= self.distill_alpha <= 1.0, prefix, "distill_alpha", "must be in [0, 1]")
        _check(self.distill_alpha_ramp_steps is None or self.distill_alpha_ramp_steps >= 0, prefix,
               "distill_alpha_ramp_steps", "must be >= 0")
        _check(self.itm_negatives in ("batch", "queue"), prefix, "itm_negatives", "must be 'batch' or 'queue'")
        _check(self.itm_negatives != "queue" or self.queue_size > 0, prefix, "itm_negatives",
               "'queue' needs queue_size > 0")
        _check(0.0 <= self.label_smoothing < 1.0, prefix, "label_smoothing", "must be in [0, 1)")
        for name in ("itc_weight", "itm_weight", "lm_weight", "text_lm_weight"):
            _check(getattr(self, name) >= 0, prefix, name, "must be >= 0")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self, prefix: str) -> None:
        for name in ("vision", "compressor", "text", "fusion", "loss", "memory"):
            getattr(self, name).validate(f"{prefix}.{name}")
        if self.loss.image_pooling == "attention":
            _check(self.compressor.embed_dim % self.loss.image_pooling_heads == 0, f"{prefix}.loss",
                   "image_pooling_heads", f"must divide the image token width (compressor.embed_dim = "
                   f"{self.compressor.embed_dim})")


@dataclass
class DataConfig:
    # demo | coco | karpathy | jsonl | csv | hf | webdataset
    format: str = "demo"
    # Training data: the annotation file (coco, karpathy), manifest (jsonl, csv), dataset folder or name (hf),
    # shard pattern (webdataset, e.g. shards/{00000..00099}.tar) or the demo folder.
    train_path: str = "data/demo"
    # Validation data in the same format; empty: no validation.
    val_path: str = ""
    # Folder that image paths in coco/karpathy annotations are relative to (default: next to the annotation file).
    image_root: str = ""
    image_column: str = "image"
    text_column: str = "caption"
    hf_split: str = "train"
    streaming: bool = False
    # Streaming: each shard is read in windows of this many undecoded samples, shuffled per epoch (train).
    stream_shuffle_window: int = 256
    # Loader worker processes per training process; "auto": the cores this process may use, shared by the
    # processes on the host (torchrun's LOCAL_WORLD_SIZE), less one for the training process itself. A resumed
    # run restores each worker's place, so it needs the same count: auto gives it on the same kind of host.
    num_workers: Union[int, str] = 4
    prefetch_factor: int = 4
    # Decompression-bomb guard, in pixels.
    max_image_pixels: int = 89_478_485
    min_image_size: int = 2
    # Stop when more than this fraction of an epoch's samples fail to decode.
    max_skip_fraction: float = 0.5
    # Train-time RandomResizedCrop keeps at least this fraction of the image area (1.0: no crop, the whole image).
    crop_scale_min: float = 0.5
    # Horizontal flips swap "left of"/"right of" in captions, so they are off unless asked for.
    hflip: bool = False
    # Demo data generator
    demo_train_size: int = 2000
    demo_val_size: int = 200
    demo_image_size: int = 64
    demo_seed: int = 0
    # Paraphrases written per demo scene (1-5, as COCO has five): several captions of one image in training,
    # evaluation and retrieval.
    demo_captions_per_image: int = 1

    def validate(self, prefix: str) -> None:
        formats = ("demo", "coco", "karpathy", "jsonl", "csv", "hf", "webdataset")
        _check(self.format in formats, prefix, "format", f"must be one of {', '.join(formats)}")
        _check(bool(self.train_path), prefix, "train_path", "must name the training data")
        _check(self.num_workers == "auto" or isinstance(self.num_workers, int) and self.num_workers >= 0, prefix,
               "num_workers", f"must be an integer >= 0 or auto, got {self.num_workers!r}")
        _check(self.prefetch_factor > 0, prefix, "prefetch_factor", "must be > 0")
        _check(0.0 < self.max_skip_fraction <= 1.0, prefix, "max_skip_fraction", "must be in (0, 1]")
        _check(self.max_image_pixels > 0, prefix, "max_image_pixels", "must be > 0")
        _check(self.stream_shuffle_window >= 1, prefix, "stream_shuffle_window", "must be >= 1")
        _check(self.min_image_size >= 1, prefix, "min_image_size", "must be >= 1")
        _check(0.0 < self.crop_scale_min <= 1.0, prefix, "crop_scale_min", "must be in (0, 1]")
        _check(self.demo_train_size > 0 and self.demo_val_size >= 0, prefix, "demo_train_size",
               "must be > 0 (and demo_val_size >= 0)")
        _check(self.demo_image_size >= 16, prefix, "demo_image_size", "must be >= 16")
        _check(1 <= self.demo_captions_per_image <= 5, prefix, "demo_captions_per_image", "must be in 1..5")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileConfig:
    enabled: bool = False
    # torch.compile mode. reduce-overhead replays CUDA graphs: one launch per graph instead of one per kernel,
    # which matters when the host cannot keep the GPU busy.
    mode: str = "default"
    # What is compiled: forward (the whole training forward, losses and queue included, as one graph) or modules
    # (each heavy submodule alone, the rest eager; smaller graphs). BENCHMARKS.md compares them.
    scope: str = "forward"
    # Under DDP, split the compiled graph at DDP's gradient buckets (dynamo's optimize_ddp), so that a bucket's
    # all-reduce starts while the rest of the backward runs; false compiles one graph.
    ddp_split_graph: bool = True

    def validate(self, prefix: str) -> None:
        _check(self.mode in COMPILE_MODES, prefix, "mode", f"must be one of {', '.join(COMPILE_MODES)}")
        _check(self.scope in ("forward", "modules"), prefix, "scope", "must be 'forward' or 'modules'")

    @property
    def cuda_graphs(self) -> bool:
        return self.enabled and self.mode in ("reduce-overhead", "max-autotune")


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints/stage1"
    # Optimizer steps between checkpoints; each epoch's end is saved too.
    save_every: int = 1000
    keep_last: int = 3
    # Rank 0 writes a checkpoint in a thread from a copy on the CPU while the training goes on; false: every rank
    # waits for the write.
    in_background: bool = True
    # Where the finished run exports its model (empty: <dir>/export).
    export_dir: str = ""
    merge_lora_on_export: bool = False

    def validate(self, prefix: str) -> None:
        _check(self.save_every > 0, prefix, "save_every", "must be > 0")
        _check(self.keep_last > 0, prefix, "keep_last", "must be > 0")


@dataclass
class LoggingConfig:
    # training.log (what users tail), steps.jsonl and TensorBoard scalars.
    dir: str = "logs/stage1"
    # Optimizer steps between log lines.
    every: int = 50

    def validate(self, prefix: str) -> None:
        _check(self.every > 0, prefix, "every", "must be > 0")


@dataclass
class ProfileConfig:
    # A profile of ``steps`` optimizer steps after step ``start_step`` (past compilation) in ``dir``: a Chrome
    # trace per rank (chrome://tracing or ui.perfetto.dev; bench/trace_gaps.py reads where the GPU waits) and the
    # top operators. Empty: no profiling.
    dir: str = ""
    start_step: int = 20
    steps: int = 5

    def validate(self, prefix: str) -> None:
        _check(self.start_step >= 0, prefix, "start_step", "must be >= 0")
        _check(self.steps > 0, prefix, "steps", "must be > 0")


@dataclass
class TrainConfig:
    # The flat names of earlier releases, still accepted in YAML, saved checkpoints and on the command line.
    RENAMED: ClassVar[dict[str, str]] = {
        "compile": "compile.enabled", "compile_mode": "compile.mode", "compile_scope": "compile.scope",
        "ddp_split_compiled_graph": "compile.ddp_split_graph",
        "checkpoint_dir": "checkpoint.dir", "save_every": "checkpoint.save_every",
        "keep_last": "checkpoint.keep_last", "checkpoint_in_background": "checkpoint.in_background",
        "export_dir": "checkpoint.export_dir", "merge_lora_on_export": "checkpoint.merge_lora_on_export",
        "log_dir": "logging.dir", "log_every": "logging.every",
        "profile_dir": "profile.dir", "profile_start_step": "profile.start_step", "profile_steps": "profile.steps",
    }

    epochs: int = 50
    # Per process (per GPU).
    batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 1e-4
    lora_lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.01
    max_grad_norm: float = 1.0
    # Phase 1 (LoRA frozen) lasts this many epochs; lora_warmup_steps, when set, switches by step instead
    # (streaming data without epochs).
    lora_warmup_epochs: int = 5
    lora_warmup_steps: Optional[int] = None
    # add_group: LoRA joins the running optimizer as a new param group; recreate: a new optimizer and schedule
    # that continue from the current step.
    lora_unfreeze_optimizer: str = "add_group"
    # Stop after this many optimizer steps (None: run all epochs).
    max_steps: Optional[int] = None
    # Save and exit after this optimizer step without changing the schedule (time-boxed jobs, resume tests).
    stop_at_step: Optional[int] = None
    # auto: bf16 where the GPU has it, fp16 on other GPUs, fp32 on CPU
    mixed_precision: str = "auto"
    # Recompute the encoder's (phase 2) and the text model's activations in the backward instead of keeping
    # them: less memory for more compute, the same losses and gradients (BENCHMARKS.md has the trade).
    gradient_checkpointing: bool = False
    # Stop (without saving) after this many optimizer steps in a row with non-finite losses or gradients.
    max_bad_steps: int = 10
    seed: int = 42
    # latest | a checkpoint folder | empty. A run without it refuses a checkpoint folder that holds a run, unless
    # overwrite: true (that run's checkpoints and tokenizer are then deleted first).
    resume: str = ""
    overwrite: bool = False
    # Flags from the original scripts; num_gpus is checked against the launched world size. Several processes
    # always train under DDP; use_ddp: true wraps a single process in DDP too (a one-process group), to check or
    # time on one GPU what each rank of a multi-GPU run executes.
    use_ddp: bool = False
    num_gpus: Optional[int] = None
    cpu: bool = False
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self, prefix: str) -> None:
        _check(self.epochs > 0, prefix, "epochs", "must be > 0")
        _check(self.batch_size > 0, prefix, "batch_size", "must be > 0")
        _check(self.grad_accum_steps > 0, prefix, "grad_accum_steps", "must be > 0")
        _check(self.lr > 0, prefix, "lr", "must be > 0")
        _check(self.lora_lr > 0, prefix, "lora_lr", "must be > 0")
        _check(self.weight_decay >= 0, prefix, "weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, prefix, "warmup_steps", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, prefix, "min_lr_ratio", "must be in [0, 1]")
        _check(self.max_grad_norm >= 0, prefix, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(self.lora_warmup_epochs >= 0, prefix, "lora_warmup_epochs", "must be >= 0")
        _check(self.lora_warmup_steps is None or self.lora_warmup_steps >= 0, prefix, "lora_warmup_steps",
               "must be >= 0")
        _check(self.lora_unfreeze_optimizer in ("add_group", "recreate"), prefix, "lora_unfreeze_optimizer",
               "must be 'add_group' or 'recreate'")
        _check(self.max_steps is None or self.max_steps > 0, prefix, "max_steps", "must be > 0")
        _check(self.stop_at_step is None or self.stop_at_step > 0, prefix, "stop_at_step", "must be > 0")
        _check(self.mixed_precision in ("auto", "no", "bf16", "fp16"), prefix, "mixed_precision",
               "must be auto, no, bf16 or fp16")
        _check(self.max_bad_steps > 0, prefix, "max_bad_steps", "must be > 0")
        _check(self.num_gpus is None or self.num_gpus > 0, prefix, "num_gpus", "must be > 0")
        for name in ("compile", "checkpoint", "logging", "profile"):
            getattr(self, name).validate(f"{prefix}.{name}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, prefix: str, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{prefix}.{name} {message}")


# Reading configs: YAML files and command lines (loravl.config_parsing does the generic part)


def parse_overrides(args: list[str]) -> dict:
    """``["--model.lora.rank", "32", "--batch_size=64"]`` -> a nested dict of ``RunConfig`` paths."""
    return parse_overrides_for(RunConfig, args)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then the command-line overrides; validated."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = upgrade_keys(RunConfig, loaded)
    file_error = None
    try:
        from_dict(RunConfig, tree).validate()
    except ConfigError as e:
        file_error = e
    if file_error is not None and path is not None:  # the file alone is wrong: blame it
        raise ConfigError(f"{path}: {file_error}") from None
    if overrides:
        tree = merge(tree, parse_overrides(overrides))
    try:
        return from_dict(RunConfig, tree).validate()
    except ConfigError as e:  # the file alone was fine (or there is none): the command line made it wrong
        raise ConfigError(f"on the command line: {e}" if overrides else str(e)) from None


def config_from_dict(tree: dict) -> RunConfig:
    return from_dict(RunConfig, tree).validate()


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def split_config_arg(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """Pull ``--config PATH`` out of argv; the rest are overrides."""
    argv = list(argv)
    path = None
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path")
            path = argv[i + 1]
            del argv[i : i + 2]
            break
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
            del argv[i]
            break
    return path, argv


def main_config(argv: Optional[list[str]] = None, default_path: Optional[str] = None) -> RunConfig:
    """What an entry script calls: ``--config`` (or ``default_path``) plus overrides; exits with the message."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print("usage: [--config FILE.yaml] [--section.field VALUE | --field VALUE ...]\n"
              "Every field of the run's config can be set, dotted or by its unique name; a YAML file's values\n"
              "come first, then the command line's.\n")
        print(describe_options(RunConfig))
        raise SystemExit(0)
    try:
        path, rest = split_config_arg(argv)
        return load_config(path or default_path, rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
