"""`scripts/ppo.py`: PPO fine-tuning of a behaviour-cloned OrderHead (seed 000 after Stage 4), with
the budget router as an extra action head when `agent.router=true` (Stage 6). The held-out report
is the one BC writes, plus the router's mean budget and decisions per episode.

Router runs discount in block time (semi-MDP, orderplan.env.core). Two gammas, each the source of truth
for one core: ppo.gamma (what PPO maximises) sets env.gamma of the training env (env.gamma left null
is filled in; a different value fails, `orderplan.train.ppo.smdp_env_gamma`), and eval.gamma (the
report's yardstick, shared with BC's summary) sets env.gamma of the held-out report's router core,
so its returns are per-block discounted returns minus the discounted decision costs, on the scale of
the one-block-per-decision BC planner. The two may differ on purpose; BC's return is compared only
when BC reported with the same gamma.

The router summary reports the budgets the learned router chooses on the held-out images (before an
episode's last decision is clipped to the blocks left): their mean and histogram.

Generation mode (env.mode=generate, `configs/ppo_generated.yaml`). The training core samples every
revealed block from the backbone (env.sampling, with CFG) instead of reading ground truth, and pays
env.reward=entropy: the drop in the model's predictive entropy of the unseen tokens (nats). Its
image pool is still the train split, but only the labels are read (the classes that condition the
samples). The held-out report stays teacher-forced with the future_loss reward (the oracle,
agreement and regret need ground truth), so its returns sit on the scale of BC's and of
teacher-forced PPO's; summary.json names the training mode and reward (`train_mode`,
`train_reward`, `train_sampling`). Exact resume holds as in teacher-forced mode: the per-iteration
env seed (src/orderplan/train/ppo.py) also reseeds the core's sampler generator."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import get_args

import torch

from orderplan.eval.report import EvalSpec, check_eval_spec, heldout_core, heldout_report, print_report
from orderplan.eval.rollouts import balanced_images, index_batches
from orderplan.planner.orderhead import OrderHead, load_orderhead
from orderplan.planner.policies import BlockPolicy, OrderHeadPolicy
from orderplan.train.ppo import PPOConfig, check_ppo_config, check_ppo_sizes, smdp_env_gamma, train_ppo
from orderplan.infra.integrity import read_json_checked
from orderplan.infra.checkpoint import atomic_write_json
from orderplan.config.common import BackboneConfig, RunConfig, check_run_config
from orderplan.infra.paths import resolve_path
from orderplan.model.loading import check_backbone_config
from orderplan.oracle.future_loss import UtilityKind
from orderplan.infra.distributed import close_distributed, init_distributed
from orderplan.infra.run_utils import Logger, job_dir, dist_info
from orderplan.infra.seeding import isolated_rng
from orderplan.infra.validation import check_budgets, check_choice, check_int, check_path_exists
from orderplan.env.core import EnvConfig, OrderPlanningCore, check_env_config
from orderplan.env.episodes import Decision, play_episodes
from orderplan.env.factory import make_core
from orderplan.env.torchrl_env import OrderPlanningEnv


@dataclass
class PPOAgentSpec:
    init_from: str = "runs/bc/tiny_mnist/orderhead.safetensors"  # the BC planner (scripts/bc.py output)
    # true: add the budget-router head (reveal one of `budgets` blocks per decision, e.g. 1, 2 or 4) and charge
    # env.decision_cost per decision; rewards are discounted per block (semi-MDP): env.gamma := ppo.gamma
    router: bool = False
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4])


@dataclass
class PPORun(RunConfig):
    """Schema of the ppo job (preset src/orderplan/configs/ppo.yaml; `python scripts/ppo.py key=value ...`);
    every default lives here. PPO fine-tuning of the BC planner; agent.router=true adds the budget router."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: PPOAgentSpec = field(default_factory=PPOAgentSpec)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    batch_size: int = 16  # env rows collected together
    oracle_kind: str = "future_loss"  # utility used for agreement / regret in the report
    run_dir: str = "runs/ppo/tiny_mnist"


