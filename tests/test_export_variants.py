"""Export variants (fused fp32, fp16, int8 dynamic/static), their checks and gates, metadata, opsets, `bench export`.

One small ViT is trained in-process on real scikit-learn digits (8x8, ~600 train / ~300 held-out
images) so the accuracy gate is measured on a model that has learned something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, DataConfig, ExportConfig, ModelConfig, load_config
from pipeline.export import graph as graph_builder
from pipeline.export.onnx_export import (ExportError, check_opset, check_parity, export_graph, ort_session,
                                         read_metadata, runtime_max_opset, supported_opsets)
from pipeline.data.manifest import file_sha256
from pipeline.export.variants import variant_file
from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.vit import VisionTransformer
from pipeline.model.weights import save_weights_pair, weights_meta
from pipeline.run_layout import VARIANTS_PLOT
from stages import export as export_stage

MODEL = ModelConfig(patch_size=2, width=48, depth=2, heads=2, mlp_dim=96, in_channels=1, mean=[0.5], std=[0.5])
CLASSES = [str(i) for i in range(10)]
ALL = ["fp32", "optimized", "fp16", "int8_dynamic", "int8_static"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(weights path, manifest path): 900 digits (a third held out), a 2-block ViT trained for 120 steps."""
    from pipeline.data.eval_stream import iter_split
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.transforms import make_transform
    from pipeline.model.vit import build_model

    root = tmp_path_factory.mktemp("trained")
    prepare_dataset(DataConfig(source="digits", limit=900, val_fraction=0.34, shard_max_samples=200, workers=1),
                    root / "data")
    manifest = root / "data" / "manifest.json"
    transform = make_transform(8, 1, MODEL.mean, MODEL.std)
    pairs = [(transform(im), y) for _, im, y in iter_split(manifest, "train")]
    x, y = torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 50k-parameter model: more threads only add barrier waits on a shared CPU
    try:
        torch.manual_seed(0)
        model = build_model(MODEL, 8, 10)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(120):
            idx = torch.randint(0, len(x), (64,))
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    weights = save_weights_pair(root / "weights", model.state_dict(), weights_meta(MODEL, 8, 10, CLASSES))
    return weights, manifest


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The export stage with every variant on the trained model: (info, out dir, weights)."""
    weights, manifest = trained
    out = tmp_path_factory.mktemp("export")
    info = export_stage.run(ExportConfig(variants=ALL, parity_images=64), weights, manifest, out)
    return info, out, weights


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = dict(image_size=16, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, num_classes=10, in_channels=3)
    model = VisionTransformer(**{**args, **kw}).eval()
    with torch.no_grad():  # fresh ViTs start with zero biases and class token: perturb so every term is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_every_variant_is_written_checked_and_described(exported):
    info, out, _ = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([variant_file(v) for v in ALL]
                                                           + ["model.onnx.json", VARIANTS_PLOT, "stage.json"])
    assert list(info["variants"]) == ALL
    v = info["variants"]
    depth = MODEL.depth
    # The fused graph (CPU form): one Attention per block, each norm one LayerNormalization, GELU fused
    # with its bias; the fp16 (GPU) graph fuses the residual adds into SkipLayerNormalization.
    assert v["optimized"]["fusions"] == {"Attention": depth, "BiasGelu": depth, "LayerNormalization": 2 * depth + 1}
    assert v["fp16"]["fusions"]["SkipLayerNormalization"] == 2 * depth
    # The patch embedding is a MatMul (a plain patchify), so int8 dynamic has no (slow) ConvInteger.
    assert "Conv" not in v["optimized"]["op_counts"] and "ConvInteger" not in v["int8_dynamic"]["op_counts"]
    assert "Attention" not in v["fp32"]["fusions"] and v["fp32"]["op_counts"].get("MatMul", 0) > 4 * depth
    assert v["fp16"]["fusions"]["Attention"] == depth
    assert v["int8_dynamic"]["fusions"]["QAttention"] == depth and v["int8_dynamic"]["fusions"]["MatMulInteger"] > 0
    assert v["int8_static"]["op_counts"]["QuantizeLinear"] > 0 and v["int8_static"]["op_counts"]["DequantizeLinear"] > 0
    for name in ("fp32", "optimized"):
        assert v[name]["parity"]["max_abs_diff"] < 1e-4 and v[name]["parity"]["disagreements"] == 0
    fp16 = v["fp16"]["parity"]
    assert fp16["max_abs_diff"] < ExportConfig().fp16_parity_tolerance and fp16["top1_agreement"] >= 0.995
    assert fp16["max_abs_diff"] > 1e-5  # it really computes in fp16
    torch_top1 = v["fp32"]["accuracy"]["torch_fp32_top1"]
    assert torch_top1 > 0.5  # the model learned: the gate is measured on a real classifier
    for name in ALL:
        acc = v[name]["accuracy"]
        assert acc["n_images"] > 250 and acc["drop_points"] <= 0.5, (name, acc)
        assert acc["drop_points"] == pytest.approx(100 * (torch_top1 - acc["top1"]))
    # Quantized graphs are smaller on disk; fp16 about half the fused fp32 one.
    assert v["int8_dynamic"]["bytes"] < v["optimized"]["bytes"] and v["fp16"]["bytes"] < 0.7 * v["optimized"]["bytes"]
    assert info["parity"]["n_images"] == 64 and info["opset"] == 18


def test_metadata_round_trips_through_an_onnxruntime_session(exported):
    info, out, weights = exported
    sha = file_sha256(weights)
    for name in ALL:
        session, _ = ort_session(out / variant_file(name), providers=["CPUExecutionProvider"])
        meta = read_metadata(session)
        assert meta["variant"] == name
        assert meta["class_names"] == CLASSES and meta["mean"] == [0.5] and meta["std"] == [0.5]
        assert meta["image_size"] == [8, 8] and meta["in_channels"] == 1 and meta["patch_size"] == 2
        assert meta["pos_embed_interp"] == "bicubic" and "bicubic resize" in meta["resize"] and meta["crop"] is None
        assert meta["weights_sha256"] == sha
    assert info["metadata"]["weights_sha256"] == sha and read_metadata(out / "model.onnx")["variant"] == "fp32"


def test_predict_reads_each_variant_file_alone_from_its_metadata(exported, trained, tmp_path, capsys):
    """A variant shipped without model.onnx.json (only model.onnx has one) still predicts: its
    preprocessing comes from its own vitpipe.* metadata, and its answers are PyTorch's."""
    import shutil

    from pipeline.cli import main
    from pipeline.export.predict import load_predictor
    from pipeline.export.variants import labelled_images
    from pipeline.model.weights import model_from_pair

    info, out, weights = exported
    _, manifest = trained
    reference = load_predictor(weights)
    images, _ = labelled_images(manifest, "val", 64, model_from_pair(weights)[1])
    expected = reference.logits(images.numpy()).argmax(1)
    for name in ALL:
        alone = tmp_path / name
        alone.mkdir()
        path = Path(shutil.copy(out / variant_file(name), alone))
        predictor = load_predictor(path)
        assert predictor.preprocessing == reference.preprocessing, name
        agreement = (predictor.logits(images.numpy()).argmax(1) == expected).mean()
        assert agreement >= (1.0 if name in ("fp32", "optimized") else 0.95), (name, agreement)
    image = tmp_path / "digit.png"
    Image.fromarray((images[0, 0].numpy() * 0.5 + 0.5).clip(0, 1) * 255).convert("L").save(image)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "int8_dynamic" / variant_file("int8_dynamic")), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["top_k"][0]["class"] in CLASSES


