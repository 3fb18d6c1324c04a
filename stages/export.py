"""Stage 4, export: a weights pair -> the ONNX variants of export.variants, each parity-checked on held-out images.

Reads: model.safetensors/model.json, manifest.json (its val split supplies real held-out images and
labels, its train split the int8_static calibration sample; a local file or an s3:// or http(s)://
URL, the shards read beside it).
Writes: <out>/model.onnx (fp32, torch.onnx.export), model.<variant>.onnx for the others, and
model.onnx.json (input name/shape, preprocessing, classes, opset, and per variant: file, fusions,
parity, held-out top-1 accuracy and its drop against PyTorch fp32).

Checks, per variant (the first failure stops the stage; its file is renamed <file>.failed and no
model.onnx.json is written):
  fp32, optimized  max |dlogit| <= export.parity_tolerance and no top-1 disagreement
  fp16             max |dlogit| <= export.fp16_parity_tolerance, top-1 agreement >= export.fp16_min_top1_agreement
  every variant    held-out top-1 accuracy at most export.max_accuracy_drop points below PyTorch fp32's
With export.dynamic_resolution, optimized and fp16 are also parity-checked at two other resolutions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.atomic import move_into_place, write_json
from pipeline.config import ExportConfig
from pipeline.data.manifest import file_sha256, load_manifest, manifest_location
from pipeline.eval.plots import plot_variant_accuracy
from pipeline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, check_opset, compare_logits, onnx_logits, torch_logits
from pipeline.export.variants import (graph_summary, labelled_images, measure_variant,
                                      preprocessing_metadata, write_variants)
from pipeline.model.weights import check_model_classes, model_from_pair, pair_paths
from pipeline.progress import Progress
from pipeline.run_layout import VARIANTS_PLOT
from pipeline.track import NullTracker, Tracker
from stages import record
from stages.lineage import content_sha256, log_dataset_input

PARITY_PROVIDERS = ["CPUExecutionProvider"]  # checks run where every machine can run them; benchmark picks GPUs


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the allowed tolerance."""


class AccuracyError(RuntimeError):
    """A variant's held-out top-1 accuracy fell more than export.max_accuracy_drop below PyTorch fp32's."""


def held_out_images(manifest_path: str | Path, n: int, meta: dict) -> torch.Tensor:
    """The first `n` val images, preprocessed exactly as the model expects (N, C, H, W)."""
    return labelled_images(manifest_path, "val", n, meta)[0]


def other_resolutions(image_size: tuple[int, int], patch: int) -> list[tuple[int, int]]:
    """Two sizes besides the model's for the dynamic-resolution check: about half and 1.5x, multiples of the patch."""
    def snap(v: float) -> int:
        return max(patch, int(round(v / patch)) * patch)

    h, w = image_size
    return [(snap(h / 2), snap(w / 2)), (snap(h * 1.5), snap(w * 1.5))]


def _check_variant(variant: str, parity: dict, acc_drop: float, export: ExportConfig, path: Path) -> None:
    """Raise ParityError/AccuracyError (after renaming `path` to .failed) when `variant` misses its bar."""
    problem, error = None, ParityError
    if variant in ("fp32", "optimized"):
        if parity["max_abs_diff"] > export.parity_tolerance or parity["disagreements"]:
            problem = (f"max |dlogit| {parity['max_abs_diff']:.3e} (limit {export.parity_tolerance:.1e}), "
                       f"top-1 disagreements {parity['disagreements']}")
    elif variant == "fp16":
        if parity["max_abs_diff"] > export.fp16_parity_tolerance or parity["top1_agreement"] < export.fp16_min_top1_agreement:
            problem = (f"max |dlogit| {parity['max_abs_diff']:.3e} (fp16 limit {export.fp16_parity_tolerance:.1e}), "
                       f"top-1 agreement {parity['top1_agreement']:.4f} (min {export.fp16_min_top1_agreement})")
    if problem is None and acc_drop > export.max_accuracy_drop:
        problem, error = (f"held-out top-1 accuracy {acc_drop:.2f} points below PyTorch fp32 "
                          f"(export.max_accuracy_drop {export.max_accuracy_drop})"), AccuracyError
    if problem is not None:
        move_into_place(path, path.with_name(path.name + ".failed"))  # kept for inspection, never as a finished export
        raise error(f"{path}: {variant} check failed on {parity['n_images']} held-out images: {problem}")