def check_ppo_run(run: PPORun, check_paths: bool = True, world: int | None = None) -> None:
    """Validate configs/ppo.yaml's schema before anything loads: ValueError naming the key and its
    range (batch_size >= 1, agent.budgets in [1, N blocks], every ppo.* and eval.* field, the env
    against the backbone's geometry; ppo.frames_per_batch and ppo.minibatch_size split evenly over
    `world` torchrun ranks, None = torchrun's WORLD_SIZE); with `check_paths`, FileNotFoundError
    for a missing agent.init_from or backbone weights."""
    check_run_config(run)
    num_blocks = check_backbone_config(run.backbone, check_paths=check_paths)
    check_env_config(run.env, num_blocks=num_blocks)
    check_int("batch_size", run.batch_size, 1, note=" (env rows)")
    check_budgets("agent.budgets", run.agent.budgets, num_blocks)
    if check_paths:
        check_path_exists("agent.init_from", run.agent.init_from, hint="run `python scripts/bc.py` first (or set "
                          "agent.init_from=/path/to/orderhead.safetensors)")
    check_ppo_config(run.ppo)
    check_ppo_sizes(run.ppo, run.batch_size, dist_info()[1] if world is None else world)
    check_eval_spec(run.eval)
    check_choice("oracle_kind", run.oracle_kind, get_args(UtilityKind))


def smdp_gamma(run: PPORun) -> float | None:
    """env.gamma of the training env: ppo.gamma for router runs (block-time discounting, so a
    decision revealing k blocks is followed by gamma^k), raising ValueError when env.gamma is set to
    something else (`smdp_env_gamma`); plain runs keep env.gamma (it changes nothing when every
    decision is one block)."""
    if not run.agent.router:
        return run.env.gamma
    return smdp_env_gamma(run.env.gamma, run.ppo.gamma)


def train_env_config(run: PPORun) -> EnvConfig:
    """The training core's EnvConfig: run.env on the train split, with the router's budgets and its
    semi-MDP gamma (`smdp_gamma`). In generation mode the split's codes are never read, only its
    labels (the conditioning classes). Validated here, before anything is loaded: raises ValueError
    (e.g. env.mode=generate with a reward other than entropy, a mode unknown to the env)."""
    budgets = list(run.agent.budgets) if run.agent.router else None
    env = replace(run.env, split="train", budget=budgets, gamma=smdp_gamma(run))
    check_env_config(env)
    # env.query=pending (generation without the per-token query) pays nan rewards: nothing to learn from
    if env.query != "full":
        raise ValueError(f"PPO needs the env's rewards: env.query={env.query} skips the query they come from; "
                         "use env.query=full")
    return env


def report_env_config(run: PPORun) -> EnvConfig:
    """The held-out report's EnvConfig (before `heldout_core` sets split and budgets). Always
    teacher-forced: the oracle baseline, agreement and regret need ground truth. A generation-mode
    run is reported with the future_loss reward, the teacher-forced counterpart of its entropy
    reward and the reward of BC's report, so its returns compare with BC's and the planner's.
    Router runs discount per block with eval.gamma (the report's yardstick)."""
    env = run.env
    if env.mode == "generate":  # (parallel decoding is a way of generating: the report reveals ground truth)
        env = replace(env, mode="teacher_forced", reward="future_loss", parallel=False, coherence=0.0)
    return replace(env, gamma=run.eval.gamma if run.agent.router else env.gamma)


def training_description(env: EnvConfig) -> dict:
    """summary.json's record of what PPO trained on: train_mode, train_reward, in generation mode
    train_sampling (the sampler's knobs; None when teacher-forced), train_parallel and
    train_coherence (env.parallel, env.coherence)."""
    return {"train_mode": env.mode, "train_reward": env.reward,
            "train_sampling": asdict(env.sampling) if env.mode == "generate" else None,
            # parallel decoding (env.parallel): evaluation generates with the planner the same way
            "train_parallel": env.parallel, "train_coherence": env.coherence}


