"""How much does sampling a step's tokens independently cost, in nats? (the schedule_nll job)

Parallel decoding (`orderplan.model.parallel`) draws the m_s tokens of step s independently, each from
p(x_j | tokens of the earlier steps). So a schedule samples from the factorisation

    q_S(x) = prod_s prod_{j in step s} p(x_j | x_{steps < s}),

and with one token per step q is the backbone's own chain rule. This job scores the held-out token
grids under q for every schedule (teacher forcing: `generate_parallel(..., forced=x)`, the same
block choices as when sampling) and reports, per schedule, the NLL in nats per token and its paired
excess over the same rule with one token per step (`<name>@L`). For data drawn from the backbone
the expected excess is the summed conditional total correlation of each step's tokens: what the
independent draws leave out. A large excess at few steps says parallel decoding fails because the
backbone's tokens are dependent within a step, whatever the sampler does; a small one would point
at the sampler instead.

Outputs: run_dir/results.json and results.md. Units: nats per token (sums over an image / L)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orderplan.config.common import BackboneConfig, RunConfig, check_run_config
from orderplan.data.tokens import load_token_data
from orderplan.eval.sample_metrics import mean_interval
from orderplan.infra.checkpoint import atomic_write_bytes, atomic_write_json
from orderplan.infra.run_utils import job_dir, progress
from orderplan.infra.seeding import generator
from orderplan.infra.validation import check_int, check_range
from orderplan.model.loading import build_backbone
from orderplan.model.parallel import ParallelSchedule, generate_parallel, step_sizes
from orderplan.model.sampling import SamplingConfig

__all__ = ["ScheduleNLLRun", "check_schedule_nll_run", "run_schedule_nll"]

_RULES = ("raster", "random", "halton", "confident", "spread_confident")


def _default_schedules() -> list[str]:
    return [f"{r}@{s}" for r in _RULES for s in (64, 32, 16, 8, 4)] + ["confident@16c", "spread_confident@16c"]


@dataclass
class ScheduleNLLRun(RunConfig):
    """Schema of the schedule_nll job (preset src/orderplan/configs/schedule_nll.yaml)."""

    run_dir: str = "runs/schedule_nll/tiny_mnist"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    schedules: list[str] = field(default_factory=_default_schedules)  # `<name>@<S>[c]`, as evaluate's policies
    num_images: int | None = None  # first N held-out images; null = all
    batch_size: int = 250
    bootstrap: int = 2000
    level: float = 0.95


def check_schedule_nll_run(run: ScheduleNLLRun) -> None:
    """ValueError naming the key, before any data loads."""
    check_run_config(run)
    check_int("num_images", run.num_images, 2, allow_none=True, note=" (null = all)")
    check_int("batch_size", run.batch_size, 1)
    check_int("bootstrap", run.bootstrap, 10)
    check_range("level", run.level, 0.0, 1.0, lo_open=True, hi_open=True)
    if not run.schedules:
        raise ValueError("schedules must name at least one schedule, e.g. [raster@64, raster@16]")
    for entry in run.schedules:
        try:
            parsed = ParallelSchedule.parse(str(entry))
        except ValueError as err:
            raise ValueError(f"schedules: {err}") from None
        if parsed is None:
            raise ValueError(f"schedules: {entry!r} is not a schedule `<name>@<S>[c]` (e.g. raster@16)")


@torch.no_grad()
def schedule_nll(model, geometry, codes: torch.Tensor, labels: torch.Tensor, schedule: ParallelSchedule,
                 batch_size: int, seed: int) -> torch.Tensor:
    """[M] float64: -log q_S(x) of each token grid codes [M, L] (labels [M]) under `schedule`, nats
    per image. A random block order is drawn per image from (seed, name), so `random@S` for every S
    scores the same orders."""
    L = codes.shape[1]
    sizes = step_sizes(L, schedule.steps, schedule.kind)
    orders = schedule.token_orders(len(codes), geometry, generator(seed, "schedule_nll", schedule.name))
    sc = SamplingConfig(cfg_scale=1.0)
    dev = next(model.parameters()).device
    out = []
    for lo in range(0, len(codes), batch_size):
        hi = min(lo + batch_size, len(codes))
        res = generate_parallel(model, labels[lo:hi].to(dev), sizes, schedule.rule,
                                None if orders is None else orders[lo:hi].to(dev), sc, geometry=geometry,
                                forced=codes[lo:hi].to(dev))
        out.append(res.nll.cpu())
    return torch.cat(out)


@job_dir("schedule_nll")
def run_schedule_nll(run: ScheduleNLLRun) -> dict:
    """Score the held-out grids under every schedule; write results.json and results.md. Returns
    {schedules: {label: {steps, kind, nll_per_token, nll_ci, excess_vs_one_token, excess_ci}}}."""
    check_schedule_nll_run(run)
    t0 = time.time()
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    bb = build_backbone(run.backbone, device=run.device)
    codes, labels = load_token_data(run.backbone, "heldout")
    if run.num_images is not None:
        codes, labels = codes[:run.num_images], labels[:run.num_images]
    L = codes.shape[1]
    scheds = [ParallelSchedule.parse(str(s)) for s in run.schedules]
    for s in scheds:
        if not 1 <= s.steps <= L:
            raise ValueError(f"schedules: {s.label} needs 1 <= steps <= L={L}")
    # every rule's one-token-per-step version is the reference of its excess
    refs = {ParallelSchedule(s.name, L) for s in scheds}
    todo = list(dict.fromkeys([*scheds, *sorted(refs, key=lambda r: r.name)]))
    print(f"[schedule_nll] {len(codes)} held-out images, L={L}, {len(todo)} schedules -> {run_dir}", flush=True)
    nll = {s: schedule_nll(bb.gpt, bb.geometry, codes, labels, s, run.batch_size, run.seed)
           for s in progress(todo, desc="schedule_nll")}
    rows = {}
    for s in scheds:
        per_tok = nll[s] / L
        mean, lo, hi = mean_interval(per_tok, run.bootstrap, run.level, run.seed)
        ex, elo, ehi = mean_interval(per_tok - nll[ParallelSchedule(s.name, L)] / L, run.bootstrap, run.level,
                                     run.seed)
        rows[s.label] = {"rule": s.name, "steps": s.steps, "kind": s.kind, "tokens_per_step": L / s.steps,
                         "nll_per_token": mean, "nll_ci": [lo, hi], "excess_vs_one_token": ex,
                         "excess_ci": [elo, ehi]}
    results = {"num_images": len(codes), "tokens": L, "units": "nats per token", "level": run.level,
               "bootstrap": run.bootstrap, "seed": run.seed, "backbone": run.backbone.name, "schedules": rows,
               "wall_time_s": round(time.time() - t0, 1)}
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_bytes(run_dir / "results.md", markdown(results).encode())
    print(markdown(results), flush=True)
    return results


def markdown(results: dict) -> str:
    """The results table: one row per schedule, nats per token with intervals."""
    pct = round(100 * results["level"])
    lines = [f"Held-out NLL under each schedule's factorisation ({results['num_images']} images, "
             f"L = {results['tokens']}, nats per token, {pct}% bootstrap intervals). Excess: paired, against "
             "the same rule with one token per step.", "",
             "| schedule | forwards | tokens / step | NLL [CI] | excess over one token per step [CI] |",
             "|---|---|---|---|---|"]
    for label, r in results["schedules"].items():
        lines.append(f"| {label} | {r['steps']} | {r['tokens_per_step']:.0f} | {r['nll_per_token']:.4f} "
                     f"[{r['nll_ci'][0]:.4f}, {r['nll_ci'][1]:.4f}] | {r['excess_vs_one_token']:+.4f} "
                     f"[{r['excess_ci'][0]:+.4f}, {r['excess_ci'][1]:+.4f}] |")
    return "\n".join(lines) + "\n"
