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

from agents.evaluation import evaluate
from agents.oracle_data import BuildOracleRun, OracleDataset, build_oracle, collect_states, select_images
from agents.orderhead import OrderHead, orderhead_config_for, save_orderhead
from agents.policies import OrderHeadPolicy, make_policy
from backbone.blocks import BlockGeometry
from backbone.checkpoint import (CheckpointManager, atomic_write_json, load_safetensors, rng_state, set_rng_state,
                                 sha256_file)
from backbone.config import BackboneConfig, BackboneTrainConfig, RunConfig, resolve_path
from backbone.gpt import GPT
from backbone.loading import build_backbone, load_token_data, save_gpt
from backbone.train import ar_batch, ar_loss, heldout_nll
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
class JointConfig:
    """Limited joint tuning (seed Stage 5): L = L_AR + lam * L_OH on the top `top_n` GPT blocks."""

    top_n: int = 0  # top transformer blocks of the GPT trained with the OrderHead; 0 = frozen backbone (off)
    tune_output: bool = True  # with top_n > 0: also tune the GPT's final norm and output projection
    lam: float = 1.0  # lambda: weight of L_OH (nats/state) next to L_AR (nats/token) for the backbone
    lr: float = 1e-5  # AdamW lr of the tuned backbone parameters (the head keeps bc.lr)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # norm clip of the backbone gradient (the head's is clipped by bc.grad_clip)
    ar_batch_size: int = 32  # train images per L_AR batch
    ar_random_ratio: float = 1.0  # share of L_AR images in random block orders (else raster), as in Stage 1
    class_dropout: float = 0.1  # L_AR labels dropped to the null class (keeps CFG working), as in Stage 1
    start_step: int = 0  # the head trains alone on the frozen features before this step

    def validate(self, n_layer: int, steps: int) -> None:
        if not 0 <= self.top_n <= n_layer:
            raise ValueError(f"bc.joint.top_n must lie in [0, {n_layer}] (the GPT's layers), got {self.top_n}")
        if self.top_n and not 0 <= self.start_step < steps:
            raise ValueError(f"bc.joint.start_step must lie in [0, bc.steps={steps}), got {self.start_step}")
        if self.lam < 0 or self.lr <= 0 or self.ar_batch_size < 1:
            raise ValueError(f"bc.joint needs lam >= 0, lr > 0, ar_batch_size >= 1; got lam={self.lam}, "
                             f"lr={self.lr}, ar_batch_size={self.ar_batch_size}")


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
class EvalSpec:
    num_images: int = 96  # held-out images scored by every policy
    batch_size: int = 16
    gamma: float = 0.9  # discount of the reported returns (future_loss telescopes at gamma = 1)
    baselines: list[str] = field(default_factory=lambda: ["raster", "random", "oracle"])


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


