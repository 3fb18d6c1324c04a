"""The training job every rank runs: build model and engine, stream shards, train, evaluate, save.

Distribution is applied here, never in `pipeline/model`, in this fixed order:
  1. seed, build the model in fp32 on CPU (identical on every rank);
  2. for fine-tuning: load the weights pair at the new resolution (with the recipe's drop path,
     dropout and resampling mode), evaluate, replace the head, freeze the backbone if asked
     (requires_grad, so the optimizer's groups never see it); copy the weights for the EMA;
  3. activation checkpointing (wraps blocks; must precede the engine, which captures the module);
  4. wrap in a DeepSpeed engine (ZeRO partitioning, precision, gradient clipping) over a torch
     optimizer whose param groups carry the layer-wise lr scales (param_groups.py);
  5. torch.compile through the engine (after partitioning, so ZeRO-3 hooks are compiled in);
  6. restore the newest committed checkpoint: model, optimizer, scheduler, step, RNG, data position,
     the EMA.
Rank 0 alone logs (it gets a real tracker; the others a null one) and writes the final files.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.atomic import write_json
from pipeline.config import FINETUNE_MODEL_FIELDS, TrainConfig
from pipeline.data.eval_stream import eval_batches
from pipeline.data.manifest import load_manifest
from pipeline.data.stream import StreamState, train_stream
from pipeline.data.transforms import TrainTransform, mix_batch
from pipeline.eval.confusion import MAX_CONFUSION_CLASSES, confusion_counts, write_confusion
from pipeline.eval.plots import plot_confusion, plot_training, read_history
from pipeline.model.vit import build_model, flops_per_image
from pipeline.model.weights import model_config_from_meta, model_from_pair, save_weights_pair, weights_meta
from pipeline.progress import Progress
from pipeline.run_layout import (CHECKPOINTS_DIR, CONFUSION_PLOT, LOSSES_FILE, METRICS_FILE, RESULT_FILE,
                                 TRAINING_PLOT)
from pipeline.track import tracker_for_rank
from pipeline.train import checkpoints
from pipeline.train.deepspeed_config import deepspeed_config, resolve_precision
from pipeline.train.ema import WeightEMA
from pipeline.train.flops import measure_peak_tflops
from pipeline.train.param_groups import optimizer_param_groups
from pipeline.train.preemption import REQUEUE_EXIT, Preemption
from pipeline.train.job import PREEMPTED_FILE, TrainJob  # noqa: F401 (owned by job.py; re-exported)
from pipeline.train.schedule import lr_factor



class Preempted(SystemExit):
    """Raised after the preemption checkpoint is committed; exits with REQUEUE_EXIT."""

    def __init__(self):
        super().__init__(REQUEUE_EXIT)


# --------------------------------------------------------------------------- distributed set-up


# What DeepSpeed imports when it is installed and a vitpipe rank never runs: MLflow, for DeepSpeed's
# autotuner (deepspeed/autotuning/autotuner.py tries `import mlflow` as deepspeed is imported), and
# DeepSpeed's Muon optimizer, which ZeRO imports at engine set-up and whose kernels torch.compile
# decorates at import, loading inductor. On a 2-core VM that was 2.8 s and 2 s of CPU per rank, a
# 2-rank tiny launch 11.5-13.4 s -> 8.2-9.5 s (docs/architecture.md, process lifetime).
_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed():
    """`import deepspeed` for a rank without loading what it never runs (see above).

    MLflow is hidden only while DeepSpeed itself is imported: DeepSpeed's autotuner sees none, and
    rank 0's tracker imports it as usual afterwards. Muon is imported with TorchDynamo off, so its
    kernels stay plain functions: vitpipe's optimizers are AdamW and SGD.
    """
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which DeepSpeed catches
        try:
            import deepspeed  # noqa: F401
        finally:
            if sys.modules.get("mlflow", ...) is None:
                del sys.modules["mlflow"]
    if _MUON not in sys.modules:
        before = os.environ.get("TORCHDYNAMO_DISABLE")
        os.environ["TORCHDYNAMO_DISABLE"] = "1"  # torch.compile reads it as it decorates
        try:
            importlib.import_module(_MUON)
        finally:
            if before is None:
                del os.environ["TORCHDYNAMO_DISABLE"]
            else:
                os.environ["TORCHDYNAMO_DISABLE"] = before
    import deepspeed

    return deepspeed


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs); return (rank, world)."""
    from pipeline.launch.local import use_this_environments_ninja

    # DeepSpeed JIT-builds its CPU op when it joins (and others at engine init): always the same
    # ninja, in a rank whatever launched it and in a process that trains in-process alike
    use_this_environments_ninja()
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    if not dist.is_initialized() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Under torchrun the agent's store outlives a restart of the ranks; keys of the failed
        # attempt (a dead rank's address) must not be read by the next one, so each attempt gets
        # its own key space.
        from datetime import timedelta

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(minutes=30))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"vitpipe/attempt_{attempt}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    else:
        deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)  # adopt the group
    return dist.get_rank(), dist.get_world_size()


