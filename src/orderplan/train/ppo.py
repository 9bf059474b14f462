"""PPO for the OrderHead planner with TorchRL components (the layout of TorchRL's
`sota-implementations/ppo`, the reading order of CleanRL's `ppo.py`).

    make_actor_critic(model, router, budgets)  ProbabilisticActor + ValueOperator over ONE OrderHead
    PPOConfig                                  every knob, with the derived sizes checked up front
    train_ppo(env, model, cfg, run_dir, ...)   Collector -> GAE -> ClipPPOLoss minibatch epochs
                                               (ReplayBuffer + SamplerWithoutReplacement), Adam,
                                               grad clipping, diagnostics, checkpoints, resume

Actions: plain mode samples one block from `MaskedCategorical(logits, mask=action_mask)`; router
mode samples (budget index, K ordered blocks) from `orderplan.planner.distributions.RouterDistribution`.
With the router, the decision cost is the env's business (`env.decision_cost` / env.decision_cost
config): this module only handles the action format.

Semi-MDP discounting. A router env in semi-MDP mode (env.gamma set, `core.smdp`) measures time in
blocks: a decision revealing k blocks is followed by a discount gamma^k, not gamma, and its reward
already discounts its own blocks (orderplan.env.core). GAE then runs with a per-step gamma^k: TorchRL's
`GAE` raises its scalar gamma to the power of the `steps_to_next_obs` entry (the env's
("next", "decision_blocks")) and runs the vectorised estimator on the resulting [B, T, 1] gamma
tensor; lambda stays per decision. ppo.gamma is the source of truth: the env's gamma must equal
it (`smdp_env_gamma`, the one check, also used by scripts/ppo.py to fill in env.gamma).

Initialising from a BC checkpoint is the caller's job: pass the loaded OrderHead as `model` (call
`model.enable_router(budgets)` first for router mode). The model is trained in place.

Exact resume. A checkpoint after iteration i holds the model, the Adam state, i, the frames so far,
the reward scale and every RNG state. Collection is made a function of (weights, RNG state,
iteration) only:
* the collector resets the env at the start of every iteration (`reset_at_each_iter=True`; an
  episode cut by the end of a batch is truncated and bootstrapped by GAE from the value of its
  last observation; in plain mode every episode has N decisions, so with frames_per_batch a
  multiple of B * N no episode is ever cut), and
* just before that reset the env is seeded from (cfg.seed, iteration) (the collector's
  `pre_collect_hook`), so the images drawn do not depend on what happened before;
* the torch RNG (action sampling, minibatch permutations) is restored after the collector is built
  (a fresh run seeds it, numpy's and Python's from the named stream (cfg.seed, "ppo", "train"),
  `orderplan.infra.seeding`), and the last metrics are checkpointed with it, so a run stopped after its
  final checkpoint reports what the uninterrupted one does.
So a run stopped after iteration i and restarted reproduces the uninterrupted run bit for bit on
the CPU (tested: identical weights). On a GPU the same holds up to the non-determinism of CUDA
kernels (same iterations, frames and images; weights equal up to float rounding).

Under torchrun (`train_ppo(..., ctx=init_distributed(...))`, `orderplan.train.ppo_dist`) each rank
runs its own env batch and collector, the env seeded per iteration from (rank_seed(seed, r),
iteration), its actions and minibatch permutations from its own stream (seed, "ppo", "train",
"rank", r). frames_per_batch and minibatch_size stay global: rank r collects F / W frames and
takes minibatch_size / W of them per update; gradients are averaged over the ranks before
clipping (one all-reduce per update), advantages normalised over the global minibatch, the auto
reward scale and the metrics computed over the global batch, so an update is that of one batch of
F frames (tested: 2 ranks x B rows give the weights of 1 process x 2B rows on the same rows, up to
float summation order, when a minibatch is the whole batch; with several minibatches the global
minibatch is a union of per-rank draws, not one permutation of all F frames). Rank 0 writes the
checkpoints, which record world_size (a resume needs the same W) and every rank's RNG state;
every rank resumes from them. W = 1 is the plain run, bit for bit."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement
from torchrl.envs import EnvBase, RewardSum, StepCounter, TransformedEnv
from torchrl.modules import MaskedCategorical, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from orderplan.planner.distributions import RouterDistribution
from orderplan.planner.orderhead import OrderHead, save_orderhead
from orderplan.train.ppo_dist import (all_reduce_sum, average_gradients, broadcast_module, global_means, global_rms,
                                      rank_seed, rank_stream, single_process, standardize)
from orderplan.infra.checkpoint import CheckpointManager, check_identity, rng_state, set_rng_state
from orderplan.infra.distributed import DistContext, all_gather_objects, barrier, gather_strided
from orderplan.infra.run_utils import progress as progress_bar
from orderplan.infra.seeding import seed_global
from orderplan.infra.validation import check_choice, check_gamma, check_int, check_positive, check_probability, check_range
from orderplan.env.rewards import GAMMA, discount_factors

__all__ = ["PPOConfig", "make_actor_critic", "make_gae", "make_loss", "train_ppo", "iteration_seed",
           "discounted_episode_returns", "smdp_env_gamma", "check_ppo_config"]


EvalFn = Callable[[OrderHead, int], dict[str, float]]


# -- config ---------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """PPO hyperparameters (the `ppo` config group). Sizes are in frames: one frame is one planner
    decision of one env row, so an iteration of a batched env with B rows runs
    frames_per_batch / B steps."""

    # collection
    frames_per_batch: int = 512  # decisions per iteration over all env rows (a multiple of B)
    total_frames: int = 51_200  # run length; iterations = total_frames // frames_per_batch
    R: int | None = None  # latent reasoning steps of the OrderHead (None = model.cfg.R)
    seed: int = 0  # torch RNG (actions, minibatches) and per-iteration env seeds
    # advantages
    # the project's one discount (orderplan.env.rewards.GAMMA), < 1 on purpose: future_loss rewards telescope,
    # so with gamma = 1 every order has the same return. Router runs: also env.gamma of the training env
    # (ppo.gamma is the source of truth)
    gamma: float = GAMMA
    gae_lambda: float = 0.95
    reward_scale: float | None = None  # rewards are multiplied by this before GAE (logged returns
    #                                    stay in nats); None = 1 / RMS of the first batch's rewards
    gae_every_epoch: bool = False  # recompute advantages with the current critic before every epoch
    # loss
    clip_epsilon: float = 0.2
    entropy_coef: float = 0.01  # router mode: on H(budget) + H(first block), see RouterDistribution
    critic_coef: float = 0.5
    loss_critic_type: str = "l2"  # l1 | l2 | smooth_l1
    clip_value: float | None = None  # PPO value clipping radius (CleanRL clip_vloss), None = off
    normalize_advantage: bool = True  # per minibatch, as CleanRL and TorchRL do
    # optimisation
    lr: float = 3e-4
    adam_eps: float = 1e-5
    anneal_lr: bool = False  # linear decay to 0 over the run
    max_grad_norm: float = 0.5
    epochs: int = 4  # passes over each batch
    minibatch_size: int = 128  # frames per gradient step (frames_per_batch must be a multiple)
    target_kl: float | None = None  # stop the epochs of an iteration once approx_kl exceeds this
    # bookkeeping
    eval_every: int = 10  # iterations between eval_fn calls (and after the last); 0 = never
    ckpt_every: int = 10  # iterations between checkpoints (the last iteration is always saved)
    keep_checkpoints: int = 3
    resume: bool = True  # continue from run_dir/checkpoints when a checkpoint is there
    stop_at: int | None = None  # stop after this iteration as if interrupted (checkpoint kept)

    @property
    def num_iterations(self) -> int:
        return self.total_frames // self.frames_per_batch

    @property
    def num_minibatches(self) -> int:
        return self.frames_per_batch // self.minibatch_size


def check_ppo_sizes(cfg: PPOConfig, batch: int, world: int = 1) -> None:
    """Check the derived sizes against an env with `batch` rows on each of `world` ranks
    (torchrun: frames_per_batch and minibatch_size are global, split evenly over the ranks);
    raises ValueError."""
    if world > 1 and (cfg.frames_per_batch <= 0 or cfg.frames_per_batch % (batch * world)):
        raise ValueError(f"frames_per_batch={cfg.frames_per_batch} must be a positive multiple of the env's "
                         f"batch size {batch} times the {world} ranks (each rank collects 1/{world} of it)")
    if world > 1 and (cfg.minibatch_size <= 0 or cfg.minibatch_size % world):
        raise ValueError(f"minibatch_size={cfg.minibatch_size} must be a multiple of the {world} ranks "
                         f"(each rank takes 1/{world} of every minibatch)")
    if cfg.frames_per_batch <= 0 or cfg.frames_per_batch % batch:
        raise ValueError(f"frames_per_batch={cfg.frames_per_batch} must be a positive multiple of the env's "
                         f"batch size {batch}")
    if cfg.total_frames < cfg.frames_per_batch:
        raise ValueError(f"total_frames={cfg.total_frames} is less than one batch ({cfg.frames_per_batch})")
    if cfg.minibatch_size <= 0 or cfg.frames_per_batch % cfg.minibatch_size:
        raise ValueError(f"frames_per_batch={cfg.frames_per_batch} must be a multiple of "
                         f"minibatch_size={cfg.minibatch_size}")
    if not 0.0 <= cfg.gamma <= 1.0 or not 0.0 <= cfg.gae_lambda <= 1.0:
        raise ValueError(f"gamma and gae_lambda must lie in [0, 1], got {cfg.gamma}, {cfg.gae_lambda}")
    if cfg.epochs < 1 or cfg.ckpt_every < 1 or cfg.eval_every < 0:
        raise ValueError("need epochs >= 1, ckpt_every >= 1, eval_every >= 0")
    if cfg.reward_scale is not None and cfg.reward_scale <= 0:
        raise ValueError(f"reward_scale must be positive (or None = auto), got {cfg.reward_scale}")
    if cfg.loss_critic_type not in ("l1", "l2", "smooth_l1"):
        raise ValueError(f"loss_critic_type must be l1, l2 or smooth_l1, got {cfg.loss_critic_type!r}")


# -- actor and critic -----------------------------------------------------------------------------


def _plan(model: OrderHead, inputs: tuple[torch.Tensor, ...], R: int | None):
    """OrderHead.plan on any leading batch dims; `inputs` in the order of `model.input_keys`
    (hidden [*, L|N, D], block_mask [*, N], then label [*], entropy [*, L], query_hidden [*, N, D]
    as the planner reads them). (GAE calls the critic on [2, B, T, ...] stacks of root and next
    observations.)"""
    obs = dict(zip(model.input_keys, inputs))
    lead = obs["block_mask"].shape[:-1]
    trail = {"label": 0, "entropy": 1, "block_mask": 1}  # trailing dims of each input; the rest have 2
    flat = {k: v.reshape(-1, *v.shape[v.dim() - trail.get(k, 2):]) for k, v in obs.items()}
    extra = {k: flat[k] for k in model.input_keys if k not in ("hidden", "block_mask")}
    return model.plan(flat["hidden"], flat["block_mask"], R, **extra), lead


def obs_keys(model: OrderHead) -> list[str]:
    """The observation keys the OrderHead reads (`OrderHead.input_keys`: the label only when it is
    class-conditioned, the belief features only when it reads them)."""
    return model.input_keys


class _PolicyHead(nn.Module):
    """(the OrderHead's inputs) -> logits [*, N] (router: budget_logits [*, nb], logits [*, N])."""

    def __init__(self, model: OrderHead, R: int | None, router: bool):
        super().__init__()
        self.model, self.R, self.router = model, R, router

    def forward(self, *inputs: torch.Tensor):
        out, lead = _plan(self.model, inputs, self.R)
        logits = out.logits.reshape(*lead, -1)
        if not self.router:
            return logits
        return out.budget_logits.reshape(*lead, -1), logits


class _ValueHead(nn.Module):
    """(the OrderHead's inputs) -> state_value [*, 1]."""

    def __init__(self, model: OrderHead, R: int | None):
        super().__init__()
        self.model, self.R = model, R

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out, lead = _plan(self.model, inputs, self.R)
        return out.value.reshape(*lead, 1)


def make_actor_critic(model: OrderHead, router: bool = False, budgets: list[int] | None = None,
                      R: int | None = None) -> tuple[ProbabilisticActor, ValueOperator]:
    """The PPO actor and critic over one shared OrderHead (both update the same weights).

    actor: reads hidden, block_mask, action_mask; writes logits (router: also budget_logits),
        action ([B] block, or router [B, 1 + K]) and action_log_prob. Samples under the
        collector's RANDOM exploration; under `set_exploration_type(DETERMINISTIC)` it is greedy
        (argmax block; router: argmax budget and the top-K blocks).
    critic: writes state_value [B, 1].
    R: latent reasoning steps (None = model.cfg.R). Each of actor and critic runs the OrderHead, so
    a PPO minibatch costs two planner forwards (cheap next to the backbone's env steps).
    """
    if router:
        if not model.has_router:
            raise ValueError("router mode needs an OrderHead with a router head: call model.enable_router(budgets)")
        budgets = list(model.cfg.budgets) if budgets is None else [int(k) for k in budgets]
        if budgets != model.cfg.budgets:
            raise ValueError(f"budgets {budgets} differ from the OrderHead router's {model.cfg.budgets}")
        module = TensorDictModule(_PolicyHead(model, R, True), in_keys=obs_keys(model), out_keys=["budget_logits", "logits"])
        actor = ProbabilisticActor(
            module, in_keys={"budget_logits": "budget_logits", "block_logits": "logits", "mask": "action_mask"},
            out_keys=["action"], distribution_class=RouterDistribution, distribution_kwargs={"budgets": budgets},
            return_log_prob=True)
    else:
        module = TensorDictModule(_PolicyHead(model, R, False), in_keys=obs_keys(model), out_keys=["logits"])
        actor = ProbabilisticActor(module, in_keys={"logits": "logits", "mask": "action_mask"}, out_keys=["action"],
                                   distribution_class=MaskedCategorical, return_log_prob=True)
    critic = ValueOperator(_ValueHead(model, R), in_keys=obs_keys(model))
    return actor, critic


SMDP_STEPS_KEY = ("next", "decision_blocks")  # k of each transition, written by a semi-MDP router env


def make_gae(critic: ValueOperator | None, cfg: PPOConfig, smdp: bool = False) -> GAE:
    """TorchRL's GAE with cfg.gamma and cfg.gae_lambda. smdp: discount each transition by gamma^k,
    k [B, T] read from ("next", "decision_blocks") (GAE's `steps_to_next_obs` key). critic=None
    reads state_value and ("next", "state_value") from the data instead."""
    # deactivate_vmap: the critic is called on root and next observations in turn; vmap has no
    # batching rule for the attention kernels and would fall back to a slow path
    gae = GAE(gamma=cfg.gamma, lmbda=cfg.gae_lambda, value_network=critic, average_gae=False, deactivate_vmap=True)
    if smdp:
        gae.set_keys(steps_to_next_obs=SMDP_STEPS_KEY)
    return gae


def make_loss(actor: ProbabilisticActor, critic: ValueOperator, cfg: PPOConfig,
              smdp: bool = False) -> tuple[ClipPPOLoss, GAE]:
    """ClipPPOLoss (non-functional: it calls the shared modules directly, so an optimiser over
    model.parameters() is all it needs) and its GAE value estimator (`make_gae`; smdp: per-step
    gamma^k for a semi-MDP router env)."""
    loss = ClipPPOLoss(
        actor, critic, clip_epsilon=cfg.clip_epsilon, entropy_bonus=cfg.entropy_coef > 0,
        entropy_coeff=cfg.entropy_coef, critic_coeff=cfg.critic_coef, loss_critic_type=cfg.loss_critic_type,
        normalize_advantage=cfg.normalize_advantage, clip_value=cfg.clip_value, functional=False)
    return loss, make_gae(critic, cfg, smdp)


def iteration_seed(seed: int, iteration: int) -> int:
    """The env seed of an iteration: a function of (seed, iteration) only (for exact resume)."""
    return int(np.random.SeedSequence([int(seed), int(iteration)]).generate_state(1, np.uint64)[0] % (2**62))


def _router_of(env: EnvBase) -> bool:
    """Router actions are [B, 1 + K], plain ones [B]."""
    return len(env.action_spec.shape) > len(env.batch_size)


def check_ppo_config(cfg: PPOConfig, key: str = "ppo") -> None:
    """Each PPOConfig field in its range, named `{key}.<field>` (`check_ppo_sizes` adds the checks
    against the env's batch size): counts and sizes >= 1, eval_every >= 0 (0 = never), gamma in
    (0, 1], gae_lambda in [0, 1], clip_epsilon in (0, 1], coefficients >= 0, lr / eps / norms > 0."""
    check_int(f"{key}.frames_per_batch", cfg.frames_per_batch, 1)
    check_int(f"{key}.total_frames", cfg.total_frames, 1)
    check_int(f"{key}.R", cfg.R, 0, allow_none=True, note=" (null = the OrderHead's own R)")
    check_int(f"{key}.seed", cfg.seed)
    check_gamma(f"{key}.gamma", cfg.gamma)
    check_probability(f"{key}.gae_lambda", cfg.gae_lambda)
    check_positive(f"{key}.reward_scale", cfg.reward_scale, allow_none=True, note=" (null = 1 / RMS of the first batch)")
    check_range(f"{key}.clip_epsilon", cfg.clip_epsilon, 0.0, 1.0, lo_open=True)
    check_range(f"{key}.entropy_coef", cfg.entropy_coef, 0.0)
    check_range(f"{key}.critic_coef", cfg.critic_coef, 0.0)
    check_choice(f"{key}.loss_critic_type", cfg.loss_critic_type, ("l1", "l2", "smooth_l1"))
    check_positive(f"{key}.clip_value", cfg.clip_value, allow_none=True, note=" (null = no value clipping)")
    check_positive(f"{key}.lr", cfg.lr)
    check_positive(f"{key}.adam_eps", cfg.adam_eps)
    check_positive(f"{key}.max_grad_norm", cfg.max_grad_norm)
    check_int(f"{key}.epochs", cfg.epochs, 1)
    check_int(f"{key}.minibatch_size", cfg.minibatch_size, 1)
    check_positive(f"{key}.target_kl", cfg.target_kl, allow_none=True, note=" (null = no early stop)")
    check_int(f"{key}.eval_every", cfg.eval_every, 0, note=" (0 = never)")
    check_int(f"{key}.ckpt_every", cfg.ckpt_every, 1)
    check_int(f"{key}.keep_checkpoints", cfg.keep_checkpoints, 1)
    check_int(f"{key}.stop_at", cfg.stop_at, 1, allow_none=True, note=" (null = run to the end)")


def smdp_env_gamma(env_gamma: float | None, ppo_gamma: float) -> float:
    """The per-block discount of a semi-MDP router env, checked once here for every caller.
    ppo.gamma is the source of truth: env.gamma left None takes it; a set env.gamma must equal it
    (ValueError naming both keys), since GAE discounts with ppo.gamma^k what the env's rewards
    discounted with env.gamma^i inside a decision."""
    if env_gamma is not None and not math.isclose(float(env_gamma), float(ppo_gamma), rel_tol=0.0, abs_tol=1e-12):
        raise ValueError(f"the env discounts per block with env.gamma={env_gamma} (semi-MDP router) but "
                         f"ppo.gamma={ppo_gamma}: leave env.gamma null (it is set to ppo.gamma) or make them equal")
    return float(ppo_gamma)


def _smdp_of(env: EnvBase, gamma: float) -> bool:
    """Whether `env` is a semi-MDP router env (an OrderPlanningEnv whose core has env.gamma set);
    raises ValueError when its per-block gamma differs from PPO's (`smdp_env_gamma`)."""
    core = getattr(env, "core", None)
    if not getattr(core, "smdp", False):
        return False
    smdp_env_gamma(core.cfg.gamma, gamma)
    return True


# -- training -------------------------------------------------------------------------------------


@dataclass
class _RunPlan:
    """The derived sizes and modes of a run, checked once against the env and the model."""

    B: int  # env rows (of this rank's env under torchrun)
    F: int  # frames (decisions over all rows of all ranks) per iteration
    num_iterations: int
    last_iteration: int  # num_iterations, or cfg.stop_at when that comes first
    router: bool  # actions are (budget index, K blocks)
    budgets: list[int] | None  # the router's block counts
    smdp: bool  # semi-MDP router env: GAE discounts a decision by gamma^k
    world: int = 1  # torchrun ranks, each with its own env of B rows

    @property
    def F_rank(self) -> int:
        """Frames this rank collects per iteration."""
        return self.F // self.world


@dataclass
class _Learner:
    """What every iteration works with; the actor and critic share the one OrderHead."""

    train_env: TransformedEnv  # the env + RewardSum + StepCounter
    actor: ProbabilisticActor
    loss_module: ClipPPOLoss
    gae: GAE
    optim: torch.optim.Adam
    storage: LazyTensorStorage  # one batch of this rank's frames, reused every iteration
    ctx: DistContext  # torchrun rank and world (world 1: a plain run)
    minibatch_size: int  # frames of this rank per update (cfg.minibatch_size / world)


@dataclass
class _Progress:
    """The counters a checkpoint restores."""

    iteration: int = 0  # iterations done
    frames: int = 0  # frames collected
    reward_scale: float | None = None  # None until the first batch sets it (auto scale)
    # the last iteration's train/ and time/ metrics and the last eval metrics: a run stopped after its
    # final checkpoint trains no more iterations, and still returns (and reports) them
    metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


class _SeedEnvPerIteration:
    """The collector's `pre_collect_hook`: seeds the env from (seed, iteration) just before the reset
    that opens every iteration, so the images of an iteration do not depend on earlier ones."""

    def __init__(self, env: EnvBase, seed: int, iteration: int):
        self.env, self.seed, self.iteration = env, seed, iteration

    def __call__(self) -> None:
        self.iteration += 1
        self.env.set_seed(iteration_seed(self.seed, self.iteration), static_seed=True)


def train_ppo(env: EnvBase, model: OrderHead, cfg: PPOConfig, run_dir: str | Path, logger: Any = None,
              eval_fn: EvalFn | None = None, ctx: DistContext | None = None) -> dict[str, Any]:
    """Train `model` in place with PPO on the batched TorchRL `env` (an `OrderPlanningEnv`, plain or
    router actions, on the model's device).

    run_dir gets checkpoints/ (`CheckpointManager`: model, optimizer, iteration, frames, reward
    scale, RNG states) and orderhead.safetensors (the final weights, `load_orderhead` format).
    logger: anything with `log(metrics, step)` (`orderplan.infra.run_utils.Logger`); step = frames.
    eval_fn(model, iteration) -> metrics, logged under eval/ every cfg.eval_every iterations and
    after the last one. It runs with its own RNG stream (fork_rng), in eval mode, without grad,
    and may use `env` itself: the collector resets the env before the next iteration anyway.

    Returns {"iterations", "frames", "num_iterations", "finished", "metrics" (the last
    iteration's train/ and time/ metrics), "eval" (the last eval metrics), "checkpoint",
    "orderhead" (paths)}.

    ctx: torchrun's rank and world (`orderplan.infra.distributed.init_distributed`; None = one process).
    Every rank passes its own `env` (B rows) and the same model, config and run_dir; rank r
    collects frames_per_batch / W frames per iteration from its env, seeded from (cfg.seed, r), and
    takes minibatch_size / W frames of every minibatch; gradients and batch statistics are
    reduced over the ranks (`orderplan.train.ppo_dist`), so the weights stay identical on every
    rank and an update is that of the global batch. Frames and metrics are global. Rank 0 alone
    writes checkpoints and orderhead.safetensors and calls `logger`; eval_fn runs on every rank
    (it may shard its own work). W = 1 is a plain run, bit for bit.
    """
    # -- setup: sizes and checks, agent and loss, resume, collector, RNG ---------------------------
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    ctx = single_process(device) if ctx is None else ctx
    plan = _plan_run(env, model, cfg, ctx.world)
    model.eval()  # the behaviour policy and the policy inside the loss must be the same function: no dropout
    learner = _build_learner(env, model, cfg, plan, device, ctx)
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.keep_checkpoints)
    progress, saved_rng = _restore(manager, cfg, model, learner.optim, ctx)
    broadcast_module(model, ctx)  # every rank starts from rank 0's weights, whatever the caller loaded
    collector = _make_collector(learner, cfg, plan, progress.iteration)
    # Building the collector ran the policy once; the RNG streams start (or resume) here.
    if saved_rng is not None:
        set_rng_state(saved_rng)
    else:  # a named stream: whatever setup drew (the collector's policy call, a GPT's init) changes nothing
        seed_global(cfg.seed, *rank_stream(ctx, "ppo", "train"))

    # -- the loop: rollout, learning from it, evaluation, logging, checkpoint ----------------------
    metrics: dict[str, float] = dict(progress.metrics)
    eval_metrics: dict[str, float] = dict(progress.eval_metrics)
    ckpt_path = manager.latest()
    bar = progress_bar(total=plan.num_iterations, initial=progress.iteration, desc="ppo", disable=not ctx.main)
    t_start = time.perf_counter()
    batches = collector if plan.last_iteration > progress.iteration else ()
    try:
        for data in batches:  # data [B, F / (W B)], this rank's share
            progress.iteration += 1
            progress.frames += data.numel() * ctx.world
            t_collect = time.perf_counter() - t_start
            metrics = _learn_from_batch(data, learner, model, cfg, plan, progress)
            t_train = time.perf_counter() - t_start - t_collect
            metrics["time/fps"] = plan.F / max(t_collect + t_train, 1e-9)
            metrics["time/collect_s"] = t_collect
            metrics["time/train_s"] = t_train
            metrics["train/iteration"] = float(progress.iteration)

            final = progress.iteration == plan.last_iteration
            if eval_fn is not None and _eval_due(cfg, progress.iteration, plan.num_iterations):
                eval_metrics = _run_eval(eval_fn, model, progress.iteration, device)
                metrics.update(eval_metrics)
            if logger is not None and ctx.main:
                logger.log(metrics, step=progress.frames)
            if progress.iteration % cfg.ckpt_every == 0 or final:
                progress.metrics, progress.eval_metrics = metrics, eval_metrics
                ckpt_path = _save_checkpoint(manager, model, learner.optim, cfg, plan, progress, ctx)
            bar.update(1)
            bar.set_postfix({k.split("/")[1]: f"{metrics[k]:.3g}" for k in
                             ("train/mean_return", "train/approx_kl", "train/entropy") if k in metrics})
            t_start = time.perf_counter()
            if final:
                break
    finally:
        bar.close()
        collector.shutdown(close_env=False)  # the env is the caller's

    orderhead_path = run_dir / "orderhead.safetensors"
    if ctx.main:
        save_orderhead(model, orderhead_path, {"iteration": progress.iteration, "frames": progress.frames,
                                               "algorithm": "ppo"})
    barrier(ctx)  # the weights are on disk when any rank returns
    return {"iterations": progress.iteration, "frames": progress.frames, "num_iterations": plan.num_iterations,
            "finished": progress.iteration >= plan.num_iterations, "metrics": metrics, "eval": eval_metrics,
            "checkpoint": None if ckpt_path is None else str(ckpt_path), "orderhead": str(orderhead_path)}


