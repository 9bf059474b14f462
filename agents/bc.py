"""Stage 3-4 (seed 000): behaviour cloning of the OrderHead on oracle labels.

Data: the oracle data set of `scripts/build_oracle.py` (image index + revealed-block prefix + the
full utility vector per state; built on the fly when missing). Hidden states are recomputed by the
frozen backbone: every episode is replayed once through the env core and the block-pooled hidden
states of its recorded states are kept in memory (`episode_features`), so training steps only run
the OrderHead.

Loss: cross-entropy on the oracle argmax block (or, with `bc.targets=soft`, on softmax(u / tau)
over the unrevealed blocks). The latent-reasoning depth R follows a curriculum (`bc.R_schedule`,
e.g. [0, 1, 2]: equal shares of the steps), on the same parameters. Optional DAgger rounds add
states visited by the current learner (labels from the oracle). Exact resume: the minibatch of
step s is drawn from a generator seeded by (seed, s); model, optimizer and RNG state are
checkpointed atomically.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from agents.evaluation import evaluate
from agents.oracle_data import BuildOracleRun, OracleDataset, build_oracle, collect_states, select_images
from agents.orderhead import OrderHead, orderhead_config_for, save_orderhead
from agents.policies import OrderHeadPolicy, make_policy
from backbone.checkpoint import CheckpointManager, atomic_write_json, rng_state, set_rng_state
from backbone.config import BackboneConfig, WandbConfig
from backbone.run_utils import Logger, progress, setup_device
from envs.core import EnvConfig, OrderPlanningCore
from envs.factory import make_core


@dataclass
class OracleSpec:
    """Which oracle data set to use (built into `out_dir` when missing)."""

    out_dir: str = "runs/oracle/tiny_mnist"
    num_images: int | None = 640
    behaviour: str = "random"
    kind: str = "future_loss"
    weight: str = "uniform"
    states_per_image: int | None = None
    batch_size: int = 16
    chunk_images: int = 64


@dataclass
class AgentSpec:
    """OrderHead size (fields of OrderHeadConfig; the backbone dim and geometry are filled in)."""

    d_model: int = 128
    n_heads: int = 4
    n_latents: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1


@dataclass
class BCConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    targets: str = "argmax"  # argmax | soft
    soft_tau: float = 1.0  # temperature (nats) of the soft targets
    R_schedule: list[int] = field(default_factory=lambda: [0, 1, 2])  # latent steps, equal shares of steps
    dagger_rounds: int = 0  # extra rounds of learner-visited states (labels from the oracle)
    dagger_images: int = 64  # train images per DAgger round
    replay_batch: int = 32  # episodes replayed together when recomputing hidden states
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 2


@dataclass
class EvalSpec:
    num_images: int = 96  # held-out images scored by every policy
    batch_size: int = 16
    gamma: float = 0.9  # discount of the reported returns (future_loss telescopes at gamma = 1)
    baselines: list[str] = field(default_factory=lambda: ["raster", "random", "oracle"])


@dataclass
class BCRun:
    """Schema of configs/bc.yaml."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    oracle: OracleSpec = field(default_factory=OracleSpec)
    agent: AgentSpec = field(default_factory=AgentSpec)
    bc: BCConfig = field(default_factory=BCConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    run_dir: str = "runs/bc/tiny_mnist"
    device: str = "cpu"
    seed: int = 0
    logger: str = "none"
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ----------------------------------------------------------------------------------------------
# Features: replay each episode once through the frozen backbone
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def episode_features(core: OrderPlanningCore, image_index: torch.Tensor, prefix: torch.Tensor,
                     length: torch.Tensor, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-pooled hidden states [S, N, D] (float32, CPU) and block masks [S, N] of stored states.

    Records of one image must come from one episode (their prefixes are prefixes of each other),
    as `collect_states` produces; each episode is replayed once, B images at a time, and every
    recorded state is read off as the replay passes its length."""
    S, N = prefix.shape
    hidden = torch.zeros(S, N, core.D)
    mask = torch.zeros(S, N, dtype=torch.bool)
    images = image_index.unique()
    longest = {}
    for s in range(S):  # the longest prefix of each image is its episode
        i = int(image_index[s])
        if i not in longest or length[s] > length[longest[i]]:
            longest[i] = s
    B = core.B
    for i0 in range(0, len(images), B):
        imgs = images[i0:i0 + B]
        n = len(imgs)
        rows = torch.tensor([longest[int(i)] for i in imgs])
        seq = prefix[rows]
        pad = B - n
        core.reset(image_index=torch.cat([imgs, imgs[:1].expand(pad)]).to(core.device))
        seq = torch.cat([seq, seq[:1].expand(pad, -1)]).to(core.device)
        # record id per (image row, step): -1 where nothing was recorded
        want = torch.full((B, N + 1), -1, dtype=torch.long)
        for r, img in enumerate(imgs.tolist()):
            recs = torch.nonzero(image_index == img).flatten()
            want[r, length[recs]] = recs
        for t in range(N + 1):
            hit = want[:, t] >= 0
            if bool(hit.any()):
                obs = core.observation()
                h = obs["hidden"]
                if h.shape[1] != N:  # token hidden states -> block means
                    h = h[:, core.block_tokens].mean(2)
                ids = want[hit, t]
                hidden[ids] = h[hit.to(core.device)].float().cpu()
                mask[ids] = obs["block_mask"][hit.to(core.device)].cpu()
            if t == N or not bool((want[:, t + 1:] >= 0).any()):
                break
            active = torch.arange(B, device=core.device) < n
            active &= ~core.done
            core.step(seq[:, t].clamp(min=0), active=active)
    return hidden, mask


def targets_from_utilities(util: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """Training targets [S, N]: one-hot of the argmax (kind=argmax) or softmax(u / tau) over the
    unrevealed blocks (kind=soft; u = -inf on revealed blocks gives them probability 0)."""
    if kind == "argmax":
        return F.one_hot(util.argmax(-1), util.shape[-1]).float()
    if kind == "soft":
        return torch.softmax(util / tau, -1)
    raise ValueError(f"bc.targets must be argmax or soft, got {kind!r}")


def bc_loss(model: OrderHead, hidden: torch.Tensor, mask: torch.Tensor, util: torch.Tensor, targets: str = "argmax",
            tau: float = 1.0, R: int | None = None, label: torch.Tensor | None = None):
    """Cross-entropy of the OrderHead's masked next-block distribution against the oracle targets.
    hidden [B, N, D] (or [B, L, D]), mask [B, N] revealed blocks, util [B, N] (-inf on revealed),
    label [B] (class-conditioned planners). Returns (loss, OrderHeadOutput)."""
    out = model.plan(hidden, mask, R=R, label=label)
    target = targets_from_utilities(util, targets, tau)
    logp = torch.log_softmax(out.logits, -1).masked_fill(mask, 0.0)  # revealed: -inf * 0 -> 0
    return -(target * logp).sum(-1).mean(), out


def r_at(step: int, steps: int, schedule: list[int]) -> int:
    """The latent-reasoning depth of `step`: the schedule's entries in equal shares of the steps."""
    return schedule[min(len(schedule) - 1, step * len(schedule) // max(steps, 1))]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _oracle_run(run: BCRun) -> BuildOracleRun:
    o = run.oracle
    return BuildOracleRun(backbone=run.backbone, env=replace(run.env, split="train", budget=None),
                          out_dir=o.out_dir, device=run.device, seed=run.seed, split="train",
                          num_images=o.num_images, behaviour=o.behaviour, kind=o.kind, weight=o.weight,
                          states_per_image=o.states_per_image, batch_size=o.batch_size, chunk_images=o.chunk_images)


def load_or_build_oracle(run: BCRun) -> OracleDataset:
    """The oracle data set of `run.oracle`, built (or resumed) first when it is not complete."""
    root = Path(run.oracle.out_dir)
    if not (root / "manifest.json").is_file():
        print(f"oracle data not found in {root}: building it (scripts/build_oracle.py)")
        build_oracle(_oracle_run(run))
    ds = OracleDataset(root)
    want = run.oracle.num_images
    if want is not None and ds.manifest["counts"]["images"] < want:
        # the same seeded subset, extended: finished images are skipped, the rest is built
        print(f"{root} holds {ds.manifest['counts']['images']} images, oracle.num_images={want}: extending it")
        build_oracle(_oracle_run(run))
        ds = OracleDataset(root)
    if ds.kind != run.oracle.kind:
        raise ValueError(f"{root} holds {ds.kind} utilities but oracle.kind={run.oracle.kind}")
    return ds


def train_bc(run: BCRun) -> dict:
    """Behaviour cloning + the held-out report. Writes run_dir/{orderhead.safetensors, summary.json}."""
    t0 = time.time()
    device = setup_device(run.device)
    torch.manual_seed(run.seed)
    run_dir = Path(run.run_dir)
    bc = run.bc
    ds = load_or_build_oracle(run)
    train_env = replace(run.env, split="train", budget=None)
    core = make_core(run.backbone, env=train_env, batch_size=bc.replay_batch, device=device, seed=run.seed)
    print(f"oracle data: {len(ds)} states from {ds.manifest['counts']['images']} images ({ds.kind}); "
          f"recomputing hidden states with the frozen backbone")
    hidden, mask = episode_features(core, ds.image_index, ds.prefix, ds.length)
    util = ds.utilities.clone()
    labels = core.labels.cpu()[ds.image_index]

    cfg = orderhead_config_for(core.D, core.geom, **asdict(run.agent), R=max(bc.R_schedule),
                               num_classes=core.gpt.cfg.num_classes)
    model = OrderHead(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=bc.lr, weight_decay=bc.weight_decay)
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last=bc.keep_checkpoints)
    start, history, dagger_done = 0, [], 0
    # what a resumed run must share with the checkpoint (bc.steps may grow: the run continues)
    identity = {"agent": asdict(run.agent), "oracle_dir": str(Path(run.oracle.out_dir).resolve()),
                "states": len(ds), "targets": bc.targets, "soft_tau": bc.soft_tau, "R_schedule": list(bc.R_schedule),
                "batch_size": bc.batch_size, "lr": bc.lr, "seed": run.seed, "backbone": run.backbone.name}
    ckpt = ckpts.load_latest()
    if ckpt is not None:
        diff = {k: (ckpt.get("identity", {}).get(k), v) for k, v in identity.items() if ckpt.get("identity", {}).get(k) != v}
        if diff:
            raise ValueError(f"{ckpts.latest()}: cannot resume, the run changed: "
                             + "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                             + f". Use a new run_dir or delete {run_dir / 'checkpoints'}.")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, history, dagger_done = int(ckpt["step"]), list(ckpt["history"]), int(ckpt["dagger_done"])
        print(f"resumed from {ckpts.latest()} at step {start}")

    # DAgger rounds happen at fixed steps; on resume, re-collect the rounds already done (same seeds)
    round_steps = [bc.steps * (r + 1) // (bc.dagger_rounds + 1) for r in range(bc.dagger_rounds)]
    used = set(ds.image_index.tolist())

    def dagger_round(r: int) -> None:
        nonlocal hidden, mask, util, labels
        pool = torch.tensor([i for i in select_images(core.num_images, None, run.seed).tolist() if i not in used])
        imgs = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(run.seed + 100 + r))[:bc.dagger_images]]
        used.update(imgs.tolist())
        learner = OrderHeadPolicy(model.eval(), greedy=True)
        rec = collect_states(core, lambda obs: learner.act(obs), imgs, ds.kind, run.oracle.weight,
                             generator=torch.Generator().manual_seed(run.seed + 200 + r))
        h, m = episode_features(core, rec["image_index"], rec["prefix"], rec["length"])
        hidden, mask = torch.cat([hidden, h]), torch.cat([mask, m])
        util = torch.cat([util, rec["utilities"]])
        labels = torch.cat([labels, core.labels.cpu()[rec["image_index"]]])
        model.train()
        print(f"DAgger round {r + 1}: +{len(rec['image_index'])} learner-visited states ({len(util)} in all)")

    for r in range(dagger_done):
        dagger_round(r)
    logger = Logger(run, run_dir, job="bc")
    model.train()
    bar = progress(range(start, bc.steps), initial=start, total=bc.steps, desc="bc")
    for step in bar:
        if dagger_done < bc.dagger_rounds and step >= round_steps[dagger_done]:
            dagger_round(dagger_done)
            dagger_done += 1
        gen = torch.Generator().manual_seed(run.seed * 1_000_003 + step)
        idx = torch.randint(len(util), (bc.batch_size,), generator=gen)
        R = r_at(step, bc.steps, bc.R_schedule)
        loss, out = bc_loss(model, hidden[idx].to(device), mask[idx].to(device), util[idx].to(device),
                            bc.targets, bc.soft_tau, R, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), bc.grad_clip)
        opt.step()
        done = step + 1
        if done % bc.log_every == 0 or done == bc.steps:
            acc = float((out.logits.argmax(-1).cpu() == util[idx].argmax(-1)).float().mean())
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{acc:.2f}", R=R)
            history.append({"step": done, "loss": float(loss), "train_agreement": acc, "R": R})
            logger.log({"train/loss": float(loss), "train/agreement": acc, "train/R": R}, done)
        if done % bc.ckpt_every == 0 or done == bc.steps:
            ckpts.save(done, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                              "rng": rng_state(), "history": history, "dagger_done": dagger_done,
                              "identity": identity})
    bar.close()
    model.eval()
    weights = run_dir / "orderhead.safetensors"
    save_orderhead(model, weights, {"stage": "bc", "steps": bc.steps, "oracle_kind": ds.kind,
                                    "backbone": run.backbone.name})

    report = heldout_report(run.backbone, run.env, run.eval, model, device, run.seed, run.oracle.kind)
    logger.log({f"eval/return_{k}": v for k, v in report["returns"].items()}, bc.steps)
    logger.close()
    summary = {**report, "stage": "bc", "weights": str(weights), "params": sum(p.numel() for p in model.parameters()),
               "train_states": len(util), "steps": bc.steps, "resumed_from": start, "history": history,
               "wall_time_s": time.time() - t0, "config": asdict(run)}
    atomic_write_json(run_dir / "summary.json", summary)
    print_report(summary)
    return summary


def heldout_report(backbone: BackboneConfig, env_cfg: EnvConfig, ev: EvalSpec, model: OrderHead, device: torch.device,
                   seed: int = 0, oracle_kind: str = "future_loss", router_budgets: list[int] | None = None) -> dict:
    """Learned policy next to the baselines on the same held-out images, reward and gamma (with the
    budget router when `router_budgets` is given; baselines then reveal one block per decision)."""
    env = replace(env_cfg, split="heldout", budget=router_budgets)
    if router_budgets is None:
        env.decision_cost = env_cfg.decision_cost
    core = make_core(backbone, env=env, batch_size=ev.batch_size, device=device, seed=seed)
    policies = {name: make_policy(name, core) for name in ev.baselines}
    policies["learned"] = OrderHeadPolicy(model.eval(), greedy=True, router=router_budgets is not None)
    return evaluate(policies, core, ev.num_images, ev.gamma, learned="learned", oracle_kind=oracle_kind)


def print_report(summary: dict) -> None:
    r = summary["returns"]
    cols = "  ".join(f"{k}={v:.3f}" for k, v in r.items())
    print(f"held-out mean return ({summary['reward']}, gamma={summary['gamma']}, {summary['num_images']} images): {cols}")
    if "oracle_agreement" in summary:
        print(f"learned: oracle agreement {summary['oracle_agreement']:.3f}, regret {summary['regret']:.3f} nats, "
              f"gap closed (random -> oracle) {summary.get('gap_closed', float('nan')):.2f}")
