"""`scripts/evaluate.py`: every policy on one backbone, one set of held-out images, one set of class
labels and sampler seeds; one results table.

Per policy (DESIGN.md section 7):
* teacher-forced, on the first `eval.num_images` held-out images (class-interleaved order):
  discounted return under each reward in `eval.rewards` (gamma per block, nats), order NLL
  (bits/token), area under the remaining-loss curve (nats/token); oracle agreement and regret
  (nats) on the first `eval.agreement_images` of them (one batched oracle pass per decision);
* generation mode, `eval.num_samples` samples (sample i conditioned on the label of held-out image
  i mod M, sampler reseeded per batch): FID with its bootstrap interval, KID mean and std, and the
  feature classifier's accuracy against the conditioning labels. FID at different N is not
  comparable: results always carry N.

The FID noise floor is measured at the policies' N: the FID between the reference set and a second,
disjoint set of N = `eval.num_samples` real images (reference = the embedded held-out split: the
first N train images in class-interleaved order), the comparison a policy's FID makes with its N
samples. Where no such set is at hand (an .npz or image-folder reference) it falls back to two halves
of the reference set, labelled in results.json (`fid_noise_floor_method`) as an estimate at N/2.
Held-out images, their class balance and the second real set all come from one rule,
`rollouts.balanced_images`.

Imports backbone/, envs/, agents.planner and agents.evaluation; never agents.training.

Outputs in run_dir: results.json, results.md, PNGs (samples_<policy>.png, progressive_<policy>.png,
order_heatmaps.png, remaining_loss.png) and, with eval.npz=true, samples_<policy>.npz for the ADM
evaluator.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from agents.evaluation import plots as eval_plots
from agents.evaluation.rollouts import balanced_images, generate_samples, order_of, teacher_forced_metrics
from agents.evaluation.report import oracle_comparison
from agents.evaluation.fid import (bootstrap_interval, export_npz, extract_features, frechet_distance, kernel_distance,
                                   load_npz_images, noise_floor)
from agents.planner.orderhead import load_orderhead
from agents.planner.policies import BELIEF_POLICIES, FIXED_ORDERS, BlockPolicy, FixedOrderPolicy, make_policy
from backbone.checkpoint import atomic_write_bytes, atomic_write_json
from backbone.config import BackboneConfig, RunConfig, resolve_path
from backbone.data import ImageFolderDataset, images_to_model, load_embedded_mnist
from backbone.loading import Backbone, build_backbone, load_token_data
from backbone.run_utils import Logger, progress, setup_device
from backbone.sampling import SamplingConfig
from envs.core import REWARDS, EnvConfig, OrderPlanningCore

ORACLES = {"oracle": "future_loss", "oracle_extrapolative": "extrapolative"}


@dataclass
class EvalOptions:
    num_samples: int = 500  # generated images per policy (FID's N)
    num_images: int = 200  # held-out images for the teacher-forced metrics
    batch_size: int = 100  # env rows per rollout batch
    gamma: float = 0.9  # discount per block of the reported returns
    reward: str = "future_loss"  # the reward behind the table's `return` column
    rewards: list[str] = field(default_factory=lambda: ["future_loss", "extrapolative", "anytime", "likelihood"])
    oracle_kind: str = "future_loss"  # utility behind oracle agreement / regret
    agreement_images: int = 100  # oracle agreement / regret on the first images (costliest metric); 0 = off
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0))
    R: int | None = None  # OrderHead latent reasoning steps (None = the checkpoint's)
    greedy: bool = True  # OrderHead: argmax (false: sample with the policy's seed)
    npz: bool = False  # also write samples_<policy>.npz (uint8 [N, H, W, 3] under arr_0)


@dataclass
class FeatureSpec:
    kind: str = "classifier"  # classifier (embedded MNIST) | inception (ImageNet, local weights)
    classifier_path: str | None = "artifacts/tiny_mnist/classifier.safetensors"
    inception_weights: str | None = None  # torch-fidelity's pt_inception-2015-12-05 weights file
    reference: str = "heldout"  # heldout (embedded MNIST held-out split) | ref.npz (ADM layout) | image folder
    reference_limit: int | None = None  # use at most this many reference images
    batch_size: int = 256


@dataclass
class StatsSpec:
    bootstrap: int = 100  # resamples for the FID interval
    level: float = 0.95
    kid_subsets: int = 50
    kid_subset_size: int = 100  # clipped to the smaller set; subsets of the whole set would have no spread


@dataclass
class PlotSpec:
    per_class: int = 8  # sample grid columns
    max_classes: int = 10
    heatmap_images: int = 4
    snapshot_samples: int = 8


@dataclass
class EvaluateRun(RunConfig):
    """Schema of configs/evaluate.yaml."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    policies: list[str] = field(default_factory=lambda: ["raster", "random", "oracle"])
    checkpoints: dict[str, str] = field(default_factory=lambda: {
        "bc": "runs/bc/tiny_mnist/orderhead.safetensors", "ppo": "runs/ppo/tiny_mnist/orderhead.safetensors"})
    eval: EvalOptions = field(default_factory=EvalOptions)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    stats: StatsSpec = field(default_factory=StatsSpec)
    plots: PlotSpec = field(default_factory=PlotSpec)
    run_dir: str = "runs/evaluate/tiny_mnist"


