"""Best of G orders: how much image quality a per-sample choice of order could buy (`scripts/headroom.py`).

Why. Two GRPO planners paid by rewards that rank orders as FD does (set_fd, and AdaNAT's
discriminator) both ended within 0.04 nats per decision of their anchor confident_sampled, with its
FD. Either no per-sample choice among the anchor's orders is much better than another, or there is
one and the planner cannot learn it from the state. This job measures the first half directly.

For each of N (label, noise) pairs, the evaluation's first N labels under its first sampler seed, it
plays `pool` (default confident_sampled, the anchor) G times (`draws`): the same label and, with
sampling.noise=position (forced here), the same noise per token, so the G samples of a pair differ
only by their orders (`rollouts.generate_samples(draw=d)`). A critic that needs no ground truth and
never reads an evaluation network then keeps one sample per pair:
- `discriminator_vq`: log-odds of real under the pixel discriminator (orderplan.eval.discriminator)
  trained on the train split's VQ reconstructions against `calibration_samples` pool samples under
  another sampler seed (none of the N pairs), the quality planner's reward;
- `judge`: log p(label | x) under a second digit classifier, the alignment study's reward (d).

The selections per critic: `best` (argmax over the G draws), `worst` (argmin: the control, does the
critic move FD at all), and `best<g>` (argmax over the first g draws, g = 2, 4, ... < G: the dose
response). `best` is what a planner would generate had it learned, for every pair, the critic's
favourite of G anchor draws: about the most GRPO with group size G and a tight KL to the anchor can
reach on that reward.

Statistics, in every feature space of the evaluation (the held-out one included): FD with its
bootstrap interval, precision and recall, and paired dFID (the same pair indices resampled) of every
set against draw 0 (a plain pool sample of the same pair) and against each of `baselines` (played
once on the same pairs and noise). `verdict`: per critic and per compared set, whether `best` is
below it with an interval entirely below 0 in every space, and whether its recall is no lower than
that set's minus 0.01 in every space (the quality target of issue 23).

`best` is also a planner in its own right, a search over orders rather than an amortised policy: draw
G orders from the anchor, generate each, keep the critic's favourite. It reads no ground truth and no
evaluation network, and costs G generations per image.

Seeds. Seed s plays draws sG .. sG + G - 1 of the pool, trains its discriminator with seed
discriminator.seed + s on its own calibration draw (draw s of the calibration seed) and its judge with
judge.seed + s; the baselines are the same for every seed. So seeds are replicates of the whole
procedure on the same pairs; the pairs themselves are the evaluation's.

Outputs in run_dir: results.json (checksummed), results.md, judge/. Generated sets go to members_dir
(default run_dir/members), a cache keyed by everything that shapes them: a cut run regenerates only
what is missing, and the seeds of one study share the baselines. Cost: G + len(baselines) generation
sets of N plus the calibration set; the default (N = 4,000, G = 4, five baselines) took 13 min
on 2 idle CPU cores, a further seed sharing the baselines 8 min (docs/results.md; an earlier day's
machine ran about 1.5 to 2x slower).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from orderplan.config.common import RunConfig, check_run_config, compose, to_typed
from orderplan.data.tokens import load_token_data
from orderplan.eval.alignment import JudgeSpec, _ci, judge_log_prob, ref_side, train_judge
from orderplan.eval.discriminator import DiscriminatorSpec, PixelDiscriminator, check_discriminator_spec, vq_reconstructions
from orderplan.eval.fid import extract_features
from orderplan.eval.sample_metrics import fid_with_interval, knn_radii, paired_fid_delta, precision_recall
from orderplan.infra.checkpoint import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_cache
from orderplan.infra.run_utils import job_dir, progress
from orderplan.infra.seeding import isolated_rng
from orderplan.infra.validation import check_choice, check_int, check_range
from orderplan.model.loading import backbone_identity, build_backbone

__all__ = ["HeadroomRun", "check_headroom_run", "run_headroom", "select", "CRITICS"]

CRITICS = ("discriminator_vq", "judge")
VARY = ("orders", "noise")
NOISE_SEEDS = 1000  # vary=noise: member i > 0 samples under sampler seed NOISE_SEEDS + i (as eval.sampler_seeds)


@dataclass
class HeadroomRun(RunConfig):
    """Schema of the headroom job (preset src/orderplan/configs/headroom.yaml)."""

    evaluate: str = "evaluate_spaces"  # the evaluate preset whose backbone, env, sampling and feature spaces it uses
    evaluate_overrides: list[str] = field(default_factory=list)  # as given to that evaluate run
    num_samples: int = 4000  # N (label, noise) pairs
    pool: str = "confident_sampled"  # the stochastic policy the G orders of a pair are drawn from
    draws: int = 4  # G
    # what differs between the G samples of a pair. orders: the pool's order draws under one noise
    # (the question); noise: G sampler seeds (position-noise keys) with the pool's own draws, i.e. plain
    # best-of-G sampling, the control: how much of the gain any choice among G samples would buy
    vary: str = "orders"
    # played once on the same pairs: the fixed and belief orders the target names, and raster
    baselines: list[str] = field(default_factory=lambda: ["raster", "random", "halton", "confident_first",
                                                          "spread_confident"])
    critics: list[str] = field(default_factory=lambda: list(CRITICS))
    calibration_samples: int = 1000  # the discriminator's generated side: pool samples under calibration_seed
    calibration_seed: int = 9  # a sampler seed (as eval.sampler_seeds) the evaluation does not use
    discriminator: DiscriminatorSpec = field(default_factory=DiscriminatorSpec)
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    gen_batch_size: int = 500
    bootstrap: int = 200
    level: float = 0.95
    run_dir: str = "runs/headroom/tiny_mnist/s0"
    # where the generated sets are cached (None: run_dir/members); the seeds of one study share it, so
    # they share the baselines' samples (run them one after another: one writer at a time)
    members_dir: str | None = None


def check_headroom_run(run: HeadroomRun) -> None:
    """ValueError naming the first bad key, before anything loads."""
    check_run_config(run)
    check_int("num_samples", run.num_samples, 8, note=" (covariances and 3-NN radii)")
    check_int("draws", run.draws, 2, note=" (a choice needs two samples)")
    check_choice("vary", run.vary, VARY)
    if not run.critics:
        raise ValueError("critics must name at least one of " + ", ".join(CRITICS))
    for c in run.critics:
        check_choice("critics", c, CRITICS)
    if run.pool in run.baselines:
        raise ValueError(f"baselines must not repeat the pool ({run.pool}): its draw 0 is already the plain pool")
    check_int("calibration_samples", run.calibration_samples, 2)
    check_int("calibration_seed", run.calibration_seed, 0)
    if run.calibration_seed >= NOISE_SEEDS:
        raise ValueError(f"calibration_seed must be < {NOISE_SEEDS} (vary=noise samples under sampler seeds from "
                         f"{NOISE_SEEDS}), got {run.calibration_seed}")
    check_discriminator_spec(run.discriminator)
    check_int("judge.epochs", run.judge.epochs, 1)
    check_int("gen_batch_size", run.gen_batch_size, 1)
    check_int("bootstrap", run.bootstrap, 10)
    check_range("level", run.level, 0.0, 1.0, lo_open=True, hi_open=True)


def select(scores: torch.Tensor, how: str, first: int | None = None) -> torch.Tensor:
    """The draw each pair keeps [N] long, from critic scores [G, N]: argmax (`best`) or argmin (`worst`)
    over the first `first` draws (all when None); ties keep the lowest draw."""
    if scores.dim() != 2 or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores must be finite [G, N], got {tuple(scores.shape)}")
    if how not in ("best", "worst"):
        raise ValueError(f"how must be best or worst, got {how!r}")
    # torch documents that argmax / argmin return the first extremal index on ties, on every device
    return scores[:first].argmax(0) if how == "best" else scores[:first].argmin(0)


def _pick(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Row i of draw which[i]: x [G, N, ...] -> [N, ...]."""
    return x[which, torch.arange(x.shape[1])]


