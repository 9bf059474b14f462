"""Which episode reward agrees with image quality? (`scripts/reward_alignment.py`)

The planners were trained on rewards that rank orders one way (teacher-forced future loss: PPO
best) while the generation table ranks them another (confident_first best). Before a planner is
trained for quality, this job measures, for every policy of an evaluation's generation table,
candidate episode rewards that need no ground truth and never touch the FID feature networks, and
how well each one ranks the policies as FID does.

Candidates, per generated sample (the evaluation's own samples: the same labels, sampler streams and
policy seeds, so sample i here is sample i of the table):
- `entropy_drop` (a): the env's generation reward summed over the episode (nats), from replaying the
  sample's order in the env. Undiscounted it telescopes to the entropy of the empty canvas, which
  depends on the label only: it cannot rank orders, and the job says so instead of a correlation.
- `likelihood` (b): the finished tokens' log-likelihood under the backbone, averaged over K random
  block orders (nats/token; target-aware queries on, as trained).
- `discriminator` (c): log D(x) - log(1 - D(x)) of a small pixel CNN trained to tell the train split
  from generated samples (the first half of every policy's samples, pooled), scored on the second
  half (AdaNAT's reward, here trained once rather than alongside the policy).
- `discriminator_vq` (c'): the same, with the train split's VQ reconstructions as its real side. The
  raw split differs from every decoded image by the codec's signature, which no order changes and
  which (c) learns first.
- `judge` (d): log p(conditioning class | x) under a second digit classifier with another
  architecture and seed, trained here on the train split.
- `set_fd` (e): the quality planner's reward (orderplan.eval.set_reward), a set-level one: per
  policy, minus the Fréchet distance of its samples to the train split in pixel-PCA space (the PCA
  fitted on the train split, as evaluation's; interval from the FID bootstrap); per sample, its
  leave-one-out share of that distance. Pixel PCA is also an evaluation space, so its own column
  is near 1 by construction; the other spaces say whether it transfers.

Outputs: per policy, each reward's mean with a bootstrap interval; per reward and per feature space
of the evaluation, Spearman's rank correlation between the policies' mean reward and minus their
FD (positive = the reward prefers the orders FD prefers), with an interval from resampling the
policies; per reward, the per-sample Spearman correlation with the k-NN realism score (Kynkäänniemi
et al. 2019) in the primary space, with an interval from resampling samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from orderplan.config.common import RunConfig, check_run_config, compose, to_typed
from orderplan.data.datasets import images_to_model, load_embedded_mnist
from orderplan.data.tokens import load_token_data
from orderplan.eval.classifier_training import ClassifierRun, train_classifier
from orderplan.eval.discriminator import (DiscriminatorSpec, PixelDiscriminator, check_discriminator_spec,
                                         codec_signature, vq_reconstructions)
from orderplan.eval.feature_net import ClassifierConfig, DigitClassifier, load_classifier
from orderplan.eval.sample_metrics import fid_with_interval, knn_radii, mean_interval
from orderplan.eval.set_reward import SetFrechetReward
from orderplan.infra.checkpoint import atomic_write_bytes, atomic_write_json, load_cache
from orderplan.infra.integrity import read_json_checked
from orderplan.infra.run_utils import job_dir, progress
from orderplan.infra.seeding import isolated_rng
from orderplan.infra.validation import check_int, check_range
from orderplan.model.blocks import BlockGeometry
from orderplan.model.loading import build_backbone
from orderplan.model.orders import block_order

__all__ = ["AlignmentRun", "JudgeSpec", "DiscriminatorSpec", "check_alignment_run", "reward_alignment",
           "spearman", "realism_scores", "REWARDS"]

REWARDS = ("entropy_drop", "likelihood", "discriminator", "discriminator_vq", "judge", "set_fd")
DISCRIMINATORS = ("discriminator", "discriminator_vq")  # scored on each policy's second half


@dataclass
class JudgeSpec:
    """Reward (d): a second digit classifier, another architecture and seed than the FID one."""

    channels: list[int] = field(default_factory=lambda: [16, 32])
    num_features: int = 32
    epochs: int = 4
    seed: int = 2


@dataclass
class AlignmentRun(RunConfig):
    """Schema of the reward_alignment job (preset src/orderplan/configs/reward_alignment.yaml)."""

    evaluate: str = "evaluate_spaces"  # the evaluate preset whose finished table the rewards are compared with
    evaluate_overrides: list[str] = field(default_factory=list)  # as given to that evaluate run
    num_samples: int = 1000  # per policy: the table's first samples
    likelihood_orders: int = 4  # K random block orders behind the likelihood reward
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    discriminator: DiscriminatorSpec = field(default_factory=DiscriminatorSpec)
    bootstrap: int = 1000
    level: float = 0.95
    knn_k: int = 3  # realism score's k
    run_dir: str = "runs/reward_alignment/tiny_mnist"


def check_alignment_run(run: AlignmentRun) -> None:
    check_run_config(run)
    check_int("num_samples", run.num_samples, 8)
    check_int("likelihood_orders", run.likelihood_orders, 1)
    check_int("judge.epochs", run.judge.epochs, 1)
    check_discriminator_spec(run.discriminator)
    check_int("bootstrap", run.bootstrap, 10)
    check_range("level", run.level, 0.0, 1.0, lo_open=True, hi_open=True)
    check_int("knn_k", run.knn_k, 1)


# -- statistics ---------------------------------------------------------------------------------


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (0-based; ties share the mean of their ranks) of a vector x [n], float64."""
    vals, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of the first of each group of equal values
    return (first + (counts - 1) / 2).double()[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two vectors [n] (Pearson's r of their average ranks; nan when
    either is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _interval(values: list[float], level: float) -> list[float]:
    v = np.asarray([x for x in values if math.isfinite(x)])
    if len(v) == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(v, (1 - level) / 2)), float(np.quantile(v, (1 + level) / 2))]


