"""The transfer recipe's options, each tested for what it promises, in real DeepSpeed engines.

Layer-wise lr decay (the optimizer's own per-group lr inside ZeRO 0 and 2 engines, and ZeRO-3 on 2
ranks), the weights' EMA (equal to the average of the per-step checkpoints, exact across a resume,
in result.json and MLflow, written when selected), the frozen backbone (bit-identical after
training), model.* settings at fine-tune, recipes refused before launch, classes checked at export.
In-process tests run the rank's real `Trainer` in a 1-rank gloo group; one slow test launches 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from pipeline.config import (EXECUTION_FIELDS, ConfigError, DataConfig, ModelConfig, TrackingConfig, TrainConfig,
                             finetune_model_config, load_config, train_fingerprint_fields, validate)
from pipeline.data.prepare import prepare_dataset
from pipeline.model.vit import build_model
from pipeline.model.weights import model_from_pair, read_weights_pair, save_weights_pair, weights_meta
from pipeline.train.loop import LOSSES_FILE, Preempted, TrainJob, Trainer, build_engine, init_distributed
from pipeline.train.param_groups import layer_id, optimizer_param_groups
from pipeline.train.schedule import lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"
DEPTH = 2
MODEL = ModelConfig(width=32, depth=DEPTH, heads=2, mlp_dim=64, patch_size=2, in_channels=1, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def group():
    """A real 1-rank gloo process group in this process (what torchrun gives each rank)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # Trainer's Preemption sets them
    os.environ.update(env)
    init_distributed()
    yield
    dist.destroy_process_group()
    for s, h in handlers.items():
        signal.signal(s, h)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def pair(tmp_path_factory, digits300) -> Path:
    """A seeded, untrained weights pair for the 8 px digits (10 classes named '0'..'9')."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pair")
    model = build_model(MODEL, 8, 10)
    names = [str(i) for i in range(10)]
    return save_weights_pair(out, model.state_dict(), weights_meta(MODEL, 8, 10, names, stage="pretrain"))


def _job(out: Path, manifest, init: Path, **train) -> TrainJob:
    t = TrainConfig(**{**dict(image_size=8, steps=3, micro_batch=8, ranks=1, optimizer="sgd", lr=0.05,
                              weight_decay=0.0, warmup_steps=1, zero_stage=0, eval_batch=64, log_every=1,
                              peak_tflops=1.0, keep_checkpoints=5), **train})
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(stage="finetune", model=dataclasses.replace(MODEL, drop_path=0.1), train=t,
                    manifest=str(manifest), out_dir=str(out), init_from=str(init))


def expected_ema(ckpt_root: Path, start: dict[str, torch.Tensor], decay: float, steps: int) -> dict:
    """The average folded by hand from the start weights and each step's committed ZeRO (1-3) checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ema = {k: v.clone().float() for k, v in start.items()}
    for step in range(1, steps + 1):
        raw = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=f"step_{step:08d}")
        for k in ema:
            ema[k].lerp_(raw[k].float(), 1.0 - decay)
    return ema