def state_features(gpt: GPT, geom: BlockGeometry, codes: torch.Tensor, labels: torch.Tensor, prefix: torch.Tensor,
                   length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The env's block-pooled hidden states [S, N, D] and block masks [S, N] of stored states, from one
    causal `forward_sequence` per state (differentiable: gradients reach every GPT parameter that
    requires them). codes [S, L] (the states' images), labels [S], prefix [S, N] (revealed blocks in
    order, -1 padded), length [S].

    As in the env (`OrderPlanningCore`): a revealed token's hidden state is the final-norm output of
    its input carrying the target-aware embedding of the next revealed position, the last revealed
    token's is its target-free output (ta = -1), unrevealed tokens hold 0, and blocks are token
    means. Equal to `episode_features` up to float rounding."""
    S, N = prefix.shape
    dev = codes.device
    L, D = gpt.cfg.num_tokens, gpt.cfg.dim
    block_tokens = geom.block_tokens.to(dev)
    T = block_tokens.shape[1]
    length = length.to(dev)
    prefix = prefix.to(dev)
    steps = torch.arange(N, device=dev)
    revealed = steps[None] < length[:, None]  # [S, N] over prefix slots
    mask = torch.zeros(S, N + 1, dtype=torch.bool, device=dev)
    mask.scatter_(1, torch.where(revealed, prefix, N), True)
    mask = mask[:, :N]
    nmax = int(length.max()) if S else 0
    dtype = gpt.output.weight.dtype
    if nmax == 0:  # nothing revealed anywhere: the class token's state is not an observation
        return torch.zeros(S, N, D, device=dev, dtype=dtype), mask
    positions = block_tokens[prefix[:, :nmax].clamp(min=0)].flatten(1)  # [S, M] in reveal order
    M = positions.shape[1]
    ntok = length * T
    tokens = codes.gather(1, positions)
    k = torch.arange(M + 1, device=dev)
    targets = torch.where(k[None] < ntok[:, None], torch.cat([positions, positions[:, :1]], 1), -1)
    _, h = gpt.forward_sequence(labels.to(dev), tokens, positions, targets)  # [S, M + 1, D]
    valid = k[None, :M] < ntok[:, None]
    idx = torch.where(valid, positions, L)[..., None].expand(-1, -1, D)  # padding -> a dropped slot
    hidden_tok = torch.zeros(S, L + 1, D, device=dev, dtype=h.dtype).scatter(1, idx, h[:, 1:])[:, :L]
    return hidden_tok[:, block_tokens].mean(2), mask


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
# Limited joint tuning (seed Stage 5)
# ----------------------------------------------------------------------------------------------


class JointTuner:
    """The tuned copy of the GPT (float32, eval mode; the env keeps the original backbone), its
    AdamW over the unfrozen parameters, and the L_AR / L_OH-feature computations."""

    def __init__(self, run: "BCRun", device: torch.device, codes: torch.Tensor, labels: torch.Tensor):
        self.cfg = jc = run.bc.joint
        self.base = resolve_path(run.backbone.gpt_weights, what="GPT weights")
        bb = build_backbone(run.backbone, device=device, with_vq=False, dtype=torch.float32)
        self.gpt, self.geom = bb.gpt, bb.geometry  # frozen, eval
        n = self.gpt.cfg.n_layer
        jc.validate(n, run.bc.steps)
        self.blocks = list(range(n - jc.top_n, n))
        prefixes = tuple(f"layers.{i}." for i in self.blocks) + (("norm.", "output.") if jc.tune_output else ())
        self.names = [k for k, _ in self.gpt.named_parameters() if k.startswith(prefixes)]
        named = dict(self.gpt.named_parameters())
        self.params = [named[k].requires_grad_(True) for k in self.names]
        self.opt = torch.optim.AdamW(self.params, lr=jc.lr, weight_decay=jc.weight_decay)
        self.codes, self.labels = codes.cpu(), labels.cpu()  # the train split (the env's image pool)
        self.device, self.seed = device, run.seed

    def features(self, image_index: torch.Tensor, label: torch.Tensor, prefix: torch.Tensor,
                 length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`state_features` of stored states on the tuned GPT (graph through the tuned blocks only)."""
        return state_features(self.gpt, self.geom, self.codes[image_index].to(self.device), label.to(self.device),
                              prefix.to(self.device), length.to(self.device))

    def ar_loss(self, step: int) -> torch.Tensor:
        """L_AR of `step`: a train batch drawn from (seed, step) only (exact resume), as in Stage 1."""
        jc = self.cfg
        x, y, orders = ar_batch(self.codes, self.labels, self.geom, jc.ar_batch_size, step, self.seed,
                                jc.ar_random_ratio, jc.class_dropout, self.gpt.cfg.null_class)
        return ar_loss(self.gpt, x.to(self.device), y.to(self.device), orders.to(self.device), True)

    def heldout_bits(self, backbone: BackboneConfig) -> dict[str, float]:
        """The backbone's held-out bits/token (raster and random block order; Stage-1 eval seed)."""
        codes, labels = load_token_data(backbone, "heldout")
        return heldout_nll(self.gpt, codes, labels, self.geom, BackboneTrainConfig().eval_seed, self.device)

    def state_dict(self) -> dict:
        return {"params": {k: p.detach().cpu().clone() for k, p in zip(self.names, self.params)},
                "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in zip(self.names, self.params):
                p.copy_(state["params"][k])
        self.opt.load_state_dict(state["optimizer"])


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
    if "joint" in summary:
        j = summary["joint"]
        b, a = j["heldout_bits_before"], j["heldout_bits_after"]
        print(f"joint tuning (top {j['top_n']} blocks, lambda {j['lam']}): held-out bits/token raster "
              f"{b['raster']:.4f} -> {a['raster']:.4f}, random block order {b['random']:.4f} -> {a['random']:.4f}; "
              f"tuned GPT: {j['gpt_weights']}")