# -- policies ------------------------------------------------------------------------------------


@dataclass
class PolicySpec:
    """A policy of the table: how to build it on a core, and what it needs."""

    name: str
    make: Any  # (core) -> BlockPolicy
    budgets: list[int] | None = None  # router policies: the env's budget list
    ground_truth: bool = False  # oracles: generation mode replays a same-class held-out image's order
    source: str = ""
    beliefs: bool = False  # a planner that reads the env's belief features (its cores get env.beliefs=true)


def resolve_policy(entry: str, run: EvaluateRun, backbone: Backbone) -> PolicySpec:
    """`entry`: a registry name (raster, random, zigzag, ..., oracle, oracle_extrapolative), a key of
    `checkpoints` (bc, ppo, ...) or a path to an OrderHead .safetensors file."""
    if entry in FIXED_ORDERS:
        return PolicySpec(entry, lambda core: make_policy(entry, core), source="fixed order")
    if entry == "random":
        return PolicySpec(entry, lambda core: make_policy("random", core, seed=run.seed), source=f"seed {run.seed}")
    if entry in BELIEF_POLICIES:  # the model's own beliefs: no ground truth, so generation plays them live
        return PolicySpec(entry, lambda core: make_policy(entry, core), source="model beliefs")
    if entry in ORACLES:
        return PolicySpec(entry, lambda core: make_policy(entry, core), ground_truth=True,
                          source=f"argmax {ORACLES[entry]} utility")
    path_str = run.checkpoints.get(entry, entry if entry.endswith(".safetensors") else None)
    if path_str is None:
        raise ValueError(f"unknown policy {entry!r}: use a registry name ({', '.join(FIXED_ORDERS)}, random, "
                         f"{', '.join(BELIEF_POLICIES)}, {', '.join(ORACLES)}), a key of checkpoints ({', '.join(run.checkpoints)}) or a "
                         ".safetensors path")
    path = resolve_path(path_str, must_exist=False)
    if path is None or not path.is_file():
        hint = {"bc": "python scripts/bc.py", "ppo": "python scripts/ppo.py"}.get(entry, "train it first")
        raise FileNotFoundError(f"policy {entry!r}: no OrderHead checkpoint at {path_str} ({hint}, "
                                f"or set checkpoints.{entry}=PATH)")
    _check_same_backbone(entry, path, run.backbone)
    model = load_orderhead(path, hidden_dim=backbone.gpt.cfg.dim, geometry=backbone.geometry, device=backbone.device)
    name = entry if entry in run.checkpoints else (path.parent.name if path.stem == "orderhead" else path.stem)
    budgets = list(model.cfg.budgets) if model.has_router else None

    def make(core: OrderPlanningCore) -> BlockPolicy:
        return make_policy("orderhead", core, model=model, R=run.eval.R, greedy=run.eval.greedy, seed=run.seed)

    return PolicySpec(name, make, budgets=budgets, source=str(path), beliefs=model.cfg.beliefs)