def test_accuracy_gate_fails_when_int8_loses_accuracy_and_leaves_no_finished_export(trained, tmp_path):
    """The failure mode int8 has on real transformers: an outlier weight that sets the quantization scale.

    One MLP unit of the trained model is switched off in fp32 (bias -100: GELU gives exactly 0) and
    given a large outgoing weight: PyTorch's answers do not change at all, but the per-tensor int8
    scale of that layer grows ~100x and rounds its other weights away.
    """
    from pipeline.model.weights import read_weights_pair

    weights, manifest = trained
    state, meta = read_weights_pair(weights)
    state["blocks.1.mlp.fc1.bias"][0] = -100.0
    state["blocks.1.mlp.fc2.weight"][:, 0] = 50.0
    outlier = save_weights_pair(tmp_path / "outlier", state, meta)
    out = tmp_path / "export"
    with pytest.raises(export_stage.AccuracyError, match=r"int8_dynamic check failed.*points below PyTorch fp32"):
        export_stage.run(ExportConfig(variants=["optimized", "int8_dynamic"]), outlier, manifest, out)
    # The fused fp32 graph passed and stays; the failed one is kept for inspection under a name no
    # reader takes for a model; no model.onnx.json, no stage.json: the stage is not done.
    assert sorted(p.name for p in out.iterdir()) == ["model.int8_dynamic.onnx.failed", "model.optimized.onnx"]


