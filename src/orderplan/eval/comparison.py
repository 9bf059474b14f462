"""The order comparison: every policy on the same held-out images, per-image scores, intervals over
images and seeds, and the cost of each policy in backbone forwards.

Per policy (a fixed order, a belief policy, the oracle, or a group of learned checkpoints trained
with different seeds), on the same class-balanced held-out images (`rollouts.balanced_images`), in
one teacher-forced pass over each episode:

* return: the discounted future_loss return of each image (nats; gamma per decision, plain
  one-block actions), its mean and a 95% interval (`bootstrap_mean`: images resampled, and for a
  seed group the seeds too, so the interval covers both sources of variation);
* paired differences: the per-image difference of returns against a baseline on the same images
  (`paired_delta`), its mean and a 95% interval from the same bootstrap. Images differ far more
  from each other (L_rest(empty) ranges over tens of nats) than orders on one image do, so
  unpaired return intervals of two good policies overlap even when one wins on nearly every
  image; the paired interval is the test of "A beats B". Rows carry `delta_vs[B]` for every
  baseline B without ground truth and for random;
* gap closed: (mean - random) / (oracle - random) of the means;
* oracle agreement and regret, as `orderplan.eval.scorer` defines them, on the first
  `agreement_images` images (one batched oracle pass per decision);
* forwards per decision: the policy's own count (`BlockPolicy.forwards_per_decision`, the unit of
  `orderplan.oracle.expected`), and wall time.

Router planners decide several blocks at once; they are scored here on the per-block discounted
return of the block order they produce (`scorer.order_returns`), so every row is on one scale."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from orderplan.env.core import OrderPlanningCore
from orderplan.eval.scorer import score_episodes
from orderplan.planner.policies import BlockPolicy

__all__ = ["PolicyScores", "score_policy", "bootstrap_mean", "paired_delta", "comparison_rows", "markdown_table",
           "GROUND_TRUTH"]

GROUND_TRUTH = ("oracle", "oracle_extrapolative")  # rows that read the unrevealed ground truth


@dataclass
class PolicyScores:
    """Per-image scores of one policy (a row of the table), stacked over its seeds.

    returns [S, M] float64: discounted return of image m under seed s (S = 1 for seedless policies).
    agreement, regret [S, M']: per-image means over that image's decisions (M' agreement images).
    """

    name: str
    returns: torch.Tensor
    agreement: torch.Tensor
    regret: torch.Tensor
    forwards_per_decision: float
    decisions_per_episode: float
    wall_s: float
    group: str = ""  # the table section: baseline, BC, PPO, R ablation, router
    notes: dict = field(default_factory=dict)

    @staticmethod
    def stack(name: str, parts: Sequence[PolicyScores], group: str = "") -> PolicyScores:
        """One row from the same policy under several seeds (each part has S = 1)."""
        return PolicyScores(name, torch.cat([p.returns for p in parts]), torch.cat([p.agreement for p in parts]),
                            torch.cat([p.regret for p in parts]),
                            sum(p.forwards_per_decision for p in parts) / len(parts),
                            sum(p.decisions_per_episode for p in parts) / len(parts),
                            sum(p.wall_s for p in parts), group or parts[0].group)


def score_policy(name: str, make: Callable[[OrderPlanningCore], BlockPolicy], core: OrderPlanningCore,
                 images: torch.Tensor, gamma: float, agreement_images: int = 0, oracle_kind: str = "future_loss",
                 group: str = "") -> PolicyScores:
    """Play `make(core)` on held-out `images` [M] (teacher-forced core, plain or router actions) and
    score each image with `scorer.score_episodes`: the return (router policies: their block order
    one block per step, the scale of plain policies), and agreement and regret on the first
    `agreement_images` images in the same episodes."""
    policy = make(core)
    t0 = time.time()
    s = score_episodes(policy, core, images, gamma, agreement_images, oracle_kind)
    returns = s.order_return if s.order_return is not None else s.discounted
    return PolicyScores(name, returns[None], s.agreement[None], s.regret[None], policy.forwards_per_decision(),
                        float(s.decisions.mean()), time.time() - t0, group)


def bootstrap_mean(x: torch.Tensor, resamples: int = 2000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean of x [S, M] (S seeds, M images) and a percentile bootstrap interval that resamples the
    images and, when S > 1, the seeds (both with replacement, independently). Returns (mean, lo, hi);
    nan for an empty x."""
    x = x.double()
    if x.numel() == 0:
        return (math.nan, math.nan, math.nan)
    S, M = x.shape
    g = torch.Generator().manual_seed(int(seed))
    si = torch.randint(S, (resamples, S), generator=g) if S > 1 else torch.zeros(resamples, 1, dtype=torch.long)
    mi = torch.randint(M, (resamples, M), generator=g)
    # resample r's mean is that of x[si[r]][:, mi[r]] [S, M]; gathered for a chunk of resamples at a
    # time (about 2^22 values per gather): a Python loop over the resamples dominated the tables' time
    chunk = max(1, (1 << 22) // (S * M))
    means = torch.cat([x[si[c:c + chunk, :, None], mi[c:c + chunk, None, :]].mean(dim=(1, 2))
                       for c in range(0, resamples, chunk)])
    a = (1.0 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return float(x.mean()), lo, hi


def paired_delta(a: PolicyScores, b: PolicyScores, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean per-image difference a - b (nats) with a bootstrap interval, on the same images: a's
    returns [S, M] minus b's [1, M] (b's mean over its seeds when it has several)."""
    if a.returns.shape[1] != b.returns.shape[1]:
        raise ValueError(f"paired differences need the same images: {a.name} has {a.returns.shape[1]}, "
                         f"{b.name} {b.returns.shape[1]}")
    return bootstrap_mean(a.returns - b.returns.mean(0, keepdim=True), resamples, level, seed)


def comparison_rows(scores: Sequence[PolicyScores], resamples: int = 2000, level: float = 0.95,
                    seed: int = 0) -> list[dict]:
    """One dict per policy: return mean and interval, paired differences against random and every
    ground-truth-free baseline (`delta_vs`: name -> [mean, lo, hi]), gap closed (needs rows named
    random and oracle), agreement, regret, forwards per decision, decisions per episode, wall
    time, seeds. `best_free_baseline` names the ground-truth-free baseline of highest mean return."""
    means = {s.name: float(s.returns.mean()) for s in scores}
    gap = means.get("oracle", math.nan) - means.get("random", math.nan)
    free = [s for s in scores if s.group == "baseline" and s.name not in GROUND_TRUTH]
    best = max(free, key=lambda s: means[s.name]).name if free else None
    rows = []
    for s in scores:
        mean, lo, hi = bootstrap_mean(s.returns, resamples, level, seed)
        delta = {b.name: list(paired_delta(s, b, resamples, level, seed)) for b in free if b.name != s.name}
        rows.append({
            "policy": s.name, "group": s.group, "return": mean, "return_ci": [lo, hi], "delta_vs": delta,
            "best_free_baseline": best,
            "gap_closed": (mean - means.get("random", math.nan)) / gap if abs(gap) > 1e-12 else math.nan,
            "oracle_agreement": float(s.agreement.mean()) if s.agreement.numel() else math.nan,
            "regret": float(s.regret.mean()) if s.regret.numel() else math.nan,
            "forwards_per_decision": s.forwards_per_decision, "decisions_per_episode": s.decisions_per_episode,
            "wall_s": s.wall_s, "seeds": s.returns.shape[0], "images": s.returns.shape[1],
            "agreement_images": s.agreement.shape[1], **s.notes,
        })
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison as a markdown table: return with its interval, the paired differences against
    random and against the best ground-truth-free baseline, and the other columns."""
    best = rows[0]["best_free_baseline"] if rows else None
    head = (f"| policy | seeds | return (nats) [95% CI] | Δ vs random, paired [95% CI] | Δ vs {best}, paired [95% CI] "
            "| gap closed | oracle agreement | regret (nats) | forwards / decision | wall (s) |")
    lines = [head, "|" + "---|" * 10]

    def f(v: float | None, p: int = 3) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"

    def d(r: dict, name: str | None) -> str:
        if name not in r["delta_vs"]:
            return "-"
        m, lo, hi = r["delta_vs"][name]
        return f"{f(m, 2)} [{f(lo, 2)}, {f(hi, 2)}]"

    for r in rows:
        lo, hi = r["return_ci"]
        lines.append(f"| {r['policy']} | {r['seeds']} | {f(r['return'], 2)} [{f(lo, 2)}, {f(hi, 2)}] | "
                     f"{d(r, 'random')} | {d(r, best)} | {f(r['gap_closed'], 2)} | {f(r['oracle_agreement'])} | "
                     f"{f(r['regret'])} | {f(r['forwards_per_decision'], 1)} | {f(r['wall_s'], 0)} |")
    return "\n".join(lines)