def _check_same_backbone(entry: str, path: Path, backbone: BackboneConfig) -> None:
    """A planner trained with BC joint tuning (bc.joint.top_n > 0) belongs to its tuned GPT: the BC run
    dir holds it as gpt.safetensors, a PPO run started from it names it in summary.json. The table
    compares policies on one backbone, so that backbone must be the one in use."""
    tuned = path.parent / "gpt.safetensors"
    summary = path.parent / "summary.json"
    if not tuned.is_file() and summary.is_file():
        named = json.loads(summary.read_text()).get("bc_tuned_backbone")
        tuned = Path(named) if named else tuned
    if not tuned.is_file():
        return
    used = resolve_path(backbone.gpt_weights, must_exist=False)
    if used is None or used.resolve() != tuned.resolve():
        raise ValueError(f"policy {entry!r} was trained on a jointly tuned backbone ({tuned}); evaluate every "
                         f"policy on it with backbone.gpt_weights={tuned}")


# -- reference set -------------------------------------------------------------------------------


def reference_images(run: EvaluateRun, image_size: int) -> torch.Tensor:
    """Real images float [M, C, H, W] in [-1, 1] that FID compares against (image folders are
    centre-cropped to `image_size`, as LlamaGen preprocesses them)."""
    ref, limit = run.features.reference, run.features.reference_limit
    if ref == "heldout":
        if run.backbone.data.kind != "mnist_embedded":
            raise ValueError("features.reference=heldout is only defined for the embedded MNIST data; for "
                             "ImageNet give an ADM reference batch (features.reference=/path/VIRTUAL_imagenet256"
                             "_labeled.npz) or an image folder")
        images = images_to_model(load_embedded_mnist("heldout")[0])
    else:
        path = resolve_path(ref, must_exist=True, what="reference set")
        if path.suffix == ".npz":
            images = load_npz_images(path)
        else:
            ds = ImageFolderDataset(path, image_size=image_size)
            n = len(ds) if limit is None else min(limit, len(ds))
            images = torch.stack([ds[i][0] for i in progress(range(n), desc="reference images")])
    return images[:limit] if limit is not None else images


def second_real_images(run: EvaluateRun, n: int) -> torch.Tensor | None:
    """n real images float [n, C, H, W] in [-1, 1] disjoint from the reference set, for the noise floor
    at the policies' N: with the embedded held-out split as reference, the first n train-split images
    in class-interleaved order (`balanced_images`, the rule that picks the held-out images). None
    when no such set is at hand (another reference, or n above the train split's size)."""
    if run.features.reference != "heldout" or run.backbone.data.kind != "mnist_embedded":
        return None
    train, train_labels = load_embedded_mnist("train")
    if n > len(train_labels):
        return None
    return images_to_model(train[balanced_images(torch.as_tensor(train_labels), n).numpy()])


# -- the run -------------------------------------------------------------------------------------


def _fid_stats(real: torch.Tensor, fake: torch.Tensor, stats: StatsSpec, seed: int) -> dict:
    kid_mean, kid_std, kid_size = kernel_distance(real, fake, stats.kid_subsets, stats.kid_subset_size, seed)
    lo, hi = bootstrap_interval(frechet_distance, real, fake, stats.bootstrap, stats.level, seed)
    return {"fid": frechet_distance(real, fake), "fid_ci": [lo, hi], "kid_mean": kid_mean, "kid_std": kid_std,
            "kid_subset_size": kid_size}