def chosen_budgets(core: OrderPlanningCore, policy: BlockPolicy, image_index: torch.Tensor) -> torch.Tensor:
    """The budget (blocks asked for, from core.cfg.budget) of every decision `policy` makes on the
    images image_index [M], played with `play_episodes` in chunks of core.B rows (a router core).
    A budget is counted as chosen, before the clip of an episode's last decision to the blocks left.
    Returns [decisions over all M episodes] long, CPU, in play order."""
    if not core.router:
        raise ValueError("chosen_budgets needs a router core (env.budget set)")
    budgets = torch.as_tensor(core.cfg.budget)
    chosen: list[torch.Tensor] = []
    for chunk, n in index_batches(image_index, core.B):
        decisions: list[Decision] = []
        play_episodes(core, chunk.to(core.device), policy.act, decisions.append)
        real = torch.arange(core.B) < n  # padding rows of the last chunk are not counted
        for d in decisions:
            chosen.append(budgets[d.action[:, 0].cpu()][d.active.cpu() & real])  # action[:, 0]: budget index
    return torch.cat(chosen)


def budget_summary(chosen: torch.Tensor, budgets: list[int]) -> dict:
    """mean_budget (blocks per decision) and budget_histogram {str(budget): decisions} of the chosen
    budgets [D] (`chosen_budgets`); every budget of the router has an entry."""
    return {"mean_budget": float(chosen.double().mean()),
            "budget_histogram": {str(k): int((chosen == k).sum()) for k in budgets}}


def heldout_budgets(core: OrderPlanningCore, ev: EvalSpec, model: OrderHead, router_budgets: list[int]) -> dict:
    """`budget_summary` of the learned router, greedy as in the report, on the report's held-out
    images (`balanced_images`) of the report's core (`heldout_core`)."""
    policy = OrderHeadPolicy(model.eval(), greedy=True, router=True)
    return budget_summary(chosen_budgets(core, policy, balanced_images(core.labels, ev.num_images)), router_budgets)


