"""The training job every rank runs: build model and engine, stream shards, train, evaluate, save.

Distribution is applied here, never in `pipeline/model`, in this fixed order:
  1. seed, build the model in fp32 on CPU (identical on every rank);
  2. for fine-tuning: load the weights pair at the new resolution, evaluate, replace the head;
  3. wrap in a DeepSpeed engine (ZeRO partitioning, precision, gradient clipping).
Rank 0 alone logs (it gets a real tracker; the others a null one) and writes the final files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import ModelConfig, TrainConfig, from_dict, validate_model, validate_train
from pipeline.data.loader import eval_batches, train_batches
from pipeline.data.manifest import load_manifest
from pipeline.model.vit import build_model, flops_per_image, param_groups_for_weight_decay
from pipeline.model.weights import model_config_from_meta, model_from_pair, save_weights_pair, weights_meta
from pipeline.track import tracker_for_rank
from pipeline.train.deepspeed_config import deepspeed_config, resolve_precision
from pipeline.train.schedule import lr_factor

RESULT_FILE = "result.json"


@dataclass
class TrainJob:
    """Everything one training stage needs; serialised to JSON and handed to every rank."""

    stage: str
    """pretrain or finetune (names the run and the files)."""
    model: dict
    """ModelConfig fields (for fine-tuning, taken from the weights pair instead)."""
    train: dict
    """TrainConfig fields."""
    manifest: str
    """Path of the shards' manifest.json."""
    out_dir: str
    """Where checkpoints/, model.safetensors, model.json and result.json go."""
    init_from: Optional[str] = None
    """Weights pair to start from (fine-tuning)."""
    tracking_uri: Optional[str] = None
    run_id: Optional[str] = None
    """MLflow run that rank 0 logs to."""
    extra_meta: dict = field(default_factory=dict)
    """Written into model.json as is (e.g. where the weights came from)."""

    def save(self, path: str | Path) -> None:
        """Write the job as JSON."""
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "TrainJob":
        """Read a job written by `save`."""
        return cls(**json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- distributed set-up


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs); return (rank, world)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, int(os.environ.get("LOCAL_RANK", 0)))


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, device, dtype) -> dict:
    """Top-1 accuracy and mean loss over `batches`, summed across ranks (every rank must call)."""
    sums = torch.zeros(3, dtype=torch.float64)  # correct, count, loss sum
    for images, labels, mask in batches:
        logits = forward(images.to(device=device, dtype=dtype)).float().cpu()
        losses = F.cross_entropy(logits, labels, reduction="none")
        sums[0] += ((logits.argmax(-1) == labels) & mask).sum()
        sums[1] += mask.sum()
        sums[2] += losses[mask].sum()
    if dist.is_initialized():
        dist.all_reduce(sums)
    correct, count, loss = sums.tolist()
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "count": int(count)}


# --------------------------------------------------------------------------- engine


def build_engine(model: torch.nn.Module, t: TrainConfig, world: int, precision: str):
    """Optimizer (no decay on biases/norms/pos-embed/cls), warmup+decay schedule, DeepSpeed engine."""
    import deepspeed

    groups = param_groups_for_weight_decay(model, t.weight_decay)
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))
    else:
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    factor = partial(lr_factor, total=t.steps, warmup=t.warmup_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio)
    # A callable, so the scheduler wraps the optimizer DeepSpeed actually steps.
    make_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=make_scheduler,
        config=deepspeed_config(t, world, precision),
    )
    return engine