# -- the job ------------------------------------------------------------------------------------


@job_dir("headroom")
def run_headroom(run: HeadroomRun) -> dict:
    """Generate the draws and baselines, score them with every critic, select, and compare (module
    doc). Writes run_dir/results.json and results.md; returns the results."""
    from orderplan.eval.evaluate import (EvaluateRun, _sampler_seed, balanced_images, build_feature_spaces,
                                         generation_env, generation_labels, resolve_policy)
    from orderplan.eval.rollouts import generate_samples
    from orderplan.infra.distributed import DistContext

    check_headroom_run(run)
    t0 = time.time()
    run_dir = Path(run.run_dir)
    ev = to_typed(compose(run.evaluate, list(run.evaluate_overrides)), EvaluateRun)
    if run.calibration_seed in ev.eval.sampler_seeds:
        raise ValueError(f"calibration_seed {run.calibration_seed} is one of the evaluation's sampler seeds "
                         f"{ev.eval.sampler_seeds}: the discriminator must not see the pairs it scores")
    ev = replace(ev, eval=replace(ev.eval, sampling=replace(ev.eval.sampling, noise="position")))
    torch.manual_seed(run.seed)
    bb = build_backbone(ev.backbone, device=run.device)
    _, labels = load_token_data(ev.backbone, "heldout")
    n = run.num_samples
    gen_labels = generation_labels(labels, balanced_images(labels), n)
    pool = resolve_policy(run.pool, ev, bb)
    bases = [resolve_policy(b, ev, bb) for b in run.baselines]
    for spec in [pool, *bases]:
        if spec.ground_truth or spec.schedule is not None:
            raise ValueError(f"{spec.name}: the headroom job plays orders that read no ground truth, one block per "
                             "decision (no oracles, no parallel-decoding schedules)")
    seed = _sampler_seed(ev, ev.eval.sampler_seeds[0])
    members_dir = Path(run.members_dir) if run.members_dir else run_dir / "members"

    def play(spec, draw: int, sampler_seed: int, count: int, tag: str) -> dict:
        """{images [count, C, H, W], blocks [count, N_blocks]}: a cache in members_dir, keyed by all that shapes it."""
        env = generation_env(spec, ev)
        identity = json.dumps({"policy": spec.name, "source": spec.source, "draw": draw, "n": count,
                               "sampler_seed": sampler_seed, "env": asdict(env), "batch": run.gen_batch_size,
                               "backbone": backbone_identity(ev.backbone, run.device), "seed": ev.seed},
                              sort_keys=True, default=str)
        path = members_dir / f"{tag}.pt"
        done = load_cache(path, identity, "[headroom]")
        if done is not None:
            print(f"[headroom] {tag}: generated in an earlier run with the same setup ({path})", flush=True)
            return done
        # the table's own policy stream (evaluate: isolated_rng(seed, "evaluate", "policy", name))
        with isolated_rng(ev.seed, "evaluate", "policy", spec.name):
            s = generate_samples(spec.make, bb, generation_labels(labels, balanced_images(labels), count), env,
                                 run.gen_batch_size, sampler_seed, num_snapshots=0, draw=draw,
                                 progress_bar=lambda it: progress(it, desc=f"{tag}: generating"))
        out = {"identity": identity, "images": s.images, "blocks": s.blocks}
        atomic_torch_save(out, path, checksum=True)
        return out

    # seed s plays draws sG .. sG + G - 1 of the pool (draw 0 is the evaluation table's own stream)
    first = run.seed * run.draws

    def member(i: int) -> dict:
        if run.vary == "orders" or i == 0:  # draw 0 of the table's sampler seed is the same set either way
            return play(pool, i, seed, n, f"draw{i}")
        return play(pool, 0, _sampler_seed(ev, NOISE_SEEDS + i), n, f"noise{i}")

    members = [member(first + k) for k in range(run.draws)]
    if run.vary == "orders" and all(torch.equal(m["blocks"], members[0]["blocks"]) for m in members[1:]):
        raise ValueError(f"pool {run.pool!r} drew the same orders in every draw: it is deterministic, and a choice "
                         "among identical samples measures nothing (use a stochastic policy such as confident_sampled)")
    base_sets = {spec.name: play(spec, 0, seed, n, spec.name) for spec in bases}
    images = torch.stack([m["images"] for m in members])  # [G, N, C, H, W]

    # the critics: neither reads an evaluation network (the FID classifier, the held-out autoencoder)
    scores: dict[str, torch.Tensor] = {}  # critic -> [G, N]
    base_scores: dict[str, dict[str, float]] = {b: {} for b in base_sets}
    critic_info: dict[str, dict] = {}
    for critic in run.critics:
        if critic == "discriminator_vq":
            calib = play(pool, run.seed, _sampler_seed(ev, run.calibration_seed), run.calibration_samples,
                         f"calibration{run.seed}")
            disc = PixelDiscriminator(replace(run.discriminator, seed=run.discriminator.seed + run.seed))
            loss = disc.update(vq_reconstructions(bb, ev.backbone, "train"), calib["images"], run.discriminator.steps,
                               bar=True)
            score = disc.log_odds
            critic_info[critic] = {"training_loss": loss, "calibration_samples": run.calibration_samples}
        else:
            judge, summary = train_judge(run.judge, run_dir / "judge", seed_offset=run.seed)

            def score(x: torch.Tensor, model=judge) -> torch.Tensor:
                return judge_log_prob(model, x, gen_labels[:len(x)])
            critic_info[critic] = {"heldout": summary["heldout"]}
        scores[critic] = torch.stack([score(images[d]) for d in range(run.draws)])
        for b, s in base_sets.items():
            base_scores[b][critic] = float(score(s["images"]).mean())
        # how much the critic's verdict on a pair depends on the order: its spread within a pair
        critic_info[critic]["within_pair_std"] = float(scores[critic].std(0).mean())
        critic_info[critic]["across_pair_std"] = float(scores[critic][0].std())

    # which draw each selection keeps
    # every draw on its own too: their spread is the noise of drawing the orders
    choices = {f"draw{d}": torch.full((n,), d, dtype=torch.long) for d in range(run.draws)}
    doses = [g for g in (2 ** k for k in range(1, run.draws.bit_length())) if g < run.draws]
    for critic, sc in scores.items():
        choices[f"best_{critic}"] = select(sc, "best")
        choices[f"worst_{critic}"] = select(sc, "worst")
        for g in doses:
            choices[f"best{g}_{critic}"] = select(sc, "best", first=g)

    # features in every evaluation space (the held-out one included); a selection's are its draws' rows
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device(run.device))
    extractor, ref_images = build_feature_spaces(ev, ref_side(bb), ctx)
    real_by = extractor.split(extract_features(extractor, ref_images).double())
    feats = [extractor.split(extract_features(extractor, images[d]).double())
             for d in progress(range(run.draws), desc="features")]
    base_feats = {b: extractor.split(extract_features(extractor, s["images"]).double()) for b, s in base_sets.items()}
    stacked = {sp: torch.stack([f[sp] for f in feats]) for sp in extractor.names}  # [G, N, F]
    sets = {name: {sp: _pick(stacked[sp], which) for sp in extractor.names} for name, which in choices.items()}
    sets.update(base_feats)
    radii = {sp: knn_radii(real_by[sp]) for sp in extractor.names}
    st = dict(num_resamples=run.bootstrap, level=run.level, seed=run.seed)
    against = ["draw0", *base_sets]
    selections = [name for name in choices if not name.startswith("draw")]
    rows: dict[str, dict] = {}
    for name, by in progress(sets.items(), desc="statistics"):
        row: dict = {"spaces": {}}
        if name in choices:
            row["critics"] = {c: float(_pick(sc, choices[name]).mean()) for c, sc in scores.items()}
            row["kept_draw_share"] = torch.bincount(choices[name], minlength=run.draws).div(n).tolist()
        else:
            row["critics"] = base_scores[name]
        for sp in extractor.names:
            fd, lo, hi = fid_with_interval(real_by[sp], by[sp], **st)
            pr = precision_recall(real_by[sp], by[sp], real_radii=radii[sp])
            cell = {"fd": fd, "fd_ci": [lo, hi], "precision": pr.precision, "recall": pr.recall}
            # a selection against draw 0 and every baseline; draw 0 against the baselines; the rest against draw 0
            for b in against if name in selections or name == "draw0" else ["draw0"]:
                if b != name:
                    d = paired_fid_delta(real_by[sp], by[sp], sets[b][sp], **st)
                    cell[f"dfd_vs_{b}"], cell[f"dfd_vs_{b}_ci"] = d.delta, [d.lo, d.hi]
            row["spaces"][sp] = cell
        rows[name] = row

    # the target: below draw 0 and every baseline with an interval entirely below 0 in every space, with
    # a recall (in every space) no lower than that set's minus 0.01
    verdict = {}
    for critic in scores:
        cells = rows[f"best_{critic}"]["spaces"]
        verdict[critic] = {b: {"below_in_every_space": all(c[f"dfd_vs_{b}_ci"][1] < 0 for c in cells.values()),
                               "recall_within_0.01": all(cells[sp]["recall"] >= rows[b]["spaces"][sp]["recall"] - 0.01
                                                         for sp in cells)}
                           for b in against}
    results = {"pool": run.pool, "draws": run.draws, "vary": run.vary, "draw_indices": [first, first + run.draws - 1],
               "num_samples": n, "baselines": list(base_sets), "seed": run.seed,
               "spaces": extractor.names, "held_out": ev.features.held_out, "sampling": asdict(ev.eval.sampling),
               "critics": critic_info, "sets": rows, "verdict": verdict, "config": asdict(run),
               "wall_time_s": round(time.time() - t0, 1)}
    atomic_write_json(run_dir / "results.json", results, checksum=True)
    text = headroom_markdown(results)
    atomic_write_bytes(run_dir / "results.md", text.encode())
    print(text)
    return results