def rank_device() -> torch.device:
    """This rank's device: the CPU, or the accelerator of LOCAL_RANK."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, int(os.environ.get("LOCAL_RANK", 0)))


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, device, dtype,
             num_classes: int | None = None) -> dict:
    """Top-1 accuracy and mean loss over `batches`, summed across ranks (every rank must call);
    with `num_classes`, also the confusion matrix of the same predictions ("confusion")."""
    sums = torch.zeros(3, dtype=torch.float64)  # correct, count, loss sum
    confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.int64)
    for images, labels, mask in batches:
        logits = forward(images.to(device=device, dtype=dtype)).float().cpu()
        losses = F.cross_entropy(logits, labels, reduction="none")
        sums[0] += ((logits.argmax(-1) == labels) & mask).sum()
        sums[1] += mask.sum()
        sums[2] += losses[mask].sum()
        if num_classes:
            confusion += confusion_counts(logits.argmax(-1), labels, mask, num_classes)
    if dist.is_initialized():
        dist.all_reduce(sums)
        if num_classes:
            dist.all_reduce(confusion)
    correct, count, loss = sums.tolist()
    out = {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "count": int(count)}
    if num_classes:
        out["confusion"] = confusion
    return out


# --------------------------------------------------------------------------- engine


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every encoder block in backward (non-reentrant: works with ZeRO-3 hooks)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def build_engine(model: torch.nn.Module, t: TrainConfig, world: int, precision: str, load_universal: bool = False):
    """Optimizer (no decay on biases/norms/pos-embed/cls), warmup+decay schedule, DeepSpeed engine."""
    import deepspeed

    # Each group's own lr carries its layer-wise scale; LambdaLR multiplies all of them by the same
    # schedule factor, so the ratios between layers hold at every step (see param_groups.py).
    groups = optimizer_param_groups(model, lr=t.lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay)
    if t.optimizer == "adamw" and t.offload_optimizer != "none":
        # Offloaded states are stepped on the CPU: DeepSpeed's vectorized CPU Adam (AdamW mode).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), adamw_mode=True)
    elif t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))
    else:
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    factor = partial(lr_factor, total=t.steps, warmup=t.warmup_steps, schedule=t.schedule, min_ratio=t.min_lr_ratio)
    # A callable, so the scheduler wraps the optimizer DeepSpeed actually steps.
    make_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)  # noqa: E731
    config = deepspeed_config(t, world, precision)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=config)
    return engine


def train_micro_step(engine, images: torch.Tensor, targets: torch.Tensor, device, dtype) -> float:
    """Forward, backward and (at accumulation boundaries) optimizer step on one micro batch; the loss.

    `targets` are class probabilities (B, classes): label smoothing and mixup are folded into them.
    """
    logits = engine(images.to(device=device, dtype=dtype))  # (B, classes)
    loss = F.cross_entropy(logits.float(), targets.to(device))
    engine.backward(loss)
    engine.step()
    return float(loss.detach())  # the value only: no autograd history carried into the scalar


def consolidated_state_dict(engine, ckpt_root: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights (rank 0): DeepSpeed's own zero_to_fp32 for ZeRO 1-3, the module for ZeRO 0."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    return {k: v.float().contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- RNG and resume


def _rng_state(mix_rng: np.random.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "mix": mix_rng.bit_generator.state}


def _set_rng_state(state: dict, mix_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    mix_rng.bit_generator.state = state["mix"]


def _fault_point(where: str, step: int, rank: int) -> None:
    """Fault injection for tests of failure handling: VITPIPE_FAULT="<where>:<step>:<rank>" kills
    that rank there with SIGKILL, on the first attempt only (torchrun's restarts run clean)."""
    spec = os.environ.get("VITPIPE_FAULT")
    if spec and spec == f"{where}:{step}:{rank}" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """One rank's training of one stage; `run()` returns rank 0's result."""

    def __init__(self, job: TrainJob):
        self.job = job
        self.rank, self.world = init_distributed()
        self.device = rank_device()
        self.tracker = tracker_for_rank(self.rank, job.tracking_uri, job.run_id)
        self.t = job.train
        self.out_dir = Path(job.out_dir)
        self.ckpt_root = self.out_dir / CHECKPOINTS_DIR
        self.manifest = load_manifest(job.manifest)
        self.preemption = Preemption()
        self.ema: WeightEMA | None = None
        self.result: dict = {"stage": job.stage, "world_size": self.world, "zero_stage": self.t.zero_stage}

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.job.stage}] {msg}", flush=True)

    # -- model --------------------------------------------------------------------------------

    def build_model(self):
        t, job, m = self.t, self.job, self.manifest
        torch.manual_seed(t.seed)
        if job.init_from:
            # job.model is the weights' architecture with the recipe's fine-tune settings on top
            # (see config.finetune_model_config); the architecture itself is the weights'.
            settings = {k: getattr(job.model, k) for k in FINETUNE_MODEL_FIELDS}
            model, meta = model_from_pair(job.init_from, image_size=t.image_size, num_classes=m.num_classes,
                                          class_names=m.class_names, settings=settings,
                                          pos_embed_init=t.pos_embed_init)
            mcfg = model_config_from_meta(meta)
        else:
            mcfg = job.model
            model, meta = build_model(mcfg, t.image_size, m.num_classes), None
        # No validation here: the orchestrator validated the configs before writing the job
        # (config.validate at load; the fine-tune stage against the weights' architecture).
        self.mcfg = mcfg
        self.norm = dict(image_size=t.image_size, in_channels=mcfg.in_channels, mean=mcfg.mean, std=mcfg.std)
        if meta is not None and not checkpoints.latest(self.ckpt_root):
            self.evaluate_before_finetuning(model, meta)
        if meta is not None:
            self.result["head_reset"] = meta["head_reset"]
            model.reset_head(m.num_classes)  # zero-initialized, as in the paper's transfer recipe
        if t.freeze == "backbone":
            # Before the engine: DeepSpeed and the optimizer only ever see the head's tensors.
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        model.train()
        return model

    def val_batches(self):
        return eval_batches(self.manifest, "val", batch_size=self.t.eval_batch, rank=self.rank,
                            world_size=self.world, **self.norm)

    def evaluate_before_finetuning(self, model, meta) -> None:
        # The paper's question: how good is the pre-trained model at the new resolution, with
        # resampled position embeddings, before any fine-tuning? Defined only when the head carries
        # over: a reset head is all zeros and would "predict" class 0 for every image.
        if not meta["head_reset"]:
            model.eval()
            before = evaluate(model, self.val_batches(), torch.device("cpu"), torch.float32)
            self.result["val_accuracy_before"] = before["accuracy"]
            self.tracker.log_metrics({"val_accuracy_before_finetune": before["accuracy"]}, step=0)
        else:
            self.result["val_accuracy_before"] = None

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, engine, step: int, stream, mix_rng) -> str:
        """Write and commit a checkpoint of every rank's state after `step`."""
        tag = checkpoints.tag_for(step)
        per_rank = _gather({"stream": stream.state.to_dict(), "rng": _rng_state(mix_rng)})
        client = {"step": step, "world_size": self.world, "ranks": per_rank, "mlflow_run_id": self.job.run_id,
                  "ema": self.ema.state_dict() if self.ema is not None else None,
                  # lets DeepSpeed's ds_to_universal convert this checkpoint for another rank count
                  "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        if self.rank == 0:  # a folder reused for this tag must not look committed while it is rewritten
            (self.ckpt_root / tag / checkpoints.MARKER).unlink(missing_ok=True)
        dist.barrier()
        _fault_point("save", step, self.rank)
        checkpoints.write(engine, self.ckpt_root, tag, client, step, self.rank)  # a full disk: one clear error
        dist.barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            checkpoints.commit(self.ckpt_root, tag, step, self.world, self.t.zero_stage, self.job.run_id)
            checkpoints.prune(self.ckpt_root, self.t.keep_checkpoints)
        dist.barrier()
        return tag

    def find_resume(self) -> tuple[int, str, dict] | None:
        """The checkpoint to resume from, converted to a universal checkpoint if the rank count changed."""
        found = checkpoints.latest(self.ckpt_root) if self.t.resume == "auto" else None
        if found:
            checkpoints.verify(self.ckpt_root, found[1])  # digests and weights-only, before DeepSpeed unpickles
        if found and found[2]["world_size"] != self.world:
            step, tag, info = found
            if info["zero_stage"] == 0:  # nothing is partitioned: every rank's files hold the full state
                return step, tag, {**info, "resharded": True}
            universal = checkpoints.to_universal(self.ckpt_root, tag) if self.rank == 0 else None
            dist.barrier()  # the conversion is on disk before any rank reads it
            found = (step, universal or f"{tag}{checkpoints.UNIVERSAL_SUFFIX}",
                     {**info, "universal": True, "resharded": True})
        return found

    def restore(self, engine, found):
        """(start step, this rank's stream state, rng state) from `found` (see find_resume)."""
        if not found:
            return 0, None, None
        step, tag, info = found
        _, client = engine.load_checkpoint(str(self.ckpt_root), tag=tag)
        self.result["resumed_from_step"] = step
        if self.ema is not None:
            if not client.get("ema"):
                raise RuntimeError(f"{self.ckpt_root / tag}: checkpoint has no EMA state but ema_decay is set; "
                                   f"resume=never starts over")
            self.ema.load_state_dict(client["ema"])
        if self.rank == 0:  # forget losses and metrics logged after the checkpoint: those steps run again
            for name in (LOSSES_FILE, METRICS_FILE):
                path = self.out_dir / name
                if path.is_file():
                    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                    path.write_text("".join(line + "\n" for line in kept))
        if info.get("resharded"):
            # Another rank count: the data plan of the interrupted epoch does not exist on this one.
            # Continue with the next epoch (the rest of that epoch is skipped, never repeated) and
            # reseed from (seed, step, rank); model, optimizer and schedule carry over exactly.
            epoch = max(int(r["stream"]["epoch"]) for r in client["ranks"]) + 1
            self.log(f"resumed from {tag} written by {info['world_size']} rank(s) on {self.world}; "
                     f"data continues at epoch {epoch}")
            torch.manual_seed(self.t.seed + step * 1000 + self.rank)
            self.result["resharded_from_world_size"] = info["world_size"]
            return step, StreamState(epoch=epoch), None
        mine = client["ranks"][self.rank]
        self.log(f"resumed from {tag} (committed by {info['world_size']} ranks)")
        return step, StreamState.from_dict(mine["stream"]), mine["rng"]

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> dict | None:
        t, job = self.t, self.job
        model = self.build_model()
        # Copied before activation checkpointing patches the blocks and before ZeRO partitions them.
        self.ema = WeightEMA(model, t.ema_decay, t.zero_stage, self.device) if t.ema_decay else None
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        on_gpu = self.device.type != "cpu"
        precision = resolve_precision(t.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
        found = self.find_resume()
        engine = build_engine(model, t, self.world, precision, load_universal=bool(found and found[2].get("universal")))
        if t.compile:
            engine.compile()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.result["precision"] = precision

        mix_rng = np.random.default_rng([t.seed, self.rank])
        start_step, stream_state, rng_state = self.restore(engine, found)
        if rng_state is not None:
            _set_rng_state(rng_state, mix_rng)
        a = t.augment
        transform = TrainTransform(**self.norm, random_resized_crop=a.random_resized_crop, crop_scale=a.crop_scale,
                                   crop_ratio=a.crop_ratio, hflip=a.hflip, randaugment_ops=a.randaugment_ops,
                                   randaugment_magnitude=a.randaugment_magnitude)
        stream = train_stream(self.manifest, transform=transform, micro_batch=t.micro_batch, rank=self.rank,
                              world_size=self.world, workers=t.workers, shuffle_buffer=t.shuffle_buffer, seed=t.seed,
                              sampling=t.sampling, max_corrupt_fraction=t.max_corrupt_fraction,
                              base_url=t.shard_base_url, state=stream_state, zero_copy=True)
        batches = iter(stream)
        self.normalize = transform.normalize  # batches arrive as uint8 pixels

        peak = t.peak_tflops or measure_peak_tflops(self.device, dtype)
        flops_img = 3 * flops_per_image(model)  # forward + backward ≈ 3x forward (see flops_per_image)
        global_batch = t.micro_batch * t.grad_accum * self.world
        if self.rank == 0:
            self.tracker.log_params({
                "world_size": self.world, "precision": precision, "device": self.device.type,
                "steps_per_epoch": stream.steps_per_epoch // t.grad_accum,
                "dropped_per_epoch": stream.dropped_per_epoch * 1, "peak_tflops_per_rank": round(peak, 4),
                "sampling": "resampled" if stream.settings.resampled else "exact",
            })
            self.log(f"{self.world} rank(s), ZeRO-{t.zero_stage}, {precision}; {stream.steps_per_epoch} micro "
                     f"batches per rank per epoch, {stream.dropped_per_epoch} samples dropped per epoch")

        monitor = self.tracker.system_metrics(job.system_metrics_interval, resume=start_step > 0)
        try:
            return self.train_loop(engine, stream, batches, mix_rng, dtype, start_step, peak, flops_img, global_batch)
        finally:
            if monitor is not None:
                monitor.finish()

    def train_loop(self, engine, stream, batches, mix_rng, dtype, start_step, peak, flops_img, global_batch):
        t, job, a = self.t, self.job, self.t.augment
        losses_path = self.out_dir / LOSSES_FILE
        window = torch.zeros(1, dtype=torch.float64)
        window_steps, window_start = 0, time.perf_counter()
        engine.train()
        # rank 0's stdout goes through the launcher, which shows "[stage]" lines: plain lines, bounded rate
        progress = Progress(f"[{job.stage}] progress", t.steps, "steps", initial=start_step, stream=sys.stdout,
                            enabled=self.rank == 0)
        for step in range(start_step + 1, t.steps + 1):
            step_loss = 0.0
            corrupt: dict[str, int] = {}
            for _ in range(t.grad_accum):
                batch = next(batches)
                for shard, n in batch["corrupt"].items():
                    corrupt[shard] = corrupt.get(shard, 0) + n
                images = self.normalize(batch["images"].to(self.device, non_blocking=True))
                images, targets = mix_batch(images, batch["labels"], self.manifest.num_classes,
                                            mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mix_prob,
                                            smoothing=t.label_smoothing, generator=mix_rng)
                step_loss += train_micro_step(engine, images, targets, self.device, dtype) / t.grad_accum
            if self.ema is not None:
                self.ema.update(engine.module)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"{job.stage}: loss became {step_loss} at step {step}; lower the lr")
            # Per-step loss of every rank, averaged: the figure a resumed run must reproduce exactly.
            mean_loss = torch.tensor([step_loss], dtype=torch.float64)
            dist.all_reduce(mean_loss)
            mean_loss = float(mean_loss) / self.world
            if self.rank == 0:
                with open(losses_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": mean_loss}) + "\n")
            window += mean_loss
            window_steps += 1
            progress.update()
            if corrupt:
                self.tracker.log_metrics({f"corrupt_images/{k.replace('/', '_')}": v for k, v in corrupt.items()}, step)
            if step % max(t.log_every, 1) == 0 or step == t.steps:
                self.log_window(engine, step, window, window_steps, window_start, global_batch, flops_img, peak, stream)
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                engine.eval()
                ev = evaluate(engine, self.val_batches(), self.device, dtype)
                engine.train()
                self.log_metrics({"val_accuracy": ev["accuracy"], "val_loss": ev["loss"], **self.evaluate_ema()}, step)
            stop = self.stop_requested(step)
            if (t.checkpoint_every and step % t.checkpoint_every == 0 and step != t.steps) or stop:
                tag = self.save(engine, step, stream, mix_rng)
                window_start = time.perf_counter()  # checkpoint time is not training throughput
                if stop:
                    self.log(f"stopping after step {step} ({stop}); committed {tag}; resume continues from it")
                    if self.rank == 0:
                        write_json(self.out_dir / PREEMPTED_FILE, {"step": step, "tag": tag, "reason": stop})
                    raise Preempted()
        progress.close()
        return self.finish(engine, stream, mix_rng, dtype, global_batch)

    def evaluate_ema(self) -> dict:
        """Val accuracy and loss of the EMA weights (every rank calls; empty without an EMA)."""
        if self.ema is None:
            return {}
        ev = evaluate(self.ema.module, self.val_batches(), self.device, torch.float32)  # the average is fp32
        return {"val_accuracy_ema": ev["accuracy"], "val_loss_ema": ev["loss"]}

    def stop_requested(self, step: int) -> str | None:
        """Whether any rank was asked to stop (all ranks agree, so all checkpoint together)."""
        flag = torch.tensor([1 if self.preemption.requested else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag):
            return self.preemption.signal_name or "a signal on another rank"
        if self.job.stop_after is not None and step >= self.job.stop_after:
            return "stop_after"
        return None

    def log_metrics(self, metrics: dict, step: int) -> None:
        """To the tracker, and (rank 0) to metrics.jsonl, which the training plot is drawn from."""
        self.tracker.log_metrics(metrics, step=step)
        if self.rank == 0:
            with open(self.out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def write_plots(self, confusion: torch.Tensor | None, step: int) -> None:
        """Rank 0: the training curves and the held-out confusion matrix (JSON and PNG; None when
        there are too many classes for one), logged to the run."""
        stage, m = self.job.stage, self.manifest
        files = [plot_training(read_history(self.out_dir / METRICS_FILE), self.out_dir / TRAINING_PLOT,
                               f"{stage}: {self.world} rank(s), {self.t.image_size} px, {self.t.steps} steps")]
        if confusion is not None:
            files.append(write_confusion(self.out_dir, confusion, m.class_names, "val", step))
            files.append(plot_confusion(confusion.tolist(), m.class_names, self.out_dir / CONFUSION_PLOT,
                                        f"{stage}: val split after step {step}"))
        else:
            self.log(f"no confusion matrix: {m.num_classes} classes (more than {MAX_CONFUSION_CLASSES})")
        for path in files:
            self.tracker.log_artifact(path, "plots")

    def log_window(self, engine, step, window, window_steps, window_start, global_batch, flops_img, peak, stream):
        elapsed = time.perf_counter() - window_start
        ips = global_batch * window_steps / elapsed
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "loss": float(window) / window_steps,
            "lr": max(engine.get_lr()),  # the head's: with layer-wise decay the other groups' are lower
            "images_per_s": ips,
            "step_time_s": elapsed / window_steps,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "mfu": ips * flops_img / self.world / (peak * 1e12),
            "epoch": stream.state.epoch + stream.state.batches_done / max(stream.steps_per_epoch, 1),
        }
        if self.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log_metrics(metrics, step)
        self.log(f"step {step}/{self.t.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                 f"{ips:.1f} img/s mfu {metrics['mfu']:.2f}")
        self.result.update(train_loss=metrics["loss"], images_per_s=ips, mfu=metrics["mfu"])
        # The learning rate each param group really stepped with (layer-wise decay shows here).
        self.result["lr_by_group"] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}

    def finish(self, engine, stream, mix_rng, dtype, global_batch) -> dict | None:
        t, job = self.t, self.job
        engine.eval()
        classes = self.manifest.num_classes
        ev = evaluate(engine, self.val_batches(), self.device, dtype,
                      num_classes=classes if classes <= MAX_CONFUSION_CLASSES else None)
        ema = self.evaluate_ema()
        self.log_metrics({"val_accuracy": ev["accuracy"], "val_loss": ev["loss"], **ema}, t.steps)
        self.result.update(val_accuracy=ev["accuracy"], val_loss=ev["loss"], val_count=ev["count"],
                           steps=t.steps, image_size=t.image_size, global_batch=global_batch, **ema)
        written = "ema" if t.ema_weights else "raw"
        self.result["weights_written"] = written
        final = checkpoints.latest(self.ckpt_root)
        tag = final[1] if final and final[0] == t.steps else self.save(engine, t.steps, stream, mix_rng)
        if self.rank == 0:
            if written == "ema":
                state = self.ema.weights()
            else:
                state = consolidated_state_dict(engine, self.ckpt_root, tag, t.zero_stage)
            accuracy = ema["val_accuracy_ema"] if written == "ema" else ev["accuracy"]
            meta = weights_meta(self.mcfg, t.image_size, self.manifest.num_classes, self.manifest.class_names,
                                stage=job.stage, steps=t.steps, val_accuracy=accuracy, weights_written=written,
                                **job.extra_meta)
            save_weights_pair(self.out_dir, state, meta)
            self.write_plots(ev.get("confusion"), t.steps)
            write_json(self.out_dir / RESULT_FILE, self.result)
        dist.barrier()
        return self.result if self.rank == 0 else None


def run_job(job: TrainJob) -> dict | None:
    """Train as one rank of the current process group; rank 0 returns (and writes) the result."""
    return Trainer(job).run()
