"""Stage 4, export: a weights pair -> ONNX with a dynamic batch axis, parity-checked on held-out images.

Reads: model.safetensors/model.json, manifest.json (its val split supplies real held-out images; a
local file or an s3:// or http(s):// URL, the shards read beside it).
Writes: <out>/model.onnx and <out>/model.onnx.json (input name/shape, normalization, classes, opset,
parity figures). Fails, leaving no model.onnx.json, if max |dlogit| exceeds export.parity_tolerance
or top-1 disagrees on any image.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import torch

from pipeline.atomic import write_json
from pipeline.config import ExportConfig
from pipeline.data.loader import iter_split, make_transform
from pipeline.data.manifest import load_manifest, manifest_location
from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, check_parity, export_onnx
from pipeline.model.weights import check_model_classes, model_from_pair
from pipeline.track import NullTracker, Tracker
from stages import record
from stages.lineage import content_sha256, log_dataset_input


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the allowed tolerance."""


def held_out_images(manifest_path: str | Path, n: int, meta: dict) -> torch.Tensor:
    """The first `n` val images, preprocessed exactly as the model expects (N, C, H, W)."""
    arch = meta["architecture"]
    h, w = meta["image_size"]
    transform = make_transform(h, arch["in_channels"], meta["mean"], meta["std"])
    images = [transform(img) for _, img, _ in itertools.islice(iter_split(manifest_path, "val"), n)]
    if not images:
        raise ValueError(f"{manifest_path}: the val split is empty; parity needs held-out images")
    return torch.stack(images)


def run(export: ExportConfig, weights: str | Path, manifest: str | Path, out_dir: str | Path,
        tracker: Tracker | None = None, force: bool = False) -> dict:
    """Export and parity-check; return the figures written to model.onnx.json."""
    tracker = tracker or NullTracker()
    out_dir = Path(out_dir)
    weights = Path(weights)
    manifest = manifest_location(manifest)  # an absolute path, or the manifest's URL
    # a missing or malformed manifest fails here, naming it; so does one with other classes than the model's
    check_model_classes(weights, load_manifest(manifest).class_names, str(manifest))
    cfg = dataclasses.asdict(export)
    fp = record.fingerprint("export", cfg, [weights, weights.with_suffix(".json"), manifest])
    if not force and (done := record.completed(out_dir, fp)):
        print(f"[export] up to date: {done['onnx']}")
        return done
    record.begin(out_dir, fp)
    tracker.log_params({"export": cfg, "weights": str(weights)})
    model, meta = model_from_pair(weights)
    model.eval()
    h, w = meta["image_size"]
    in_ch = meta["architecture"]["in_channels"]
    onnx_path = export_onnx(model, out_dir / "model.onnx", image_size=(h, w), in_channels=in_ch, opset=export.opset)
    images = held_out_images(manifest, export.parity_images, meta)
    parity = check_parity(onnx_path, model, images)
    tracker.log_metrics({"parity_max_abs_diff": parity["max_abs_diff"], "parity_top1_agreement": parity["top1_agreement"]})
    ok = parity["max_abs_diff"] <= export.parity_tolerance and parity["disagreements"] == 0
    if not ok:
        onnx_path.rename(out_dir / "model.onnx.failed")  # keep for inspection, never as a finished export
        raise ParityError(
            f"{onnx_path}: parity check failed on {parity['n_images']} held-out images: max |dlogit| "
            f"{parity['max_abs_diff']:.3e} (limit {export.parity_tolerance:.1e}), top-1 disagreements "
            f"{parity['disagreements']}"
        )
    info = {
        "onnx": str(onnx_path),
        "input": {"name": INPUT_NAME, "shape": ["batch", in_ch, h, w], "dtype": "float32",
                  "layout": "NCHW", "preprocess": "RGB/L pixels / 255, then (x - mean) / std",
                  "mean": meta["mean"], "std": meta["std"]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", meta["num_classes"]]},
        "class_names": meta.get("class_names"),
        "opset": export.opset,
        "weights": str(weights),
        "architecture": meta["architecture"],
        "parity": {**parity, "tolerance": export.parity_tolerance},
    }
    meta_path = out_dir / "model.onnx.json"
    write_json(meta_path, info)
    tracker.log_artifact(meta_path)
    tracker.log_lineage(inputs={"weights": content_sha256(weights), "dataset": log_dataset_input(tracker, manifest, "eval")},
                        outputs={"onnx": content_sha256(onnx_path)})
    record.finish(out_dir, "export", fp, [onnx_path, meta_path], info)
    print(f"[export] {onnx_path}: parity max |dlogit| {parity['max_abs_diff']:.2e}, top-1 agreement "
          f"{parity['top1_agreement']:.4f} on {parity['n_images']} held-out images ({', '.join(parity['providers'])})")
    return info
