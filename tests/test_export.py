"""ONNX export, PyTorch-vs-onnxruntime parity on real digit images, and the benchmark helpers (CPU, fast)."""

from __future__ import annotations

import copy
import math
import os
import re

import numpy as np
import onnx
import pytest
import torch

from pipeline.config import BenchmarkConfig, ExportConfig
from pipeline.export.benchmark import benchmark_onnx, benchmark_torch, compare, environment
from pipeline.export.onnx_export import ExportError, check_parity, export_onnx, ort_session
from pipeline.model.vit import VisionTransformer
from pipeline.tables import format_table

IMAGE = 16
TOLERANCE = ExportConfig().parity_tolerance  # 1e-4: the pipeline's own bar


def tiny_vit(in_channels: int, seed: int = 0, hybrid: bool = False) -> VisionTransformer:
    torch.manual_seed(seed)
    # The hybrid: a small-root BiT stem (two bottleneck stages, stride 2) in place of the patch conv.
    stem = dict(hybrid=True, stem_root="small", stem_stages=[1, 1], stem_width=8) if hybrid else {}
    model = VisionTransformer(
        image_size=IMAGE, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64,
        num_classes=10, in_channels=in_channels, **stem,
    )
    if hybrid:  # the zero-initialized last norms would make every bottleneck its shortcut: not a test
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm3.weight"):
                    p.normal_(1.0, 0.2)
    return model.eval()


def digit_images(n: int, in_channels: int) -> torch.Tensor:
    """The first `n` scikit-learn digits: 8x8 (0..16) upscaled to 16x16 bicubic, normalized to [-1, 1]."""
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits().images[:n]  # (n, 8, 8), values 0..16
    out = []
    for img in raw:
        pil = Image.fromarray(np.uint8(np.round(img * 255.0 / 16.0)), mode="L")
        big = np.asarray(pil.resize((IMAGE, IMAGE), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append((big - 0.5) / 0.5)
    x = torch.from_numpy(np.stack(out))[:, None]  # (n, 1, 16, 16)
    return x.expand(-1, in_channels, -1, -1).contiguous()


@pytest.fixture(scope="module", params=[(1, False), (3, False), (1, True)], ids=["gray", "rgb", "hybrid"])
def exported(request, tmp_path_factory):
    """(model, onnx path, in_channels): one export per channel count and for the hybrid, shared by the tests below."""
    c, hybrid = request.param
    model = tiny_vit(c, hybrid=hybrid)
    out = tmp_path_factory.mktemp(f"onnx{c}{'h' if hybrid else ''}") / "model.onnx"
    path = export_onnx(model, out, image_size=(IMAGE, IMAGE), in_channels=c)
    return model, path, c


def test_export_writes_a_checked_model_with_a_symbolic_batch(exported):
    _, path, c = exported
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temp files or stray .data left
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    (inp,) = proto.graph.input
    assert inp.name == "images" and [o.name for o in proto.graph.output] == ["logits"]
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [c, IMAGE, IMAGE]
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == ExportConfig().opset


def test_session_reports_the_providers_it_really_got(exported):
    _, path, _ = exported
    session, used = ort_session(path)
    assert isinstance(used, list) and used and "CPUExecutionProvider" in used
    assert used == session.get_providers()
    _, used_cpu = ort_session(path, providers=["CPUExecutionProvider"], threads=1)
    assert used_cpu == ["CPUExecutionProvider"]


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_parity_on_digits_across_batch_sizes(exported, batch_size):
    model, path, c = exported
    images = digit_images(130, c)  # 130 = 2*64 + 2: the last batch is ragged for every size but 1
    session, _ = ort_session(path, providers=["CPUExecutionProvider"])
    report = check_parity(path, model, images, batch_size=batch_size, session=session)
    assert report["n_images"] == 130
    assert report["max_abs_diff"] < TOLERANCE, report
    assert report["mean_abs_diff"] <= report["max_abs_diff"]
    assert report["top1_agreement"] == 1.0 and report["disagreements"] == 0
    assert report["providers"] == ["CPUExecutionProvider"]


def test_parity_fails_when_weights_change_after_export(exported):
    model, path, c = exported
    changed = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    report = check_parity(path, changed, digit_images(64, c))
    assert report["max_abs_diff"] > TOLERANCE


def test_export_to_a_missing_or_unusable_dir_names_the_path(tmp_path):
    model = tiny_vit(1)
    missing = tmp_path / "no" / "such" / "dir" / "model.onnx"
    with pytest.raises(ExportError, match=str(missing.parent)):
        export_onnx(model, missing, image_size=IMAGE, in_channels=1)
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    with pytest.raises(ExportError, match="afile"):
        export_onnx(model, afile / "model.onnx", image_size=IMAGE, in_channels=1)
    if os.geteuid() != 0:  # root can write anywhere, so only a normal user sees a read-only dir fail
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ExportError, match="not writable"):
                export_onnx(model, ro / "model.onnx", image_size=IMAGE, in_channels=1)
        finally:
            ro.chmod(0o755)
    assert not missing.parent.exists()


def _check_rows(rows, runtime):
    assert [r["batch_size"] for r in rows] == [1, 8]
    for r in rows:
        assert r["runtime"] == runtime and r["iterations"] == 10 and r["providers"]
        lat = [r["latency_ms_p50"], r["latency_ms_p90"], r["latency_ms_p99"], r["latency_ms_mean"]]
        assert all(math.isfinite(v) and v > 0 for v in lat)
        assert r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1000.0 / r["latency_ms_mean"])


def test_benchmarks_compare_and_table(exported):
    model, path, c = exported
    kw = dict(image_size=IMAGE, in_channels=c, warmup=2, iterations=10, threads=1)
    threads_before = torch.get_num_threads()
    ort_rows = benchmark_onnx(path, [1, 8], providers=BenchmarkConfig().providers, **kw)
    torch_rows = benchmark_torch(model, [1, 8], **kw)
    assert torch.get_num_threads() == threads_before  # restored after the run
    _check_rows(ort_rows, "onnxruntime")
    _check_rows(torch_rows, "torch")
    assert "CPUExecutionProvider" in ort_rows[0]["providers"]

    rows = compare(ort_rows, torch_rows)
    assert [r["batch_size"] for r in rows] == [1, 8]
    for r, o, t in zip(rows, ort_rows, torch_rows):
        assert r["speedup"] == pytest.approx(o["images_per_s"] / t["images_per_s"])

    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].split()[0] == "batch_size" and "speedup" in table[0]
    rule_starts = [m.start() for m in re.finditer(r"-+", table[1])]
    assert rule_starts == [m.start() for m in re.finditer(r"\S+", table[0])]  # columns line up

    env = environment(threads=1)
    assert env["torch"] == torch.__version__ and env["threads_setting"] == 1
    assert env["cpu_count"] >= 1 and "onnxruntime" in env
