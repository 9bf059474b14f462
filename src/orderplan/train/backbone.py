"""Stage 1: block-RAR training of an order-robust backbone (seed 000, DESIGN.md section 4).

Every sample draws a fresh random *block* order (raster inside blocks) with probability
`random_ratio(step)`, else raster; the target-aware embedding is on while the ratio is > 0 (RAR turns
it off only in the pure raster phase). Labels are dropped to the null class for CFG.

Exact resume without relying on saved RNG streams: the batch, the orders and the class dropout of
step s are drawn from generators seeded by (seed, s, rank), and the global torch RNG (dropout) is
re-seeded the same way at every step. A run stopped at step s and restarted continues with exactly
the batches, orders and dropout masks it would have seen. Runs under `torchrun` with DDP."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from orderplan.model.blocks import BlockGeometry
from orderplan.infra.checkpoint import CheckpointManager, atomic_write_json, rng_state, set_rng_state
from orderplan.config.common import TrainBackboneRun, check_run_config
from orderplan.infra.paths import resolve_path
from orderplan.model.gpt import GPT
from orderplan.model.loading import backbone_gpt_config, check_backbone_config, load_gpt, save_gpt
from orderplan.data.tokens import data_fingerprint, load_token_data
from orderplan.model.orders import block_order
from orderplan.infra.distributed import close_distributed, init_distributed
from orderplan.infra.run_utils import Logger, job_dir, progress
from orderplan.infra.seeding import seed_global
from orderplan.infra.validation import check_int, check_path_exists, check_positive, check_probability, check_range

LN2 = math.log(2.0)


def random_ratio(step: int, max_steps: int, random_frac: float, anneal_frac: float) -> float:
    """Fraction of samples with a random block order at `step`: 1 during the random phase, linear
    to 0 during the anneal phase, 0 in the raster phase."""
    t = step / max(max_steps, 1)
    if t < random_frac:
        return 1.0
    if anneal_frac <= 0 or t >= random_frac + anneal_frac:
        return 0.0
    return 1.0 - (t - random_frac) / anneal_frac


def lr_at(step: int, cfg) -> float:
    """Linear warmup then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + rank)


