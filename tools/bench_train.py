"""`vitpipe bench train`: the training step measured against baselines taken in the same run.

1. the matmul peak of this machine (a large fp32 matmul on every core): the ceiling for MFU;
2. a plain PyTorch loop (forward, cross-entropy, backward, clip, AdamW step) over the model and batch;
3. our training step (`loop.train_micro_step` through a DeepSpeed engine, ZeRO-0, one process)
   on the same model and batch: images/s as a ratio of the plain loop (target >= 0.95);
4. ZeRO stages 0-3 on 2 ranks (gloo on CPU): step time of each relative to ZeRO-0.

MFU = images/s x training FLOPs per image / peak, where training FLOPs = 3 x the forward count of
`pipeline.model.vit.flops_per_image` (backward costs about twice the forward).
Every run uses synthetic inputs: this measures compute, not data loading (`vitpipe bench data`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.atomic import write_json
from pipeline.tables import format_table
from pipeline.config import ModelConfig, TrainConfig, from_dict
from pipeline.model.vit import build_model, flops_per_image, param_groups_for_weight_decay
from pipeline.train.flops import measure_peak_tflops


def matmul_peak_gflops(threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    """Best-of-three dense fp32 matmul GFLOP/s on `threads` threads (train.flops measures it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return 1e3 * measure_peak_tflops(torch.device("cpu"), torch.float32, size, seconds, windows=3)
    finally:
        torch.set_num_threads(old)


def _batch(batch: int, in_channels: int, image_size: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, in_channels, image_size, image_size, generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    return images, F.one_hot(labels, num_classes).float()


def plain_loop(model_cfg: ModelConfig, t: TrainConfig, num_classes: int, steps: int, warmup: int,
               threads: int) -> dict:
    """images/s of a textbook PyTorch training loop (the baseline)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(t.seed)
        model = build_model(model_cfg, t.image_size, num_classes).train()
        opt = torch.optim.AdamW(param_groups_for_weight_decay(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
        images, targets = _batch(t.micro_batch, model_cfg.in_channels, t.image_size, num_classes)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            loss = F.cross_entropy(model(images), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        step = sorted(times)[len(times) // 2]
        return {"step_ms": step * 1e3, "images_per_s": t.micro_batch / step,
                "flops_per_image": 3 * flops_per_image(model)}
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------- one DeepSpeed run


def _worker(spec_path: str) -> None:
    """Inside torchrun: time `train_micro_step` through a DeepSpeed engine; rank 0 writes the result."""
    import torch.distributed as dist

    from pipeline.train.loop import build_engine, init_distributed, train_micro_step

    spec = json.loads(Path(spec_path).read_text())
    rank, world = init_distributed()
    mcfg = from_dict(ModelConfig, spec["model"])
    t = from_dict(TrainConfig, spec["train"])
    torch.manual_seed(t.seed)
    model = build_model(mcfg, t.image_size, spec["num_classes"])
    engine = build_engine(model, t, world, "fp32")
    images, targets = _batch(t.micro_batch, mcfg.in_channels, t.image_size, spec["num_classes"], seed=rank)
    device, times = torch.device("cpu"), []
    for i in range(spec["warmup"] + spec["steps"]):
        dist.barrier()  # ranks start each step together, as in training
        start = time.perf_counter()
        train_micro_step(engine, images, targets, device, torch.float32)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    worst = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    if rank == 0:
        step = float(worst.median())
        Path(spec["out"]).write_text(json.dumps({"step_ms": step * 1e3, "images_per_s": t.micro_batch * world / step,
                                                 "world_size": world, "zero_stage": t.zero_stage}))


def deepspeed_run(model_cfg: ModelConfig, t: TrainConfig, num_classes: int, nprocs: int, steps: int,
                  warmup: int) -> dict:
    """Launch `nprocs` ranks that time our training step; return rank 0's figures."""
    from pipeline.launch.local import worker_env

    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(t), "num_classes": num_classes,
                "steps": steps, "warmup": warmup, "out": str(Path(tmp) / "out.json")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
               "-m", "tools.bench_train", "--worker", str(spec_path)]
        proc = subprocess.run(cmd, env=worker_env(nprocs), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench train: ZeRO-{t.zero_stage} on {nprocs} rank(s) failed:\n{proc.stdout[-3000:]}")
        return json.loads((Path(tmp) / "out.json").read_text())


def bench_train(model_cfg: ModelConfig, t: TrainConfig, num_classes: int, steps: int = 20, warmup: int = 5,
                stages: tuple[int, ...] = (0, 1, 2, 3), ranks: int = 2) -> dict:
    """Everything in the module docstring, in one run."""
    cores = os.cpu_count() or 1
    peak = matmul_peak_gflops(cores)
    plain = plain_loop(model_cfg, t, num_classes, steps, warmup, cores)
    ours = deepspeed_run(model_cfg, dataclasses.replace(t, zero_stage=0, ranks=1, global_batch=None), num_classes,
                         1, steps, warmup)
    flops = plain["flops_per_image"]
    zero = {}
    for stage in stages:
        zero[stage] = deepspeed_run(model_cfg, dataclasses.replace(t, zero_stage=stage, ranks=ranks, global_batch=None),
                                    num_classes, ranks, steps, warmup)
    base = zero.get(0)
    return {
        "model": dataclasses.asdict(model_cfg), "image_size": t.image_size, "micro_batch": t.micro_batch,
        "cores": cores, "matmul_peak_gflops": peak, "flops_per_image": flops,
        "plain": {**plain, "mfu": plain["images_per_s"] * flops / (peak * 1e9)},
        "ours": {**ours, "mfu": ours["images_per_s"] * flops / (peak * 1e9),
                 "ratio_to_plain": ours["images_per_s"] / plain["images_per_s"]},
        "zero": {str(s): {**r, "step_time_vs_zero0": r["step_ms"] / base["step_ms"] if base else None}
                 for s, r in zero.items()},
        "torch": torch.__version__,
    }


def bench_train_table(r: dict) -> str:
    """The figures a reader compares, as plain text."""
    rows = [{"run": "plain PyTorch loop, 1 process", "step ms": r["plain"]["step_ms"],
             "img/s": r["plain"]["images_per_s"], "MFU": r["plain"]["mfu"], "ratio": 1.0},
            {"run": "vitpipe step (DeepSpeed ZeRO-0), 1", "step ms": r["ours"]["step_ms"],
             "img/s": r["ours"]["images_per_s"], "MFU": r["ours"]["mfu"], "ratio": r["ours"]["ratio_to_plain"]}]
    rows += [{"run": f"ZeRO-{stage}, {z['world_size']} ranks (step time vs ZeRO-0)", "step ms": z["step_ms"],
              "img/s": z["images_per_s"], "MFU": "", "ratio": z["step_time_vs_zero0"]} for stage, z in r["zero"].items()]
    head = (f"matmul peak ({r['cores']} threads, fp32): {r['matmul_peak_gflops']:.1f} GFLOP/s; "
            f"training FLOPs/image {r['flops_per_image'] / 1e9:.3f} G (3x forward)")
    return head + "\n" + format_table(rows, {"step ms": ".1f", "img/s": ".1f", "MFU": ".2f", "ratio": ".2f"})


def add_bench_train_parser(bench_sub) -> None:
    """Add `bench train` to the `vitpipe bench` subcommands."""
    p = bench_sub.add_parser("train", help="training step vs plain PyTorch, MFU, ZeRO 1/2/3 vs 0",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe whose model, pretrain.image_size and micro_batch are measured")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (median kept)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--ranks", type=int, default=2, help="ranks for the ZeRO comparison")
    p.add_argument("--out", type=Path, default=Path("bench_train.json"), help="JSON result")


def run_bench_train(args: argparse.Namespace) -> int:
    """`vitpipe bench train`: run, print the table, write the JSON."""
    from pipeline.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    num_classes = 10
    result = bench_train(cfg.model, cfg.pretrain, num_classes, steps=args.steps, warmup=args.warmup, ranks=args.ranks)
    print(bench_train_table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    _worker(parser.parse_args().worker)