def _bootstrap_spearman(a: torch.Tensor, b: torch.Tensor, resamples: int, level: float, seed: int) -> list[float]:
    """Percentile interval of Spearman's rho over resamples of the n pairs (with replacement)."""
    g = torch.Generator().manual_seed(seed)
    n = len(a)
    return _interval([spearman(a[i], b[i]) for i in (torch.randint(n, (n,), generator=g) for _ in range(resamples))],
                     level)


def realism_scores(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """k-NN realism score of each fake sample [S] (Kynkäänniemi et al. 2019): max over real points r
    of radius_k(r) / ||fake - r||, with radius_k(r) the distance from r to its k-th nearest real
    neighbour; > 1 means inside some real point's k-NN ball. real [M, F], fake [S, F]."""
    real, fake = real.double(), fake.double()
    radii = knn_radii(real, k, chunk)
    out = [(radii[None] / torch.cdist(c, real).clamp_min(1e-12)).amax(1) for c in fake.split(chunk)]
    return torch.cat(out)


# -- the candidate rewards ----------------------------------------------------------------------


@torch.no_grad()
def likelihood_reward(gpt, tokens: torch.Tensor, labels: torch.Tensor, geom: BlockGeometry, orders: int, seed: int,
                      batch: int = 250) -> torch.Tensor:
    """Mean over `orders` random block orders of log p(tokens | label) per token (nats/token) [S]
    under the backbone (teacher-forced, target-aware), tokens [S, L] long, labels [S]."""
    g = torch.Generator().manual_seed(seed)
    device = next(gpt.parameters()).device
    total = torch.zeros(len(tokens), dtype=torch.float64)
    for _ in range(orders):
        o_all = geom.token_order(block_order("random", geom, batch=len(tokens), generator=g))
        for i in range(0, len(tokens), batch):
            x, y, o = tokens[i:i + batch].to(device), labels[i:i + batch].to(device), o_all[i:i + batch].to(device)
            logits = gpt.forward_train(x, y, o, use_ta=True).float()
            lp = -F.cross_entropy(logits.flatten(0, 1), x.gather(1, o).flatten(), reduction="none").view(len(x), -1)
            total[i:i + batch] += lp.double().mean(1).cpu()
    return total / orders


def train_discriminator(real: torch.Tensor, fake: torch.Tensor, spec: DiscriminatorSpec) -> PixelDiscriminator:
    """A pixel discriminator trained once on real [M, 1, S, S] vs fake [N, 1, S, S] for spec.steps
    balanced batches (orderplan.eval.discriminator)."""
    disc = PixelDiscriminator(spec)
    disc.update(real, fake, spec.steps, bar=True)
    return disc


def train_judge(spec: JudgeSpec, run_dir: str | Path, seed_offset: int = 0) -> tuple[DigitClassifier, dict]:
    """Reward (d)'s classifier, trained on the train split into run_dir with seed spec.seed + seed_offset;
    returns it and train_classifier's summary."""
    summary = train_classifier(ClassifierRun(
        run_dir=str(run_dir), seed=spec.seed + seed_offset, epochs=spec.epochs, progress=False,
        model=ClassifierConfig(channels=spec.channels, num_features=spec.num_features)))
    return load_classifier(summary["file"]), summary


@torch.no_grad()
def judge_log_prob(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500
                   ) -> torch.Tensor:
    """Reward (d) per sample: log p(label | x) [N] (nats, float64) for images [N, 1, S, S], labels [N]."""
    logits = torch.cat([model(x) for x in images.split(batch)]).double()
    return F.log_softmax(logits, -1).gather(1, labels[:, None].to(logits.device)).squeeze(1)


# -- the job ------------------------------------------------------------------------------------


@job_dir("reward_alignment")
def reward_alignment(run: AlignmentRun) -> dict:
    """Generate each policy's first `num_samples` samples of the evaluation table, score every
    candidate reward, and compare them with the table's FD in every feature space (module doc).
    Writes run_dir/results.json and results.md."""
    from orderplan.eval.evaluate import (EvaluateRun, _sampler_seed, balanced_images, build_feature_spaces,
                                         generation_env, generation_labels, policy_identity, resolve_policy)
    from orderplan.eval.fid import extract_features
    from orderplan.eval.rollouts import generate_samples
    from orderplan.planner.policies import FixedOrderPolicy
    from orderplan.infra.distributed import DistContext

    check_alignment_run(run)
    t0 = time.time()
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ev = to_typed(compose(run.evaluate, list(run.evaluate_overrides)), EvaluateRun)
    table_path = Path(ev.run_dir) / "results.json"
    table = read_json_checked(table_path, rebuild=f"python scripts/evaluate.py --config-name {run.evaluate}")
    if "feature_spaces" not in table:
        raise ValueError(f"{table_path} has no feature spaces: rerun scripts/evaluate.py --config-name {run.evaluate}")
    spaces = table["feature_spaces"]["names"]
    torch.manual_seed(run.seed)
    bb = build_backbone(ev.backbone, device=run.device)
    codes, labels = load_token_data(ev.backbone, "heldout")
    n = run.num_samples
    gen_labels = generation_labels(labels, balanced_images(labels), n)
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device(run.device))
    extractor, ref_images = build_feature_spaces(ev, ref_side(bb), ctx)
    real_primary = extractor.split(extract_features(extractor, ref_images).double())[extractor.primary]

    specs = [resolve_policy(p, ev, bb) for p in table["policies"]]
    skipped = [s.name for s in specs if s.ground_truth or s.schedule is not None]
    specs = [s for s in specs if s.name not in skipped]  # oracles replay ground-truth orders; schedules decode apart
    if len(specs) < 3:
        raise ValueError(f"need >= 3 policies without ground truth in {table_path}, got {[s.name for s in specs]}")
    per: dict[str, dict] = {}
    for spec in specs:
        env, seed = generation_env(spec, ev), _sampler_seed(ev, ev.eval.sampler_seeds[0])
        with isolated_rng(ev.seed, "evaluate", "policy", spec.name):  # the table's own stream of this policy
            s = generate_samples(spec.make, bb, gen_labels, env, ev.eval.gen_batch_size, seed, num_snapshots=0,
                                 progress_bar=lambda it, name=spec.name: progress(it, desc=f"{name}: generating"))
        # the entropy drop: the same orders replayed in the env, which draws the same tokens (a planned
        # order decoded in one pass equals stepping the env) and sums the rewards on the way
        replay = generate_samples(lambda core, b=s.blocks: FixedOrderPolicy(b), bb, gen_labels, env,
                                  ev.eval.gen_batch_size, seed, num_snapshots=0, rewards=True,
                                  progress_bar=lambda it, name=spec.name: progress(it, desc=f"{name}: replaying"))
        if not torch.equal(replay.tokens, s.tokens):
            raise RuntimeError(f"{spec.name}: replaying its orders in the env drew other tokens")
        s.entropy_return = replay.entropy_return
        feats = extract_features(extractor, s.images).double()
        cache = Path(ev.run_dir) / "policies" / f"{spec.name}.pt"
        done = load_cache(cache, policy_identity(spec, ev), "[reward_alignment]")
        if done is None:
            raise ValueError(f"{cache}: the table's samples of {spec.name} are missing or from another setup; rerun "
                             f"scripts/evaluate.py --config-name {run.evaluate} with the same overrides")
        cached = done["generated"]["features"]
        per[spec.name] = {"samples": s, "features": feats,
                          "same_samples_as_table": bool(torch.allclose(feats, cached[:n], atol=1e-4, rtol=1e-4))}

    # (b) likelihood, (d) judge: per sample
    judge, judge_summary = train_judge(run.judge, run_dir / "judge")
    # (c) the discriminator: trained on the first half of every policy's samples, scored on the second
    real_pixels = images_to_model(load_embedded_mnist("train")[0])
    half = n // 2
    fakes = torch.cat([p["samples"].images[:half] for p in per.values()])
    disc = train_discriminator(real_pixels, fakes, run.discriminator)
    # (c') the same against the train split's VQ reconstructions: it cannot win on the codec's signature
    recon = vq_reconstructions(bb, ev.backbone, "train")
    disc_vq = train_discriminator(recon, fakes, run.discriminator)
    # why (c') exists: how well the same network tells the raw split from its own reconstructions
    codec = codec_signature(real_pixels, recon, run.discriminator)
    set_reward = SetFrechetReward(real_pixels, ["pixel_pca"], ev.features.pca_components, ev.features.random_seed)
    rows: dict[str, dict] = {}
    per_sample: dict[str, list[torch.Tensor]] = {r: [] for r in REWARDS}
    realism: list[torch.Tensor] = []
    for k, (name, p) in enumerate(per.items()):
        s = p["samples"]
        rewards = {
            "entropy_drop": s.entropy_return.double(),
            "likelihood": likelihood_reward(bb.gpt, s.tokens, s.labels, bb.geometry, run.likelihood_orders, run.seed),
            "judge": judge_log_prob(judge, s.images, s.labels),
        }
        rewards["discriminator"] = disc.log_odds(s.images[half:])
        rewards["discriminator_vq"] = disc_vq.log_odds(s.images[half:])
        pca = set_reward.features(s.images)["pixel_pca"]
        rewards["set_fd"] = set_reward.from_features({"pixel_pca": pca}).reward.double()
        real_score = realism_scores(real_primary, extractor.split(p["features"])[extractor.primary], run.knn_k)
        row = {"num_samples": n, "same_samples_as_table": p["same_samples_as_table"],
               "realism": float(real_score.mean())}
        for r, v in rewards.items():
            row[r], *ci = mean_interval(v, run.bootstrap, run.level, run.seed + k)
            row[f"{r}_ci"] = ci
            per_sample[r].append(v)
        # set_fd is a set-level reward: the policy's value is minus its set's FD, not a mean over samples
        fd, lo, hi = fid_with_interval(set_reward.reference_features["pixel_pca"], pca, run.bootstrap, run.level,
                                       run.seed + k)
        row["set_fd"], row["set_fd_ci"] = -fd, [-hi, -lo]
        realism.append(real_score)
        row["fd"] = {sp: table["policies"][name]["spaces"][sp]["fid"] for sp in spaces}
        rows[name] = row

    names = list(rows)
    corr: dict[str, dict] = {}
    for r in REWARDS:
        mean = torch.tensor([rows[nm][r] for nm in names], dtype=torch.float64)
        corr[r] = {"policies": {}, "samples": None, "constant": _constant(mean)}
        for sp in spaces:
            if corr[r]["constant"]:  # no ranking at all: rounding noise must not read as a correlation
                corr[r]["policies"][sp] = {"rho": float("nan"), "ci": [float("nan"), float("nan")]}
                continue
            neg_fd = -torch.tensor([rows[nm]["fd"][sp] for nm in names], dtype=torch.float64)
            corr[r]["policies"][sp] = {"rho": spearman(mean, neg_fd),
                                       "ci": _bootstrap_spearman(mean, neg_fd, run.bootstrap, run.level, run.seed)}
        # per sample, pooled over policies (the discriminator is scored on each policy's second half)
        vals = torch.cat(per_sample[r])
        rs = torch.cat([x[half:] for x in realism]) if r in DISCRIMINATORS else torch.cat(realism)
        g = torch.Generator().manual_seed(run.seed)
        # a random subset of at most 4,000 samples, point and interval alike (each resample re-ranks)
        sub = torch.randperm(len(vals), generator=g)[:4000]
        corr[r]["samples"] = {"rho": spearman(vals[sub], rs[sub]), "n": len(sub), "pooled": len(vals),
                              "ci": _bootstrap_spearman(vals[sub], rs[sub], min(run.bootstrap, 200), run.level, run.seed)}
    results = {"evaluation": str(table_path), "spaces": spaces, "held_out": table["feature_spaces"].get("held_out"),
               "num_samples": n, "skipped": skipped, "policies": rows, "correlation": corr,
               "codec_signature": codec, "judge": {"file": judge_summary["file"], "heldout": judge_summary["heldout"],
                         "channels": run.judge.channels},
               "config": asdict(run), "wall_time_s": round(time.time() - t0, 1)}
    atomic_write_json(run_dir / "results.json", results, checksum=True)
    text = alignment_markdown(results)
    atomic_write_bytes(run_dir / "results.md", text.encode())
    print(text)
    return results