def run_evaluation(run: EvaluateRun) -> dict:
    """Evaluate every policy of `run.policies`; write results.json / results.md / PNGs in run_dir."""
    from agents.evaluation.feature_net import make_feature_extractor  # torchmetrics' inception import is heavy

    t_start = time.time()
    ev, device, run_dir = run.eval, setup_device(run.device), Path(run.run_dir)
    if ev.reward not in ev.rewards:
        raise ValueError(f"eval.reward={ev.reward!r} must be one of eval.rewards {ev.rewards}")
    bad = [r for r in ev.rewards if r not in REWARDS or r == "entropy"]
    if bad:
        raise ValueError(f"eval.rewards: {bad} are not teacher-forced rewards; choose from "
                         f"{[r for r in REWARDS if r != 'entropy']}")
    if ev.num_samples < 2 or ev.num_images < 1:
        raise ValueError("eval.num_samples must be >= 2 and eval.num_images >= 1")
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(run, run_dir, job="evaluate")
    torch.manual_seed(run.seed)

    bb = build_backbone(run.backbone, device=device)
    codes, labels = load_token_data(run.backbone, "heldout")
    images = balanced_images(labels)  # [M] class-interleaved: any prefix covers every class
    specs = [resolve_policy(p, run, bb) for p in run.policies]  # fail on a bad name before any work
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"policy names must be unique, got {[s.name for s in specs]}")
    n_tf = min(ev.num_images, len(images))
    n_agree = min(ev.agreement_images, n_tf)
    n_orders = min(max(n_tf, ev.num_samples), len(images))  # orders the oracles replay in generation mode
    gen_labels = labels[images[torch.arange(ev.num_samples) % len(images)]]
    env_tf = replace(run.env, mode="teacher_forced", split="heldout", reward=ev.reward, decision_cost=0.0)
    env_gen = replace(run.env, sampling=ev.sampling)

    extractor = make_feature_extractor(run.features.kind, run.features.classifier_path, run.features.inception_weights)
    extractor = extractor.to(device).eval()
    ref = reference_images(run, bb.gpt.cfg.grid_h * (bb.vq.config.downsample_factor if bb.vq is not None else 1))
    real = extract_features(extractor, ref, run.features.batch_size, device)
    second = second_real_images(run, ev.num_samples)
    floor = noise_floor(real, None if second is None else
                        extract_features(extractor, second, run.features.batch_size, device), run.seed)
    classify = getattr(extractor, "classify", None) if run.features.kind == "classifier" else None

    results: dict = {"num_samples": ev.num_samples, "fid_noise_floor": floor.fid, "fid_noise_floor_n": floor.n,
                     "fid_noise_floor_method": floor.method, "fid_noise_floor_description": floor.description,
                     "num_reference": len(real), "num_images_teacher_forced": n_tf,
                     "num_images_agreement": n_agree, "gamma": ev.gamma,
                     "reward": ev.reward, "features": run.features.kind, "sampling": vars(ev.sampling),
                     "backbone": run.backbone.name, "seed": run.seed, "policies": {}}
    orders_for_heatmap, curves = {}, {}
    for spec in specs:
        t0 = time.time()
        print(f"[evaluate] {spec.name}: teacher-forced rollouts on {n_tf} held-out images", flush=True)
        tf_env = replace(env_tf, budget=spec.budgets, beliefs=env_tf.beliefs or spec.beliefs)
        tf_core = OrderPlanningCore(bb, codes, labels, tf_env, ev.batch_size, seed=run.seed)
        blocks, decisions = order_of(spec.make, tf_core, images[:n_orders if spec.ground_truth else n_tf])
        tf = teacher_forced_metrics(blocks[:n_tf], bb, codes, labels, env_tf, ev.rewards, ev.gamma, ev.batch_size,
                                    image_index=images[:n_tf])
        row: dict = {"return": tf["returns"][ev.reward], "returns": tf["returns"],
                     "order_nll_bits": tf["order_nll_bits"], "auc_remaining_loss": tf["auc_remaining_loss"],
                     "decisions_per_episode": float(decisions[:n_tf].double().mean()), "source": spec.source}
        if n_agree > 0:  # measured for every policy, the oracles too (a check of the oracle policy itself)
            row.update(oracle_comparison(spec.make(tf_core), tf_core, images[:n_agree], ev.oracle_kind))
        orders_for_heatmap[spec.name] = blocks[:run.plots.heatmap_images]
        curves[spec.name] = tf["remaining_curve"]

        make_gen = (lambda core, b=blocks: FixedOrderPolicy(b)) if spec.ground_truth else spec.make
        gen_env = replace(env_gen, budget=spec.budgets, beliefs=env_gen.beliefs or spec.beliefs)
        samples = generate_samples(make_gen, bb, gen_labels, gen_env, ev.batch_size, run.seed,
                                   num_snapshots=run.plots.snapshot_samples,
                                   progress_bar=lambda it, n=spec.name: progress(it, desc=f"{n}: generating"))
        fake = extract_features(extractor, samples.images, run.features.batch_size, device)
        row.update(_fid_stats(real, fake, run.stats, run.seed))
        if classify is not None:
            with torch.no_grad():
                pred = torch.cat([classify(b.to(device)).argmax(-1).cpu()
                                  for b in samples.images.split(run.features.batch_size)])
            row["class_acc"] = float((pred == samples.labels).double().mean())
        else:
            row["class_acc"] = None
        row["entropy_return"] = float(samples.entropy_return.mean())
        row["seconds"] = round(time.time() - t0, 1)
        results["policies"][spec.name] = row
        logger.log({f"{spec.name}/{k}": v for k, v in row.items() if isinstance(v, float)}, step=0)

        eval_plots.sample_grid(run_dir / f"samples_{spec.name}.png", samples.images, samples.labels,
                               f"{spec.name}: generated samples (N={ev.num_samples})", run.plots.per_class,
                               run.plots.max_classes)
        eval_plots.progressive_snapshots(run_dir / f"progressive_{spec.name}.png", samples.snapshots,
                                         samples.snapshot_masks, bb.geometry, samples.fractions,
                                         f"{spec.name}: generation in progress")
        if ev.npz:
            export_npz(run_dir / f"samples_{spec.name}.npz", samples.images)
        print(f"[evaluate] {spec.name}: FID {row['fid']:.3f} (N={ev.num_samples}), return {row['return']:.2f}, "
              f"order NLL {row['order_nll_bits']:.3f} bits/token ({row['seconds']} s)", flush=True)

    heat_imgs = bb.vq.decode_codes(codes[images[:run.plots.heatmap_images]].to(device).view(
        -1, bb.gpt.cfg.grid_h, bb.gpt.cfg.grid_w)).float().cpu() if bb.vq is not None else None
    if heat_imgs is not None:
        eval_plots.order_heatmaps(run_dir / "order_heatmaps.png", orders_for_heatmap, heat_imgs, bb.geometry)
    eval_plots.remaining_loss_curves(run_dir / "remaining_loss.png", curves, "remaining loss L_rest / L (nats/token)")
    results["remaining_curves"] = curves
    results["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_bytes(run_dir / "results.md", results_markdown(results).encode())
    logger.close()
    print(results_markdown(results))
    return results


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def results_markdown(results: dict) -> str:
    """One row per policy; every FID in it is at N = num_samples."""
    n = results["num_samples"]
    lines = [
        f"# Evaluation: {results['backbone']}",
        "",
        f"- generated samples per policy N = {n} (FID at different N is not comparable); features: "
        f"{results['features']}; reference images: {results['num_reference']}",
        f"- FID noise floor {results['fid_noise_floor']:.3f} at N = {results['fid_noise_floor_n']} "
        f"({results['fid_noise_floor_description']})",
        f"- teacher-forced metrics on {results['num_images_teacher_forced']} held-out images; return = discounted "
        f"{results['reward']} return (gamma {results['gamma']} per block, nats); oracle agreement on the first "
        f"{results['num_images_agreement']}",
        f"- sampling: {json.dumps(results['sampling'])}; seed {results['seed']}; sample i is conditioned on the "
        "label of held-out image i (class-interleaved order)",
        "- oracles need ground truth: in generation mode they replay their teacher-forced order of the held-out "
        "image whose label conditions the sample",
        "",
        "| policy | FID | FID CI | KID | class acc | order NLL (bits/token) | return | AUC L_rest (nats/token) "
        "| oracle agreement | decisions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["policies"].items():
        lo, hi = r["fid_ci"]
        lines.append(
            f"| {name} | {r['fid']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['kid_mean']:.3g} ± {r['kid_std']:.2g} "
            f"| {_fmt(r['class_acc'], 3)} | {r['order_nll_bits']:.4f} | {r['return']:.2f} | "
            f"{r['auc_remaining_loss']:.4f} | {_fmt(r.get('oracle_agreement'), 3)} | {r['decisions_per_episode']:.1f} |")
    lines.append("")
    return "\n".join(lines)
