"""`scripts/quality.py`: a block-order planner trained for image quality.

    python scripts/quality.py                     # configs/quality.yaml: seed 0, ~22 min of one CPU core
    python scripts/quality.py seed=1 run_dir=runs/quality/tiny_mnist/s1
    python scripts/quality.py grpo.iterations=2 grpo.groups=2 grpo.group_size=2 curve_samples=16   # quick

The planner. An OrderHead with belief features whose logits are a residual on confidence order
(`OrderHeadConfig.anchor_tau`): logits = f(s) - H_block / tau, with f's last layer at 0. So it starts
exactly where confident_first is (greedy: confident_first; sampled: confident_sampled with the same
tau), which is what behaviour cloning on confident_first's choices approximates, with no cloning
error and no BC data set.

Training (orderplan.train.grpo). Generation mode (the env samples every revealed block from the
backbone with CFG, sampling.noise=position), one block per decision. An iteration plays P groups of
G episodes; a group's rows share their label and their noise, so they differ only by the order. Each
finished sample is paid its leave-one-out share of the iteration batch's Fréchet distance to the
train split in the training spaces (orderplan.eval.set_reward: pixel_pca by default; never the
classifier or the held-out autoencoder). Advantages are group-relative, and the loss carries the
exact KL to the anchor confident_sampled (grpo.kl_coef nats per unit of advantage).

The other reward (`reward.kind=discriminator`, preset configs/quality_discriminator.yaml): AdaNAT's.
A pixel discriminator (orderplan.eval.discriminator, not a FID network) is warmed up on the start
policy's iteration-0 curve samples against the train split's VQ reconstructions; each iteration pays every sample its
log-odds of real, scored before the discriminator has seen it, then the samples join a FIFO buffer and
the discriminator takes `steps_per_iteration` steps. Its weights, optimiser, minibatch stream and
buffer are in the checkpoints, so a resumed run continues exactly. Why reconstructions and not the raw
split (`reward.discriminator.real`): the discriminator tells raw digits from the VQ reconstructions of
the same digits with 98% held-out accuracy (log-odds about +-11 nats), which is the codec's signature;
against the raw split it pays every sample about -10 to -17 nats for what no order can change.

Monitors. Every iteration logs the reward, the batch FD per training space, the policy entropy and
the KL to the anchor. Every `curve_every` iterations (and at 0, before any update: then the planner
IS confident_sampled) the planner generates `curve_samples` images on fixed labels, noise and block
draws, sampling its blocks as it was trained and as evaluate_quality scores it (eval.greedy=false), and curve.json gets their FD,
precision and recall in the training spaces (a diversity collapse shows as falling recall), and
the head is saved as curve/iter_XXXXX.safetensors, so the learning curve in the evaluation spaces is
one `scripts/evaluate.py` call away (configs/quality.yaml says how).

Outputs in run_dir: orderhead.safetensors (the final head, the evaluate job's `checkpoints` entry),
curve.json, summary.json (both with checksums), checkpoints/ (exact resume: model, optimiser,
iteration, curve; every iteration's randomness comes from (seed, iteration)), quality.log."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from orderplan.config.common import BackboneConfig, RunConfig, check_run_config
from orderplan.data.datasets import images_to_model, load_embedded_mnist
from orderplan.env.core import EnvConfig, OrderPlanningCore, check_env_config
from orderplan.env.factory import make_core
from orderplan.eval.rollouts import balanced_images
from orderplan.eval.sample_metrics import precision_recall
from orderplan.infra.checkpoint import CheckpointManager, atomic_write_json, check_identity
from orderplan.infra.run_utils import Logger, job_dir, progress
from orderplan.infra.seeding import derive_seed, isolated_rng
from orderplan.infra.validation import check_choice, check_int, check_range
from orderplan.model.loading import check_backbone_config
from orderplan.model.sampling import row_keys
from orderplan.planner.orderhead import OrderHead, orderhead_config_for, save_orderhead
from orderplan.train.grpo import (GRPOConfig, categorical_entropy, check_grpo_config, group_advantages, group_index,
                                 grpo_loss, masked_log_softmax)
from orderplan.eval.discriminator import DiscriminatorSpec, PixelDiscriminator, check_discriminator_spec, vq_reconstructions
from orderplan.eval.set_reward import SetFrechetReward, check_reward_spaces

OBS_KEYS = ("hidden", "block_mask", "label", "entropy", "query_hidden")  # what the planner reads


@dataclass
class QualityAgentSpec:
    anchor_tau: float = 0.1  # nats: the temperature of confident_sampled, the anchor and the start
    d_model: int | None = None  # None: sized for the backbone (orderhead_config_for)
    n_latents: int = 4
    R: int = 1  # latent reasoning steps


@dataclass
class OnlineDiscriminatorSpec(DiscriminatorSpec):
    """reward.kind=discriminator: the pixel discriminator trained alongside the policy (AdaNAT).
    `steps` are its warm-up steps on the iteration-0 curve samples (the start policy's), before any update."""

    steps_per_iteration: int = 25  # Adam steps after each iteration's samples join the buffer
    buffer: int = 1024  # the most recent generated samples it trains on (FIFO)
    # its real side. reconstructions: the reference split's token grids decoded by the VQ, the images a
    # perfect token generator would make; images: the raw split, whose difference from any decoded
    # image (the codec's signature, which no order changes) it learns first (module doc)
    real: str = "reconstructions"


DISCRIMINATOR_REAL = ("reconstructions", "images")


REWARD_KINDS = ("set_fd", "discriminator")


@dataclass
class QualityRewardSpec:
    # set_fd: each sample's leave-one-out share of the batch FD in `spaces` (orderplan.eval.set_reward);
    # discriminator: its log-odds of real under a pixel discriminator trained alongside the policy
    kind: str = "set_fd"
    # training-only feature spaces the set_fd reward reads (orderplan.eval.set_reward.TRAINING_SPACES);
    # with either kind, the batch FD and the learning curve are logged in them
    spaces: list[str] = field(default_factory=lambda: ["pixel_pca"])
    reference: str = "train"  # the real images: the embedded train split (as evaluation's features.reference)
    pca_components: int = 32  # as evaluation's features.pca_components
    random_seed: int = 0  # random_relu's weights, as evaluation's features.random_seed
    discriminator: OnlineDiscriminatorSpec = field(default_factory=OnlineDiscriminatorSpec)


@dataclass
class QualityRun(RunConfig):
    """Schema of the quality job (preset src/orderplan/configs/quality.yaml); every default lives here."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # the preset (configs/quality.yaml) sets generation mode (env group `generate`), sampling.noise=position
    # and env.hidden=block; check_quality_run refuses an env without the first two
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: QualityAgentSpec = field(default_factory=QualityAgentSpec)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: QualityRewardSpec = field(default_factory=QualityRewardSpec)
    curve_every: int = 20  # iterations between learning-curve points (0: only the first and the last)
    curve_samples: int = 1000  # samples per learning-curve point
    run_dir: str = "runs/quality/tiny_mnist/s0"


def check_quality_run(run: QualityRun, check_paths: bool = True) -> None:
    """ValueError naming the first bad key, before anything loads."""
    check_run_config(run)
    check_backbone_config(run.backbone, check_paths=check_paths)
    env = run.env
    check_env_config(env)
    if env.mode != "generate" or env.sampling.noise != "position" or not env.beliefs or env.budget is not None \
            or env.parallel or env.query != "full":
        raise ValueError("the quality planner trains in generation mode with sampling.noise=position (a group's "
                         "members differ only by their order), env.beliefs=true (its anchor reads the entropies), "
                         "one block per decision (env.budget=null, env.parallel=false) and env.query=full")
    check_grpo_config(run.grpo)
    check_choice("reward.kind", run.reward.kind, REWARD_KINDS)
    check_reward_spaces(run.reward.spaces)
    check_discriminator_spec(run.reward.discriminator, "reward.discriminator")
    check_int("reward.discriminator.steps_per_iteration", run.reward.discriminator.steps_per_iteration, 0)
    check_int("reward.discriminator.buffer", run.reward.discriminator.buffer, 1)
    check_choice("reward.discriminator.real", run.reward.discriminator.real, DISCRIMINATOR_REAL)
    check_choice("reward.reference", run.reward.reference, ("train", "heldout"))
    check_int("reward.pca_components", run.reward.pca_components, 1)
    check_range("agent.anchor_tau", run.agent.anchor_tau, 0.0, lo_open=True, note=" (nats)")
    check_int("agent.R", run.agent.R, 0)
    check_int("agent.n_latents", run.agent.n_latents, 1)
    check_int("curve_every", run.curve_every, 0)
    check_int("curve_samples", run.curve_samples, 3, note=" (a covariance and a 3-NN radius)")
    if run.grpo.groups * run.grpo.group_size < 3:
        raise ValueError("grpo.groups * grpo.group_size must be >= 3: the batch FD is a leave-one-out one")


# -- rollouts ------------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """One iteration's episodes: S decisions of B rows, flattened decision-major ([S * B] rows)."""

    obs: dict[str, torch.Tensor]  # OBS_KEYS, each [S * B, ...]
    action: torch.Tensor  # [S * B] long
    old_logp: torch.Tensor  # [S * B] log pi_old(action)
    row: torch.Tensor  # [S * B] the env row (episode) of each decision
    images: torch.Tensor  # [B, C, H, W] the finished samples, [-1, 1]
    entropy: float  # mean policy entropy per decision (nats)


def seed_groups(core: OrderPlanningCore, seed: int, groups: int, group_size: int) -> None:
    """Seed `core` with `seed`, then give every row of a group the same noise key (sampling.noise=position)."""
    core.seed(seed)
    core.row_key = row_keys(seed, group_index(groups, group_size, core.device))


@torch.no_grad()
def play(core: OrderPlanningCore, model: OrderHead, image_index: torch.Tensor, generator: torch.Generator | None
         ) -> Rollout:
    """Play one episode per row of `core` on image_index [B] (their labels condition the samples):
    sampled from the planner by Gumbel-max with `generator`, or greedy when it is None."""
    core.reset(image_index=image_index.to(core.device))
    keep: dict[str, list[torch.Tensor]] = {k: [] for k in OBS_KEYS}
    actions, logps, ents = [], [], []
    while not bool(core.done.all()):
        obs = core.observation()
        legal = obs["action_mask"]
        logp = masked_log_softmax(model(obs).logits, legal)
        scores = logp.clone()
        if generator is not None:
            u = torch.rand(logp.shape, generator=generator).clamp_(1e-12, 1 - 1e-7).to(logp.device)
            scores = scores - torch.log(-torch.log(u))
        a = scores.masked_fill(~legal, float("-inf")).argmax(-1)
        for k in OBS_KEYS:
            keep[k].append(obs[k])
        actions.append(a)
        logps.append(logp.gather(1, a[:, None])[:, 0])
        ents.append(categorical_entropy(logp, legal).mean())
        core.step(a)
    B = core.B
    images = core.decode_images(torch.ones(B, dtype=torch.bool, device=core.device)).cpu()
    steps = len(actions)
    return Rollout({k: torch.cat(v) for k, v in keep.items()}, torch.cat(actions), torch.cat(logps),
                   torch.arange(B, device=core.device).repeat(steps), images, float(torch.stack(ents).mean()))


def generate_samples(core: OrderPlanningCore, model: OrderHead, image_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Samples [M, C, H, W] of the planner, its blocks drawn from its policy as in training and in
    evaluation (eval.greedy=false), on image_index [M] (their labels): batch j of the core's B rows
    under sampler seed derive_seed(seed, "curve", j) (distinct noise per row) and block draws from
    derive_seed(seed, "curve_actions", j), so every curve point of a run sees the same labels and noise."""
    out = []
    for j, start in enumerate(range(0, len(image_index), core.B)):
        chunk = image_index[start:start + core.B]
        n = len(chunk)
        if n < core.B:
            chunk = torch.cat([chunk, chunk[-1:].expand(core.B - n)])
        core.seed(derive_seed(seed, "curve", j))
        draws = torch.Generator().manual_seed(derive_seed(seed, "curve_actions", j))
        out.append(play(core, model, chunk, draws).images[:n])
    return torch.cat(out)


# -- the job -------------------------------------------------------------------------------------


def reference_images(spec: QualityRewardSpec) -> torch.Tensor:
    images, _ = load_embedded_mnist(spec.reference)
    return images_to_model(images)


def build_head(run: QualityRun, core: OrderPlanningCore) -> OrderHead:
    """A fresh residual planner (module doc): its init draws from its own named stream."""
    num_classes = core.gpt.cfg.num_classes
    cfg = orderhead_config_for(core.D, core.geom, d_model=run.agent.d_model, n_latents=run.agent.n_latents,
                               R=run.agent.R, beliefs=True, num_classes=num_classes, anchor_tau=run.agent.anchor_tau,
                               backbone_weights=getattr(core.bb, "random_weights_tag", None))
    with isolated_rng(run.seed, "quality", "orderhead_init"):
        return OrderHead(cfg).to(core.device)


def curve_point(core: OrderPlanningCore, model: OrderHead, reward: SetFrechetReward, run: QualityRun,
                iteration: int, updates: int) -> tuple[dict, torch.Tensor]:
    """The learning-curve record at `iteration`: samples on the fixed curve labels and noise
    (`generate_samples`), their FD, precision and recall in every training space; and the samples
    [curve_samples, C, H, W]."""
    model.eval()
    idx = balanced_images(core.labels, run.curve_samples)
    images = generate_samples(core, model, idx, run.seed)
    feats = reward.features(images)
    point: dict = {"iteration": iteration, "updates": updates, "num_samples": len(images)}
    real = reward.reference_features
    for name, x in feats.items():
        pr = precision_recall(real[name], x)
        point[name] = {"fd": reward.from_features({name: x}).fd[name], "precision": pr.precision, "recall": pr.recall}
    model.train()
    return point, images


def _identity(run: QualityRun) -> dict:
    return {"seed": run.seed, "grpo": asdict(run.grpo) | {"iterations": None, "ckpt_every": None},
            "reward": asdict(run.reward), "agent": asdict(run.agent), "env": asdict(run.env),
            "curve_every": run.curve_every, "curve_samples": run.curve_samples}


@job_dir("quality")
def run_quality(run: QualityRun) -> dict:
    """Train the quality planner (module doc); returns summary.json's dict."""
    check_quality_run(run)
    t0 = time.time()
    out = Path(run.run_dir)
    g = run.grpo
    B = g.groups * g.group_size
    core = make_core(run.backbone, env=replace(run.env, split="train"), batch_size=B, device=run.device, seed=run.seed)
    real = reference_images(run.reward)
    reward = SetFrechetReward(real, run.reward.spaces, run.reward.pca_components, run.reward.random_seed)
    dspec = run.reward.discriminator
    disc = PixelDiscriminator(dspec) if run.reward.kind == "discriminator" else None
    disc_real = real  # the discriminator's real side (OnlineDiscriminatorSpec.real)
    if disc is not None and dspec.real == "reconstructions":
        disc_real = vq_reconstructions(core.bb, run.backbone, run.reward.reference)
    buffer = None  # the discriminator's generated side: the most recent samples
    model = build_head(run, core).train()
    opt = torch.optim.Adam(model.parameters(), lr=g.lr)
    manager = CheckpointManager(out / "checkpoints", keep_last=g.keep_checkpoints)
    start, curve, history, updates = 0, [], [], 0
    state = manager.load_latest()
    if state is not None:
        check_identity(state["identity"], _identity(run), manager.ckpt_dir,
                       "Resume with the same settings, or use a new run_dir.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, updates = int(state["iteration"]), int(state["updates"])
        curve, history = list(state["curve"]), list(state["history"])
        if disc is not None:
            disc.load_state_dict(state["discriminator"])
            buffer = state["buffer"]
        print(f"resuming from {manager.latest()} (iteration {start})")
    logger = Logger(run, out, job="quality")
    paid_by = (f"leave-one-out FD share in {run.reward.spaces}" if disc is None else
               "log-odds of real under a pixel discriminator trained alongside")
    print(f"quality planner: GRPO in generation mode, {g.iterations} iterations of {g.groups} groups x "
          f"{g.group_size}, reward = {paid_by}, KL {g.kl_coef} to confident_sampled(tau={run.agent.anchor_tau})")
    if start == 0:
        point, images = curve_point(core, model, reward, run, 0, 0)
        if disc is not None:  # warm-up on the start policy's samples, so iteration 1 is paid by a trained critic
            buffer = images[-dspec.buffer:]
            point["discriminator_loss"] = disc.update(disc_real, buffer, dspec.steps, bar=True)
            point["discriminator_log_odds"] = float(disc.log_odds(images).mean())
        curve.append(point)
        save_orderhead(model, out / "curve" / "iter_00000.safetensors", {"iteration": "0"})
    bar = progress(range(start, g.iterations), desc="quality", initial=start, total=g.iterations)
    for it in bar:
        model.eval()
        seed_groups(core, derive_seed(run.seed, "quality", "episodes", it), g.groups, g.group_size)
        pick = torch.randint(core.num_images, (g.groups,), generator=torch.Generator().manual_seed(
            derive_seed(run.seed, "quality", "labels", it)))
        ro = play(core, model, pick.repeat_interleave(g.group_size), torch.Generator().manual_seed(
            derive_seed(run.seed, "quality", "actions", it)))
        paid = reward(ro.images)  # the batch FD is logged with either reward
        extra = {}
        if disc is None:
            r = paid.reward
        else:  # scored before the discriminator sees them, then they join its buffer
            r = disc.log_odds(ro.images).float()
            buffer = torch.cat([buffer, ro.images])[-dspec.buffer:]
            extra = {"discriminator_loss": disc.update(disc_real, buffer, dspec.steps_per_iteration),
                     "called_real": float((r > 0).float().mean())}
        adv = group_advantages(r, g.group_size, g.adv_eps).to(core.device)[ro.row]
        model.train()
        mb_gen = torch.Generator().manual_seed(derive_seed(run.seed, "quality", "minibatches", it))
        stats = []
        n = len(ro.action)
        for _ in range(g.epochs):
            perm = torch.randperm(n, generator=mb_gen).to(core.device)
            for s in range(0, n, g.minibatch_size):
                idx = perm[s:s + g.minibatch_size]
                obs = {k: v[idx] for k, v in ro.obs.items()}
                logits = model(obs).logits
                legal = ~obs["block_mask"]
                loss, st = grpo_loss(logits, model.anchor_logits(obs["entropy"]), legal, ro.action[idx],
                                     ro.old_logp[idx], adv[idx], g.clip, g.kl_coef)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), g.max_grad_norm)
                opt.step()
                updates += 1
                stats.append(st)
        rec = {"iteration": it + 1, "updates": updates, "reward": float(r.mean()),
               "reward_std": float(r.std()), "group_reward_std": float(r.view(-1, g.group_size).std(1).mean()),
               "policy_entropy": ro.entropy, **extra,
               **{f"batch_fd_{k}": v for k, v in paid.fd.items()},
               **{f"{k}": sum(getattr(s, k) for s in stats) / len(stats)
                  for k in ("loss", "surrogate", "kl", "entropy", "clip_fraction")}}
        history.append(rec)
        logger.log({f"train/{k}": v for k, v in rec.items() if k != "iteration"}, it + 1)
        bar.set_postfix(fd=f"{next(iter(paid.fd.values())):.2f}", kl=f"{rec['kl']:.3f}", H=f"{ro.entropy:.2f}")
        last = it + 1 == g.iterations
        if (run.curve_every and (it + 1) % run.curve_every == 0) or last:
            point, images = curve_point(core, model, reward, run, it + 1, updates)
            if disc is not None:
                point["discriminator_log_odds"] = float(disc.log_odds(images).mean())
            curve.append(point)
            save_orderhead(model, out / "curve" / f"iter_{it + 1:05d}.safetensors", {"iteration": str(it + 1)})
            logger.log({f"curve/{s}_{m}": curve[-1][s][m] for s in run.reward.spaces
                        for m in ("fd", "precision", "recall")}, it + 1)
        if (it + 1) % g.ckpt_every == 0 or last:
            manager.save(it + 1, {"model": model.state_dict(), "optim": opt.state_dict(), "iteration": it + 1,
                                  "updates": updates, "curve": curve, "history": history, "identity": _identity(run),
                                  **({} if disc is None else {"discriminator": disc.state_dict(), "buffer": buffer})})
    logger.close()
    weights = save_orderhead(model.eval(), out / "orderhead.safetensors", {"stage": "quality"})
    atomic_write_json(out / "curve.json", {"spaces": run.reward.spaces, "points": curve}, checksum=True)
    summary = {"stage": "quality", "weights": str(weights), "iterations": g.iterations, "updates": updates,
               "curve": curve, "history": history, "wall_time_s": time.time() - t0, "config": asdict(run)}
    atomic_write_json(out / "summary.json", summary, checksum=True)
    first, final = curve[0], curve[-1]
    for s in run.reward.spaces:
        print(f"{s}: FD {first[s]['fd']:.3f} -> {final[s]['fd']:.3f}, recall {first[s]['recall']:.3f} -> "
              f"{final[s]['recall']:.3f} ({final['num_samples']} samples)")
    return summary