def test_accuracy_gate_passes_the_real_model_and_fails_below_its_drop(exported, trained, tmp_path):
    info, _, _ = exported
    weights, manifest = trained
    acc = info["variants"]["int8_dynamic"]["accuracy"]
    assert acc["drop_points"] <= ExportConfig().max_accuracy_drop  # the default gate passed in `exported`
    if acc["drop_points"] > 0:  # with a drop to see, a limit below it must fail
        with pytest.raises(export_stage.AccuracyError):
            export_stage.run(ExportConfig(variants=["int8_dynamic"], max_accuracy_drop=acc["drop_points"] / 2),
                             weights, manifest, tmp_path)
    else:  # int8 answered more held-out images right than fp32: even a zero limit passes
        export_stage.run(ExportConfig(variants=["int8_dynamic"], max_accuracy_drop=0.0), weights, manifest, tmp_path)
        assert (tmp_path / "model.onnx.json").is_file()


def test_dynamic_resolution_graph_matches_resampled_models_at_three_sizes(trained, tmp_path):
    weights, manifest = trained
    info = export_stage.run(ExportConfig(variants=["optimized"], dynamic_resolution=True, parity_images=32),
                            weights, manifest, tmp_path)
    entry = info["variants"]["optimized"]
    assert entry["parity"]["max_abs_diff"] < 1e-4  # native 8x8
    sizes = [r["image_size"] for r in entry["resolutions"]]
    assert sizes == [[4, 4], [12, 12]]
    assert all(r["max_abs_diff"] < 1e-4 and r["n_images"] == 32 for r in entry["resolutions"])
    dims = onnx.load(str(tmp_path / "model.optimized.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "height", "width"]
    assert entry["op_counts"]["Resize"] == 1


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_in_graph_pos_embed_resize_matches_resample_pos_embed(mode):
    model = tiny_vit()
    session = _session(graph_builder.build_vit_graph(model, opset=18, dynamic_resolution=True, pos_embed_mode=mode))
    for size in (8, 20, 28):  # 2x2, 5x5 and 7x7 grids from the stored 4x4
        other = tiny_vit(image_size=size)
        state = model.state_dict()
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], other.grid, model.grid, mode=mode)
        other.load_state_dict(state)
        x = torch.randn(3, 3, size, size)
        diff = np.abs(other(x).detach().numpy() - session.run(None, {"images": x.numpy()})[0]).max()
        assert diff < 1e-4, (mode, size, diff)


def _session(proto):
    import onnxruntime as ort

    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_fused_graph_of_the_hybrid_matches_pytorch():
    # the BiT stem (weight-standardized convs, GroupNorm, SAME padding) inlined before the fused blocks
    model = tiny_vit(hybrid=True, stem_root="small", stem_stages=[1, 1, 1], stem_width=8)
    proto = graph_builder.build_vit_graph(model, opset=18)
    session = _session(proto)
    x = torch.randn(5, 3, 16, 16)
    assert np.abs(model(x).detach().numpy() - session.run(None, {"images": x.numpy()})[0]).max() < 1e-4
    assert graph_builder.fusions(proto)["Attention"] == 2 and graph_builder.op_counts(proto)["Conv"] > 3
    with pytest.raises(ValueError, match="dynamic_resolution"):
        graph_builder.build_vit_graph(model, opset=18, dynamic_resolution=True)


@pytest.mark.parametrize("skip_layer_norm", [False, True])
def test_both_residual_norm_forms_match_pytorch(skip_layer_norm):
    # CPU form (Add + LayerNormalization) and GPU form (SkipLayerNormalization): the same function.
    model = tiny_vit(depth=3)
    proto = graph_builder.build_vit_graph(model, opset=18, skip_layer_norm=skip_layer_norm)
    x = torch.randn(4, 3, 16, 16)
    assert np.abs(model(x).detach().numpy() - _session(proto).run(None, {"images": x.numpy()})[0]).max() < 1e-4
    fused = graph_builder.fusions(proto)
    assert fused.get("SkipLayerNormalization", 0) == (6 if skip_layer_norm else 0)
    assert fused["LayerNormalization"] == (1 if skip_layer_norm else 7)


