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

Limited joint tuning (seed Stage 5, `bc.joint.top_n > 0`, off by default): from step
`bc.joint.start_step` on, the top n transformer blocks of the GPT (and, with `tune_output`, its final
norm and output projection) are trained together with the OrderHead. Objective, for the tuned
backbone parameters theta_G: L = L_AR + lambda * L_OH, lambda = `bc.joint.lam`, where L_AR is the
backbone's own block-RAR training loss (`backbone.train.ar_loss`, nats/token, on a batch of
`ar_batch_size` train images in random block orders, `ar_batch` as in Stage 1) and L_OH the BC
cross-entropy above (nats/state). The OrderHead's gradient is that of L_OH alone (L_AR does not
depend on it; lambda only rescales the backbone's share), so with lambda -> 0 the backbone just
keeps training on L_AR and the head sees its features. For L_OH the hidden states of the minibatch
are recomputed by the tuned GPT in one causal pass per state (`state_features`, equal to the env's
incremental features up to float rounding), with autograd reaching only the unfrozen blocks; the
GPT is kept in eval mode (no dropout), as the frozen backbone is. The oracle labels are NOT
recomputed: they stay those of the original backbone (the data set of `oracle.out_dir`), and DAgger
rollouts and their labels also use the original backbone. The tuned GPT is written to
run_dir/gpt.safetensors and the held-out report scores every policy on it, next to the backbone's
held-out bits/token before and after tuning.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from agents.evaluation.report import EvalSpec, heldout_report, print_report
from agents.planner.orderhead import OrderHead, orderhead_config_for, save_orderhead
from agents.planner.policies import OrderHeadPolicy
from agents.training.features import episode_features
from agents.training.joint import JointConfig, JointTuner
from agents.training.oracle_data import BuildOracleRun, OracleDataset, build_oracle, collect_states, select_images
from backbone.checkpoint import CheckpointManager, atomic_write_json, load_safetensors, rng_state, set_rng_state, sha256_file
from backbone.config import BackboneConfig, RunConfig
from backbone.loading import save_gpt
from backbone.run_utils import Logger, progress, setup_device
from envs.core import EnvConfig
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
    joint: JointConfig = field(default_factory=JointConfig)  # limited joint tuning (seed Stage 5), off by default


