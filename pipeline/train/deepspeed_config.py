"""The one place where a typed `TrainConfig` becomes a DeepSpeed JSON config."""

from __future__ import annotations

from pipeline.config import ConfigError, TrainConfig


def resolve_precision(requested: str, on_gpu: bool, bf16_supported: bool) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if requested == "auto":
        if not on_gpu:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested in ("bf16", "fp16") and not on_gpu:
        raise ConfigError(f"precision: {requested} needs a GPU here; use precision=fp32 (or auto) on CPU")
    return requested


def deepspeed_config(t: TrainConfig, world_size: int, precision: str) -> dict:
    """DeepSpeed config for stage settings `t` on `world_size` ranks.

    The global batch is checked here as DeepSpeed would, but with a message that says what to change.
    """
    global_batch = t.micro_batch * t.grad_accum * world_size
    if t.global_batch is not None and t.global_batch != global_batch:
        raise ConfigError(
            f"global_batch: {t.global_batch} != micro_batch {t.micro_batch} x grad_accum {t.grad_accum}"
            f" x ranks {world_size} = {global_batch}"
        )
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        # Overlap reduction with backward; contiguous gradients avoid fragmentation.
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    for kind, device in (("offload_optimizer", t.offload_optimizer), ("offload_param", t.offload_params)):
        if device != "none":
            zero[kind] = {"device": device, "pin_memory": True}
            if device == "nvme":
                zero[kind]["nvme_path"] = t.nvme_path
    if t.zero_stage == 3:
        # Gather full weights when a 16-bit model is saved (used by save_16bit_model on GPU).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(t.clip_grad),
        "zero_optimization": zero,
        # Our optimizers are torch.optim ones (AdamW/SGD) so that CPU and GPU runs are the same code.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves, from rank 0 only
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return cfg