def consolidated_state_dict(engine, ckpt_root: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights (rank 0): DeepSpeed's own zero_to_fp32 for ZeRO 1-3, the module for ZeRO 0."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    return {k: v.float().contiguous() for k, v in sd.items()}


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the job


def run_job(job: TrainJob) -> dict | None:
    """Train as one rank of the current process group; rank 0 returns (and writes) the result."""
    rank, world = init_distributed()
    device = _device()
    tracker = tracker_for_rank(rank, job.tracking_uri, job.run_id)
    t = from_dict(TrainConfig, dict(job.train))
    out_dir = Path(job.out_dir)
    ckpt_root = out_dir / "checkpoints"
    manifest = load_manifest(job.manifest)
    num_classes = len(manifest.class_names)

    torch.manual_seed(t.seed)
    result: dict = {"stage": job.stage, "world_size": world, "zero_stage": t.zero_stage}
    if job.init_from:
        model, meta = model_from_pair(
            job.init_from, image_size=t.image_size, num_classes=num_classes, class_names=manifest.class_names
        )
        mcfg = model_config_from_meta(meta)
    else:
        mcfg = from_dict(ModelConfig, dict(job.model))
        model = build_model(mcfg, t.image_size, num_classes)
        meta = None
    validate_model(mcfg)
    validate_train(t, mcfg, f"{job.stage}.")
    norm = dict(image_size=t.image_size, in_channels=mcfg.in_channels, mean=mcfg.mean, std=mcfg.std)
    val_batches = partial(eval_batches, manifest, "val", batch_size=t.eval_batch, rank=rank, world_size=world, **norm)

    if meta is not None:
        # The paper's question: how good is the pre-trained model at the new resolution, with
        # resampled position embeddings, before any fine-tuning? Only defined when the classes
        # (and so the head) carry over.
        same_classes = list(meta.get("class_names") or []) == list(manifest.class_names)
        if same_classes:
            model.eval()
            before = evaluate(model, val_batches(), torch.device("cpu"), torch.float32)
            result["val_accuracy_before"] = before["accuracy"]
            tracker.log_metrics({"val_accuracy_before_finetune": before["accuracy"]}, step=0)
        else:
            result["val_accuracy_before"] = None
        model.reset_head(num_classes)  # zero-initialized, as in the paper's transfer recipe
        model.train()

    on_gpu = device.type != "cpu"
    precision = resolve_precision(t.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    engine = build_engine(model, t, world, precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    result["precision"] = precision
    if rank == 0:
        tracker.log_params({"world_size": world, "precision": precision, "device": str(device.type)})

    # Resume: a run folder that already holds a complete checkpoint continues from it.
    start_step = 0
    if (ckpt_root / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_root))
        start_step = int((client or {}).get("step", 0))
        result["resumed_from_step"] = start_step

    batches = iter(
        train_batches(
            manifest,
            micro_batch=t.micro_batch,
            rank=rank,
            world_size=world,
            workers=t.workers,
            shuffle_buffer=t.shuffle_buffer,
            seed=t.seed + start_step,
            **norm,
        )
    )
    flops_img = 3 * flops_per_image(model)  # forward + backward ≈ 3x forward (documented in flops_per_image)
    global_batch = t.micro_batch * t.grad_accum * world
    window_loss, window_steps, window_start = torch.zeros(1, dtype=torch.float64), 0, time.perf_counter()
    last_eval: dict = {}
    engine.train()
    step = start_step
    for step in range(start_step + 1, t.steps + 1):
        for _ in range(t.grad_accum):
            images, labels = next(batches)
            logits = engine(images.to(device=device, dtype=dtype))
            loss = F.cross_entropy(logits.float(), labels.to(device), label_smoothing=t.label_smoothing)
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().double().cpu() / t.grad_accum
        window_steps += 1
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"{job.stage}: loss became {float(loss)} at step {step}; lower the lr")
        if step % max(t.log_every, 1) == 0 or step == t.steps:
            dist.all_reduce(window_loss)  # mean over ranks as well as steps
            elapsed = time.perf_counter() - window_start
            ips = global_batch * window_steps / elapsed
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "loss": float(window_loss) / (world * window_steps),
                "lr": engine.get_lr()[0],
                "images_per_s": ips,
                "step_time_s": elapsed / window_steps,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "achieved_tflops": ips * flops_img / 1e12,
            }
            tracker.log_metrics(metrics, step=step)
            if rank == 0:
                print(f"[{job.stage}] step {step}/{t.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                      f"{ips:.1f} img/s", flush=True)
            result["train_loss"] = metrics["loss"]
            result["images_per_s"] = ips
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            engine.eval()
            last_eval = evaluate(engine, val_batches(), device, dtype)
            engine.train()
            tracker.log_metrics({"val_accuracy": last_eval["accuracy"], "val_loss": last_eval["loss"]}, step=step)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step != t.steps:
            engine.save_checkpoint(str(ckpt_root), tag=f"step_{step:08d}", client_state={"step": step})
            window_start = time.perf_counter()  # checkpoint time is not training throughput

    engine.eval()
    last_eval = evaluate(engine, val_batches(), device, dtype)
    tracker.log_metrics({"val_accuracy": last_eval["accuracy"], "val_loss": last_eval["loss"]}, step=t.steps)
    result.update(val_accuracy=last_eval["accuracy"], val_loss=last_eval["loss"], val_count=last_eval["count"],
                  steps=t.steps, image_size=t.image_size, global_batch=global_batch)

    tag = f"step_{t.steps:08d}"
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"step": t.steps})
    dist.barrier()
    if rank == 0:
        state = consolidated_state_dict(engine, ckpt_root, tag, t.zero_stage)
        model_meta = weights_meta(mcfg, t.image_size, num_classes, manifest.class_names, stage=job.stage,
                                  steps=t.steps, val_accuracy=last_eval["accuracy"], **job.extra_meta)
        save_weights_pair(out_dir, state, model_meta)
        _atomic_json(out_dir / RESULT_FILE, result)
    dist.barrier()
    return result if rank == 0 else None