@dataclass
class BCRun(RunConfig):
    """Schema of configs/bc.yaml."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    oracle: OracleSpec = field(default_factory=OracleSpec)
    agent: AgentSpec = field(default_factory=AgentSpec)
    bc: BCConfig = field(default_factory=BCConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    run_dir: str = "runs/bc/tiny_mnist"


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
    jc = bc.joint
    jc.validate(core.gpt.cfg.n_layer, bc.steps)
    states = [ds.image_index.clone(), ds.prefix.clone(), ds.length.clone()]  # what joint tuning replays

    cfg = orderhead_config_for(core.D, core.geom, **asdict(run.agent), R=max(bc.R_schedule),
                               num_classes=core.gpt.cfg.num_classes)
    model = OrderHead(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=bc.lr, weight_decay=bc.weight_decay)
    tuner, bits_before = None, None
    if jc.top_n:
        with torch.random.fork_rng(devices=[]):  # the global RNG (head dropout) stays that of a plain BC run
            tuner = JointTuner(run, device, core.codes, core.labels)
            if (run_dir / "gpt.safetensors").resolve() == tuner.base.resolve():
                raise ValueError(f"run_dir {run_dir} holds the backbone being tuned (backbone.gpt_weights): joint "
                                 "tuning writes run_dir/gpt.safetensors, use another run_dir")
            bits_before = tuner.heldout_bits(run.backbone)
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last=bc.keep_checkpoints)
    start, history, dagger_done = 0, [], 0
    # what a resumed run must share with the checkpoint (bc.steps may grow: the run continues)
    identity = {"agent": asdict(run.agent), "oracle_dir": str(Path(run.oracle.out_dir).resolve()),
                "states": len(ds), "targets": bc.targets, "soft_tau": bc.soft_tau, "R_schedule": list(bc.R_schedule),
                "batch_size": bc.batch_size, "lr": bc.lr, "seed": run.seed, "backbone": run.backbone.name}
    if tuner:  # (absent when off, so checkpoints of plain BC runs resume as before)
        identity["joint"] = {**asdict(jc), "gpt_weights": str(tuner.base)}
    ckpt = ckpts.load_latest()
    if ckpt is not None:
        saved = ckpt.get("identity", {})
        keys = [*identity, *(["joint"] if "joint" in saved and "joint" not in identity else [])]  # joint -> plain too
        diff = {k: (saved.get(k), identity.get(k)) for k in keys if saved.get(k) != identity.get(k)}
        if diff:
            raise ValueError(f"{ckpts.latest()}: cannot resume, the run changed: "
                             + "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                             + f". Use a new run_dir or delete {run_dir / 'checkpoints'}.")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if tuner:
            tuner.load_state_dict(ckpt["joint"])
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
        for j, key in enumerate(("image_index", "prefix", "length")):
            states[j] = torch.cat([states[j], rec[key].cpu()])
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
        joint = tuner is not None and step >= jc.start_step
        if joint:
            h, m = tuner.features(states[0][idx], labels[idx], states[1][idx], states[2][idx])
            if h.requires_grad:  # the backbone's share of L_OH is lambda * its gradient; the head's is 1
                h.register_hook(lambda g: g * jc.lam)
        else:
            h, m = hidden[idx].to(device), mask[idx].to(device)
        loss, out = bc_loss(model, h, m, util[idx].to(device), bc.targets, bc.soft_tau, R, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        if joint:
            tuner.opt.zero_grad(set_to_none=True)
            loss_ar = tuner.ar_loss(step)
            (loss + loss_ar).backward()  # head: grad L_OH; tuned backbone: grad (L_AR + lam * L_OH)
            torch.nn.utils.clip_grad_norm_(tuner.params, jc.grad_clip)
            tuner.opt.step()
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), bc.grad_clip)
        opt.step()
        done = step + 1
        if done % bc.log_every == 0 or done == bc.steps:
            acc = float((out.logits.argmax(-1).cpu() == util[idx].argmax(-1)).float().mean())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{acc:.2f}", R=R)
            history.append({"step": done, "loss": float(loss.detach()), "train_agreement": acc, "R": R})
            logger.log({"train/loss": float(loss.detach()), "train/agreement": acc, "train/R": R}, done)
            if joint:
                history[-1]["loss_ar"] = float(loss_ar)
                logger.log({"train/loss_ar": float(loss_ar)}, done)
        if done % bc.ckpt_every == 0 or done == bc.steps:
            extra = {"joint": tuner.state_dict()} if tuner else {}
            ckpts.save(done, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                              "rng": rng_state(), "history": history, "dagger_done": dagger_done,
                              "identity": identity, **extra})
    bar.close()
    model.eval()
    weights, gpt_path = run_dir / "orderhead.safetensors", run_dir / "gpt.safetensors"
    eval_backbone, joint_summary = run.backbone, None
    if tuner:
        tuner.gpt.eval()
        bits_after = tuner.heldout_bits(run.backbone)
        joint_summary = {"top_n": jc.top_n, "lam": jc.lam, "lr": jc.lr, "start_step": jc.start_step,
                         "tuned_blocks": tuner.blocks, "tuned_params": tuner.names,
                         "base_weights": str(tuner.base), "gpt_weights": str(gpt_path),
                         "heldout_bits_before": bits_before, "heldout_bits_after": bits_after}
        save_gpt(tuner.gpt, gpt_path, {"stage": "bc_joint", "steps": bc.steps, "top_n": jc.top_n, "lam": jc.lam,
                                       "tuned_blocks": tuner.blocks, "tuned_params": tuner.names,
                                       "base_weights": str(tuner.base), "base_sha256": sha256_file(tuner.base),
                                       "heldout_bits_before": bits_before, "heldout_bits_after": bits_after})
        eval_backbone = replace(run.backbone, gpt_weights=str(gpt_path.resolve()))  # every policy on the tuned GPT
    elif gpt_path.is_file() and load_safetensors(gpt_path)[1].get("stage") == "bc_joint":
        # the tuned backbone of an earlier joint run in this run_dir does not belong to this planner (PPO would use it)
        print(f"removing {gpt_path}: left by an earlier joint-tuning run, this run's planner uses the frozen backbone")
        gpt_path.unlink()
    save_orderhead(model, weights, {"stage": "bc", "steps": bc.steps, "oracle_kind": ds.kind,
                                    "backbone": run.backbone.name,
                                    **({"gpt_weights": str(gpt_path)} if tuner else {})})

    report = heldout_report(eval_backbone, run.env, run.eval, model, device, run.seed, run.oracle.kind)
    logger.log({f"eval/return_{k}": v for k, v in report["returns"].items()}, bc.steps)
    logger.close()
    summary = {**report, "stage": "bc", "weights": str(weights), "params": sum(p.numel() for p in model.parameters()),
               "train_states": len(util), "steps": bc.steps, "resumed_from": start, "history": history,
               "wall_time_s": time.time() - t0, "config": asdict(run)}
    if joint_summary:
        summary["joint"] = joint_summary
    atomic_write_json(run_dir / "summary.json", summary)
    print_report(summary)
    return summary