# -- setup and resume -----------------------------------------------------------------------------


def _plan_run(env: EnvBase, model: OrderHead, cfg: PPOConfig, world: int = 1) -> _RunPlan:
    """Derived sizes and modes, with every check against the env and the model (ValueError);
    warns when an iteration is too short to hold an episode of one block per decision."""
    B = int(env.batch_size.numel())
    check_ppo_sizes(cfg, B, world)
    F = cfg.frames_per_batch
    router = _router_of(env)
    if router and not model.has_router:
        raise ValueError("the env takes router actions but the OrderHead has no router head (model.enable_router)")
    budgets = list(model.cfg.budgets) if router else None
    smdp = _smdp_of(env, cfg.gamma)  # block-time discounting: GAE with gamma^k per decision
    env_cfg = getattr(getattr(env, "core", None), "cfg", None)  # an OrderPlanningEnv's EnvConfig
    if router and env_cfg is not None and list(env_cfg.budget or []) != budgets:
        raise ValueError(f"the env's budgets {env_cfg.budget} differ from the OrderHead router's {budgets}")
    N = int(env.observation_spec["action_mask"].shape[-1])
    if F // (B * world) < N:
        warnings.warn(f"frames_per_batch={F} gives {F // (B * world)} decisions per env row and iteration, fewer "
                      f"than the N={N} of a one-block-per-decision episode: the env is reset at every iteration, so "
                      f"the later decisions of longer episodes are never collected; use frames_per_batch >= "
                      f"{B * world * N}", stacklevel=3)
    last_iteration = cfg.num_iterations if cfg.stop_at is None else min(cfg.stop_at, cfg.num_iterations)
    return _RunPlan(B, F, cfg.num_iterations, last_iteration, router, budgets, smdp, world)


