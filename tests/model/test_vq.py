"""VQ tokenizer: LlamaGen compatibility (names, shapes, checkpoint format), quantisation
correctness, safetensors I/O, and the train_vq / extract_codes entry points at tiny budgets."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from orderplan.model import vq as vq_mod
from orderplan.data.datasets import CodeDataset, images_to_model, load_embedded_mnist
from orderplan.model.vq import (
    VQConfig,
    VQModel,
    codebook_stats,
    load_llamagen_vq,
    load_vq_safetensors,
    save_vq_safetensors,
    vq_preset,
)

REPO = Path(__file__).resolve().parents[2]

# Taken from LlamaGen tokenizer/tokenizer_image/vq_model.py (VQ_16 with default ModelArgs).
LLAMAGEN_VQ16_SHAPES = {
    "quantize.embedding.weight": (16384, 8),
    "quantize.codebook_used": (65536,),
    "quant_conv.weight": (8, 256, 1, 1),
    "quant_conv.bias": (8,),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.res.0.conv1.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.0.norm1.weight": (512,),
    "encoder.mid.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.1.k.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.attn.2.v.bias": (512,),
    "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.3.res.0.conv1.weight": (128, 256, 3, 3),
    "decoder.conv_blocks.4.res.2.conv1.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
# Keys LlamaGen does NOT have (no downsample at the last level, attention only at the lowest).
LLAMAGEN_VQ16_ABSENT = [
    "encoder.conv_blocks.4.downsample.conv.weight",
    "decoder.conv_blocks.4.upsample.conv.weight",
    "encoder.conv_blocks.3.attn.0.q.weight",
    "decoder.conv_blocks.1.attn.0.q.weight",
    "decoder.conv_blocks.0.res.0.nin_shortcut.weight",
]
LLAMAGEN_VQ16_NUM_KEYS = 344
LLAMAGEN_VQ16_NUM_PARAMS = 71_883_403


def llamagen_param_count(ch=128, mult=(1, 1, 2, 2, 4), nres=2, z=256, d=8, k=16384, cin=3) -> int:
    """Parameter count of LlamaGen's VQModel, written out from its module definitions."""
    def conv(i, o, s):
        return i * o * s * s + o

    def gn(c):
        return 2 * c

    def res(i, o):
        return gn(i) + conv(i, o, 3) + gn(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attn(c):
        return gn(c) + 4 * conv(c, c, 1)

    n, bi = conv(cin, ch, 3), ch  # encoder
    for lvl, m in enumerate(mult):
        for _ in range(nres):
            n, bi = n + res(bi, ch * m), ch * m
            n += attn(bi) if lvl == len(mult) - 1 else 0
        n += conv(bi, bi, 3) if lvl != len(mult) - 1 else 0
    n += 2 * res(bi, bi) + attn(bi) + gn(bi) + conv(bi, z, 3)
    bi = ch * mult[-1]  # decoder
    n += conv(z, bi, 3) + 2 * res(bi, bi) + attn(bi)
    for lvl in reversed(range(len(mult))):
        for _ in range(nres + 1):
            n, bi = n + res(bi, ch * mult[lvl]), ch * mult[lvl]
            n += attn(bi) if lvl == len(mult) - 1 else 0
        n += conv(bi, bi, 3) if lvl != 0 else 0
    n += gn(bi) + conv(bi, cin, 3)
    return n + k * d + conv(z, d, 1) + conv(d, z, 1)  # codebook, quant convs


# A small 3-channel config (LlamaGen layout, 16x16 -> 4x4) for checkpoint-format tests.
SMALL_RGB = VQConfig(codebook_size=64, codebook_embed_dim=4, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
                     z_channels=16, in_channels=3, ch=8, num_res_blocks=1, norm_groups=4)


def _random_model(cfg: VQConfig, seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    model = VQModel(cfg).eval()
    with torch.no_grad():  # spread the codebook so that codes differ between inputs
        model.quantize.embedding.weight.normal_()
    return model


# ---- LlamaGen compatibility --------------------------------------------------------------------


def test_vq16_names_shapes_and_size_match_llamagen():
    with torch.device("meta"):
        model = VQModel(vq_preset("vq_16"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in LLAMAGEN_VQ16_SHAPES.items():
        assert shapes.get(key) == shape, key
    for key in LLAMAGEN_VQ16_ABSENT:
        assert key not in shapes, key
    assert len(shapes) == LLAMAGEN_VQ16_NUM_KEYS
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == llamagen_param_count() == LLAMAGEN_VQ16_NUM_PARAMS
    assert vq_preset("vq_16").downsample_factor == 16


def test_tiny_mnist_preset_is_small_and_8x8():
    cfg = vq_preset("tiny_mnist")
    model = VQModel(cfg)
    n_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    assert n_bytes < 3_000_000
    assert (cfg.in_channels, cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm) == (1, 256, 8, True)
    assert model.encode_to_codes(torch.zeros(2, 1, 32, 32)).shape == (2, 8, 8)
    assert n_bytes > 0 and llamagen_param_count(
        ch=cfg.ch, mult=cfg.encoder_ch_mult, nres=cfg.num_res_blocks, z=cfg.z_channels,
        d=cfg.codebook_embed_dim, k=cfg.codebook_size, cin=1) == sum(p.numel() for p in model.parameters())


def test_llamagen_checkpoint_round_trip(tmp_path):
    model = _random_model(SMALL_RGB)
    path = tmp_path / "vq.pt"
    # LlamaGen's training checkpoints also carry optimizer state, steps and an argparse Namespace.
    torch.save({"model": model.state_dict(), "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")}, path)
    loaded = load_llamagen_vq(path, SMALL_RGB)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode_to_codes(x), model.encode_to_codes(x))
    # A bare state dict (no "model" key) and one without the usage buffer also load.
    sd = {k: v for k, v in model.state_dict().items() if k != "quantize.codebook_used"}
    torch.save(sd, path)
    assert torch.equal(load_llamagen_vq(path, SMALL_RGB).quant_conv.weight, model.quant_conv.weight)


@pytest.mark.parametrize("break_it,key", [
    (lambda sd: sd.pop("decoder.conv_out.bias"), "decoder.conv_out.bias"),
    (lambda sd: sd.__setitem__("quant_conv.weight", torch.zeros(5, 16, 1, 1)), "quant_conv.weight"),
    (lambda sd: sd.__setitem__("encoder.extra.weight", torch.zeros(1)), "encoder.extra.weight"),
])
def test_bad_checkpoint_names_the_key(tmp_path, break_it, key):
    sd = VQModel(SMALL_RGB).state_dict()
    break_it(sd)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_llamagen_vq(tmp_path / "bad.pt", SMALL_RGB)


def test_missing_or_unreadable_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_llamagen_vq(tmp_path / "nope.pt", SMALL_RGB)
    torch.save({"model": VQModel(SMALL_RGB).state_dict()}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match="cut.pt"):
        load_llamagen_vq(tmp_path / "cut.pt", SMALL_RGB)


def test_blocks_follow_llamagen_math():
    """Numerics that names and shapes cannot catch: LlamaGen's right/bottom-only padding in the
    stride-2 conv, its attention formula, and the pre-activation residual block."""
    down = vq_mod.Downsample(1)
    with torch.no_grad():
        down.conv.weight.fill_(1.0)
        down.conv.bias.zero_()
    out = down(torch.ones(1, 1, 4, 4))
    # Top-left 3x3 window fully inside (9 ones); bottom-right window half in the padding (4).
    assert out.shape == (1, 1, 2, 2) and out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]

    torch.manual_seed(0)
    attn = vq_mod.AttnBlock(8, groups=4)
    x = torch.randn(2, 8, 3, 5)
    n = attn.norm(x)
    q, k, v = (m(n).flatten(2) for m in (attn.q, attn.k, attn.v))  # [B, C, HW]
    w = torch.softmax(q.transpose(1, 2) @ k / 8 ** 0.5, dim=-1)  # [B, HW(query), HW(key)]
    ref = x + attn.proj_out((v @ w.transpose(1, 2)).view(2, 8, 3, 5))
    assert torch.allclose(attn(x), ref, atol=1e-5)

    res = vq_mod.ResnetBlock(4, 8, dropout=0.0, groups=4)
    x = torch.randn(2, 4, 6, 6)
    h = res.conv2(F.silu(res.norm2(res.conv1(F.silu(res.norm1(x))))))
    assert torch.allclose(res(x), res.nin_shortcut(x) + h, atol=1e-6)

    up = vq_mod.Upsample(1)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity conv: shows the nearest-neighbour upsampling
        up.conv.bias.zero_()
    assert torch.equal(up(torch.tensor([[[[1.0, 2.0]]]])), torch.tensor([[[[1.0, 1.0, 2.0, 2.0]] * 2]]))


# ---- quantisation --------------------------------------------------------------------------------


def test_encode_picks_nearest_l2_normalised_code():
    model = _random_model(vq_preset("tiny_mnist"))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    codes = model.encode_to_codes(x)
    with torch.no_grad():
        z = F.normalize(model.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
        e = F.normalize(model.quantize.embedding.weight, dim=-1)
        dist = torch.cdist(z.double(), e.double())  # [256 positions, 256 codes]
    chosen = dist.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, dist.min(1).values, atol=1e-5)
    assert (codes.reshape(-1) == dist.argmin(1)).float().mean() > 0.95  # near-ties aside
    assert len(codes.unique()) > 10  # non-trivial: many different codes


def test_decode_uses_normalised_codebook_and_shapes():
    model = _random_model(vq_preset("tiny_mnist"))
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    codes = model.encode_to_codes(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    out = model.decode_codes(codes)
    assert out.shape == (3, 1, 32, 32) and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(3.0)  # l2-normalised lookup: the scale is irrelevant
    assert torch.allclose(model.decode_codes(codes), out, atol=1e-5)
    assert torch.equal(model.encode_to_codes(x), codes)
    with pytest.raises(ValueError, match="out of range"):
        model.decode_codes(torch.full((1, 8, 8), 256))


def test_forward_straight_through_and_losses():
    cfg = vq_preset("tiny_mnist")
    model = _random_model(cfg).train()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    recon, losses = model(x)
    with torch.no_grad():
        expected = model.decode_latents(model.quantize.codebook()[losses["codes"]].permute(0, 3, 1, 2))
    assert torch.allclose(recon, expected, atol=1e-5)  # forward value = decoded codebook vectors
    assert torch.allclose(losses["recon_mse"], F.mse_loss(recon, x))
    total = losses["recon_mse"] + losses["codebook"] + cfg.commit_loss_beta * losses["commitment"]
    assert torch.allclose(losses["loss"], total)
    assert torch.allclose(losses["codebook"], losses["commitment"])  # same value, different gradients
    losses["loss"].backward()
    # Straight-through: the reconstruction gradient reaches the encoder; the codebook is trained.
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    used = losses["codes"].unique()
    assert torch.equal(model.quantize.embedding.weight.grad.abs().sum(1).nonzero().flatten(), used)
    usage, ppl = codebook_stats(losses["codes"], cfg.codebook_size)
    assert float(losses["usage"]) == pytest.approx(usage) == len(used) / cfg.codebook_size
    assert 1 <= float(losses["perplexity"]) <= len(used) + 1e-6


def test_codebook_stats():
    usage, ppl = codebook_stats(torch.tensor([0, 1, 2, 3]), 8)
    assert usage == 0.5 and ppl == pytest.approx(4.0)
    assert codebook_stats(torch.tensor([5, 5, 5]), 8) == (0.125, pytest.approx(1.0))


def test_config_validation():
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(ch=12, norm_groups=32)
    with pytest.raises(ValueError, match="unknown VQ preset"):
        vq_preset("vq_99")
    with pytest.raises(ValueError, match="unknown VQConfig keys"):
        VQConfig.from_dict({**SMALL_RGB.to_dict(), "bogus": 1})


# ---- safetensors ---------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    model = _random_model(SMALL_RGB)
    path = tmp_path / "sub" / "vq.safetensors"
    save_vq_safetensors(model, SMALL_RGB, path)
    # no temp file left; the checksum record beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["vq.safetensors", "vq.safetensors.sha256"]
    loaded, cfg = load_vq_safetensors(path)
    assert cfg == SMALL_RGB and not loaded.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode_to_codes(x)
    assert torch.equal(loaded.encode_to_codes(x), codes)
    assert torch.equal(loaded.decode_codes(codes), model.decode_codes(codes))
    # Without the config metadata the file is rejected with a message.
    save_file(load_file(str(path)), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="vq_config"):
        load_vq_safetensors(tmp_path / "plain.safetensors")


# ---- entry points ---------------------------------------------------------------------------------


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_train_vq_cli_then_extract_codes(tmp_path):
    """Through the CLI overrides a user types; then encode the embedded MNIST with the result."""
    cmd = [sys.executable, str(REPO / "scripts" / "train_vq.py"), "run_dir=vqrun", "train.max_steps=3",
           "train.batch_size=8", "train.warmup_steps=1", "train.restart_every=2", "progress=false",
           "train.eval_batch_size=500"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # hydra writes nothing outside run_dir
    summary = json.loads((tmp_path / "vqrun" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["heldout_size"] == 500
    assert 0 < summary["heldout"]["mse"] < 1 and 0 < summary["heldout"]["codebook_usage"] <= 1
    assert summary["vq_config"]["codebook_size"] == 256 and summary["config"]["train"]["batch_size"] == 8
    assert len(summary["data"]["sha256"]) == 64

    from orderplan.data.extract import ExtractCodesConfig, extract_codes

    weights = tmp_path / "vqrun" / "vq.safetensors"
    out = tmp_path / "codes"
    extract_codes(ExtractCodesConfig(vq_weights=str(weights), out_dir=str(out), progress=False, batch_size=1000))
    held = CodeDataset(out, "heldout")
    assert len(CodeDataset(out, "train")) == 4500 and len(held) == 500 and held.grid == (8, 8)
    model, _ = load_vq_safetensors(weights)
    images, labels = load_embedded_mnist("heldout")
    assert torch.equal(held.codes[:7], model.encode_to_codes(images_to_model(images[:7])))
    assert torch.equal(held.labels, torch.from_numpy(labels))
    assert held.meta["source_sha256"] == summary["data"]["sha256"]


def test_train_vq_is_deterministic(tmp_path):
    from orderplan.train.vq import TrainSection, TrainVQConfig, train_vq

    def run(name):
        cfg = TrainVQConfig(run_dir=str(tmp_path / name), progress=False,
                            train=TrainSection(max_steps=2, batch_size=4, warmup_steps=1, eval_batch_size=500))
        train_vq(cfg)
        return load_file(str(tmp_path / name / "vq.safetensors"))

    a, b = run("a"), run("b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_extract_image_folder_with_llamagen_checkpoint_and_flip(tmp_path, monkeypatch):
    monkeypatch.setitem(vq_mod.VQ_PRESETS, "small_rgb", SMALL_RGB)
    model = _random_model(SMALL_RGB)
    torch.save({"model": model.state_dict()}, tmp_path / "vq.pt")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")

    from orderplan.data.datasets import ImageFolderDataset
    from orderplan.data.extract import ExtractCodesConfig, ExtractVQSection, extract_codes

    cfg = ExtractCodesConfig(source="image_folder", image_folder=str(tmp_path / "imgs"), image_size=16, flip=True,
                             vq_weights=str(tmp_path / "vq.pt"), vq=ExtractVQSection(preset="small_rgb"),
                             out_dir=str(tmp_path / "codes"), batch_size=4, progress=False)
    meta = extract_codes(cfg)["train"]
    assert meta["shape"] == [12, 4, 4] and meta["flip"] and meta["classes"] == ["cat", "dog"]
    ds = CodeDataset(tmp_path / "codes", "train")
    x = torch.stack([img for img, _ in ImageFolderDataset(tmp_path / "imgs", 16)])
    assert torch.equal(ds.codes[:6], model.encode_to_codes(x))
    assert torch.equal(ds.codes[6:], model.encode_to_codes(torch.flip(x, dims=[-1])))
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] * 2


@pytest.mark.parametrize("name,schema", [("train_vq", "orderplan.train.vq:TrainVQConfig"),
                                         ("extract_codes", "orderplan.data.extract:ExtractCodesConfig")])
def test_yaml_configs_match_their_schemas(name, schema):
    """Every YAML key exists in the dataclass (to_typed rejects unknown keys) and the YAML
    defaults equal the dataclass defaults, so library and CLI runs agree."""
    import importlib

    from orderplan.config.common import compose, to_typed

    module, cls = schema.split(":")
    schema_cls = getattr(importlib.import_module(module), cls)
    assert to_typed(compose(name), schema_cls) == schema_cls()
