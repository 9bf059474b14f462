"""The held-out report shared by BC and PPO: every policy plays the same held-out images under the
same reward, and the learned policy is compared with the oracle at the states it visits.

Numbers (nats unless stated):
* returns[name]: mean discounted return (gamma of the run) per episode; `returns_undiscounted` too.
  With reward=future_loss the undiscounted return is L_rest(empty) for every order, so only the
  discounted one ranks orders.
* Router cores: `returns_per_block` scores each policy's block order replayed one block per step.
  In semi-MDP mode (env.gamma set, `semi_mdp: true`) `returns` are already discounted in block time
  (a decision at block-time tau weighs gamma^tau), so `returns_without_decision_cost` (or `returns`
  when decision_cost = 0) equals `returns_per_block`: the latter is kept as a cross-check. Without it,
  `returns` discount per decision and only `returns_per_block` is comparable across policies.
* oracle_agreement, regret: the learned policy's, as `orderplan.eval.scorer` defines them (per-image
  means over the image's decisions, averaged over images; u: the oracle utility of `oracle_kind`).

Every number comes from `orderplan.eval.scorer.score_episodes`; images are chosen by
`rollouts.balanced_images`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from orderplan.eval.rollouts import balanced_images
from orderplan.eval.scorer import EpisodeScores, score_episodes
from orderplan.planner.orderhead import OrderHead
from orderplan.planner.policies import POLICY_NAMES, BlockPolicy, OrderHeadPolicy, make_policy
from orderplan.config.common import BackboneConfig
from orderplan.infra.validation import check_gamma, check_int
from orderplan.env.core import EnvConfig, OrderPlanningCore
from orderplan.env.factory import make_core
from orderplan.env.rewards import GAMMA


@dataclass
class EvalSpec:
    """The held-out report of a BC or PPO run (`heldout_report`): the `eval:` section of the bc and ppo jobs."""

    num_images: int = 96  # held-out images, the same for every policy
    batch_size: int = 16
    # discount of the reported returns (orderplan.env.rewards.GAMMA): future_loss telescopes at gamma = 1, so
    # returns are compared discounted. A ppo run keeps it apart from ppo.gamma (router runs: it sets env.gamma of
    # the held-out report's core); its bc_return is compared only when the BC run's eval.gamma is the same
    gamma: float = GAMMA
    # policy names of orderplan.planner.policies (expected_oracle costs ~35 backbone forwards per decision)
    baselines: list[str] = field(default_factory=lambda: ["raster", "random", "confident_first", "oracle"])


def check_eval_spec(ev: EvalSpec, key: str = "eval") -> None:
    """Raise ValueError naming `{key}.<field>` and its range: num_images, batch_size >= 1, gamma in
    (0, 1], baselines registry names (checked here, not after the training the report follows)."""
    check_int(f"{key}.num_images", ev.num_images, 1)
    check_int(f"{key}.batch_size", ev.batch_size, 1)
    check_gamma(f"{key}.gamma", ev.gamma)
    names = [n for n in POLICY_NAMES if n != "orderhead"]
    bad = [b for b in ev.baselines if b not in names]
    if bad:
        raise ValueError(f"{key}.baselines: {bad} are not policy names; choose from {', '.join(names)}")


def _means(s: EpisodeScores) -> dict[str, float]:
    """Image means of a policy's scores: discounted / undiscounted return, decisions per episode,
    `discounted_no_cost` (the env's decision cost added back: the information part of the return),
    `per_block` (router cores: the block order one block per step) and, where measured,
    oracle_agreement and regret."""
    out = {"discounted": float(s.discounted.mean()), "undiscounted": float(s.undiscounted.mean()),
           "decisions": float(s.decisions.mean()), "discounted_no_cost": float(s.discounted_no_cost.mean())}
    if s.order_return is not None:
        out["per_block"] = float(s.order_return.mean())
    if s.agreement.numel():
        out["oracle_agreement"], out["regret"] = float(s.agreement.mean()), float(s.regret.mean())
    return out


def policy_returns(policy: BlockPolicy, core: OrderPlanningCore, image_index: torch.Tensor,
                   gamma: float) -> dict[str, float]:
    """Mean returns and decisions per episode of `policy` on `image_index` (`_means` of
    `scorer.score_episodes`)."""
    return _means(score_episodes(policy, core, image_index, gamma))


def oracle_comparison(policy: BlockPolicy, core: OrderPlanningCore, image_index: torch.Tensor,
                      kind: str = "future_loss") -> dict[str, float]:
    """Agreement with the oracle argmax and regret at the states the policy visits, means over the
    images of per-image means (`scorer.score_episodes`; a router decision's first block is compared)."""
    s = score_episodes(policy, core, image_index, None, agreement_images=len(image_index), oracle_kind=kind)
    return {"oracle_agreement": float(s.agreement.mean()), "regret": float(s.regret.mean())}


def evaluate(policies: dict[str, BlockPolicy], core: OrderPlanningCore, num_images: int, gamma: float,
             learned: str | None = "learned", oracle_kind: str = "future_loss") -> dict:
    """The held-out report: returns of every policy on the same images, and the learned policy's
    agreement with the oracle and regret. The core must be teacher-forced on the held-out split."""
    images = balanced_images(core.labels, num_images)
    # the learned policy's agreement and regret come from the same episodes as its returns
    stats = {name: _means(score_episodes(p, core, images, gamma, len(images) if name == learned else 0, oracle_kind))
             for name, p in policies.items()}
    report = {
        "num_images": len(images),
        "split": core.cfg.split,
        "reward": core.cfg.reward,
        "gamma": gamma,
        "returns": {k: v["discounted"] for k, v in stats.items()},
        "returns_undiscounted": {k: v["undiscounted"] for k, v in stats.items()},
        "decisions_per_episode": {k: v["decisions"] for k, v in stats.items()},
    }
    if core.router:
        report["returns_per_block"] = {k: v["per_block"] for k, v in stats.items()}
        report["semi_mdp"] = core.smdp
    if core.cfg.decision_cost:
        report["decision_cost"] = core.cfg.decision_cost
        report["returns_without_decision_cost"] = {k: v["discounted_no_cost"] for k, v in stats.items()}
    if learned is not None and learned in policies:
        report.update(oracle_agreement=stats[learned]["oracle_agreement"], regret=stats[learned]["regret"])
        r = report["returns"]
        if {"random", "oracle"} <= r.keys():
            gap = r["oracle"] - r["random"]
            report["gap_closed"] = (r[learned] - r["random"]) / gap if abs(gap) > 1e-12 else float("nan")
    return report


def heldout_core(backbone: BackboneConfig, env_cfg: EnvConfig, ev: EvalSpec, device: torch.device, seed: int = 0,
                 router_budgets: list[int] | None = None) -> OrderPlanningCore:
    """The teacher-forced held-out core every report plays on (with the budget router when
    `router_budgets` is given)."""
    env = replace(env_cfg, split="heldout", budget=router_budgets)
    return make_core(backbone, env=env, batch_size=ev.batch_size, device=device, seed=seed)


def heldout_report(backbone: BackboneConfig, env_cfg: EnvConfig, ev: EvalSpec, model: OrderHead, device: torch.device,
                   seed: int = 0, oracle_kind: str = "future_loss", router_budgets: list[int] | None = None,
                   core: OrderPlanningCore | None = None) -> dict:
    """Learned policy next to the baselines on the same held-out images, reward and gamma (with the
    budget router when `router_budgets` is given; baselines then reveal one block per decision).
    `core`: a `heldout_core` of the same arguments to reuse (built when None)."""
    core = core or heldout_core(backbone, env_cfg, ev, device, seed, router_budgets)
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