@pytest.mark.parametrize("skip_layer_norm", [False, True])
@pytest.mark.parametrize("norm_eps", [1e-12, 0.5])
def test_fused_graph_keeps_each_norms_eps(norm_eps, skip_layer_norm):
    """Hugging Face ViTs use LayerNorm eps 1e-12 (model.norm_eps): the fused graph writes the eps of
    each norm, where it used to refuse every eps but 1e-6. At eps 0.5 a graph that wrote 1e-6
    would miss PyTorch by far more than the tolerance, so the match says the eps is the model's."""
    model = tiny_vit(depth=2, norm_eps=norm_eps)
    proto = graph_builder.build_vit_graph(model, opset=18, skip_layer_norm=skip_layer_norm)
    x = torch.randn(4, 3, 16, 16)
    assert np.abs(model(x).detach().numpy() - _session(proto).run(None, {"images": x.numpy()})[0]).max() < 1e-4
    norms = [n for n in proto.graph.node if n.op_type in ("LayerNormalization", "SkipLayerNormalization")]
    eps = [a.f for n in norms for a in n.attribute if a.name == "epsilon"]
    assert len(norms) == 5 and eps == pytest.approx([norm_eps] * 5, rel=1e-6)
    if norm_eps == 0.5:  # the difference the eps makes is visible, so the match above means something
        wrong = tiny_vit(depth=2, norm_eps=1e-6)
        assert np.abs(model(x).detach().numpy() - wrong(x).detach().numpy()).max() > 1e-2


@pytest.mark.parametrize("dynamic, patch_op", [(False, "MatMul"), (True, "Conv")])
def test_patch_embedding_is_a_matmul_at_the_fixed_size(dynamic, patch_op):
    # Fixed size: Reshape/Transpose into patches + MatMul; dynamic resolution keeps the Conv (any H, W).
    model = tiny_vit()
    proto = graph_builder.build_vit_graph(model, opset=18, dynamic_resolution=dynamic)
    x = torch.randn(3, 3, 16, 16)
    assert np.abs(model(x).detach().numpy() - _session(proto).run(None, {"images": x.numpy()})[0]).max() < 1e-4
    first = next(n for n in proto.graph.node if n.op_type in ("MatMul", "Conv"))
    assert first.op_type == patch_op and first.name.startswith("patch_embed")


@pytest.mark.parametrize("kw, named", [
    (dict(class_token=False, global_pool="avg"), "global_pool='avg'"),
    (dict(fc_norm=True, global_pool="avg", class_token=False), "fc_norm"),
])
def test_fused_graph_refuses_what_it_does_not_build_by_name(kw, named):
    # The BiT stem (hybrid) and timm's pooling variants are exported by torch.onnx.export (fp32);
    # the builder names them instead of writing a graph that would only fail its parity check.
    with pytest.raises(ValueError, match="does not cover this model") as err:
        graph_builder.build_vit_graph(tiny_vit(**kw), opset=18)
    assert named in str(err.value) and "export.variants=[fp32]" in str(err.value)


def test_fp16_without_fp32_io_takes_and_returns_fp16(tmp_path):
    from pipeline.export.precision import to_fp16

    model = tiny_vit()
    half = to_fp16(graph_builder.build_vit_graph(model, opset=18, skip_layer_norm=True), keep_io_types=False,
                   fp32_ops=["SkipLayerNormalization", "LayerNormalization"])
    path = export_graph(half, tmp_path / "m.onnx", image_size=16, in_channels=3, opset=18)
    session, _ = ort_session(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)" and session.get_outputs()[0].type == "tensor(float16)"
    counts = graph_builder.op_counts(onnx.load(str(path)))
    assert counts["Cast"] >= 2 * 5  # the kept-fp32 norms are wrapped in Casts
    report = check_parity(path, model, torch.randn(40, 3, 16, 16), session=session)
    assert report["max_abs_diff"] < 5e-2 and report["top1_agreement"] >= 0.95