def headroom_markdown(res: dict) -> str:
    """results.md: FD per set and space with its paired dFID against draw 0 and the baselines."""
    spaces, held = res["spaces"], res.get("held_out")
    head = [f"{sp} (held out)" if sp == held else sp for sp in spaces]
    lo, hi = res["draw_indices"]
    what = "orders" if res.get("vary", "orders") == "orders" else "samples (noise varied: the control)"
    lines = [f"# Best of {res['draws']} {what} of {res['pool']}: N = {res['num_samples']} pairs, seed "
             f"{res['seed']} (draws {lo}..{hi}, shown as draw0..draw{hi - lo})", "",
             "FD per feature space; below it, paired dFID against draw 0 (a plain draw of the same pair) and "
             "against each baseline, with 95% intervals (negative: closer to the train split).", "",
             "| set | " + " | ".join(head) + " | recall (" + spaces[0] + ") | " +
             " | ".join(f"mean {c}" for c in res["critics"]) + " |",
             "|---|" + "---|" * (len(spaces) + 1 + len(res["critics"]))]
    for name, row in res["sets"].items():
        cells = []
        for sp in spaces:
            c = row["spaces"][sp]
            parts = [f"{c['fd']:.3f}"]
            for b in ["draw0", *res["baselines"]]:
                if f"dfd_vs_{b}" in c:
                    parts.append(f"vs {b} {c[f'dfd_vs_{b}']:+.3f} {_ci(c[f'dfd_vs_{b}_ci'], 3)}")
            cells.append("<br>".join(parts))
        crit = [f"{row['critics'].get(c, float('nan')):.3f}" for c in res["critics"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['spaces'][spaces[0]]['recall']:.3f} | "
                     + " | ".join(crit) + " |")
    lines += ["", "Critics: " + "; ".join(
        f"{c}: spread within a pair {i['within_pair_std']:.3f}, across pairs {i['across_pair_std']:.3f}"
        for c, i in res["critics"].items()), ""]
    for critic, v in res["verdict"].items():
        said = ", ".join(f"{'below' if ok['below_in_every_space'] else 'not below'} {b}"
                         f"{'' if ok['recall_within_0.01'] else ' (recall lower by more than 0.01)'}" for b, ok in v.items())
        lines.append(f"- **best_{critic}** (interval entirely below 0 in every space): {said}")
    return "\n".join(lines) + "\n"