def _build_learner(env: EnvBase, model: OrderHead, cfg: PPOConfig, plan: _RunPlan, device: torch.device,
                   ctx: DistContext) -> _Learner:
    train_env = TransformedEnv(env, RewardSum())  # episode_reward: the undiscounted return, in nats
    train_env.append_transform(StepCounter())  # step_count: decisions so far
    actor, critic = make_actor_critic(model, plan.router, plan.budgets, cfg.R)
    # torchrun: the loss sees this rank's share of a minibatch only, so `_update` normalises the
    # advantages over the global minibatch itself
    loss_cfg = cfg if not ctx.distributed else replace(cfg, normalize_advantage=False)
    loss_module, gae = make_loss(actor, critic, loss_cfg, plan.smdp)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    storage = LazyTensorStorage(plan.F_rank, device=env.device or device)
    return _Learner(train_env, actor, loss_module, gae, optim, storage, ctx, cfg.minibatch_size // ctx.world)


def _restore(manager: CheckpointManager, cfg: PPOConfig, model: OrderHead,
             optim: torch.optim.Optimizer, ctx: DistContext) -> tuple[_Progress, dict | None]:
    """Load the latest checkpoint into `model` and `optim` (cfg.resume): returns the counters and
    this rank's saved RNG states (None on a fresh start, which begins from cfg.reward_scale).
    Under torchrun every rank reads the checkpoint rank 0 wrote (a shared run_dir), and the world
    size must be the one it was made with (each rank's env seed and RNG stream depend on it)."""
    state = manager.load_latest() if cfg.resume else None
    found = all_gather_objects(None if state is None else int(state["iteration"]), ctx)
    if len(set(found)) > 1:
        raise RuntimeError(f"the ranks found different checkpoints in {manager.ckpt_dir} (iterations {found}): "
                           "under torchrun run_dir must be one directory every rank reads")
    if state is None:
        return _Progress(reward_scale=cfg.reward_scale), None
    check_identity({"frames_per_batch": int(state["frames_per_batch"]), "world_size": int(state.get("world_size", 1))},
                   {"frames_per_batch": cfg.frames_per_batch, "world_size": ctx.world},
                   manager.ckpt_dir, "Exact resume needs the same batches: set ppo.frames_per_batch and the number of "
                   "torchrun processes back, or use another run_dir.",
                   what="cannot resume, the checkpoint was made with another batch size")
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optimizer"])
    rng = state["rank_rng"][ctx.rank] if ctx.distributed else state["rng"]
    return _Progress(int(state["iteration"]), int(state["frames"]), state["reward_scale"],
                     dict(state.get("metrics", {})), dict(state.get("eval_metrics", {}))), rng


def _make_collector(learner: _Learner, cfg: PPOConfig, plan: _RunPlan, iteration: int) -> Collector:
    """A collector for the iterations after `iteration` (at least one batch long, so that it can be
    built when nothing is left): the env is seeded per iteration and reset at every iteration (see
    the module doc). Under torchrun this rank's share of the batch, from its own env seed."""
    remaining = max(plan.last_iteration - iteration, 0)
    return Collector(learner.train_env, learner.actor, frames_per_batch=plan.F_rank,
                     total_frames=max(remaining, 1) * plan.F_rank, reset_at_each_iter=True,
                     pre_collect_hook=_SeedEnvPerIteration(learner.train_env, rank_seed(cfg.seed, learner.ctx),
                                                           iteration),
                     auto_register_policy_transforms=False)


def _save_checkpoint(manager: CheckpointManager, model: OrderHead, optim: torch.optim.Optimizer, cfg: PPOConfig,
                     plan: _RunPlan, progress: _Progress, ctx: DistContext) -> Path:
    """Rank 0 writes; under torchrun every rank calls it (its RNG state is gathered into the file,
    `rank_rng`, and world_size is recorded). Returns the checkpoint's path on every rank."""
    state = {
        "model": model.state_dict(), "optimizer": optim.state_dict(), "iteration": progress.iteration,
        "frames": progress.frames, "frames_per_batch": plan.F, "reward_scale": float(progress.reward_scale),
        "rng": rng_state(), "config": asdict(cfg), "orderhead_config": model.cfg.to_dict(),
        "metrics": {k: float(v) for k, v in progress.metrics.items()},
        "eval_metrics": {k: float(v) for k, v in progress.eval_metrics.items()},
    }
    if ctx.distributed:
        state["world_size"] = ctx.world
        state["rank_rng"] = all_gather_objects(state["rng"], ctx)
    path = manager.save(progress.iteration, state) if ctx.main else manager.path_for(progress.iteration)
    barrier(ctx)  # no rank runs ahead of a checkpoint that is not on disk yet
    return path


# -- one iteration --------------------------------------------------------------------------------


def _learn_from_batch(data: TensorDictBase, learner: _Learner, model: OrderHead, cfg: PPOConfig, plan: _RunPlan,
                      progress: _Progress) -> dict[str, float]:
    """Everything an iteration does with its batch data [B, F / B] (torchrun: this rank's share,
    [B, F / (W B)]): learning-rate schedule, reward scaling (sets progress.reward_scale on the first
    batch, from every rank's rewards), advantages, the minibatch epochs. Returns the iteration's
    train/ metrics (over the global batch)."""
    ctx = learner.ctx
    if cfg.anneal_lr:
        for group in learner.optim.param_groups:
            group["lr"] = cfg.lr * (1.0 - (progress.iteration - 1) / plan.num_iterations)
    next_td = data.get("next")
    raw_reward = next_td.get("reward")  # [B, T, 1] nats, kept for the logged returns
    if progress.reward_scale is None:  # auto: per-decision rewards of order 1
        rms = float(raw_reward.float().pow(2).mean().sqrt()) if not ctx.distributed else global_rms(raw_reward, ctx)
        progress.reward_scale = 1.0 / rms if rms > 0 and math.isfinite(rms) else 1.0
    # GAE runs in float32 whatever the backbone dtype: the critic's values are float32 (OrderHead.plan
    # casts) and so are the rewards (cast here too, for an env that pays bf16 ones), so advantages,
    # value targets and the losses built from them are float32
    next_td.set("reward", raw_reward.float() * progress.reward_scale)

    if plan.smdp and SMDP_STEPS_KEY not in data.keys(True):  # GAE would silently fall back to gamma
        raise KeyError(f"a semi-MDP env must write {SMDP_STEPS_KEY} (k per decision)")
    with torch.no_grad():
        data = learner.gae(data)
    n = data.numel() * ctx.world  # the global batch's frames: explained variance is not a mean of per-rank terms
    explained_var = _explained_variance(gather_strided(data.get("state_value").reshape(-1, 1), n, ctx),
                                        gather_strided(data.get("value_target").reshape(-1, 1), n, ctx))
    sums, n_updates, epochs = _update_epochs(data, learner, model, cfg)

    metrics = {f"train/{k}": float(v) / n_updates for k, v in sums.items()}
    metrics["train/explained_variance"] = explained_var
    metrics["train/epochs"] = float(epochs)
    metrics["train/lr"] = float(learner.optim.param_groups[0]["lr"])
    metrics["train/reward_scale"] = float(progress.reward_scale)
    metrics.update(_episode_metrics(data, raw_reward, cfg.gamma, plan, ctx))
    return metrics


def _update_epochs(data: TensorDictBase, learner: _Learner, model: OrderHead,
                   cfg: PPOConfig) -> tuple[dict[str, torch.Tensor], int, int]:
    """cfg.epochs passes of minibatch updates over the batch (fewer when cfg.target_kl stops them).
    Returns the summed diagnostics of every update (device tensors: no sync per update; torchrun:
    averaged over the ranks, i.e. those of the global minibatches), the number of updates and of
    epochs run. Under torchrun each rank draws cfg.num_minibatches minibatches of
    minibatch_size / W frames per epoch from its own permutation: the same count and size on
    every rank, so every update's collectives line up."""
    ctx = learner.ctx
    # A fresh sampler per iteration: SamplerWithoutReplacement draws the next permutation as soon as
    # one runs out, so a sampler kept across iterations would carry a draw made before the
    # checkpoint into the next iteration (a resume could not reproduce it).
    buffer = ReplayBuffer(storage=learner.storage, sampler=SamplerWithoutReplacement(),
                          batch_size=learner.minibatch_size)
    sums: dict[str, torch.Tensor] = {}
    n_updates = 0
    for epoch in range(cfg.epochs):
        if cfg.gae_every_epoch and epoch > 0:
            with torch.no_grad():
                data = learner.gae(data)
        buffer.extend(data.exclude("next").reshape(-1))  # the loss needs no next obs
        kl_before = sums.get("approx_kl", 0.0)
        for _ in range(cfg.num_minibatches):
            for k, v in _update(buffer.sample(), learner, model, cfg.max_grad_norm,
                                cfg.normalize_advantage).items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
        if cfg.target_kl is not None:
            epoch_kl = float(all_reduce_sum(sums["approx_kl"] - kl_before, ctx)) / (cfg.num_minibatches * ctx.world)
            if epoch_kl > cfg.target_kl:  # the global value: every rank stops at the same epoch
                break
    if ctx.distributed:
        keys = list(sums)
        avg = all_reduce_sum(torch.stack([sums[k] for k in keys]), ctx) / ctx.world
        sums = dict(zip(keys, avg.unbind()))
    return sums, n_updates, epoch + 1


def _update(batch: TensorDictBase, learner: _Learner, model: OrderHead, max_grad_norm: float,
            normalize_advantage: bool = True) -> dict[str, torch.Tensor]:
    """One gradient step on a minibatch [minibatch_size] (torchrun: this rank's [minibatch_size / W]
    share; advantages normalised over the global minibatch, gradients averaged over the ranks
    before clipping, so every rank takes the same step); returns its diagnostics (`_minibatch_stats`)."""
    ctx = learner.ctx
    if ctx.distributed and normalize_advantage:  # the loss module's own normalisation is off (`_build_learner`)
        key = learner.loss_module.tensor_keys.advantage
        batch.set(key, standardize(batch.get(key), ctx))
    loss = learner.loss_module(batch)
    total = loss["loss_objective"] + loss["loss_critic"]
    if "loss_entropy" in loss.keys():
        total = total + loss["loss_entropy"]
    learner.optim.zero_grad(set_to_none=True)
    total.backward()
    average_gradients(model.parameters(), ctx)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    learner.optim.step()
    return _minibatch_stats(loss, grad_norm)


def _episode_metrics(data: TensorDictBase, raw_reward: torch.Tensor, gamma: float, plan: _RunPlan,
                     ctx: DistContext | None = None) -> dict[str, float]:
    """train/ metrics of the episodes that ended in the batch (returns in nats, unscaled) and, with
    the router, the mean budget asked (blocks per decision, before the end-of-episode clip).
    Under torchrun: over the episodes and decisions of every rank (`_global_episode_metrics`)."""
    if ctx is not None and ctx.distributed:
        return _global_episode_metrics(data, raw_reward, gamma, plan, ctx)
    metrics: dict[str, float] = {}
    next_td = data.get("next")
    done = next_td.get("done")[..., 0]
    if bool(done.any()):
        metrics["train/mean_return"] = float(next_td.get("episode_reward")[..., 0][done].mean())
        # what PPO maximises; with reward=future_loss the undiscounted return is the same for every
        # order (it telescopes), so this is the one that shows learning. Semi-MDP: a decision is
        # discounted by the blocks revealed before it (the `step` observation)
        clock = data.get("step") if plan.smdp else data.get("step_count")[..., 0]
        metrics["train/mean_discounted_return"] = float(discounted_episode_returns(
            raw_reward[..., 0], clock, done, gamma).mean())
        metrics["train/mean_decisions"] = float(next_td.get("step_count")[..., 0][done].float().mean())
        metrics["train/episodes"] = float(done.sum())
    if plan.router:
        budget_sizes = torch.as_tensor(plan.budgets, device=data.device)[data.get("action")[..., 0]]
        metrics["train/mean_budget"] = float(budget_sizes.float().mean())
    return metrics


def _global_episode_metrics(data: TensorDictBase, raw_reward: torch.Tensor, gamma: float, plan: _RunPlan,
                            ctx: DistContext) -> dict[str, float]:
    """`_episode_metrics` over every rank's batch: the same keys, each a global sum / global count
    (one all-reduce); the episode keys are left out when no rank finished an episode."""
    next_td = data.get("next")
    done = next_td.get("done")[..., 0]
    clock = data.get("step") if plan.smdp else data.get("step_count")[..., 0]
    n_done = float(done.sum())
    pairs = {  # (sum, count) of this rank
        "mean_return": (next_td.get("episode_reward")[..., 0][done].double().sum(), n_done),
        "mean_discounted_return": (discounted_episode_returns(raw_reward[..., 0], clock, done, gamma).double().sum(),
                                   n_done),
        "mean_decisions": (next_td.get("step_count")[..., 0][done].double().sum(), n_done),
        "episodes": (n_done, 1.0),  # summed over ranks below
    }
    if plan.router:
        budget_sizes = torch.as_tensor(plan.budgets, device=data.device)[data.get("action")[..., 0]]
        pairs["mean_budget"] = (budget_sizes.double().sum(), float(budget_sizes.numel()))
    means = global_means(pairs, ctx)  # the episode means are left out when no rank finished one
    metrics = {f"train/{k}": v for k, v in means.items() if k != "episodes"}
    if means["episodes"] > 0:
        metrics["train/episodes"] = means["episodes"] * ctx.world  # a mean over ranks of 1 each: back to the sum
    return metrics


def _eval_due(cfg: PPOConfig, iteration: int, num_iterations: int) -> bool:
    """eval_fn runs every cfg.eval_every iterations and after the last one (never when eval_every = 0)."""
    return cfg.eval_every > 0 and (iteration % cfg.eval_every == 0 or iteration == num_iterations)


# -- helpers --------------------------------------------------------------------------------------


def _minibatch_stats(loss: TensorDictBase, grad_norm: torch.Tensor) -> dict[str, torch.Tensor]:
    """CleanRL-named diagnostics of one update (detached 0-d tensors). approx_kl is CleanRL's k3
    estimator E[(r - 1) - log r] = mean_ratio - 1 + kl_approx (TorchRL's kl_approx is E[-log r])."""
    keys = ["loss_objective", "loss_critic", "clip_fraction"]
    if "entropy" in loss.keys():
        keys += ["entropy", "loss_entropy"]
    out = {k: loss[k].detach().float() for k in keys}
    out["approx_kl"] = (loss["mean_ratio"] - 1.0 + loss["kl_approx"]).detach().float()
    out["grad_norm"] = grad_norm.detach().float()
    return out


def discounted_episode_returns(reward: torch.Tensor, step: torch.Tensor, done: torch.Tensor,
                               gamma: float) -> torch.Tensor:
    """sum_t gamma^step_t r_t (`orderplan.env.rewards.discount_factors`) of every episode that ends in a
    rollout [B, T] whose episodes all start inside it (the collector resets the env at every iteration). reward [B, T] (nats), step [B, T]
    decisions made before each one (StepCounter's root step_count; semi-MDP: blocks revealed before
    it), done [B, T] bool. Returns the returns of the finished episodes, in (row, time) order."""
    c = reward.double() * discount_factors(step, gamma)  # [B, T]
    cs = c.cumsum(-1)
    t = torch.arange(reward.shape[-1], device=reward.device).expand_as(done)
    last_end = torch.where(done, t, -1).cummax(-1).values  # last episode end at or before t
    prev_end = torch.cat([torch.full_like(last_end[..., :1], -1), last_end[..., :-1]], -1)  # strictly before t
    base = torch.where(prev_end >= 0, cs.gather(-1, prev_end.clamp(min=0)), 0.0)
    return (cs - base)[done].float()


def _explained_variance(value: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var[target - value] / Var[target] over the batch (CleanRL); nan when Var[target] = 0."""
    value, target = value.detach().flatten().double(), target.detach().flatten().double()
    var = target.var(unbiased=False)
    return float("nan") if float(var) == 0 else float(1.0 - (target - value).var(unbiased=False) / var)


def _run_eval(eval_fn: EvalFn, model: OrderHead, iteration: int, device: torch.device) -> dict[str, float]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        out = eval_fn(model, iteration)
    model.eval()
    return {(k if "/" in k else f"eval/{k}"): float(v) for k, v in out.items()}