def _constant(x: torch.Tensor, rel: float = 1e-9) -> bool:
    """Whether the values are equal up to float rounding (the undiscounted entropy drop telescopes
    to the entropy of the empty canvas, which no order changes)."""
    return float(x.max() - x.min()) <= rel * max(1.0, float(x.abs().max()))


def ref_side(bb) -> int:
    """Image side of the backbone's samples (pixels)."""
    return bb.gpt.cfg.grid_h * (bb.vq.config.downsample_factor if bb.vq is not None else 1)


def _ci(x: list[float], digits: int = 2) -> str:
    return f"[{x[0]:+.{digits}f}, {x[1]:+.{digits}f}]"


def alignment_markdown(res: dict) -> str:
    """The alignment tables (markdown)."""
    sp, rows, corr = res["spaces"], res["policies"], res["correlation"]
    lines = [f"# Reward alignment: N = {res['num_samples']} samples per policy (the table's first samples)", "",
             "Mean episode reward per policy [95% bootstrap CI] and its FD in every space of the evaluation:", "",
             "| policy | " + " | ".join(REWARDS) + " | realism | " + " | ".join(f"FD {s}" for s in sp) + " |",
             "|---" * (2 + len(REWARDS) + len(sp)) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f} {_ci(r[k + '_ci'], 4)}" for k in REWARDS)
                     + f" | {r['realism']:.3f} | " + " | ".join(f"{r['fd'][s]:.3f}" for s in sp) + " |")
    lines += ["", "Spearman's rho between a reward's policy means and minus FD (positive = the reward ranks the "
              "orders as FD does; 95% CI from resampling the policies), and per sample with the k-NN realism "
              "score in the primary space (95% CI from resampling samples):", "",
              "| reward | " + " | ".join(f"rho vs -FD {s}" + (" (held out)" if s == res.get("held_out") else "")
                                        for s in sp) + " | per-sample rho vs realism |",
              "|---" * (2 + len(sp)) + "|"]
    for r in REWARDS:
        c = corr[r]
        if c.get("constant"):
            lines.append(f"| {r} | " + " | ".join("constant over policies" for _ in sp)
                         + f" | {c['samples']['rho']:+.3f} {_ci(c['samples']['ci'], 3)} |")
            continue
        lines.append(f"| {r} | " + " | ".join(f"{c['policies'][s]['rho']:+.2f} {_ci(c['policies'][s]['ci'])}" for s in sp)
                     + f" | {c['samples']['rho']:+.3f} {_ci(c['samples']['ci'], 3)} |")
    if "codec_signature" in res:
        c = res["codec_signature"]
        lines += ["", f"The codec's signature: the discriminator's network, trained on half of the train split against "
                      f"the VQ reconstructions of the same images, tells the other half from their reconstructions "
                      f"with held-out accuracy {c['heldout_accuracy']:.3f} (log-odds {c['log_odds_real']:+.2f} real, "
                      f"{c['log_odds_reconstruction']:+.2f} reconstructed; {c['num_heldout']} pairs)."]
    if res["skipped"]:
        lines += ["", f"Not scored: {', '.join(res['skipped'])} (ground-truth orders or parallel schedules)."]
    lines.append("")
    return "\n".join(lines)