@job_dir("ppo")
def run_ppo(run: PPORun) -> dict:
    """Fine-tune, evaluate on held-out images, write run_dir/{orderhead.safetensors, summary.json}
    (and what it prints to run_dir/ppo.log).

    Under torchrun (`torchrun --nproc_per_node W scripts/ppo.py`) every rank runs its own training
    env of batch_size rows (its own images and actions) and the ranks train one model together
    (`train_ppo`'s ctx: ppo.frames_per_batch and ppo.minibatch_size are global, split over the
    ranks); every rank then computes the held-out report on the same images (identical numbers),
    and rank 0 alone writes the weights, checkpoints, summary.json and the wandb log."""
    check_ppo_run(run)
    t0 = time.time()
    train_env_config(run)  # fail on a bad env (mode, reward, gamma) before loading anything
    ctx = init_distributed(run.device)  # one process: no group, rank 0 of 1
    device = ctx.device
    init = resolve_path(run.agent.init_from, must_exist=False)
    if init is None or not init.is_file():
        raise FileNotFoundError(f"no BC planner at {run.agent.init_from}: run `python scripts/bc.py` first "
                                "(or set agent.init_from=/path/to/orderhead.safetensors)")
    tuned = init.parent / "gpt.safetensors"  # BC with joint tuning (bc.joint.top_n > 0): the head's backbone
    if tuned.is_file():
        print(f"note: {init.parent} holds a jointly tuned backbone; using backbone.gpt_weights={tuned}")
        run = replace(run, backbone=replace(run.backbone, gpt_weights=str(tuned.resolve())))
    model = load_orderhead(init, device=device, backbone=run.backbone)
    if model.cfg.beliefs != run.env.beliefs:  # the observation is the planner's, not a separate choice
        print(f"note: the planner at {init} was trained with env.beliefs={model.cfg.beliefs}; using it")
        run = replace(run, env=replace(run.env, beliefs=model.cfg.beliefs))
    budgets = list(run.agent.budgets) if run.agent.router else None
    env_cfg = train_env_config(run)
    core = make_core(run.backbone, env=env_cfg, batch_size=run.batch_size, device=device, seed=run.seed)
    model.check_compatible(core.D, core.geom)
    if budgets is not None:  # the new router head's init: its own named stream (ppo.seed), whatever drew before
        with isolated_rng(run.ppo.seed, "ppo", "router_init"):
            model.enable_router(budgets)
    actions = (f"router {budgets}, decision cost {env_cfg.decision_cost}, gamma per block" if budgets
               else "one block per decision")
    mode = (f"generation mode, reward {env_cfg.reward}, cfg_scale {env_cfg.sampling.cfg_scale}"
            if env_cfg.mode == "generate" else f"teacher-forced, reward {env_cfg.reward}")
    print(f"PPO from {init} ({actions}; {mode}); {run.ppo.num_iterations} iterations of "
          f"{run.ppo.frames_per_batch} decisions, gamma {run.ppo.gamma}")
    logger = Logger(run, Path(run.run_dir), enabled=ctx.main, job="ppo")
    result = train_ppo(OrderPlanningEnv(core), model, run.ppo, run.run_dir, logger=logger, ctx=ctx)

    eval_env = report_env_config(run)  # teacher-forced whatever the training mode
    core = heldout_core(run.backbone, eval_env, run.eval, device, run.seed, budgets)  # one core for both reports
    report = heldout_report(run.backbone, eval_env, run.eval, model, device, run.seed, run.oracle_kind, budgets, core)
    logger.log({f"eval/return_{k}": v for k, v in report["returns"].items()}, result["frames"])
    logger.close()
    summary = {**report, "stage": "ppo", "init_from": str(init), "weights": str(Path(run.run_dir) / "orderhead.safetensors"),
               "iterations": result["iterations"], "frames": result["frames"], "finished": result["finished"],
               **training_description(env_cfg), "train_metrics": result["metrics"],
               "wall_time_s": time.time() - t0, "world_size": ctx.world, "config": asdict(run)}
    summary["bc_tuned_backbone"] = run.backbone.gpt_weights if tuned.is_file() else None
    if budgets is not None:
        summary["router"] = {"budgets": budgets, "decision_cost": env_cfg.decision_cost, "smdp_gamma": env_cfg.gamma,
                             "decisions_per_episode": report["decisions_per_episode"]["learned"],
                             **heldout_budgets(core, run.eval, model, budgets)}
    bc_summary = init.parent / "summary.json"
    if bc_summary.is_file():  # the BC numbers under the same images, reward and gamma, for comparison
        bc = read_json_checked(bc_summary, required=False)
        if all(bc.get(k) == report[k] for k in ("gamma", "num_images", "reward")):
            summary["bc_return"] = bc["returns"].get("learned")
            if budgets is not None and summary["bc_return"]:
                # the router's block order scored per block, against the one-block-per-decision BC planner
                per_block = report["returns_per_block"]["learned"]
                summary["router"]["return_per_block"] = per_block
                summary["router"]["return_loss_vs_bc"] = (summary["bc_return"] - per_block) / abs(summary["bc_return"])
        else:
            print(f"note: no bc_return: BC reported {bc.get('reward')} with gamma={bc.get('gamma')} on "
                  f"{bc.get('num_images')} images, this report {report['reward']} with eval.gamma={report['gamma']} "
                  f"on {report['num_images']}")
    if ctx.main:
        atomic_write_json(Path(run.run_dir) / "summary.json", summary, checksum=True)
        print_report(summary)
        if "router" in summary:
            r = summary["router"]
            print(f"router: {r['decisions_per_episode']:.2f} decisions per episode, mean budget chosen "
                  f"{r['mean_budget']:.2f} blocks, histogram {r['budget_histogram']}")
    close_distributed(ctx)
    return summary
