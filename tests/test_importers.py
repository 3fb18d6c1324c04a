"""Import adapters (pipeline/model/importers.py), checked by logits.

Hugging Face: a real `transformers` ViT saved with save_pretrained must give the same logits as our
model loaded from the import. timm and Google .npz: random tensors under those formats' exact key
names and shapes are written to disk, imported, and our logits compared with a reference forward
pass written here from the paper's equations (1)-(4), reading the tensors in their own layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.model.importers import WeightsImportError, import_weights, read_source, resolve_init
from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.vit import build_model
from pipeline.model.weights import model_from_pair, read_weights_pair
from stages import finetune

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max |logit difference|, fp32


# -- the reference forward: the paper's equations, nothing from our model --------------------------


def _ln(x, g, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * g + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _msa(q, k, v):  # each (B, heads, N, head_dim)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _patches(x, p, order):
    """(B, C, H, W) -> (B, N, P*P*C) flattened patches, row-major over the grid; `order` of a patch's values."""
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // p, p, w // p, p)  # (b, c, gh, py, gw, px)
    t = t.permute(0, 2, 4, 1, 3, 5) if order == "c,y,x" else t.permute(0, 2, 4, 3, 5, 1)
    return t.reshape(b, (h // p) * (w // p), -1)


def reference_timm(sd: dict, x: torch.Tensor, heads: int, pool: str, features=None) -> torch.Tensor:
    """timm's layout: conv weight (D, C, P, P), Linear weights (out, in), fused qkv rows (3, heads, hd).

    `features`: a hybrid's stem output (B, C, h, w), cut into 1x1 patches instead of the image.
    """
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double() if features is None else features
    w = sd["patch_embed.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    z = _patches(x, p, "c,y,x") @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]  # x_p E
    if "cls_token" in sd:
        z = torch.cat([sd["cls_token"].expand(len(x), -1, -1), z], dim=1)
    z = z + sd["pos_embed"]  # eq. (1)
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_blocks):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = _ln(z, g("norm1.weight"), g("norm1.bias"), 1e-6)
        qkv = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(len(x), z.shape[1], 3, heads, -1)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        z = z + _msa(q, k, v).transpose(1, 2).flatten(2) @ g("attn.proj.weight").T + g("attn.proj.bias")  # (2)
        y = _ln(z, g("norm2.weight"), g("norm2.bias"), 1e-6)
        z = z + _gelu(y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")  # (3)
    if "norm.weight" in sd:
        z = _ln(z, sd["norm.weight"], sd["norm.bias"], 1e-6)  # (4)
    r = z[:, 0] if pool == "token" else z[:, (1 if "cls_token" in sd else 0):].mean(1)
    if "fc_norm.weight" in sd:
        r = _ln(r, sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
    return r @ sd["head.weight"].T + sd["head.bias"]


def reference_npz(arrays: dict, x: torch.Tensor, features=None) -> torch.Tensor:
    """Flax's layout: HWIO kernels, Dense kernels (in, out), attention kernels split by head (DenseGeneral).

    `features`: a hybrid's stem output (B, C, h, w), cut into 1x1 patches instead of the image.
    """
    big_vision = any(k.startswith("params/") for k in arrays)
    pre = "params/" if big_vision else ""
    w = {k[len(pre):]: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}
    x = x.double() if features is None else features
    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    stacked = "Transformer/encoderblock/LayerNorm_0/scale" in w
    depth = (w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0] if stacked
             else len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")}))
    kernel = w["embedding/kernel"]  # (P, P, C, D)
    p, d = kernel.shape[0], kernel.shape[-1]
    z = _patches(x, p, "y,x,c") @ kernel.reshape(-1, d) + w["embedding/bias"]
    if "cls" in w:
        z = torch.cat([w["cls"].expand(len(x), -1, -1), z], dim=1)
    z = z + (w["pos_embedding"] if big_vision else w["Transformer/posembed_input/pos_embedding"])
    for i in range(depth):
        g = (lambda n: w[f"Transformer/encoderblock/{n}"][i]) if stacked else \
            (lambda n: w[f"Transformer/encoderblock_{i}/{n}"])
        y = _ln(z, g("LayerNorm_0/scale"), g("LayerNorm_0/bias"), 1e-6)
        q, k, v = (torch.einsum("bnd,dhk->bhnk", y, g(f"{mha}/{n}/kernel")) + g(f"{mha}/{n}/bias")[None, :, None]
                   for n in ("query", "key", "value"))
        z = z + torch.einsum("bhnk,hkd->bnd", _msa(q, k, v), g(f"{mha}/out/kernel")) + g(f"{mha}/out/bias")
        y = _ln(z, g(f"{ln2}/scale"), g(f"{ln2}/bias"), 1e-6)
        z = z + _gelu(y @ g(f"{mlp}/Dense_0/kernel") + g(f"{mlp}/Dense_0/bias")) @ g(f"{mlp}/Dense_1/kernel") \
            + g(f"{mlp}/Dense_1/bias")
    z = _ln(z, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"], 1e-6)
    r = z[:, 0] if "cls" in w else z.mean(1)
    return r @ w["head/kernel"] + w["head/bias"]


# -- random checkpoints in each format's exact names and shapes ---------------------------------------

D, DEPTH, HEADS, MLP, P, C, K = 32, 2, 4, 64, 4, 3, 5


def _rand(gen, *shape, scale=0.2, center=0.0):
    return center + scale * torch.randn(*shape, generator=gen)


def timm_state_dict(grid=(3, 3), class_token=True, fc_norm=False, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"patch_embed.proj.weight": _rand(g, D, C, P, P), "patch_embed.proj.bias": _rand(g, D),
          "pos_embed": _rand(g, 1, int(class_token) + grid[0] * grid[1], D)}
    if class_token:
        sd["cls_token"] = _rand(g, 1, 1, D)
    for i in range(DEPTH):
        for n, shape in (("norm1", (D,)), ("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("norm2", (D,)),
                         ("mlp.fc1", (MLP, D)), ("mlp.fc2", (D, MLP))):
            sd[f"blocks.{i}.{n}.weight"] = _rand(g, *shape, center=1.0 if "norm" in n else 0.0)
            sd[f"blocks.{i}.{n}.bias"] = _rand(g, shape[0])
    final = "fc_norm" if fc_norm else "norm"
    sd[f"{final}.weight"], sd[f"{final}.bias"] = _rand(g, D, center=1.0), _rand(g, D)
    sd["head.weight"], sd["head.bias"] = _rand(g, K, D, scale=0.5), _rand(g, K)
    return sd


def npz_arrays(layout="vision_transformer", grid=(3, 3), class_token=True, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hd = D // HEADS
    big_vision = layout != "vision_transformer"
    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    per_block = {"LayerNorm_0/scale": ((D,), 1.0), "LayerNorm_0/bias": ((D,), 0.0),
                 f"{ln2}/scale": ((D,), 1.0), f"{ln2}/bias": ((D,), 0.0),
                 f"{mha}/out/kernel": ((HEADS, hd, D), 0.0), f"{mha}/out/bias": ((D,), 0.0),
                 f"{mlp}/Dense_0/kernel": ((D, MLP), 0.0), f"{mlp}/Dense_0/bias": ((MLP,), 0.0),
                 f"{mlp}/Dense_1/kernel": ((MLP, D), 0.0), f"{mlp}/Dense_1/bias": ((D,), 0.0)}
    for n in ("query", "key", "value"):
        per_block[f"{mha}/{n}/kernel"] = ((D, HEADS, hd), 0.0)
        per_block[f"{mha}/{n}/bias"] = ((HEADS, hd), 0.0)
    a = {"embedding/kernel": _rand(g, P, P, C, D), "embedding/bias": _rand(g, D),
         "Transformer/encoder_norm/scale": _rand(g, D, center=1.0), "Transformer/encoder_norm/bias": _rand(g, D),
         "head/kernel": _rand(g, D, K, scale=0.5), "head/bias": _rand(g, K)}
    pos = _rand(g, 1, int(class_token) + grid[0] * grid[1], D)
    a["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = pos
    if class_token:
        a["cls"] = _rand(g, 1, 1, D)
    if layout == "big_vision_stacked":  # nn.scan over blocks: the layer axis first
        for n, (shape, c) in per_block.items():
            a[f"Transformer/encoderblock/{n}"] = _rand(g, DEPTH, *shape, center=c)
    else:
        for i in range(DEPTH):
            for n, (shape, c) in per_block.items():
                a[f"Transformer/encoderblock_{i}/{n}"] = _rand(g, *shape, center=c)
    pre = "params/" if big_vision else ""
    return {pre + k: v.numpy() for k, v in a.items()}


def images(size, n=3, seed=1):
    return torch.rand(n, C, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def our_logits(pair: Path, x: torch.Tensor, image_size=None) -> torch.Tensor:
    model, _ = model_from_pair(pair, image_size=image_size)
    with torch.no_grad():
        return model.eval()(x.float())


# -- timm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,class_token,fc_norm,pool,suffix", [
    ("cls token, token pool", True, False, "token", ".safetensors"),
    ("no cls token (vit_*_gap), avg pool", False, False, "avg", ".pth"),
    ("cls + fc_norm (MAE fine-tune), avg pool", True, True, "avg", ".bin"),
])
def test_timm_logits_match_reference(tmp_path, case, class_token, fc_norm, pool, suffix):
    sd = timm_state_dict(class_token=class_token, fc_norm=fc_norm)
    src = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(src))
    else:
        torch.save({"model": sd, "epoch": 3} if suffix == ".pth" else sd, src)  # train.py wraps it in "model"
    meta = import_weights(src, tmp_path / "pair", heads=HEADS)
    arch = meta["architecture"]
    assert (arch["width"], arch["depth"], arch["heads"], arch["mlp_dim"], arch["patch_size"]) == (D, DEPTH, HEADS, MLP, P)
    assert (arch["class_token"], arch["fc_norm"], arch["global_pool"]) == (class_token, fc_norm, pool)
    assert meta["image_size"] == [12, 12] and meta["num_classes"] == K and meta["pos_embed_interp"] == "bicubic"
    assert meta["source"]["format"] == "timm" and len(meta["source"]["sha256"]) == 64
    x = images((12, 12))
    ref = reference_timm(sd, x, HEADS, pool)
    assert ref.abs().max() > 0.5  # logits of a real size: a match below is not a match of zeros
    assert (our_logits(tmp_path / "pair", x).double() - ref).abs().max() <= TOL


def test_timm_hub_folder_reads_config_heads_normalization_and_nonsquare_grid(tmp_path):
    sd = timm_state_dict(grid=(3, 4), class_token=True)
    (tmp_path / "hub").mkdir()
    save_file(sd, str(tmp_path / "hub" / "model.safetensors"))
    (tmp_path / "hub" / "config.json").write_text(json.dumps({
        "architecture": "vit_custom", "num_classes": K, "global_pool": "avg", "model_args": {"num_heads": HEADS},
        "pretrained_cfg": {"input_size": [3, 12, 16], "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}}))
    meta = import_weights(tmp_path / "hub", tmp_path / "pair")
    assert meta["image_size"] == [12, 16] and meta["architecture"]["heads"] == HEADS
    assert meta["architecture"]["global_pool"] == "avg" and meta["mean"] == [0.4, 0.45, 0.5]
    assert set(meta["source"]["files"]) == {"config.json", "model.safetensors"}
    x = images((12, 16))
    assert (our_logits(tmp_path / "pair", x).double() - reference_timm(sd, x, HEADS, "avg")).abs().max() <= TOL


def test_timm_heads_come_from_the_size_table_or_must_be_given(tmp_path):
    save_file(timm_state_dict(), str(tmp_path / "odd.safetensors"))
    with pytest.raises(WeightsImportError, match=r"odd.safetensors.*head count.*--heads"):
        read_source(tmp_path / "odd.safetensors")
    # ViT-Ti/16's widths (192, depth 12, MLP 768) are in the table: 3 heads, as timm's vit_tiny.
    g = torch.Generator().manual_seed(0)
    ti = {"patch_embed.proj.weight": _rand(g, 192, 3, 16, 16), "patch_embed.proj.bias": _rand(g, 192),
          "cls_token": _rand(g, 1, 1, 192), "pos_embed": _rand(g, 1, 5, 192),
          "norm.weight": _rand(g, 192), "norm.bias": _rand(g, 192)}
    for i in range(12):
        for n, shape in (("norm1", (192,)), ("attn.qkv", (576, 192)), ("attn.proj", (192, 192)),
                         ("norm2", (192,)), ("mlp.fc1", (768, 192)), ("mlp.fc2", (192, 768))):
            ti[f"blocks.{i}.{n}.weight"], ti[f"blocks.{i}.{n}.bias"] = _rand(g, *shape), _rand(g, shape[0])
    save_file(ti, str(tmp_path / "ti.safetensors"))
    imp = read_source(tmp_path / "ti.safetensors")
    assert imp.cfg.heads == 3 and imp.num_classes == 0 and imp.image_size == (32, 32)  # headless


# -- Google .npz -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,class_token", [("vision_transformer", True), ("big_vision", True),
                                                ("big_vision_stacked", False)])
def test_npz_logits_match_reference(tmp_path, layout, class_token):
    arrays = npz_arrays(layout, class_token=class_token)
    np.savez(tmp_path / "vit.npz", **arrays)
    meta = import_weights(tmp_path / "vit.npz", tmp_path / "pair")
    arch = meta["architecture"]
    assert (arch["width"], arch["depth"], arch["heads"], arch["mlp_dim"], arch["patch_size"]) == (D, DEPTH, HEADS, MLP, P)
    assert arch["class_token"] == class_token and arch["global_pool"] == ("token" if class_token else "avg")
    assert meta["pos_embed_interp"] == "bilinear" and meta["source"]["format"] == "npz"
    assert meta["source"]["layout"] == ("vision_transformer" if layout == "vision_transformer" else "big_vision")
    x = images((12, 12))
    ref = reference_npz(arrays, x)
    assert ref.abs().max() > 0.5
    assert (our_logits(tmp_path / "pair", x).double() - ref).abs().max() <= TOL


def test_npz_at_another_resolution_resamples_bilinearly(tmp_path):
    np.savez(tmp_path / "vit.npz", **npz_arrays())
    import_weights(tmp_path / "vit.npz", tmp_path / "pair")
    stored, _ = read_weights_pair(tmp_path / "pair")
    model, meta = model_from_pair(tmp_path / "pair", image_size=20)  # grid 3x3 -> 5x5
    want = resample_pos_embed(stored["pos_embed"], (5, 5), (3, 3), 1, "bilinear")
    assert torch.equal(model.pos_embed.detach(), want)
    bicubic = resample_pos_embed(stored["pos_embed"], (5, 5), (3, 3), 1, "bicubic")
    assert (want - bicubic).abs().max() > 1e-3  # the mode is really what decided it
    assert meta["source_image_size"] == [12, 12]


def test_npz_representation_layer_is_dropped_with_its_head(tmp_path):
    arrays = npz_arrays()
    arrays["pre_logits/kernel"], arrays["pre_logits/bias"] = np.ones((D, D), np.float32), np.ones(D, np.float32)
    np.savez(tmp_path / "in21k.npz", **arrays)
    meta = import_weights(tmp_path / "in21k.npz", tmp_path / "pair")
    assert meta["num_classes"] == 0
    assert set(meta["source"]["dropped_keys"]) == {"pre_logits/kernel", "pre_logits/bias", "head/kernel", "head/bias"}
    model, out = model_from_pair(tmp_path / "pair", num_classes=3)  # fine-tuning attaches a zero head
    assert out["head_reset"] and torch.count_nonzero(model.head.weight) == 0


# -- Hugging Face ----------------------------------------------------------------------------------


@pytest.fixture
def hf_config():
    transformers = pytest.importorskip("transformers")
    return transformers.ViTConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                  intermediate_size=MLP, image_size=12, patch_size=P, num_labels=K,
                                  id2label={i: f"class{i}" for i in range(K)})


def _randomize(model, seed=0):
    # HF's own init leaves logits near 0; random weights everywhere make a match mean something.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_rand(g, *p.shape, center=1.0 if "layernorm" in name and name.endswith("weight") else 0.0))
    return model.eval()


@pytest.mark.parametrize("weights", ["randomized", "hf_init"])
def test_hf_image_classification_folder_gives_the_same_logits(tmp_path, hf_config, weights):
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    hf = ViTForImageClassification(hf_config).eval()
    # HF's own init (std 0.02) keeps activations small, where LayerNorm's epsilon shows: with our
    # old fixed 1e-6 instead of HF's 1e-12 these logits differed by 1.5e-4 (> TOL), hence norm_eps.
    hf = _randomize(hf) if weights == "randomized" else hf
    hf.save_pretrained(tmp_path / "hf")
    meta = import_weights(tmp_path / "hf", tmp_path / "pair")
    assert meta["architecture"]["norm_eps"] == 1e-12 and meta["class_names"] == [f"class{i}" for i in range(K)]
    assert meta["source"]["format"] == "hf" and "model.safetensors" in meta["source"]["files"]
    x = images((12, 12))
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    assert want.abs().max() > (0.5 if weights == "randomized" else 0.1)
    assert (our_logits(tmp_path / "pair", x) - want).abs().max() <= TOL


def test_hf_vit_model_folder_gives_the_same_tokens(tmp_path, hf_config):
    from transformers import ViTModel

    hf = _randomize(ViTModel(hf_config))  # with its pooler, which no classifier reads
    hf.save_pretrained(tmp_path / "hf")
    meta = import_weights(tmp_path / "hf", tmp_path / "pair")
    assert meta["num_classes"] == 0 and set(meta["source"]["ignored_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    model, _ = model_from_pair(tmp_path / "pair")
    x = images((12, 12))
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        got = model.eval().forward_features(x)
    assert (got - want).abs().max() <= TOL


def test_hf_unsupported_activation_is_refused_by_name(tmp_path, hf_config):
    from transformers import ViTModel

    ViTModel(hf_config).save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    with pytest.raises(WeightsImportError, match="hidden_act 'gelu_new'"):
        read_source(tmp_path / "hf")


# -- errors name the key or file ---------------------------------------------------------------------


def test_missing_key_is_named(tmp_path):
    sd = timm_state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(WeightsImportError, match=r"m\.safetensors: missing key 'blocks\.1\.mlp\.fc2\.bias'"):
        import_weights(tmp_path / "m.safetensors", tmp_path / "pair", heads=HEADS)
    assert not (tmp_path / "pair").exists()  # nothing half-written


def test_unexpected_key_is_named(tmp_path):
    arrays = npz_arrays()
    arrays["Transformer/encoderblock_0/LayerScale_0/scale"] = np.ones(D, np.float32)
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(WeightsImportError, match=r"x\.npz: unexpected key\(s\) 'Transformer/encoderblock_0/LayerScale_0/scale'"):
        read_source(tmp_path / "x.npz")


def test_wrong_shape_is_named(tmp_path):
    sd = timm_state_dict()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(3 * D + 1, D)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsImportError, match=r"'blocks\.1\.attn\.qkv\.weight' has shape \(97, 32\), expected \(96, 32\)"):
        read_source(tmp_path / "w.safetensors", heads=HEADS)


def test_unsupported_timm_variant_is_refused_by_name(tmp_path):
    sd = timm_state_dict()
    sd["dist_token"] = torch.zeros(1, 1, D)
    save_file(sd, str(tmp_path / "deit.safetensors"))
    with pytest.raises(WeightsImportError, match="'dist_token' is DeiT distillation token"):
        read_source(tmp_path / "deit.safetensors", heads=HEADS)


def test_pos_embed_without_a_class_position_is_refused_by_name(tmp_path):
    sd = timm_state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, 1:]  # 9 positions for 9 patches, none for the class token
    save_file(sd, str(tmp_path / "nec.safetensors"))
    with pytest.raises(WeightsImportError, match="'pos_embed' has 9 positions.*no_embed_class"):
        read_source(tmp_path / "nec.safetensors", heads=HEADS)


def test_unknown_format_is_named(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(WeightsImportError, match=r"model\.onnx: unknown weights format '\.onnx'"):
        read_source(tmp_path / "model.onnx")
    with pytest.raises(WeightsImportError, match="format 'keras' is unknown"):
        read_source(tmp_path / "model.onnx", fmt="keras")


# -- the command and fine-tuning's resolution ------------------------------------------------------


def test_import_weights_command_writes_a_pair_model_from_pair_loads(tmp_path, capsys):
    arrays = npz_arrays()
    np.savez(tmp_path / "vit.npz", **arrays)
    assert main(["import-weights", str(tmp_path / "vit.npz"), "--out", str(tmp_path / "pair")]) == 0
    assert "width 32, depth 2, heads 4" in capsys.readouterr().out
    x = images((12, 12))
    assert (our_logits(tmp_path / "pair" / "model.safetensors", x).double() - reference_npz(arrays, x)).abs().max() <= TOL
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert main(["import-weights", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "bad")]) == 1
    assert "bad.npz: cannot read .npz" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_resolve_init_imports_once_per_source_hash(tmp_path):
    np.savez(tmp_path / "vit.npz", **npz_arrays())
    first = resolve_init(tmp_path / "vit.npz", tmp_path / "imported")
    assert first.parent == tmp_path / "imported" and first.name.startswith("npz-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_init(tmp_path / "vit.npz", tmp_path / "imported") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not re-imported
    np.savez(tmp_path / "vit.npz", **npz_arrays(seed=1))  # same name, other bytes: a new import
    assert resolve_init(tmp_path / "vit.npz", tmp_path / "imported") != first
    assert resolve_init(first, tmp_path / "imported") == first  # our own pair passes through


@pytest.mark.slow
def test_finetune_init_from_an_npz_trains(tmp_path, digits300):
    # finetune.init_from as `--init` passes it; the recipe's model.* is not passed, since the
    # architecture is the checkpoint's (a recipe that sets another one is refused by the stage).
    np.savez(tmp_path / "vit.npz", **npz_arrays())  # 3-channel 12 px, patch 4; digits are 1-channel 8 px
    cfg = load_config(ROOT / "configs" / "pipeline" / "tiny.yaml",
                      ["finetune.ranks=1", "finetune.steps=2", "finetune.image_size=16"])
    finetune.run(cfg.finetune, digits300 / "manifest.json", tmp_path / "vit.npz", tmp_path / "run" / "finetune")
    imported = list((tmp_path / "run" / "imported").glob("npz-*"))
    assert len(imported) == 1
    _, meta = read_weights_pair(tmp_path / "run" / "finetune")
    assert meta["image_size"] == [16, 16] and meta["init_from"] == str((imported[0] / "model.safetensors").resolve())
    assert meta["architecture"]["width"] == D and meta["num_classes"] == 10
    losses = [json.loads(line) for line in (tmp_path / "run" / "finetune" / "losses.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(r["loss"]) for r in losses if "loss" in r)


# -- hybrids: the BiT ResNet stem (timm vit_*_r50_* / vit_small_r26_s32_*, Google R50+ViT .npz) ------

SW = 16  # stem width: root channels; stage i bottlenecks of SW * 2^i, output 4x that


def _same(n, k, s):
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2  # Flax/TF 'SAME': the extra pixel after


def _std_conv(x, w, stride):
    """Weight-standardized conv (the original hybrid's StdConv: (w - mean) / (std + 1e-5)), 'SAME' padding."""
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    w = w / (w.std(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
    (t, b), (l, r) = _same(x.shape[2], w.shape[2], stride), _same(x.shape[3], w.shape[3], stride)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (l, r, t, b)), w, stride=stride)


def _gn(x, g, b, eps=1e-6):
    n, c, h, w = x.shape
    groups = math.gcd(32, c)  # BiT's 32 groups; the tiny stems here have fewer channels than that
    y = x.reshape(n, groups, -1)
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + eps)
    return y.reshape(n, c, h, w) * g[None, :, None, None] + b[None, :, None, None]


def reference_stem(x, conv, norm, stages):
    """ResNet-v1.5 bottlenecks after a 7x7/2 root and 3x3/2 'SAME' max pool (the paper's hybrid stem).

    conv(name) -> OIHW kernel, norm(name) -> (scale, bias); names are "root", "I.J.conv1".."conv3",
    "I.J.proj" (0-based stage I, unit J) and the matching norms.
    """
    x = torch.relu(_gn(_std_conv(x, conv("root"), 2), *norm("root")))
    (t, b), (l, r) = _same(x.shape[2], 3, 2), _same(x.shape[3], 3, 2)
    x = torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (l, r, t, b), value=float("-inf")), 3, 2)
    for i, units in enumerate(stages):
        for j in range(units):
            s, u = (2 if i > 0 and j == 0 else 1), f"{i}.{j}."
            short = _gn(_std_conv(x, conv(u + "proj"), s), *norm(u + "proj")) if j == 0 else x
            y = torch.relu(_gn(_std_conv(x, conv(u + "conv1"), 1), *norm(u + "norm1")))
            y = torch.relu(_gn(_std_conv(y, conv(u + "conv2"), s), *norm(u + "norm2")))
            x = torch.relu(_gn(_std_conv(y, conv(u + "conv3"), 1), *norm(u + "norm3")) + short)
    return x


def _stem_shapes(stages):
    """(name, OIHW shape) of every conv of a stem of `stages`, in reference_stem's names."""
    out = [("root", (SW, C, 7, 7))]
    ch = SW
    for i, units in enumerate(stages):
        o = 4 * SW * 2**i
        for j in range(units):
            cin = ch if j == 0 else o
            out += [(f"{i}.{j}.proj", (o, cin, 1, 1))] if j == 0 else []
            out += [(f"{i}.{j}.conv1", (o // 4, cin, 1, 1)), (f"{i}.{j}.conv2", (o // 4, o // 4, 3, 3)),
                    (f"{i}.{j}.conv3", (o, o // 4, 1, 1))]
        ch = o
    return out, ch


def timm_hybrid_state_dict(stages, grid=(2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = timm_state_dict(grid=grid, seed=seed)
    convs, ch = _stem_shapes(stages)
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = _rand(g, D, ch, 1, 1), _rand(g, D)
    bb = "patch_embed.backbone."
    for name, shape in convs:
        if name == "root":
            conv, norm = bb + "stem.conv", bb + "stem.norm"
        else:
            i, j, part = name.split(".")
            base = f"{bb}stages.{i}.blocks.{j}."
            conv, norm = (base + "downsample.conv", base + "downsample.norm") if part == "proj" else \
                (base + part, base + part.replace("conv", "norm"))
        sd[conv + ".weight"] = _rand(g, *shape, scale=1.0)
        sd[norm + ".weight"], sd[norm + ".bias"] = _rand(g, shape[0], center=1.0), _rand(g, shape[0])
    return sd


def reference_timm_hybrid(sd, x, stages):
    def timm_name(name):
        if name == "root":
            return "patch_embed.backbone.stem.conv", "patch_embed.backbone.stem.norm"
        i, j, part = name.split(".")
        base = f"patch_embed.backbone.stages.{i}.blocks.{j}."
        return (base + "downsample.conv", base + "downsample.norm") if part == "proj" else \
            (base + part.replace("norm", "conv"), base + part.replace("conv", "norm"))

    sd64 = {k: v.double() for k, v in sd.items()}
    feat = reference_stem(x.double(), lambda n: sd64[timm_name(n)[0] + ".weight"],
                          lambda n: (sd64[timm_name(n)[1] + ".weight"], sd64[timm_name(n)[1] + ".bias"]), stages)
    vit_only = {k: v for k, v in sd.items() if not k.startswith("patch_embed.backbone.")}
    return reference_timm(vit_only, feat.float(), HEADS, "token", features=feat)


def npz_hybrid_arrays(stages, grid=(2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = npz_arrays(grid=grid, seed=seed)
    convs, ch = _stem_shapes(stages)
    a["embedding/kernel"], a["embedding/bias"] = _rand(g, 1, 1, ch, D).numpy(), _rand(g, D).numpy()
    for name, (o, i_, h, w) in convs:
        if name == "root":
            conv, norm = "conv_root", "gn_root"
        else:
            i, j, part = name.split(".")
            unit = f"block{int(i) + 1}/unit{int(j) + 1}/"
            conv, norm = (unit + "conv_proj", unit + "gn_proj") if part == "proj" else \
                (unit + part, unit + part.replace("conv", "gn"))
        a[conv + "/kernel"] = _rand(g, h, w, i_, o, scale=1.0).numpy()  # HWIO
        a[norm + "/scale"], a[norm + "/bias"] = _rand(g, o, center=1.0).numpy(), _rand(g, o).numpy()
    return a


def reference_npz_hybrid(arrays, x, stages):
    def flax_name(name):
        if name == "root":
            return "conv_root", "gn_root"
        i, j, part = name.split(".")
        unit = f"block{int(i) + 1}/unit{int(j) + 1}/"
        return (unit + "conv_proj", unit + "gn_proj") if part == "proj" else \
            (unit + part.replace("norm", "conv"), unit + part.replace("conv", "gn").replace("norm", "gn"))

    t = lambda k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float64))  # noqa: E731
    feat = reference_stem(x.double(), lambda n: t(flax_name(n)[0] + "/kernel").permute(3, 2, 0, 1),
                          lambda n: (t(flax_name(n)[1] + "/scale"), t(flax_name(n)[1] + "/bias")), stages)
    vit_only = {k: v for k, v in arrays.items() if not k.startswith(("conv_root", "gn_root", "block"))}
    return reference_npz(vit_only, x, features=feat)


@pytest.mark.parametrize("stages", [(1, 2), (1, 1, 1, 1)])  # R50-like stride 16 in miniature; R26-like stride 32
def test_timm_hybrid_logits_match_reference(tmp_path, stages):
    stride = 4 * 2 ** (len(stages) - 1)
    sd = timm_hybrid_state_dict(stages)
    save_file(sd, str(tmp_path / "r50.safetensors"))
    meta = import_weights(tmp_path / "r50.safetensors", tmp_path / "pair", heads=HEADS)
    arch = meta["architecture"]
    assert arch["hybrid"] and arch["stem_root"] == "bit" and arch["stem_stages"] == list(stages)
    assert arch["stem_width"] == SW and meta["image_size"] == [2 * stride, 2 * stride]
    x = images((2 * stride, 2 * stride))
    ref = reference_timm_hybrid(sd, x, stages)
    assert ref.abs().max() > 0.5
    assert (our_logits(tmp_path / "pair", x).double() - ref).abs().max() <= TOL


def test_npz_hybrid_logits_match_reference(tmp_path):
    stages = (2, 1)
    arrays = npz_hybrid_arrays(stages)
    np.savez(tmp_path / "R50+ViT.npz", **arrays)
    meta = import_weights(tmp_path / "R50+ViT.npz", tmp_path / "pair")
    arch = meta["architecture"]
    assert arch["hybrid"] and arch["stem_stages"] == [2, 1] and meta["image_size"] == [16, 16]
    assert meta["pos_embed_interp"] == "bilinear"
    x = images((16, 16))
    ref = reference_npz_hybrid(arrays, x, stages)
    assert ref.abs().max() > 0.5
    assert (our_logits(tmp_path / "pair", x).double() - ref).abs().max() <= TOL


def test_hybrid_stem_key_errors_are_named(tmp_path):
    sd = timm_hybrid_state_dict((1, 1))
    del sd["patch_embed.backbone.stages.1.blocks.0.downsample.norm.bias"]
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(WeightsImportError, match=r"missing key 'patch_embed\.backbone\.stages\.1\.blocks\.0\.downsample\.norm\.bias'"):
        read_source(tmp_path / "a.safetensors", heads=HEADS)
    sd = timm_hybrid_state_dict((1, 1))
    sd["patch_embed.backbone.norm.weight"] = torch.ones(4 * SW * 2)  # a pre-activation ResNetV2's final norm
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(WeightsImportError, match=r"unexpected key\(s\) 'patch_embed\.backbone\.norm\.weight'"):
        read_source(tmp_path / "b.safetensors", heads=HEADS)
    other = {k: v for k, v in timm_state_dict().items()}
    other["patch_embed.backbone.conv1.0.weight"] = torch.zeros(8, 3, 3, 3)  # timm's resnet26d backbone
    save_file(other, str(tmp_path / "c.safetensors"))
    with pytest.raises(WeightsImportError, match=r"'patch_embed\.backbone\.conv1\.0\.weight': only timm's ResNetV2"):
        read_source(tmp_path / "c.safetensors", heads=HEADS)