def test_a_variant_that_fails_while_written_leaves_no_file(trained, tmp_path, monkeypatch):
    from pipeline.export import precision

    def broken(src, dst, calibration, **options):  # a fake only here: this test is about the quantizer failing
        open(dst, "wb").write(b"half a model")
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr(precision, "quantize_int8_static", broken)
    weights, manifest = trained
    with pytest.raises(ExportError, match="int8_static quantization failed.*calibration exploded"):
        export_stage.run(ExportConfig(variants=["int8_static"]), weights, manifest, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp folder, no record


def test_opsets_outside_the_supported_range_are_refused_before_any_work(trained, tmp_path):
    lo, hi = supported_opsets()
    assert lo == 18 and hi == runtime_max_opset() >= 18
    check_opset(lo)
    check_opset(hi)
    with pytest.raises(ExportError, match=rf"{hi + 1} is outside the supported range {lo}\.\.{hi}"):
        check_opset(hi + 1)
    weights, manifest = trained
    out = tmp_path / "never"
    with pytest.raises(ExportError, match="supported range"):
        export_stage.run(ExportConfig(opset=hi + 1), weights, manifest, out)
    assert not out.exists()
    with pytest.raises(ConfigError, match="export.opset: 17 is below 18"):
        load_config("configs/pipeline/tiny.yaml", ["export.opset=17"])
    with pytest.raises(ConfigError, match="export.variants.*did you mean 'int8_dynamic'"):
        load_config("configs/pipeline/tiny.yaml", ["export.variants=[int8_dynamik]"])


def test_the_plain_export_emits_the_asked_opset_without_conversion_warnings(tmp_path, caplog, capfd):
    from pipeline.export.onnx_export import export_onnx

    path = export_onnx(tiny_vit(depth=1), tmp_path / "m.onnx", image_size=16, in_channels=3, opset=18)
    assert next(o.version for o in onnx.load(str(path)).opset_import if o.domain == "") == 18
    text = capfd.readouterr().err + caplog.text
    assert "version conversion" not in text.lower() and "torchvision" not in text.lower()


def test_bench_export_measures_every_candidate_and_the_busy_case(tmp_path):
    from tools.bench_export import bench_export

    result = bench_export("vit-ti4", image_size=16, batch_sizes=(1, 4), rounds=1, iterations=1, busy_seconds=20,
                          num_classes=10, depth=1, workdir=tmp_path)
    quiet = [r for r in result["rows"] if r["case"] == "as_is"]
    names = {r["candidate"] for r in quiet}
    assert {"eager", "fp32", "optimum", "optimized", "int8_dynamic", "int8_static"} <= names
    assert {r["batch"] for r in quiet} == {1, 4}
    for r in result["rows"]:
        assert r["best_ms"] > 0 and r["vs_best_eager"] > 0
    best_eager = min(r["best_ms"] for r in quiet if r["batch"] == 1 and r["candidate"].startswith("eager"))
    row = next(r for r in quiet if r["batch"] == 1 and r["candidate"] == "optimized")
    assert row["vs_best_eager"] == pytest.approx(best_eager / row["best_ms"])
    busy = [r["candidate"] for r in result["rows"] if r["case"] == "busy"]
    assert "optimized[ours: spinning off]" in busy and "optimized[ort defaults: spinning on]" in busy
    assert result["busy"]["seconds_measured"] < 20 and not result["busy"]["load_ended_early"]
    assert result["graphs"]["optimized"]["fusions"]["Attention"] == 1
    assert "Attention" not in result["graphs"]["optimum"]["fusions"]  # what the issue measured of the Optimum way
    json.dumps(result)  # the JSON written by the command


def _cuda_session_or_skip(path):
    import onnxruntime as ort

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu")
    session, used = ort_session(path, providers=["CUDAExecutionProvider"])
    if used[0] != "CUDAExecutionProvider":
        pytest.fail(f"asked for CUDA, onnxruntime gave {used}: its CUDA libraries did not load")
    return session


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # before the fixtures run
def test_fused_and_fp16_graphs_on_cuda_match_pytorch(exported, trained):
    from pipeline.export.variants import labelled_images
    from pipeline.model.weights import model_from_pair

    _, out, _ = exported
    weights, manifest = trained
    model, meta = model_from_pair(weights)
    images, _ = labelled_images(manifest, "val", None, meta)
    for name, tolerance in (("optimized", 1e-3), ("fp16", ExportConfig().fp16_parity_tolerance)):
        session = _cuda_session_or_skip(out / variant_file(name))
        report = check_parity(out / variant_file(name), model, images, session=session)
        assert report["max_abs_diff"] < tolerance and report["top1_agreement"] >= 0.995, (name, report)


def test_int8_weights_are_7_bit_exactly_where_the_cpu_would_saturate(exported):
    """x86 without VNNI multiplies u8 x s8 with VPMADDUBSW, whose 16-bit sums saturate: there the
    quantizers use 7-bit weights (reduce_range); the file records which."""
    from pipeline.export import precision

    assert precision.cpu_has_vnni("flags : fpu sse avx2 avx512f avx512_vnni") is True
    assert precision.cpu_has_vnni("flags : fpu sse avx2 avx_vnni") is True
    assert precision.cpu_has_vnni("flags : fpu sse avx2 fma") is False
    info, out, _ = exported
    bits = 7 if precision.int8_reduce_range() else 8
    for variant in ("int8_dynamic", "int8_static"):
        assert read_metadata(out / variant_file(variant))["int8_weight_bits"] == bits
