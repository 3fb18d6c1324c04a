"""Real multi-process training: 2 gloo ranks, DeepSpeed ZeRO-2, real shards; then fine-tuning.

One module-scoped run (prepare -> pretrain -> finetune) is shared by the assertions below; each
training stage is a real `torchrun` of two processes with the CPU accelerator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.vit import build_model
from pipeline.model.weights import model_from_pair, read_weights_pair
from stages import finetune, prepare, pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    cfg = load_config(TINY, ["pretrain.steps=6", "pretrain.checkpoint_every=3", "pretrain.eval_every=3",
                             "finetune.steps=4"])
    prep = prepare.run(cfg.data, work / "prepare")
    pre = pretrain.run(cfg.model, cfg.pretrain, prep["manifest"], work / "pretrain")
    ft = finetune.run(cfg.finetune, prep["manifest"], pre["weights"], work / "finetune")
    return {"cfg": cfg, "work": work, "prepare": prep, "pretrain": pre, "finetune": ft}


def test_pretrain_ran_on_two_ranks_with_zero2_and_wrote_checkpoints(trained):
    pre, work = trained["pretrain"], trained["work"]
    assert pre["world_size"] == 2 and pre["zero_stage"] == 2 and pre["precision"] == "fp32"
    assert pre["steps"] == 6 and pre["global_batch"] == 8 * 2
    # periodic (step 3) and final (step 6) DeepSpeed checkpoints, one optimizer shard per rank
    ckpts = work / "pretrain" / "checkpoints"
    for tag in ("step_00000003", "step_00000006"):
        shards = sorted(p.name for p in (ckpts / tag).glob("*optim_states.pt"))
        assert len(shards) == 2, shards
        marker = json.loads((ckpts / tag / "COMMITTED").read_text())
        assert marker["world_size"] == 2 and marker["step"] == int(tag[5:])
    # every val image evaluated exactly once across the two ranks
    assert pre["val_count"] == trained["prepare"]["val_samples"]
    # an accuracy over exactly those images: a whole number of them right (not a mean of padded batches)
    right = pre["val_accuracy"] * pre["val_count"]
    assert abs(right - round(right)) < 1e-6 and 0 <= round(right) <= pre["val_count"]
    assert pre["train_loss"] > 0


def test_consolidated_weights_load_without_deepspeed(trained):
    weights = trained["pretrain"]["weights"]
    code = textwrap.dedent(f"""
        import sys
        sys.modules["deepspeed"] = None  # any import of deepspeed now fails
        import torch
        from pipeline.model.weights import model_from_pair
        model, meta = model_from_pair({str(weights)!r})
        x = torch.zeros(2, 1, 14, 14)
        print(tuple(model(x).shape), meta["image_size"], meta["num_classes"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split("\n")[0] == "(2, 10) [14, 14] 10"


def test_consolidated_weights_equal_deepspeed_zero_to_fp32(trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpts = trained["work"] / "pretrain" / "checkpoints"
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step_00000006")
    ours = load_file(trained["pretrain"]["weights"])
    assert set(ours) == set(reference)
    for k in ours:
        assert torch.equal(ours[k], reference[k].float()), k
    # and the weights moved away from initialization (the model the ranks built: same seed, same
    # config): training really happened
    cfg = trained["cfg"]
    torch.manual_seed(cfg.pretrain.seed)
    initial = build_model(cfg.model, cfg.pretrain.image_size, 10).state_dict()
    assert set(initial) == set(ours)
    for k in ("head.weight", "patch_embed.weight", "pos_embed", "blocks.0.attn.qkv.weight"):
        assert not torch.equal(ours[k], initial[k]), f"{k} is still its initial value"


def test_model_json_describes_the_model(trained):
    meta = json.loads((Path(trained["pretrain"]["weights"]).with_suffix(".json")).read_text())
    assert meta["image_size"] == [14, 14] and meta["num_classes"] == 10
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["architecture"]["patch_size"] == 2 and meta["architecture"]["in_channels"] == 1
    assert meta["mean"] == [0.1307] and meta["std"] == [0.3081]
    assert meta["pos_embed_interp"] == "bicubic" and meta["stage"] == "pretrain"


def test_finetune_at_higher_resolution_resamples_pos_embed_and_replaces_head(trained):
    ft = trained["finetune"]
    assert ft["image_size"] == 28 and ft["init_image_size"] == [14, 14]
    # the pre-trained model was evaluated at 28 px before fine-tuning (same classes: head kept for it)
    right = ft["val_accuracy_before"] * ft["val_count"]
    assert abs(right - round(right)) < 1e-6 and 0 <= round(right) <= ft["val_count"]
    assert ft["val_count"] == trained["prepare"]["val_samples"]
    state, meta = read_weights_pair(ft["weights"])
    assert meta["image_size"] == [28, 28] and meta["stage"] == "finetune"
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, 32)  # grid 7x7 -> 14x14, class token kept
    assert state["head.weight"].shape == (10, 32)


def test_finetune_starts_from_resampled_pretrained_embeddings(trained):
    # What fine-tuning starts from: the pre-trained embeddings resampled 7x7 -> 14x14 (bicubic).
    pre_state, _ = read_weights_pair(trained["pretrain"]["weights"])
    model, meta = model_from_pair(trained["pretrain"]["weights"], image_size=28)
    expected = resample_pos_embed(pre_state["pos_embed"], (14, 14), (7, 7), mode="bicubic")
    assert torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.pos_embed[:, :1], pre_state["pos_embed"][:, :1])  # class token untouched
    # the head is zero-initialized when classes change (the paper's transfer recipe)
    reset, reset_meta = model_from_pair(trained["pretrain"]["weights"], image_size=28, num_classes=3)
    assert reset_meta["head_reset"] and reset.head.weight.abs().sum() == 0


def test_rerun_is_skipped_when_inputs_match(trained):
    cfg, work = trained["cfg"], trained["work"]
    before = (work / "pretrain" / "model.safetensors").stat().st_mtime_ns
    again = pretrain.run(cfg.model, cfg.pretrain, trained["prepare"]["manifest"], work / "pretrain")
    assert again["weights"] == trained["pretrain"]["weights"]
    assert (work / "pretrain" / "model.safetensors").stat().st_mtime_ns == before


def test_a_rank_loads_neither_mlflow_nor_inductor_for_deepspeed_and_can_still_track():
    # DeepSpeed imports MLflow when it is installed (for its autotuner) and ZeRO imports its Muon
    # optimizer, whose kernels torch.compile decorates at import (loading inductor): ~5 s of CPU
    # per rank start on a 2-core VM, for nothing a vitpipe rank runs. A real 1-rank ZeRO-2 engine
    # in a fresh process (as torchrun starts a rank) trains a step; then rank 0's tracker can
    # still import mlflow.
    code = textwrap.dedent("""
        import json, socket, sys, torch, os
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from pipeline.config import ModelConfig, TrainConfig
        from pipeline.model.vit import build_model
        from pipeline.train.loop import build_engine, init_distributed, train_micro_step
        init_distributed()
        torch.manual_seed(0)
        model = build_model(ModelConfig(width=32, depth=1, heads=2, mlp_dim=64, patch_size=4, in_channels=1,
                                        mean=[0.5], std=[0.5]), 8, 10)
        t = TrainConfig(image_size=8, steps=2, micro_batch=4, ranks=1, zero_stage=2, warmup_steps=1)
        engine = build_engine(model, t, 1, "fp32")
        loss = train_micro_step(engine, torch.rand(4, 1, 8, 8), torch.eye(10)[:4], torch.device("cpu"), torch.float32)
        loaded = sorted(m for m in ("mlflow", "torch._inductor.compile_fx") if m in sys.modules)
        import mlflow
        print(json.dumps({"loaded": loaded, "loss": loss, "mlflow": mlflow.__version__}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"a rank loaded {out['loaded']} for DeepSpeed"
    assert out["loss"] > 0 and out["mlflow"]  # the engine trained; mlflow imports after DeepSpeed