def start_weights(init: Path, image_size: int, num_classes: int, class_names) -> dict[str, torch.Tensor]:
    """What fine-tuning starts from: the pair at `image_size`, head zero-initialized."""
    model, _ = model_from_pair(init, image_size=image_size, num_classes=num_classes, class_names=class_names)
    model.reset_head(num_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- layer-wise lr decay


def test_layer_groups_place_every_tensor_once_and_keep_the_no_decay_rule():
    model = build_model(MODEL, 8, 10)
    groups = optimizer_param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr"] == 0.5 ** (DEPTH + 1 - layer_id(name, DEPTH)), name
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert g["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert layer_id("pos_embed", DEPTH) == layer_id("patch_embed.weight", DEPTH) == 0
    assert layer_id("blocks.0.attn.qkv.weight", DEPTH) == 1 and layer_id("head.bias", DEPTH) == DEPTH + 1
    with pytest.raises(ValueError, match="'mystery.weight' belongs to no known layer"):
        layer_id("mystery.weight", DEPTH)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_layer_decay_ratios_hold_inside_a_deepspeed_engine_through_the_schedule(zero_stage, group):
    torch.manual_seed(0)
    model = build_model(MODEL, 8, 10)
    t = TrainConfig(image_size=8, steps=20, micro_batch=4, ranks=1, optimizer="sgd", lr=0.1, weight_decay=0.0,
                    warmup_steps=4, schedule="cosine", zero_stage=zero_stage, layer_decay=0.5)
    engine = build_engine(model, t, 1, "fp32")
    # The optimizer that really steps: torch's SGD itself under ZeRO-0, inside DeepSpeed's ZeRO optimizer otherwise.
    stepping = engine.optimizer if zero_stage == 0 else engine.optimizer.optimizer
    assert isinstance(stepping, torch.optim.SGD)
    for step in range(1, 8):
        loss = torch.nn.functional.cross_entropy(engine(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,)))
        engine.backward(loss)
        engine.step()
        lrs = {g["name"]: g["lr"] for g in stepping.param_groups}
        head = lrs["layer_03/no_decay"]
        assert head == pytest.approx(0.1 * lr_factor(step, total=20, warmup=4, schedule="cosine"), rel=1e-12)
        assert lrs["layer_01/no_decay"] / head == pytest.approx(0.5 ** DEPTH, rel=1e-12)  # block 0
        assert lrs["layer_02/no_decay"] / head == pytest.approx(0.5, rel=1e-12)  # block 1
        assert lrs["layer_00/no_decay"] / head == pytest.approx(0.5 ** (DEPTH + 1), rel=1e-12)  # embedding
    assert engine.get_lr() == [g["lr"] for g in stepping.param_groups]


# --------------------------------------------------------------------------- EMA, in the real Trainer


@pytest.fixture(scope="module")
def ema_run(group, digits300, pair, tmp_path_factory):
    """A 4-step fine-tune (ZeRO-1) with an EMA, a checkpoint after every step, logged to a real MLflow store."""
    from pipeline.track import start_tracker

    work = tmp_path_factory.mktemp("ema")
    tracker = start_tracker(TrackingConfig(uri=f"sqlite:///{work / 'mlflow.db'}"), run_name="ema")
    job = _job(work / "reference", digits300, pair, steps=4, zero_stage=1, ema_decay=0.5, ema_weights=True,
               checkpoint_every=1, eval_every=2)
    job.tracking_uri, job.run_id = tracker.tracking_uri, tracker.run_id
    result = Trainer(job).run()
    tracker.finish()
    return {"work": work, "job": job, "result": result, "tracker": tracker}


def test_ema_is_the_average_of_the_steps_and_is_what_gets_written(ema_run, digits300, pair):
    out = Path(ema_run["job"].out_dir)
    start = start_weights(pair, 8, 10, [str(i) for i in range(10)])
    want = expected_ema(out / "checkpoints", start, 0.5, 4)
    written, meta = read_weights_pair(out / "model.safetensors")
    assert set(written) == set(want)
    worst = max((written[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-6, worst
    raw = expected_ema(out / "checkpoints", start, 1e-30, 4)  # decay ~0: the last step's weights
    assert max((written[k] - raw[k]).abs().max().item() for k in want) > 1e-4  # the EMA, not the raw weights
    r = ema_run["result"]
    assert r["weights_written"] == "ema" and meta["weights_written"] == "ema"
    assert 0.0 <= r["val_accuracy_ema"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
    assert meta["val_accuracy"] == r["val_accuracy_ema"]


def test_ema_accuracy_is_logged_to_mlflow_beside_the_raw_one(ema_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ema_run["tracker"].tracking_uri)
    run_id = ema_run["tracker"].run_id
    ema = client.get_metric_history(run_id, "val_accuracy_ema")
    raw = client.get_metric_history(run_id, "val_accuracy")
    assert sorted(m.step for m in ema) == sorted(m.step for m in raw) == [2, 4]  # eval_every=2 and the end
    assert [m.value for m in ema if m.step == 4] == [ema_run["result"]["val_accuracy_ema"]]


def test_resume_continues_the_same_ema_exactly(ema_run, digits300, pair):
    work = ema_run["work"]
    job = _job(work / "interrupted", digits300, pair, steps=4, zero_stage=1, ema_decay=0.5, ema_weights=True,
               checkpoint_every=1, eval_every=2)
    with pytest.raises(Preempted):
        Trainer(dataclasses.replace(job, stop_after=2)).run()
    resumed = Trainer(job).run()
    assert resumed["resumed_from_step"] == 2
    ref_dir, got_dir = Path(ema_run["job"].out_dir), Path(job.out_dir)
    ref, got = load_file(ref_dir / "model.safetensors"), load_file(got_dir / "model.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit for bit
    assert (got_dir / LOSSES_FILE).read_text() == (ref_dir / LOSSES_FILE).read_text()
    assert resumed["val_accuracy_ema"] == ema_run["result"]["val_accuracy_ema"]


# --------------------------------------------------------------------------- frozen backbone, new classes


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("three")
    prepare_dataset(DataConfig(source="synthetic", synthetic_count=90, synthetic_classes=3, synthetic_size=[8, 8],
                               shard_max_samples=40, workers=1), out)
    return out


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_frozen_backbone_stays_bit_identical_and_the_new_head_trains(zero_stage, group, pair, three_classes, tmp_path):
    job = _job(tmp_path / "probe", three_classes, pair, steps=4, lr=0.5, zero_stage=zero_stage, freeze="backbone")
    result = Trainer(job).run()
    before, _ = read_weights_pair(pair)
    after, meta = read_weights_pair(tmp_path / "probe" / "model.safetensors")
    backbone = [k for k in before if not k.startswith("head.")]
    assert len(backbone) > 10
    for k in backbone:
        assert torch.equal(before[k], after[k]), k
    assert after["head.weight"].shape == (3, 32) and after["head.weight"].abs().sum() > 0  # zero-initialized, then trained
    assert result["lr_by_group"].keys() == {"layer_03/no_decay"}  # the optimizer saw the head only
    # new classes: the reset head has nothing to say before fine-tuning
    assert result["head_reset"] is True and result["val_accuracy_before"] is None
    assert meta["num_classes"] == 3 and meta["architecture"]["drop_path"] == 0.1  # model.drop_path applied


def test_summary_reads_n_a_for_a_new_head():
    from stages.recipe import summary_table

    text = summary_table({"recipe": "r", "workdir": "w", "finetune": {"image_size": 28, "head_reset": True,
                                                                      "val_accuracy_before": None, "val_accuracy": 0.5}})
    assert "n/a (new head)" in text


# --------------------------------------------------------------------------- model.* at fine-tune


def test_model_settings_apply_and_architecture_changes_are_refused(pair):
    _, meta = read_weights_pair(pair)
    weights_cfg = ModelConfig(**meta["architecture"])
    recipe = load_config(TINY, ["model.depth=2", "model.drop_path=0.1", "model.dropout=0.05",
                                "model.pos_embed_interp=bilinear", "model.mean=[0.5]", "model.std=[0.5]"]).model
    merged = finetune_model_config(weights_cfg, recipe, str(pair))
    assert (merged.drop_path, merged.dropout, merged.pos_embed_interp) == (0.1, 0.05, "bilinear")
    assert dataclasses.replace(merged, drop_path=0.0, dropout=0.0, pos_embed_interp="bicubic") == weights_cfg
    model, loaded = model_from_pair(pair, image_size=16, settings={"drop_path": 0.1, "pos_embed_interp": "bilinear"})
    assert model.blocks[-1].drop_path_rate == 0.1 and loaded["pos_embed_interp"] == "bilinear"
    # a key the recipe leaves unset comes from the weights
    assert finetune_model_config(dataclasses.replace(weights_cfg, drop_path=0.2),
                                 load_config(None).model, "w").drop_path == 0.2
    wide = load_config(TINY, ["model.width=64", "model.depth=2"]).model
    with pytest.raises(ConfigError, match=r"model\.width: the recipe sets 64, the weights have 32\n  model\.mean"):
        finetune_model_config(weights_cfg, wide, str(pair))  # (tiny's mean and std are not the weights' either)
    with pytest.raises(ConfigError, match=r"model\.width: the recipe sets 64 but the weights .* have 32; .* or set "
                                          r"model\.width=32 "):
        finetune_model_config(weights_cfg, load_config(TINY, ["model.width=64", "model.depth=2", "model.mean=[0.5]",
                                                              "model.std=[0.5]"]).model, str(pair))
    with pytest.raises(ValueError, match="would change the stored architecture"):
        model_from_pair(pair, settings={"width": 64})


def test_every_architecture_difference_is_named_at_once_with_overrides_that_work(pair):
    """A recipe written for other weights differs in many fields: one error lists them all, and
    the overrides it gives, pasted onto the command line, are accepted."""
    _, meta = read_weights_pair(pair)
    weights_cfg = ModelConfig(**meta["architecture"])
    other = ["model.width=64", "model.depth=3", "model.mlp_dim=200", "model.in_channels=3",
             "model.mean=[0.4,0.4,0.4]", "model.std=[0.2,0.2,0.2]"]
    with pytest.raises(ConfigError) as err:
        finetune_model_config(weights_cfg, load_config(TINY, other).model, str(pair))
    text = str(err.value)
    differing = [k.split("=")[0] for k in other]
    assert f"the recipe sets {len(differing)} architecture fields that differ from the weights {pair}" in text
    for key in differing:
        assert f"{key}: the recipe sets " in text, key
    overrides = text.rsplit("add the overrides ", 1)[1].split()
    assert [o.split("=")[0] for o in overrides] == differing
    merged = finetune_model_config(weights_cfg, load_config(TINY, other + overrides).model, str(pair))
    assert merged == weights_cfg


def test_finetune_stage_refuses_an_architecture_change_before_launching(pair, digits300, tmp_path):
    from stages import finetune

    cfg = load_config(TINY, ["model.depth=2", "model.heads=4", "finetune.image_size=8"])
    with pytest.raises(ConfigError, match=r"model\.heads: the recipe sets 4, the weights have 2"):
        finetune.run(cfg.finetune, digits300, pair, tmp_path / "ft", model=cfg.model)
    assert not (tmp_path / "ft" / "job.json").exists()  # no rank was started


# --------------------------------------------------------------------------- refused before launch


def test_recipes_that_cannot_run_are_refused_by_validation():
    with pytest.raises(ConfigError, match="offload needs optimizer=adamw.*offload_optimizer=none"):
        load_config(TINY, ["finetune.offload_optimizer=cpu", "finetune.zero_stage=2"])  # tiny's finetune is SGD
    with pytest.raises(ConfigError, match="pretrain.freeze"):
        load_config(TINY, ["pretrain.freeze=backbone"])
    with pytest.raises(ConfigError, match="ema_weights.*ema_decay"):
        load_config(TINY, ["finetune.ema_weights=true"])
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="layer_decay: must be in"):
            load_config(TINY, [f"finetune.layer_decay={bad}"])
    with pytest.raises(ConfigError, match="ema_decay: must be in"):
        load_config(TINY, ["finetune.ema_decay=1.0"])
    validate(load_config(TINY, ["finetune.layer_decay=0.75", "finetune.ema_decay=0.999", "finetune.ema_weights=true",
                                "finetune.freeze=backbone"]))
    assert load_config(TINY).finetune.optimizer == "sgd" and load_config(None).finetune.weight_decay == 0.0


def test_recipe_options_are_fingerprinted():
    for name in ("layer_decay", "ema_decay", "ema_weights", "freeze"):
        assert name not in EXECUTION_FIELDS
        assert name in train_fingerprint_fields(TrainConfig())


def test_export_and_benchmark_refuse_a_model_trained_on_other_classes(pair, three_classes, tmp_path):
    from pipeline.config import BenchmarkConfig, ExportConfig
    from stages import benchmark, export

    with pytest.raises(ValueError, match=r"predicts 10 classes .* has 3 classes"):
        export.run(ExportConfig(parity_images=4), pair, three_classes, tmp_path / "export")
    assert not (tmp_path / "export" / "model.onnx").exists()
    onnx = tmp_path / "other" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"not read: the classes are checked first")
    (onnx.parent / "model.onnx.json").write_text(json.dumps({"class_names": ["a", "b", "c"],
                                                            "output": {"shape": ["batch", 3]}}))
    with pytest.raises(ValueError, match=r"predicts 10 classes .* has 3 classes"):
        benchmark.run(BenchmarkConfig(), onnx, pair, tmp_path / "bench")
    assert not (tmp_path / "bench" / "bench.json").exists()


# --------------------------------------------------------------------------- 2 ranks, ZeRO-3


@pytest.mark.slow
def test_zero3_on_two_ranks_layer_decay_ema_and_model_settings(pair, digits300, tmp_path):
    """The finetune stage (a real 2-rank launch): partitioned params, gathered into the EMA."""
    from mlflow.tracking import MlflowClient

    from pipeline.track import start_tracker
    from stages import finetune

    cfg = load_config(TINY, ["model.depth=2", "model.mean=[0.5]", "model.std=[0.5]", "model.drop_path=0.1",
                             "finetune.image_size=16", "finetune.steps=3", "finetune.ranks=2",
                             "finetune.zero_stage=3", "finetune.micro_batch=4", "finetune.checkpoint_every=1",
                             "finetune.keep_checkpoints=5", "finetune.layer_decay=0.5", "finetune.ema_decay=0.5",
                             "finetune.ema_weights=true", "finetune.min_lr_ratio=0.2", "finetune.log_every=1",
                             "finetune.peak_tflops=1"])
    tracker = start_tracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), run_name="zero3")
    result = finetune.run(cfg.finetune, digits300, pair, tmp_path / "ft", tracker, model=cfg.model)
    tracker.finish()
    assert result["world_size"] == 2 and result["zero_stage"] == 3
    lrs = result["lr_by_group"]
    top = lrs["layer_03/no_decay"]
    assert top > 0 and lrs["layer_01/no_decay"] / top == pytest.approx(0.5 ** DEPTH, rel=1e-9)
    assert lrs["layer_00/no_decay"] / top == pytest.approx(0.5 ** (DEPTH + 1), rel=1e-9)
    start = start_weights(pair, 16, 10, [str(i) for i in range(10)])
    want = expected_ema(tmp_path / "ft" / "checkpoints", start, 0.5, 3)
    written, meta = read_weights_pair(result["weights"])
    assert max((written[k] - want[k]).abs().max().item() for k in want) < 1e-6
    assert meta["architecture"]["drop_path"] == 0.1 and meta["weights_written"] == "ema"
    assert result["head_reset"] is False and result["val_accuracy_before"] is not None
    history = MlflowClient(tracking_uri=tracker.tracking_uri).get_metric_history(tracker.run_id, "val_accuracy_ema")
    assert [m.value for m in history] == [result["val_accuracy_ema"]]