def run(export: ExportConfig, weights: str | Path, manifest: str | Path, out_dir: str | Path,
        tracker: Tracker | None = None, force: bool = False) -> dict:
    """Write and check every variant; return the figures written to model.onnx.json."""
    tracker = tracker or NullTracker()
    check_opset(export.opset)  # before any work: an opset the exporter or the runtime cannot honour
    out_dir = Path(out_dir)
    weights = pair_paths(weights)[0]  # the pair's folder or .json: its .safetensors
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
    images, labels = labelled_images(manifest, "val", export.accuracy_images and max(export.accuracy_images, export.parity_images), meta)
    calibration = None
    if "int8_static" in export.variants:
        # The train split is stored in a seeded shuffled order, so its first images are a class-mixed sample.
        calibration = labelled_images(manifest, "train", export.calibration_images, meta)[0].numpy()
    preprocess = preprocessing_metadata(meta, file_sha256(weights), export.dynamic_resolution)
    paths = write_variants(model, export.variants, out_dir, opset=export.opset, metadata=preprocess,
                           dynamic_resolution=export.dynamic_resolution, calibration=calibration,
                           fp16_keep_io_types=export.fp16_keep_io_types, fp16_fp32_ops=export.fp16_fp32_ops)

    ref = torch_logits(model, images)  # PyTorch fp32: the reference every variant is checked against
    n_parity = min(export.parity_images, len(images))
    variants: dict[str, dict] = {}
    progress = Progress("[export] checking variants", len(paths), "variants")
    for variant, path in paths.items():
        parity, accuracy, session = measure_variant(path, ref, images, labels, n_parity, PARITY_PROVIDERS)
        acc, torch_acc, drop = accuracy["top1"], accuracy["torch_fp32_top1"], accuracy["drop_points"]
        entry = {"file": path.name, **graph_summary(path), "parity": parity,
                 "accuracy": {**accuracy, "max_drop_points": export.max_accuracy_drop}}
        tracker.log_metrics({f"{variant}_parity_max_abs_diff": parity["max_abs_diff"],
                             f"{variant}_top1": acc, f"{variant}_top1_drop_points": drop})
        _check_variant(variant, parity, drop, export, path)
        if export.dynamic_resolution and variant in ("optimized", "fp16"):
            entry["resolutions"] = _check_resolutions(variant, session, weights, images[:n_parity], model.patch_size,
                                                      (h, w), export, path)
        variants[variant] = entry
        progress.clear()  # the variant's line, then the bar under it
        print(f"[export] {variant:<12} {path.name}: max |dlogit| {parity['max_abs_diff']:.2e}, top-1 agreement "
              f"{parity['top1_agreement']:.4f}, held-out top-1 {acc:.4f} (PyTorch {torch_acc:.4f}), "
              f"fusions {entry['fusions'] or 'none'}", flush=True)
        progress.update()

    progress.close()
    first = next(iter(variants))
    main = "fp32" if "fp32" in variants else first
    info = {
        "onnx": str(paths[main]),
        "input": {"name": INPUT_NAME, "shape": ["batch", in_ch, h, w], "dtype": "float32",
                  "layout": "NCHW", "preprocess": "RGB/L pixels / 255, then (x - mean) / std",
                  "mean": meta["mean"], "std": meta["std"]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", meta["num_classes"]]},
        "class_names": meta.get("class_names"),
        "opset": export.opset,
        "weights": str(weights),
        "architecture": meta["architecture"],
        "metadata": preprocess,  # also in every file's metadata_props, as vitpipe.<key>
        "parity": {**variants[main]["parity"], "tolerance": export.parity_tolerance},
        "variants": variants,
    }
    meta_path = out_dir / "model.onnx.json"
    write_json(meta_path, info)
    tracker.log_artifact(meta_path)
    plot = plot_variant_accuracy(variants, out_dir / VARIANTS_PLOT, f"export: held-out top-1 of each variant "
                                 f"({len(images)} val images)")
    tracker.log_artifact(plot, "plots")
    tracker.log_lineage(inputs={"weights": content_sha256(weights), "dataset": log_dataset_input(tracker, manifest, "eval")},
                        outputs={"onnx": content_sha256(paths[main])})
    record.finish(out_dir, "export", fp, [*paths.values(), meta_path, plot], info)
    return info


def _check_resolutions(variant: str, session, weights: Path, images: torch.Tensor, patch: int,
                       size: tuple[int, int], export: ExportConfig, path: Path) -> list[dict]:
    """Parity of a dynamic-resolution graph at two other sizes, against the model rebuilt there (pos-embeds resampled)."""
    tolerance = export.parity_tolerance if variant == "optimized" else export.fp16_parity_tolerance
    out = []
    for hw in other_resolutions(size, patch):
        ref_model, _ = model_from_pair(weights, image_size=hw)
        resized = F.interpolate(images, size=hw, mode="bicubic", align_corners=False)
        parity = {**compare_logits(torch_logits(ref_model, resized), onnx_logits(session, resized), path),
                  "image_size": list(hw), "tolerance": tolerance}
        out.append(parity)
        if parity["max_abs_diff"] > tolerance:
            move_into_place(path, path.with_name(path.name + ".failed"))
            raise ParityError(f"{path}: {variant} at {hw[0]}x{hw[1]} (dynamic resolution): max |dlogit| "
                              f"{parity['max_abs_diff']:.3e} > {tolerance:.1e} on {parity['n_images']} images")
    return out