def batch_indices(n: int, batch: int, step: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Indices of this rank's batch at `step`: the global stream is a concatenation of per-epoch
    permutations (epoch e seeded by seed + e), each step takes the next batch * world samples and
    rank r takes its contiguous share. Independent of where a run was resumed."""
    gb = batch * world
    start = step * gb + rank * batch
    idx = torch.arange(start, start + batch)
    epochs, offs = idx // n, idx % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e))
        sel = epochs == e
        out[sel] = perm[offs[sel]]
    return out


def make_orders(geom: BlockGeometry, batch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Token orders [batch, L]: random block orders with probability `ratio`, else raster."""
    rnd = block_order("random", geom, batch=batch, generator=gen)
    raster = block_order("raster", geom).expand(batch, -1)
    use_rnd = torch.rand(batch, generator=gen) < ratio
    return geom.token_order(torch.where(use_rnd[:, None], rnd, raster))


def ar_batch(codes: torch.Tensor, labels: torch.Tensor, geom: BlockGeometry, batch: int, step: int, seed: int,
             ratio: float, class_dropout: float, null_class: int, rank: int = 0,
             world: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training batch of `step` (rank `rank` of `world`): images x [batch, L], labels y [batch]
    (dropped to `null_class` with probability `class_dropout`) and token orders [batch, L] (random
    block orders with probability `ratio`, else raster). Drawn from generators seeded by
    (seed, step, rank) only, so a resumed run sees the same batches."""
    gen = _step_generator(seed, step, rank)
    idx = batch_indices(len(codes), batch, step, seed, rank, world)
    x, y = codes[idx], labels[idx]
    orders = make_orders(geom, batch, ratio, gen)
    drop = torch.rand(batch, generator=gen) < class_dropout
    return x, torch.where(drop, null_class, y), orders


def ar_loss(model, x: torch.Tensor, y: torch.Tensor, orders: torch.Tensor,
            use_ta: torch.Tensor | bool = True) -> torch.Tensor:
    """L_AR: the mean teacher-forced next-token cross-entropy (nats/token) of images x [B, L] with
    labels y [B] generated in token orders [B, L] (`model`: a GPT or its DDP wrapper)."""
    logits = model(x, y, orders, use_ta)
    return F.cross_entropy(logits.flatten(0, 1).float(), x.gather(1, orders).flatten())


@torch.no_grad()
def heldout_nll(model: GPT, codes: torch.Tensor, labels: torch.Tensor, geom: BlockGeometry, seed: int,
                device: torch.device, batch: int = 250) -> dict[str, float]:
    """Held-out NLL in bits/token under raster and under random block orders (one fixed random
    order per image, drawn from `seed`), target-aware embedding on, model in eval mode."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n = codes.shape[0]
    rnd_orders = geom.token_order(block_order("random", geom, batch=n, generator=gen))
    raster = geom.token_order(block_order("raster", geom)).expand(n, -1)
    out = {}
    for name, orders in (("raster", raster), ("random", rnd_orders)):
        total, count = 0.0, 0
        for i in range(0, n, batch):
            x, y, o = codes[i:i + batch].to(device), labels[i:i + batch].to(device), orders[i:i + batch].to(device)
            logits = model.forward_train(x, y, o, use_ta=True)
            nll = F.cross_entropy(logits.flatten(0, 1), x.gather(1, o).flatten(), reduction="sum")
            total += float(nll)
            count += x.numel()
        out[name] = total / count / LN2
    model.train(was_training)
    return out


@job_dir("train_backbone")
def train_backbone(run: TrainBackboneRun) -> dict:
    """Train (or resume) the order-robust GPT of `run.backbone`; returns the summary written to
    `run_dir/summary.json` (rank 0)."""
    check_train_backbone_run(run)
    ctx = init_distributed(run.device)
    rank, world, local_rank, device = ctx.rank, ctx.world, ctx.local_rank, ctx.device
    tc, bcfg = run.train, run.backbone
    run_dir = Path(run.run_dir)
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last=tc.keep_checkpoints)

    # -- data and model ---------------------------------------------------------------------------
    train_codes, train_labels = load_token_data(bcfg, "train")
    held_codes, held_labels = load_token_data(bcfg, "heldout")
    gcfg = backbone_gpt_config(bcfg)
    geom = BlockGeometry(gcfg.grid_h, gcfg.grid_w, bcfg.block_size)
    if train_codes.shape[1] != gcfg.num_tokens or int(train_codes.max()) >= gcfg.vocab_size:
        raise ValueError(f"data has {train_codes.shape[1]} tokens/image with ids up to {int(train_codes.max())}; "
                         f"the GPT expects {gcfg.num_tokens} tokens and vocab {gcfg.vocab_size}")
    # The GPT's init keeps the plain torch seed, drawn right here (nothing before draws from it): the
    # committed tiny default was trained so. numpy and `random` get a named stream (none of this
    # draws from them, a library might); dropout is reseeded per step below.
    seed_global(run.seed, "train_backbone", "host")
    torch.manual_seed(run.seed)
    model = GPT(gcfg)
    if tc.init_from:
        model.load_state_dict(load_gpt(resolve_path(tc.init_from, what="init_from weights"), gcfg).state_dict())
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(tc.beta1, tc.beta2),
    )
    fingerprint = data_fingerprint(bcfg)
    identity = {"gpt_config": gcfg.to_dict(), "data": fingerprint, "block_size": bcfg.block_size,
                "world_size": world, "batch_size": tc.batch_size, "seed": run.seed}

    # -- resume -----------------------------------------------------------------------------------
    start, history = 0, []
    loss_val = float("nan")  # the last logged train loss (the summary's final_train_loss_nats)
    ckpt = ckpts.load_latest()
    if ckpt is not None:
        saved = ckpt["identity"]
        diff = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"{ckpts.latest()}: cannot resume, the run changed: "
                             + "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, history = int(ckpt["step"]), list(ckpt.get("history", []))
        # a run stopped after its last checkpoint trains no more steps: the summary reads the saved loss
        loss_val = float(ckpt.get("last_loss", float("nan")))
        if rank == 0:
            print(f"resumed from {ckpts.latest()} at step {start}")
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else model
    amp = tc.amp and device.type == "cuda"
    logger = Logger(run, run_dir, enabled=rank == 0, job="train_backbone")
    if rank == 0:
        print(f"GPT {gcfg.n_layer}x{gcfg.dim} ({model.num_params() / 1e6:.2f}M params), L={gcfg.num_tokens}, "
              f"{geom.num_blocks} blocks of {geom.block}x{geom.block}; {len(train_codes)} train images; "
              f"global batch {tc.batch_size * world} ({world} process(es)); steps {start}->{tc.max_steps}")

    def save(step: int) -> None:
        if rank == 0:
            ckpts.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                              "rng": rng_state(), "identity": identity, "history": history,
                              "last_loss": loss_val})

    # -- loop -------------------------------------------------------------------------------------
    model.train()
    t0, tokens_seen = time.time(), 0
    end = tc.max_steps if tc.stop_at is None else min(tc.max_steps, tc.stop_at)
    bar = progress(range(start, end), initial=start, total=tc.max_steps, disable=rank != 0, desc="train_backbone")
    for step in bar:
        torch.manual_seed((run.seed * 1_000_003 + step) * 65_537 + rank)  # dropout masks
        ratio = random_ratio(step, tc.max_steps, tc.random_frac, tc.anneal_frac)
        x, y, orders = ar_batch(train_codes, train_labels, geom, tc.batch_size, step, run.seed, ratio,
                                tc.class_dropout, gcfg.null_class, rank, world)
        x, y, orders = x.to(device), y.to(device), orders.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = ar_loss(ddp, x, y, orders, ratio > 0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {float(loss)}; last checkpoint: {ckpts.latest()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        tokens_seen += x.numel() * world
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            loss_val = float(loss)
            rate = tokens_seen / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_val:.3f}", ratio=f"{ratio:.2f}", tok_s=f"{rate:.0f}")
            logger.log({"train/loss": loss_val, "train/bits_per_token": loss_val / LN2, "train/lr": lr_at(step, tc),
                        "train/random_ratio": ratio, "train/grad_norm": float(gnorm), "time/tokens_per_s": rate}, done)
        if done % tc.eval_every == 0 or done == tc.max_steps:
            if rank == 0:
                ev = heldout_nll(model, held_codes, held_labels, geom, tc.eval_seed, device)
                history.append({"step": done, "heldout_bits_raster": ev["raster"], "heldout_bits_random": ev["random"]})
                logger.log({"eval/bits_raster": ev["raster"], "eval/bits_random": ev["random"]}, done)
                bar.write(f"step {done}: held-out bits/token raster {ev['raster']:.4f} random {ev['random']:.4f}")
        if done % tc.ckpt_every == 0 or done == end:
            save(done)
    bar.close()

    # -- summary ----------------------------------------------------------------------------------
    summary: dict = {}
    if rank == 0 and end < tc.max_steps:
        print(f"stopped at step {end} of {tc.max_steps} (train.stop_at); rerun to continue")
    elif rank == 0:
        ev = heldout_nll(model, held_codes, held_labels, geom, tc.eval_seed, device)
        save_gpt(model, run_dir / "gpt.safetensors",
                 {"steps": tc.max_steps, "data": fingerprint, "block_size": bcfg.block_size,
                  "heldout_bits_raster": ev["raster"], "heldout_bits_random": ev["random"]})
        summary = {
            "steps": tc.max_steps,
            "resumed_from": start,
            "params": model.num_params(),
            "world_size": world,
            "final_train_loss_nats": loss_val,
            "heldout_bits_per_token": {"raster": ev["raster"], "random_block_order": ev["random"],
                                       "random_minus_raster": ev["random"] - ev["raster"]},
            "history": history,
            "data": fingerprint,
            "weights": str(run_dir / "gpt.safetensors"),
            "wall_time_s": time.time() - t0,
            "config": asdict(run),
        }
        atomic_write_json(run_dir / "summary.json", summary, checksum=True)
        print(f"held-out bits/token: raster {ev['raster']:.4f}, random block order {ev['random']:.4f} "
              f"(gap {ev['random'] - ev['raster']:+.4f}); wrote {run_dir / 'summary.json'}")
    logger.close()
    close_distributed(ctx)
    return summary

def check_train_backbone_run(run: TrainBackboneRun, check_paths: bool = True) -> None:
    """configs/train_backbone.yaml: positive step counts, sizes and intervals, lr > 0, betas in
    [0, 1), probabilities in [0, 1], train.init_from existing when set."""
    check_run_config(run)
    check_backbone_config(run.backbone, check_paths=check_paths, gpt_weights=False)  # it writes the GPT, reads none
    if run.backbone.dtype == "bfloat16":  # Adam on bf16 weights loses small updates; train.amp autocasts instead
        raise ValueError("backbone.dtype=bfloat16 is for the frozen backbone; train_backbone keeps float32 weights "
                         "(train.amp=true runs the forward in bfloat16 autocast): use backbone.dtype=auto or float32")
    t = run.train
    if check_paths:
        check_path_exists("train.init_from", t.init_from, allow_none=True)
    check_int("train.max_steps", t.max_steps, 1)
    check_int("train.stop_at", t.stop_at, 1, allow_none=True, note=" (null = run to max_steps)")
    check_int("train.batch_size", t.batch_size, 1)
    check_positive("train.lr", t.lr)
    check_range("train.min_lr", t.min_lr, 0.0)
    check_int("train.warmup_steps", t.warmup_steps, 0)
    check_range("train.weight_decay", t.weight_decay, 0.0)
    check_range("train.beta1", t.beta1, 0.0, 1.0, hi_open=True)
    check_range("train.beta2", t.beta2, 0.0, 1.0, hi_open=True)
    check_positive("train.grad_clip", t.grad_clip)
    for name in ("class_dropout", "random_frac", "anneal_frac"):
        check_probability(f"train.{name}", getattr(t, name))
    for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        check_int(f"train.{name}", getattr(t, name), 1)
    check_int("train.eval_seed", t.eval_seed)
