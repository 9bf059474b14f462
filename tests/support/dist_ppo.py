"""Rank functions of tests/agents/test_ppo_dist.py (spawned processes import them by module name).

Each builds the tiny toy env and OrderHead of tests/agents/test_ppo.py, so every rank (and the
one-process reference in the test) starts from the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

from orderplan.planner.orderhead import OrderHead, orderhead_config_for
from orderplan.train.ppo import (PPOConfig, _build_learner, _learn_from_batch, _make_collector, _plan_run, _Progress,
                                 train_ppo)
from orderplan.train.ppo_dist import single_process
from orderplan.infra.distributed import close_distributed, init_distributed
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import toy_core

BUDGETS = [1, 2, 4]


def toy_env(batch_size: int, router: bool = False, seed: int = 0) -> OrderPlanningEnv:
    """tests/agents/test_ppo.py's toy env."""
    return OrderPlanningEnv(toy_core(batch_size=batch_size, seed=seed, **({"budget": BUDGETS} if router else {})))


def small_head(core, router: bool = False, seed: int = 0) -> OrderHead:
    """tests/agents/test_ppo.py's head: the same weights for the same seed, in every process."""
    torch.manual_seed(seed)
    budgets = BUDGETS if router else None
    return OrderHead(orderhead_config_for(core.D, core.geom, d_model=32, n_heads=4, budgets=budgets))


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


def _weights(model, out_dir: str, name: str) -> str:
    """Save the state dict to out_dir/name.pt and return the path: the launcher joins the ranks
    before it reads their return values, so those must be small (a pipe's buffer), and tensors put
    in its queue travel as shared memory that is gone once the rank exits."""
    path = Path(out_dir) / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    return str(path)


def weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def train_rank(run_dirs: list[str], out_dir: str, cfg_kwargs: dict, batch_size: int, router: bool = False) -> dict:
    """One train_ppo per rank under the torchrun environment: rank r trains into run_dirs[r] (one
    directory shared by every rank, or one per rank to see who writes). Returns the path of the
    final weights (in out_dir), the result and the files of this rank's run_dir."""
    ctx = init_distributed("cpu")
    env = toy_env(batch_size=batch_size, router=router)
    model = small_head(env.core, router)
    run_dir = Path(run_dirs[ctx.rank])
    out = train_ppo(env, model, PPOConfig(**cfg_kwargs), run_dir, ctx=ctx)
    close_distributed(ctx)
    return {"weights": _weights(model, out_dir, f"rank{ctx.rank}"), "result": out, "files": _files(run_dir),
            "world": ctx.world}


def resume_rank(root: str, out_dir: str, cfg_kwargs: dict, batch_size: int, stop_at: int) -> dict:
    """Under torchrun: an uninterrupted run (root/ref), and a run stopped after `stop_at`
    iterations then restarted with a fresh env and model (root/part, the shared run_dir).
    Returns both final weights and results."""
    ctx = init_distributed("cpu")
    out = {}
    for name, changes in (("ref", {}), ("part", {"stop_at": stop_at}), ("resumed", {})):
        env = toy_env(batch_size=batch_size, seed=7 if name == "resumed" else 0)
        model = small_head(env.core, seed=7 if name == "resumed" else 0)  # resumed: the checkpoint's weights win
        run_dir = Path(root) / ("ref" if name == "ref" else "part")
        res = train_ppo(env, model, PPOConfig(**{**cfg_kwargs, **changes}), run_dir, ctx=ctx)
        out[name] = {"weights": _weights(model, out_dir, f"{name}_rank{ctx.rank}"), "result": res}
    close_distributed(ctx)
    return out


def collect_batch(path: str, batch_size: int, cfg_kwargs: dict) -> None:
    """One iteration's batch [batch_size, F / batch_size] of the toy env under a fresh head, saved
    to `path` (plain process: the data the equivalence test splits over ranks)."""
    env = toy_env(batch_size=batch_size)
    model = small_head(env.core)
    cfg = PPOConfig(**cfg_kwargs)
    plan = _plan_run(env, model, cfg)
    learner = _build_learner(env, model, cfg, plan, torch.device("cpu"), single_process(torch.device("cpu")))
    collector = _make_collector(learner, cfg, plan, 0)
    data = next(iter(collector))
    collector.shutdown(close_env=False)
    torch.save(data.cpu(), path)


def learn_rank(path: str, out_dir: str, cfg_kwargs: dict, batch_size: int) -> dict:
    """`_learn_from_batch` on this rank's rows r, r + W, ... of the saved batch (all rows in one
    process), from the shared initial head: returns the weights and the iteration's metrics."""
    ctx = init_distributed("cpu")
    data = torch.load(path, weights_only=False)
    data = data[torch.arange(ctx.rank, data.shape[0], ctx.world)]
    env = toy_env(batch_size=batch_size)  # only builds the actor and critic: its rows are not played
    model = small_head(env.core)
    cfg = PPOConfig(**cfg_kwargs)
    plan = _plan_run(env, model, cfg, ctx.world)
    model.eval()
    learner = _build_learner(env, model, cfg, plan, torch.device("cpu"), ctx)
    torch.manual_seed(0)  # one minibatch per epoch: its permutation changes only the order of float sums
    metrics = _learn_from_batch(data, learner, model, cfg, plan, _Progress(iteration=1, reward_scale=cfg.reward_scale))
    close_distributed(ctx)
    return {"weights": _weights(model, out_dir, f"world{ctx.world}_rank{ctx.rank}"), "metrics": metrics}
