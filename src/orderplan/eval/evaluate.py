"""`scripts/evaluate.py`: every policy on one backbone, one set of held-out images, one set of class
labels and sampler seeds; one results table.

Per policy (DESIGN.md section 7):
* teacher-forced, on the first `eval.num_images` held-out images (class-interleaved order; 0 = skip):
  discounted return under each reward in `eval.rewards` (gamma per block, nats), order NLL
  (bits/token), area under the remaining-loss curve (nats/token); oracle agreement and regret
  (nats) on the first `eval.agreement_images` of them (one batched oracle pass per decision);
* generation mode, N = `eval.num_samples` samples (`eval.policy_samples` may lower one policy's N,
  e.g. the costly expected_oracle), sample i conditioned on the label of held-out image i mod M
  (class-interleaved, so any prefix is class-balanced), batch j of sampler seed s seeded
  seed + 100003 s + j: every policy gets the same labels and sampler streams (the paired design).
  Against the reference features (features.reference, default the 4,500-image train split, the FID
  convention; features.second_reference adds a second FID column, default the held-out split):
  FID with a bootstrap interval, KID, precision and recall (k-NN manifolds, Kynkaanniemi et al.
  2019) with intervals, the classifier's accuracy and mean log p(conditioning class | sample) with an
  interval, FID against N (prefixes), and `fid_seeds`: S = len(eval.sampler_seeds) FIDs of
  independent sample sets of the same labels at N = eval.seed_samples, the spread that matters when
  two FIDs are compared. eval.seed_sets=chunks (default) takes the S disjoint chunks of the main set:
  batch j of a set has its own sampler seed (and the policy its own reseed), so chunk s is an
  independent draw, and it costs nothing; eval.seed_sets=extra generates a set per further seed in
  eval.sampler_seeds (seed s: batch j seeded seed + 100003 s + j; the first seed's set is reused).
  After all policies: dFID against each of `eval.dfid_baselines` with a paired bootstrap interval
  (src/orderplan/eval/sample_metrics.py), and the verdict: is the best learned planner's FID below,
  above or not separated from each baseline's.

Generation cost: policies whose order is fixed before the episode (fixed orders, random, the oracles'
replayed orders) are decoded in one KV-cached pass per batch; planners step the env, whose per-token
query runs only where beliefs are read (src/orderplan/eval/rollouts.py).

Under torchrun: every rank generates its whole sampler batches of each sample set and rank 0 gathers
the features in sample order (src/orderplan/eval/sharding.py); the oracles' teacher-forced orders,
which generation replays, are played the same way, by whole batches on every rank; rank 0 runs
everything else and writes every file. The results equal one process's exactly, whatever the number of ranks.


Outputs in run_dir: results.json, results.md, PNGs (samples_side_by_side.png, fid_vs_n.png,
reveal_time_heatmaps.png, samples_<policy>.png, progressive_<policy>.png, order_heatmaps.png,
remaining_loss.png) and, with eval.npz=true, samples_<policy>.npz for the ADM evaluator."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orderplan.eval import plots as eval_plots
from orderplan.eval.rollouts import balanced_images, order_of, teacher_forced_metrics
from orderplan.eval.report import oracle_comparison
from orderplan.eval.feature_spaces import FeatureSpaces, PixelPCA, build_space, check_spaces, default_spaces
from orderplan.eval.fid import export_npz, extract_features, kernel_distance, load_npz_images, noise_floor
from orderplan.eval.sample_metrics import (class_logprob, fid_curve, fid_with_interval, frechet_from_features,
                                              knn_radii, mean_interval, paired_fid_delta, precision_recall)
from orderplan.eval.sharding import SampleSet, figure_indices, generate_sharded, orders_sharded
from orderplan.planner.orderhead import load_orderhead
from orderplan.model.parallel import ParallelSchedule
from orderplan.planner.policies import BELIEF_POLICIES, FIXED_ORDERS, BlockPolicy, FixedOrderPolicy, make_policy
from orderplan.infra.integrity import read_json_checked
from orderplan.infra.checkpoint import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_cache, sha256_file
from orderplan.config.common import BackboneConfig, RunConfig, check_run_config
from orderplan.infra.paths import resolve_path
from orderplan.model.loading import check_backbone_config
from orderplan.data.datasets import ImageFolderDataset, images_to_model, load_embedded_mnist
from orderplan.infra.cpu_heap import keep_freed_heap_memory
from orderplan.infra.distributed import DistContext, broadcast_object, close_distributed, init_distributed
from orderplan.model.loading import Backbone, backbone_identity, build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.infra.run_utils import Logger, job_dir, progress
from orderplan.model.sampling import SamplingConfig, check_sampling
from orderplan.infra.seeding import isolated_rng
from orderplan.infra.validation import check_choice, check_gamma, check_int, check_int_list, check_path_exists, check_range
from orderplan.env.core import EnvConfig, OrderPlanningCore, REWARDS, check_env_config
from orderplan.env.rewards import GAMMA

ORACLES = {"oracle": "future_loss", "oracle_extrapolative": "extrapolative"}


@dataclass
class EvalOptions:
    # generated images per policy (FID's N, always reported) under the first sampler seed; 0 = teacher-forced only
    num_samples: int = 5000
    num_images: int = 200  # held-out images for the teacher-forced metrics (0 = generation only)
    batch_size: int = 100  # env rows per teacher-forced rollout batch
    gen_batch_size: int = 500  # rows per generation batch (batch j of sampler seed s is seeded seed + 100003 s + j)
    sampler_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fid_seeds: one FID per seed
    seed_samples: int | None = None  # N of fid_seeds (None = num_samples, or num_samples / seeds for chunks)
    # where fid_seeds' sets come from: chunks = disjoint chunks of the main set (free: every generation
    # batch has its own sampler seed, so the chunks are independent draws); extra = one more sample set
    # per further sampler seed (the first seed's set is reused)
    seed_sets: str = "chunks"
    # per-policy N, e.g. {expected_oracle: 500} (its cost: ~35 backbone forwards per decision)
    policy_samples: dict[str, int] = field(default_factory=dict)
    # N of the FID-vs-N curve (prefixes of the main set)
    fid_curve: list[int] = field(default_factory=lambda: [250, 500, 1000, 2000, 5000])
    # the paired dFID columns: each policy against these (those in `policies`)
    dfid_baselines: list[str] = field(default_factory=lambda: ["raster", "random", "confident_first"])
    gamma: float = GAMMA  # discount per block of the reported returns (orderplan.env.rewards.GAMMA)
    reward: str = "future_loss"  # the reward behind the table's `return` column
    rewards: list[str] = field(default_factory=lambda: ["future_loss", "extrapolative", "anytime", "likelihood"])
    oracle_kind: str = "future_loss"  # utility behind oracle agreement / regret
    agreement_images: int = 100  # oracle agreement / regret on the first images (costliest metric); 0 = off
    # generation mode (LlamaGen's knobs)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0))
    R: int | None = None  # OrderHead latent reasoning steps (None = the checkpoint's)
    greedy: bool = True  # OrderHead: argmax (false: sample with the policy's seed)
    npz: bool = False  # also write samples_<policy>.npz for the ADM evaluator (uint8 [N, H, W, 3] under arr_0)


@dataclass
class FeatureSpec:
    # classifier (embedded MNIST) | inception (ImageNet, local weights; pip install -e ".[inception]")
    kind: str = "classifier"
    classifier_path: str | None = "artifacts/tiny_mnist/classifier.safetensors"  # scripts/train_classifier.py
    # a local copy of torch-fidelity's pt_inception-2015-12-05-6726825d.pth weights file; nothing downloads
    inception_weights: str | None = None
    reference: str = "train"  # train | heldout (embedded MNIST splits) | ref.npz (ADM layout) | image folder
    second_reference: str | None = "heldout"  # a second FID column (fid_<name>); null = none
    reference_limit: int | None = None  # use at most this many reference images
    batch_size: int = 256
    pr_k: int = 3  # k of the k-NN manifolds behind precision / recall
    # further feature spaces, each reported with FID, paired dFID, fid_seeds, precision and recall
    # (src/orderplan/eval/feature_spaces.py): autoencoder | pixel_pca | random_relu; null = every one that
    # fits the data (the digit autoencoder only with kind=classifier); [] = the primary space only
    spaces: list[str] | None = None
    # the space kept out of everything that is tuned (training, rewards, model selection): reported in
    # the final table only, and named there (null = none)
    held_out: str | None = "autoencoder"
    autoencoder_path: str | None = "artifacts/tiny_mnist/autoencoder.safetensors"  # scripts/train_autoencoder.py
    pca_components: int = 32  # pixel_pca: components fitted on the primary reference set
    random_seed: int = 0  # random_relu: the seed its weights are drawn from


@dataclass
class StatsSpec:
    bootstrap: int = 200  # resamples behind the FID intervals (fid_ci) and the paired dFID intervals
    level: float = 0.95
    kid_subsets: int = 50
    # clipped to the smaller set; subsets of the whole set would have no spread (ADM uses 1000 of 50k samples)
    kid_subset_size: int = 100


@dataclass
class PlotSpec:
    per_class: int = 8  # sample grid columns
    max_classes: int = 10
    heatmap_images: int = 4
    snapshot_samples: int = 8
    column_rows: int = 10  # rows of samples_side_by_side.png (samples of the same labels and seeds)


@dataclass
class EvaluateRun(RunConfig):
    """Schema of the evaluate job (preset src/orderplan/configs/evaluate.yaml; `python scripts/evaluate.py
    key=value ...`); every default lives here. Every policy on the same backbone, held-out images, class
    labels and sampler seeds; one table."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    # registry names (raster, random, zigzag, diagonal, spiral, center_spiral, column_major, reverse,
    # confident_first, uncertain_first, expected_oracle, oracle, oracle_extrapolative), keys of `checkpoints`,
    # or paths to OrderHead .safetensors files
    policies: list[str] = field(default_factory=lambda: ["raster", "random", "oracle"])
    # policy name -> OrderHead .safetensors (where `policies: [bc, ppo]` find their heads)
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
    schedule: ParallelSchedule | None = None  # a parallel-decoding schedule (generation only)
    parallel: bool = False  # a planner trained with env.parallel: it generates with parallel decoding too


def resolve_policy(entry: str, run: EvaluateRun, backbone: Backbone) -> PolicySpec:
    """`entry`: a registry name (raster, random, zigzag, ..., oracle, oracle_extrapolative), a key of
    `checkpoints` (bc, ppo, ...) or a path to an OrderHead .safetensors file."""
    if entry in FIXED_ORDERS:
        return PolicySpec(entry, lambda core: make_policy(entry, core), source="fixed order")
    schedule = ParallelSchedule.parse(entry)
    if schedule is not None:  # generation only: a schedule samples tokens, it has no teacher-forced row
        return PolicySpec(entry, lambda core: make_policy(entry, core, seed=run.seed), schedule=schedule,
                          source=f"parallel decoding, {schedule.steps} forwards ({schedule.kind} sizes)")
    if entry == "random":
        return PolicySpec(entry, lambda core: make_policy("random", core, seed=run.seed), source=f"seed {run.seed}")
    if entry in BELIEF_POLICIES:  # the model's own beliefs: no ground truth, so generation plays them live
        kw = {"seed": run.seed} if entry == "confident_sampled" else {}  # the sampled one draws from run.seed
        return PolicySpec(entry, lambda core: make_policy(entry, core, **kw), source="model beliefs")
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
    model = load_orderhead(path, hidden_dim=backbone.gpt.cfg.dim, geometry=backbone.geometry, device=backbone.device,
                           backbone=run.backbone)
    name = entry if entry in run.checkpoints else (path.parent.name if path.stem == "orderhead" else path.stem)
    budgets = list(model.cfg.budgets) if model.has_router else None
    summary = path.parent / "summary.json"
    parallel = bool(read_json_checked(summary, required=False).get("train_parallel", False)) if summary.is_file() else False

    def make(core: OrderPlanningCore) -> BlockPolicy:
        return make_policy("orderhead", core, model=model, R=run.eval.R, greedy=run.eval.greedy, seed=run.seed)

    return PolicySpec(name, make, budgets=budgets, source=str(path) + (" (parallel decoding)" if parallel else ""),
                      beliefs=model.cfg.beliefs, parallel=parallel)


def generation_env(spec: PolicySpec, run: EvaluateRun) -> EnvConfig:
    """The env a policy generates in: the run's env with eval.sampling, the policy's budgets,
    for planners that read them the belief features, and for planners trained with env.parallel
    parallel decoding (a decision's tokens sampled together, one forward per decision)."""
    env = replace(run.env, sampling=run.eval.sampling, budget=spec.budgets, beliefs=run.env.beliefs or spec.beliefs)
    return replace(env, parallel=True, query="full") if spec.parallel else env


def generation_labels(labels: torch.Tensor, images: torch.Tensor, n: int) -> torch.Tensor:
    """Class labels [n] of generated samples: sample i takes the label of held-out image images[i mod M]
    (`balanced_images` order, so every prefix is class-balanced)."""
    return labels[images[torch.arange(n) % len(images)]]


def _check_same_backbone(entry: str, path: Path, backbone: BackboneConfig) -> None:
    """A planner trained with BC joint tuning (bc.joint.top_n > 0) belongs to its tuned GPT: the BC run
    dir holds it as gpt.safetensors, a PPO run started from it names it in summary.json. The table
    compares policies on one backbone, so that backbone must be the one in use."""
    tuned = path.parent / "gpt.safetensors"
    summary = path.parent / "summary.json"
    if not tuned.is_file() and summary.is_file():
        named = read_json_checked(summary, required=False).get("bc_tuned_backbone")
        tuned = Path(named) if named else tuned
    if not tuned.is_file():
        return
    used = resolve_path(backbone.gpt_weights, must_exist=False)
    if used is None or used.resolve() != tuned.resolve():
        raise ValueError(f"policy {entry!r} was trained on a jointly tuned backbone ({tuned}); evaluate every "
                         f"policy on it with backbone.gpt_weights={tuned}")


# -- reference sets ------------------------------------------------------------------------------


def reference_images(run: EvaluateRun, image_size: int, ref: str | None = None) -> torch.Tensor:
    """Real images float [M, C, H, W] in [-1, 1] that FID compares against: `ref` (default
    features.reference) is train / heldout (the embedded MNIST splits, in class-interleaved order), an
    ADM .npz batch or an image folder (centre-cropped to `image_size`, as LlamaGen preprocesses)."""
    ref = run.features.reference if ref is None else ref
    limit = run.features.reference_limit
    if ref in ("train", "heldout"):
        if run.backbone.data.kind != "mnist_embedded":
            raise ValueError(f"features.reference={ref} is only defined for the embedded MNIST data; for "
                             "ImageNet give an ADM reference batch (features.reference=/path/VIRTUAL_imagenet256"
                             "_labeled.npz) or an image folder")
        images, labels = load_embedded_mnist(ref)
        images = images_to_model(images[balanced_images(torch.as_tensor(labels)).numpy()])
    else:
        path = resolve_path(ref, must_exist=True, what="reference set")
        if path.suffix == ".npz":
            images = load_npz_images(path)
        else:
            ds = ImageFolderDataset(path, image_size=image_size)
            n = len(ds) if limit is None else min(limit, len(ds))
            images = torch.stack([ds[i][0] for i in progress(range(n), desc="reference images")])
    return images[:limit] if limit is not None else images


def reference_name(ref: str) -> str:
    """Short name of a reference set for result keys (fid_heldout, fid_train, fid_ref_batch)."""
    return ref if ref in ("train", "heldout") else Path(ref).stem


def feature_space_names(fs: FeatureSpec) -> list[str]:
    """The extra feature spaces of a run (`features.spaces`, null = every one that fits the data)."""
    return default_spaces(fs.kind) if fs.spaces is None else list(fs.spaces)


def build_feature_spaces(run: EvaluateRun, side: int, ctx: DistContext) -> tuple[FeatureSpaces, torch.Tensor | None]:
    """Every rank's feature extractor: the primary network (features.kind) first, then the extra
    spaces. pixel_pca is fitted on rank 0 from the primary reference set and broadcast, so every
    rank extracts in the same space. Returns (the extractor in eval mode on ctx.device, the
    reference images on rank 0 / None elsewhere)."""
    from orderplan.eval.feature_net import make_feature_extractor  # torchmetrics' inception import is heavy

    fs = run.features
    names = feature_space_names(fs)
    ref_images = reference_images(run, side) if ctx.main else None
    pca = None
    if "pixel_pca" in names:
        pca = broadcast_object(PixelPCA(fs.pca_components).fit(ref_images).state() if ctx.main else None, ctx)
    spaces = {fs.kind: make_feature_extractor(fs.kind, fs.classifier_path, fs.inception_weights)}
    for name in names:
        spaces[name] = build_space(name, autoencoder_path=fs.autoencoder_path, pca_state=pca, seed=fs.random_seed)
    return FeatureSpaces(spaces).to(ctx.device).eval(), ref_images


# -- one policy ----------------------------------------------------------------------------------


@dataclass
class Generated:
    """What the run keeps of one policy's main sample set (sampler seed sampler_seeds[0])."""

    features: torch.Tensor  # [N, F] float64 features of every space side by side (FeatureSpaces.split)
    images: torch.Tensor  # [R, C, H, W] the first plots.column_rows samples
    orders: torch.Tensor  # [N, N_blocks] reveal orders


def policy_identity(spec: PolicySpec, run: EvaluateRun) -> str:
    """Everything that shapes one policy's row (its source and checkpoint by sha256, its N, the
    backbone weights by sha256, the env, eval, feature and statistics settings), as a JSON string: a
    rerun reuses a finished policy only when this is unchanged. Not in it: the list of policies and
    the dFID baselines, computed over all policies after the loop."""
    ev = {k: v for k, v in asdict(run.eval).items() if k not in ("policy_samples", "dfid_baselines")}
    ev["n"] = int(run.eval.policy_samples.get(spec.name, run.eval.num_samples))
    if LEARNED_SOURCES not in spec.source:  # eval.greedy and eval.R shape an OrderHead's row only:
        ev["greedy"], ev["R"] = EvalOptions.greedy, EvalOptions.R  # the others' rows are reused across them
    src = Path(spec.source)
    gpt = resolve_path(run.backbone.gpt_weights, must_exist=False) if run.backbone.gpt_weights else None
    return json.dumps({"policy": spec.name, "source": spec.source,
                       "sha256": sha256_file(src) if spec.source.endswith(".safetensors") and src.is_file() else None,
                       "gpt_sha256": sha256_file(gpt) if gpt is not None and gpt.is_file() else None,
                       "backbone": backbone_identity(run.backbone, run.device),
                       # oracle_chunk bounds memory and leaves every number unchanged
                       "env": {**asdict(run.env), "oracle_chunk": None}, "eval": ev,
                       "features": asdict(run.features), "stats": asdict(run.stats),
                       "column_rows": run.plots.column_rows, "heatmap_images": run.plots.heatmap_images,
                       "seed": run.seed, "device": run.device}, sort_keys=True, default=str)


def _load_policy(path: Path, identity: str) -> dict | None:
    """A policy's cached row and sample features from an earlier run, when the file is intact and its
    identity matches (else None: recomputed)."""
    return load_cache(path, identity, "[evaluate]")


def seed_set_size(ev: EvalOptions, n: int) -> int:
    """N of each fid_seeds set of a policy with n samples: eval.seed_samples (None = as large as
    possible), at most n, and for seed_sets=chunks at most n // S (S chunks of the main set)."""
    most = n // len(ev.sampler_seeds) if ev.seed_sets == "chunks" else n
    return min(most, ev.seed_samples or most)


def _sampler_seed(run: EvaluateRun, s: int) -> int:
    # batch j of a set is seeded base + j: distinct streams per sampler seed while batches < 100003
    return run.seed + 100003 * int(s)


def _teacher_forced_envs(spec: PolicySpec, run: EvaluateRun) -> tuple[EnvConfig, EnvConfig]:
    """(the env the orders are replayed in under each reward, the env the policy plays in)."""
    env_tf = replace(run.env, mode="teacher_forced", split="heldout", reward=run.eval.reward, decision_cost=0.0)
    return env_tf, replace(env_tf, budget=spec.budgets, beliefs=env_tf.beliefs or spec.beliefs)


def _oracle_orders(spec: PolicySpec, run: EvaluateRun, bb: Backbone, codes: torch.Tensor, labels: torch.Tensor,
                   images: torch.Tensor, n_orders: int, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """A ground-truth policy's teacher-forced orders [n_orders, N] and decisions [n_orders] of the first
    n_orders held-out images, which generation replays: every rank plays its whole batches (the
    oracle's cost) and all ranks get them all, equal to one process's."""
    tf_env = _teacher_forced_envs(spec, run)[1]
    return orders_sharded(spec.make, lambda: OrderPlanningCore(bb, codes, labels, tf_env, run.eval.batch_size,
                                                               seed=run.seed), images[:n_orders], run.eval.batch_size, ctx)


def _teacher_forced_row(spec: PolicySpec, run: EvaluateRun, bb: Backbone, codes: torch.Tensor, labels: torch.Tensor,
                        images: torch.Tensor, n_tf: int, n_agree: int, n_orders: int,
                        played: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict, torch.Tensor, list]:
    """Teacher-forced metrics on the first n_tf held-out images (module doc); returns (row, the block
    orders [n_orders or n_tf, N] the policy played, the remaining-loss curve). `played`: the
    (orders, decisions) of a ground-truth policy on the first n_orders images, already played."""
    ev = run.eval
    if spec.schedule is not None:  # samples tokens, not blocks: nothing to replay teacher-forced
        return {}, torch.zeros(0, bb.geometry.num_blocks, dtype=torch.long), []
    env_tf, tf_env = _teacher_forced_envs(spec, run)
    n_play = n_orders if spec.ground_truth else n_tf
    if n_play == 0:
        return {}, torch.zeros(0, bb.geometry.num_blocks, dtype=torch.long), []
    tf_core = None if played is not None and n_tf == 0 else OrderPlanningCore(bb, codes, labels, tf_env,
                                                                              ev.batch_size, seed=run.seed)
    blocks, decisions = order_of(spec.make, tf_core, images[:n_play]) if played is None else played
    if n_tf == 0:
        return {}, blocks, []
    tf = teacher_forced_metrics(blocks[:n_tf], bb, codes, labels, env_tf, ev.rewards, ev.gamma, ev.batch_size,
                                image_index=images[:n_tf])
    row: dict = {"return": tf["returns"][ev.reward], "returns": tf["returns"],
                 "order_nll_bits": tf["order_nll_bits"], "auc_remaining_loss": tf["auc_remaining_loss"],
                 "decisions_per_episode": float(decisions[:n_tf].double().mean())}
    if n_agree > 0:  # measured for every policy, the oracles too (a check of the oracle policy itself)
        row.update(oracle_comparison(spec.make(tf_core), tf_core, images[:n_agree], ev.oracle_kind))
    return row, blocks, tf["remaining_curve"]


def _generate(spec: PolicySpec, run: EvaluateRun, bb: Backbone, gen_labels: torch.Tensor, blocks: torch.Tensor,
              seed: int, n: int, extractor, ctx: DistContext, snapshots: int = 0,
              shown: torch.Tensor | None = None, npz: bool = False) -> SampleSet | None:
    """Samples 0..n-1 of sampler seed `seed`, this rank's batches of them (src/orderplan/eval/sharding.py),
    gathered on rank 0 (None on the others)."""
    ev = run.eval

    def make_at(lo: int):
        if spec.ground_truth:  # sample i replays blocks[i mod M]; the shard's core numbers its rows from lo
            return lambda core, b=blocks.roll(-lo, 0): FixedOrderPolicy(b)
        return spec.make

    return generate_sharded(make_at, bb, gen_labels[:n], generation_env(spec, run), ev.gen_batch_size, seed, ctx,
                            extractor, run.features.batch_size, shown=shown, num_snapshots=snapshots, npz=npz,
                            progress_bar=lambda it, name=spec.name: progress(it, desc=f"{name}: generating"))


def _generation_row(spec: PolicySpec, run: EvaluateRun, bb: Backbone, gen_labels: torch.Tensor, blocks: torch.Tensor,
                    refs: dict[str, torch.Tensor], radii: dict[str, torch.Tensor], extractor, run_dir: Path,
                    ctx: DistContext) -> tuple[dict, Generated] | tuple[None, None]:
    """Generation-mode metrics of one policy: its main set of N samples against the reference
    features refs[primary] (and a second reference), and one FID per sampler seed (module doc).
    Every rank generates its batches of each set; rank 0 computes the row, draws the figures and
    returns it ((None, None) on the others, whose `refs` may be empty). radii: knn_radii of the
    reference in each space (precision and recall), computed once per run."""
    ev, st = run.eval, run.stats
    n = int(ev.policy_samples.get(spec.name, ev.num_samples))
    n_seed = seed_set_size(ev, n)
    shown = figure_indices(gen_labels[:n], run.plots.per_class, run.plots.column_rows)
    samples = _generate(spec, run, bb, gen_labels, blocks, _sampler_seed(run, ev.sampler_seeds[0]), n, extractor, ctx,
                        run.plots.snapshot_samples, shown, ev.npz)
    extra = [] if ev.seed_sets == "chunks" else [
        _generate(spec, run, bb, gen_labels, blocks, _sampler_seed(run, s), n_seed, extractor, ctx)
        for s in ev.sampler_seeds[1:]]
    if samples is None:
        return None, None
    primary, real_all = next(iter(refs.items()))
    real_by, fake_by = extractor.split(real_all), extractor.split(samples.features)
    real, fake = real_by[extractor.primary], fake_by[extractor.primary]
    kid_mean, kid_std, kid_size = kernel_distance(real, fake, st.kid_subsets, st.kid_subset_size, run.seed)
    row: dict = {"num_samples": n, "fid_reference": primary,
                 "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": kid_size,
                 "generation_path": samples.path,
                 "decisions_per_sample": float(samples.decisions.double().mean()),
                 # sequential backbone forwards per image, and images per second of generation wall time
                 # (the slowest rank's, decoding to pixels included, features not), measured in this run
                 "forward_passes_per_image": float(samples.forwards.mean()),
                 "samples_per_s": n / max(samples.seconds, 1e-9)}
    for name, other in list(refs.items())[1:]:
        row[f"fid_{name}"] = frechet_from_features(extractor.split(other)[extractor.primary], fake)
    logits = sample_logits(extractor, samples.features)
    if logits is not None:
        logp = class_logprob(logits, samples.labels)
        mean, lo, hi = mean_interval(logp, seed=run.seed)
        row.update(class_acc=float((logits.argmax(-1) == samples.labels).double().mean()),
                   class_logprob=mean, class_logprob_ci=[lo, hi])
    else:
        row.update(class_acc=None, class_logprob=None, class_logprob_ci=None)
    row["fid_curve"] = fid_curve(real, fake, [m for m in ev.fid_curve if m <= n] or [n], st.bootstrap, st.level,
                                 run.seed)
    sets_all = ([samples.features[s * n_seed:(s + 1) * n_seed] for s in range(len(ev.sampler_seeds))]
                if ev.seed_sets == "chunks" else [samples.features[:n_seed]] + [e.features for e in extra])
    sets_by = [extractor.split(f) for f in sets_all]
    # every space's FD, fid_seeds, precision and recall come from space_row; the primary's are also the row's own
    row["spaces"] = {space: space_row(real_by[space], fake_by[space], [f[space] for f in sets_by], run,
                                      radii.get(space)) for space in extractor.names}
    row.update(row["spaces"][extractor.primary])
    seeds = row["fid_seeds"]
    row.update(fid_seeds_n=n_seed, fid_seeds_sets=ev.seed_sets, fid_seeds_mean=float(np.mean(seeds)),
               fid_seeds_std=float(np.std(seeds, ddof=1)) if len(seeds) > 1 else None)
    if samples.entropy_return is not None:
        row["entropy_return"] = float(samples.entropy_return.mean())
    eval_plots.sample_grid(run_dir / f"samples_{spec.name}.png", samples.images, samples.labels[samples.shown],
                           f"{spec.name}: generated samples (N={n})", run.plots.per_class, run.plots.max_classes)
    eval_plots.progressive_snapshots(run_dir / f"progressive_{spec.name}.png", samples.snapshots,
                                     samples.snapshot_masks, bb.geometry, samples.fractions,
                                     f"{spec.name}: generation in progress")
    if ev.npz:
        export_npz(run_dir / f"samples_{spec.name}.npz", samples.uint8)
    return row, Generated(samples.features, samples.image_rows(run.plots.column_rows), samples.blocks)


def space_row(real: torch.Tensor, fake: torch.Tensor, seed_sets: list[torch.Tensor], run: EvaluateRun,
              real_radii: torch.Tensor | None = None) -> dict:
    """One policy in one feature space: FD with its bootstrap interval, one FD per sampler-seed set
    (fid_seeds), precision and recall (k = features.pr_k) with intervals. real [M, F], fake [N, F],
    seed_sets: [n_seed, F] each; real_radii [M]: knn_radii(real, pr_k) if already computed."""
    st = run.stats
    fid, lo, hi = fid_with_interval(real, fake, st.bootstrap, st.level, run.seed)
    pr = precision_recall(real, fake, run.features.pr_k, real_radii=real_radii)
    seeds = [frechet_from_features(real, f) for f in seed_sets]
    return {"fid": fid, "fid_ci": [lo, hi], "fid_seeds": seeds, "precision": pr.precision, "recall": pr.recall,
            "pr_k": pr.k, "precision_ci": list(mean_interval(pr.in_real.double(), seed=run.seed)[1:]),
            "recall_ci": list(mean_interval(pr.in_fake.double(), seed=run.seed)[1:])}


def sample_logits(extractor, features: torch.Tensor) -> torch.Tensor | None:
    """Classifier logits [S, classes] of samples from their features [S, F] (None for feature nets
    without a class head, e.g. Inception)."""
    head = getattr(extractor, "logits_from_features", None)
    return None if head is None else head(features).cpu()


def paired_deltas(generated: dict[str, Generated], baselines: list[str], real: torch.Tensor, stats: StatsSpec,
                  seed: int, extractor: FeatureSpaces, labels: torch.Tensor | None = None) -> dict[str, dict]:
    """Every policy against every baseline present, paired on the first min(N_a, N_b) samples (they
    share labels and sampler seeds), in every feature space of `extractor` (real: the reference's
    features of all spaces side by side): dFID with the paired bootstrap (the same sample indices in
    both sets; negative = fewer FID points) and, with a classifier, the mean per-sample difference of
    log p(conditioning class | sample) (nats; positive = more recognisable). {policy: {dfid_vs_<b>,
    dfid_vs_<b>_ci, dfid_vs_<b>_n, logprob_vs_<b>, logprob_vs_<b>_ci} of the primary space, and
    spaces: {space: {dfid_vs_<b>, dfid_vs_<b>_ci}}}."""
    out: dict[str, dict] = {name: {"spaces": {s: {} for s in extractor.names}} for name in generated}
    logp = {}
    if labels is not None:
        for name, g in generated.items():
            logits = sample_logits(extractor, g.features)
            if logits is not None:
                logp[name] = class_logprob(logits, labels[:len(g.features)])
    real_by = extractor.split(real)
    feats = {name: extractor.split(g.features) for name, g in generated.items()}
    for b in baselines:
        if b not in generated:
            continue
        for name in generated:
            n = min(len(generated[name].features), len(generated[b].features))
            for space in extractor.names:
                d = paired_fid_delta(real_by[space], feats[name][space][:n], feats[b][space][:n], stats.bootstrap,
                                     stats.level, seed)
                out[name]["spaces"][space].update({f"dfid_vs_{b}": d.delta, f"dfid_vs_{b}_ci": [d.lo, d.hi]})
                if space == extractor.primary:
                    out[name].update({f"dfid_vs_{b}": d.delta, f"dfid_vs_{b}_ci": [d.lo, d.hi], f"dfid_vs_{b}_n": n})
            if name in logp and b in logp:
                mean, lo, hi = mean_interval(logp[name][:n] - logp[b][:n], level=stats.level, seed=seed)
                out[name].update({f"logprob_vs_{b}": mean, f"logprob_vs_{b}_ci": [lo, hi]})
    return out


# -- the run -------------------------------------------------------------------------------------


def _check_options(run: EvaluateRun, check_paths: bool = True) -> None:
    """The fields evaluate and power share (everything but `policies` and `power`), each in its
    range: ValueError naming the dotted key; with `check_paths`, FileNotFoundError for missing
    weights, feature-network files or reference sets. Runs before anything loads."""
    ev, fs, st, pl = run.eval, run.features, run.stats, run.plots
    check_run_config(run)
    num_blocks = check_backbone_config(run.backbone, check_paths=check_paths)
    check_env_config(run.env, num_blocks=num_blocks)
    if ev.reward not in ev.rewards:
        raise ValueError(f"eval.reward={ev.reward!r} must be one of eval.rewards {ev.rewards}")
    bad = [r for r in ev.rewards if r not in REWARDS or r == "entropy"]
    if bad:
        raise ValueError(f"eval.rewards: {bad} are not teacher-forced rewards; choose from "
                         f"{[r for r in REWARDS if r != 'entropy']}")
    if ev.num_samples != 0:  # 0: teacher-forced rows only (no VQ decoder, feature network or reference set)
        check_int("eval.num_samples", ev.num_samples, 2, note=" (or 0 = teacher-forced metrics only)")
    elif ev.num_images == 0:
        raise ValueError("eval.num_samples=0 (teacher-forced only) needs eval.num_images >= 1")
    check_int("eval.num_images", ev.num_images, 0, note=" (0 = generation only)")
    check_int("eval.batch_size", ev.batch_size, 1)
    check_int("eval.gen_batch_size", ev.gen_batch_size, 1)
    check_int_list("eval.sampler_seeds", ev.sampler_seeds, distinct=True)
    check_int("eval.seed_samples", ev.seed_samples, 2, allow_none=True, note=" (null = eval.num_samples)")
    check_choice("eval.seed_sets", ev.seed_sets, ("chunks", "extra"))
    for name, n in ev.policy_samples.items():
        check_int(f"eval.policy_samples.{name}", n, 2)
    if ev.seed_sets == "chunks":  # each of the S chunks needs 2 samples for a FID
        for key, n in [("eval.num_samples", ev.num_samples)] + [(f"eval.policy_samples.{k}", v)
                                                                for k, v in ev.policy_samples.items()]:
            if n and n < 2 * len(ev.sampler_seeds):
                raise ValueError(f"{key}={n} is too small for eval.seed_sets=chunks: fid_seeds needs "
                                 f"{len(ev.sampler_seeds)} chunks (len(eval.sampler_seeds)) of >= 2 samples")
    check_int_list("eval.fid_curve", ev.fid_curve, 2, nonempty=False)
    check_gamma("eval.gamma", ev.gamma)
    check_choice("eval.oracle_kind", ev.oracle_kind, ORACLES.values())
    check_int("eval.agreement_images", ev.agreement_images, 0, note=" (0 = off)")
    check_sampling(ev.sampling, "eval.sampling")
    check_int("eval.R", ev.R, 0, allow_none=True, note=" (null = the checkpoint's)")
    check_choice("features.kind", fs.kind, ("classifier", "inception"))
    spaces = feature_space_names(fs)
    check_spaces(spaces, fs.kind)
    if fs.held_out is not None and fs.held_out not in (fs.kind, *spaces):
        raise ValueError(f"features.held_out={fs.held_out!r} is not among the spaces {[fs.kind, *spaces]} (null = none)")
    check_int("features.pca_components", fs.pca_components, 1)
    if check_paths and ev.num_samples:  # the feature files are read for generation only
        if fs.kind == "classifier":
            check_path_exists("features.classifier_path", fs.classifier_path, allow_none=True)
        else:
            check_path_exists("features.inception_weights", fs.inception_weights,
                              hint="download pt_inception-2015-12-05-6726825d.pth once; nothing downloads here")
        if "autoencoder" in spaces:
            check_path_exists("features.autoencoder_path", fs.autoencoder_path, allow_none=True,
                              hint="python scripts/train_autoencoder.py update_manifest=true")
        for key, ref in (("features.reference", fs.reference), ("features.second_reference", fs.second_reference)):
            if ref not in ("train", "heldout"):
                check_path_exists(key, ref, allow_none=key == "features.second_reference")
    check_int("features.reference_limit", fs.reference_limit, 1, allow_none=True, note=" (null = all)")
    check_int("features.batch_size", fs.batch_size, 1)
    check_int("features.pr_k", fs.pr_k, 1)
    check_int("stats.bootstrap", st.bootstrap, 1)
    check_range("stats.level", st.level, 0.0, 1.0, lo_open=True, hi_open=True)
    check_int("stats.kid_subsets", st.kid_subsets, 1)
    check_int("stats.kid_subset_size", st.kid_subset_size, 2)
    check_int("plots.per_class", pl.per_class, 1)
    check_int("plots.max_classes", pl.max_classes, 1)
    for name in ("heatmap_images", "snapshot_samples", "column_rows"):
        check_int(f"plots.{name}", getattr(pl, name), 0, note=" (0 = none)")


def check_evaluate_run(run: EvaluateRun, check_paths: bool = True) -> None:
    """Validate configs/evaluate.yaml's schema before anything loads (`_check_options` plus a
    non-empty `policies`)."""
    if not run.policies:
        raise ValueError("policies must name at least one policy, got []")
    _check_options(run, check_paths)


@job_dir("evaluate")
def run_evaluation(run: EvaluateRun) -> dict:
    """Evaluate every policy of `run.policies`; write results.json / results.md / PNGs in run_dir.

    Under torchrun every rank generates its whole sampler batches of each sample set and rank 0
    gathers their features (src/orderplan/eval/sharding.py); rank 0 alone runs the teacher-forced
    rows (broadcasting the oracles' orders that generation replays), the reference features and
    every statistic, and writes every file. Every rank returns rank 0's results, which do not
    depend on the number of ranks."""
    check_evaluate_run(run)
    if str(run.device) == "cpu":  # ~14% faster CPU generation, the same numbers (src/orderplan/infra/cpu_heap.py)
        keep_freed_heap_memory()
    ctx = init_distributed(run.device)
    results = _evaluate(run, ctx) if run.eval.num_samples else _evaluate_teacher_forced(run, ctx)
    close_distributed(ctx)  # on success only: after an exception the other ranks may never reach the barrier
    return results


def _evaluate_teacher_forced(run: EvaluateRun, ctx: DistContext) -> dict:
    """eval.num_samples=0: the teacher-forced rows of every policy on rank 0 (no generation, so no
    VQ decoder, feature network or reference set: a backbone without them, e.g. random weights at
    GPT-B geometry, is evaluated this way). Writes results.json, results.md, remaining_loss.png."""
    t_start, ev, run_dir = time.time(), run.eval, Path(run.run_dir)
    if not ctx.main:
        return broadcast_object(None, ctx)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(run, run_dir, enabled=ctx.main, job="evaluate")
    torch.manual_seed(run.seed)
    bb = build_backbone(run.backbone, device=ctx.device)
    codes, labels = load_token_data(run.backbone, "heldout")
    images = balanced_images(labels)  # [M] class-interleaved: any prefix covers every class
    specs = [resolve_policy(p, run, bb) for p in run.policies]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"policy names must be unique, got {[s.name for s in specs]}")
    sched = [s.name for s in specs if s.schedule is not None]
    if sched:
        raise ValueError(f"{sched} are parallel-decoding schedules, measured in generation only: set eval.num_samples > 0")
    n_tf = min(ev.num_images, len(images))
    n_agree = min(ev.agreement_images, n_tf)
    results: dict = {"num_samples": 0, "generation": "off (eval.num_samples=0)", "num_images_teacher_forced": n_tf,
                     "num_images_agreement": n_agree, "gamma": ev.gamma, "reward": ev.reward,
                     "backbone": run.backbone.name, "seed": run.seed, "policies": {}}
    curves = {}
    for spec in specs:
        t0 = time.time()
        print(f"[evaluate] {spec.name}: teacher-forced rollouts on {n_tf} held-out images", flush=True)
        with isolated_rng(run.seed, "evaluate", "policy", spec.name):  # as in _generate_policy
            row, _, curves[spec.name] = _teacher_forced_row(spec, run, bb, codes, labels, images, n_tf, n_agree, n_tf)
        row.update(source=spec.source, seconds=round(time.time() - t0, 1))
        results["policies"][spec.name] = row
        logger.log({f"{spec.name}/{k}": v for k, v in row.items() if isinstance(v, float)}, step=0)
    eval_plots.remaining_loss_curves(run_dir / "remaining_loss.png", curves, "remaining loss L_rest / L (nats/token)")
    results["remaining_curves"] = curves
    results["seconds"] = round(time.time() - t_start, 1)
    text = "\n".join([f"# Evaluation: {results['backbone']} (teacher-forced only: eval.num_samples=0)",
                      *teacher_forced_table(results), ""])
    atomic_write_json(run_dir / "results.json", results, checksum=True)  # read back by reward_alignment
    atomic_write_bytes(run_dir / "results.md", text.encode())
    logger.close()
    print(text)
    return broadcast_object(results, ctx)


def _evaluate(run: EvaluateRun, ctx: DistContext) -> dict:
    """`run_evaluation`'s body on one rank of `ctx` (the order of collectives is the same on every rank:
    the pixel PCA, then per policy, the skip flag, the oracles' orders, then one gather per sample set;
    last the results)."""
    t_start = time.time()
    ev, device, run_dir = run.eval, ctx.device, Path(run.run_dir)
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(run, run_dir, enabled=ctx.main, job="evaluate")
    torch.manual_seed(run.seed)

    bb = build_backbone(run.backbone, device=device)
    codes, labels = load_token_data(run.backbone, "heldout")
    images = balanced_images(labels)  # [M] class-interleaved: any prefix covers every class
    specs = [resolve_policy(p, run, bb) for p in run.policies]  # fail on a bad name before any work
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"policy names must be unique, got {[s.name for s in specs]}")
    n_tf = min(ev.num_images, len(images))
    n_agree = min(ev.agreement_images, n_tf)
    n_max = max([ev.num_samples, *ev.policy_samples.values()])
    n_orders = min(max(n_tf, n_max), len(images))  # orders the oracles replay in generation mode
    gen_labels = generation_labels(labels, images, n_max)

    side = bb.gpt.cfg.grid_h * (bb.vq.config.downsample_factor if bb.vq is not None else 1)
    extractor, ref_images = build_feature_spaces(run, side, ctx)  # a collective (pixel_pca's fit)
    orders_for_heatmap, curves, generated = {}, {}, {}
    if not ctx.main:  # the other ranks only generate their batches of every policy rank 0 has not cached
        for spec in specs:
            if broadcast_object(None, ctx):  # rank 0 has no finished row of it
                _generate_policy(spec, run, bb, codes, labels, images, n_tf, n_agree, n_orders, gen_labels, {},
                                 {}, extractor, ctx)
        return broadcast_object(None, ctx)
    refs = {reference_name(r): extract_features(extractor, ref_images if r == run.features.reference
                                                else reference_images(run, side, r), run.features.batch_size,
                                                device).double()
            for r in dict.fromkeys([run.features.reference, run.features.second_reference]) if r}
    real_all = next(iter(refs.values()))
    real = extractor.split(real_all)[extractor.primary]
    second = extractor.split(list(refs.values())[1])[extractor.primary] if len(refs) > 1 else None
    floor = noise_floor(real, second, run.seed)
    # the reference's k-NN radii, once per space rather than once per policy and space
    radii = {space: knn_radii(x, run.features.pr_k) for space, x in extractor.split(real_all).items()}

    results: dict = {"num_samples": ev.num_samples, "policy_samples": dict(ev.policy_samples),
                     "sampler_seeds": list(ev.sampler_seeds), "seed_sets": ev.seed_sets, "references": {k: len(v) for k, v in refs.items()},
                     "fid_reference": next(iter(refs)), "num_reference": len(real),
                     "fid_noise_floor": floor.fid, "fid_noise_floor_n": floor.n,
                     "fid_noise_floor_method": floor.method, "fid_noise_floor_description": floor.description,
                     "num_images_teacher_forced": n_tf, "num_images_agreement": n_agree, "gamma": ev.gamma,
                     "reward": ev.reward, "features": run.features.kind, "sampling": vars(ev.sampling),
                     "backbone": run.backbone.name, "seed": run.seed,
                     "feature_spaces": {"names": extractor.names, "primary": extractor.primary,
                                        "held_out": run.features.held_out, "widths": extractor.widths},
                     "policies": {}}
    if "pixel_pca" in extractor.names:
        results["feature_spaces"]["pixel_pca_explained"] = float(extractor.spaces["pixel_pca"].explained.sum())
    for spec in specs:
        cache = run_dir / "policies" / f"{spec.name}.pt"
        identity = policy_identity(spec, run)
        done = _load_policy(cache, identity)
        broadcast_object(done is None, ctx)  # to do (True) or finished: the other ranks skip it too
        if done is not None:
            print(f"[evaluate] {spec.name}: finished in an earlier run with the same setup ({cache})", flush=True)
            row, generated[spec.name] = done["row"], Generated(**done["generated"])
            orders_for_heatmap[spec.name] = done["heatmap_orders"]
            if done["curve"]:
                curves[spec.name] = done["curve"]
            results["policies"][spec.name] = row
            continue
        t0 = time.time()
        row, blocks, curve, gen_row, generated[spec.name] = _generate_policy(
            spec, run, bb, codes, labels, images, n_tf, n_agree, n_orders, gen_labels, refs, radii, extractor, ctx)
        row["source"] = spec.source
        orders_for_heatmap[spec.name] = blocks[:run.plots.heatmap_images]
        if curve:
            curves[spec.name] = curve
        row.update(gen_row)
        row["seconds"] = round(time.time() - t0, 1)
        results["policies"][spec.name] = row
        atomic_torch_save({"identity": identity, "row": row, "generated": vars(generated[spec.name]),
                           "heatmap_orders": orders_for_heatmap[spec.name], "curve": curve}, cache, checksum=True)
        logger.log({f"{spec.name}/{k}": v for k, v in row.items() if isinstance(v, float)}, step=0)
        print(f"[evaluate] {spec.name}: FID {row['fid']:.3f} (N={row['num_samples']}), seeds "
              f"{', '.join(f'{f:.2f}' for f in row['fid_seeds'])} (N={row['fid_seeds_n']}), precision "
              f"{row['precision']:.3f}, recall {row['recall']:.3f} ({row['seconds']} s)", flush=True)

    for name, extra in paired_deltas(generated, ev.dfid_baselines, real_all, run.stats, run.seed, extractor,
                                     gen_labels).items():
        by_space = extra.pop("spaces")
        results["policies"][name].update(extra)
        for space, d in by_space.items():
            results["policies"][name]["spaces"][space].update(d)
    results["verdict"] = verdict(results, specs)
    results["spaces_verdict"] = spaces_verdict(results)
    results["steps_verdict"] = steps_verdict(results)
    _figures(run, run_dir, bb, codes, images, gen_labels, generated, orders_for_heatmap, curves, results)
    results["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(run_dir / "results.json", results, checksum=True)  # read back by reward_alignment
    atomic_write_bytes(run_dir / "results.md", results_markdown(results).encode())
    logger.close()
    print(results_markdown(results))
    return broadcast_object(results, ctx)


def _generate_policy(spec: PolicySpec, run: EvaluateRun, bb: Backbone, codes: torch.Tensor, labels: torch.Tensor,
                     images: torch.Tensor, n_tf: int, n_agree: int, n_orders: int, gen_labels: torch.Tensor,
                     refs: dict[str, torch.Tensor], radii: dict[str, torch.Tensor], extractor,
                     ctx: DistContext) -> tuple | None:
    """One policy's teacher-forced row (rank 0) and generation row (every rank generates, rank 0
    computes): (row, blocks, curve, gen_row, Generated) on rank 0, None on the others."""
    if ctx.main:
        print(f"[evaluate] {spec.name}: teacher-forced rollouts on {n_tf} held-out images", flush=True)
    # the policy's own RNG stream: its row must not depend on which policies ran before it in this
    # process (a rerun skips the finished ones)
    with isolated_rng(run.seed, "evaluate", "policy", spec.name):
        # a ground-truth policy's orders (replayed by generation) cost an oracle pass per decision:
        # every rank plays its share of the images
        played = (_oracle_orders(spec, run, bb, codes, labels, images, n_orders, ctx)
                  if spec.ground_truth and n_orders else None)
        row, blocks, curve = (_teacher_forced_row(spec, run, bb, codes, labels, images, n_tf, n_agree, n_orders, played)
                              if ctx.main else ({}, None if played is None else played[0], []))
        gen_row, generated = _generation_row(spec, run, bb, gen_labels, blocks, refs, radii, extractor, Path(run.run_dir),
                                             ctx)
    return (row, blocks, curve, gen_row, generated) if ctx.main else None


def _figures(run: EvaluateRun, run_dir: Path, bb: Backbone, codes: torch.Tensor, images: torch.Tensor,
             gen_labels: torch.Tensor, generated: dict[str, Generated], orders_for_heatmap: dict, curves: dict,
             results: dict) -> None:
    """The pictures people look at first: samples side by side, FID against N, and the orders."""
    rows = min(len(g.images) for g in generated.values())
    if rows > 0:
        eval_plots.policy_columns(run_dir / "samples_side_by_side.png", {n: g.images[:rows] for n, g in generated.items()},
                                  gen_labels[:rows], rows, "the same labels and sampler seeds, one column per policy")
    eval_plots.fid_vs_n(run_dir / "fid_vs_n.png", {n: r["fid_curve"] for n, r in results["policies"].items()},
                        f"FID against the number of samples (reference: {results['fid_reference']})")
    if any("@" in n for n in results["policies"]):  # parallel-decoding schedules: quality against cost
        eval_plots.fid_vs_steps(run_dir / "fid_vs_steps.png", results["policies"],
                                f"FID against forward passes (reference: {results['fid_reference']}, "
                                f"95% bootstrap intervals)")
    eval_plots.reveal_time_heatmaps(run_dir / "reveal_time_heatmaps.png", {n: g.orders for n, g in generated.items()},
                                    bb.geometry, "mean reveal step of each block while generating (0 = first)")
    # teacher-forced orders on held-out images (none without eval.num_images, except the oracles')
    played = {n: o for n, o in orders_for_heatmap.items() if len(o) >= run.plots.heatmap_images}
    if bb.vq is not None and played and run.plots.heatmap_images > 0:
        heat_imgs = bb.vq.decode_codes(codes[images[:run.plots.heatmap_images]].to(bb.device).view(
            -1, bb.gpt.cfg.grid_h, bb.gpt.cfg.grid_w)).float().cpu()
        eval_plots.order_heatmaps(run_dir / "order_heatmaps.png", played, heat_imgs, bb.geometry)
    if curves:
        eval_plots.remaining_loss_curves(run_dir / "remaining_loss.png", curves,
                                         "remaining loss L_rest / L (nats/token)")
        results["remaining_curves"] = curves


LEARNED_SOURCES = ".safetensors"


def verdict(results: dict, specs: list[PolicySpec]) -> dict | None:
    """Whether the best learned planner (lowest FID among OrderHead checkpoints) has a lower FID than
    each dFID baseline, decided by the paired interval: below (interval under 0), above (over 0) or
    not separated (it contains 0)."""
    learned = [s.name for s in specs if s.source.endswith(LEARNED_SOURCES)]
    if not learned:
        return None
    pol = results["policies"]
    best = min(learned, key=lambda n: pol[n]["fid"])
    out: dict = {"best_learned": best, "fid": pol[best]["fid"], "vs": {}}
    for key in [k for k in pol[best] if k.startswith("dfid_vs_") and k.endswith("_ci")]:
        b = key[len("dfid_vs_"):-len("_ci")]
        lo, hi = pol[best][key]
        word = "below" if hi < 0 else "above" if lo > 0 else "not separated from"
        out["vs"][b] = {"dfid": pol[best][f"dfid_vs_{b}"], "ci": [lo, hi], "n": pol[best][f"dfid_vs_{b}_n"],
                        "says": word}
        if "spaces" in pol[best]:
            out["vs"][b].update(across_spaces(pol[best]["spaces"], b))
    return out


def _side(ci: list[float]) -> str:
    return "below" if ci[1] < 0 else "above" if ci[0] > 0 else "not separated"


def across_spaces(spaces: dict[str, dict], baseline: str) -> dict:
    """One policy against `baseline` in every feature space: {"per_space": {space: below | above |
    not separated}, "robust": below (the paired interval is under 0 in every space) | above (over 0
    in every space) | disagree (below in one space, above in another) | not separated}."""
    per = {s: _side(r[f"dfid_vs_{baseline}_ci"]) for s, r in spaces.items() if f"dfid_vs_{baseline}_ci" in r}
    words = set(per.values())
    robust = ("below" if words == {"below"} else "above" if words == {"above"} else
              "disagree" if {"below", "above"} <= words else "not separated")
    return {"per_space": per, "robust": robust}


# the fixed and belief orders of the feature-space robustness table (those present in a run are compared)
ROBUST_CANDIDATES = ("raster", "random", "confident_first", "halton", "spread_confident", "confident_sampled")


def spaces_verdict(results: dict, candidates: tuple[str, ...] = ROBUST_CANDIDATES) -> dict | None:
    """Which order is best in each feature space, whether the spaces agree, and which ordered pairs
    are separated the same way in every space (paired intervals; only pairs whose dFID was computed,
    i.e. the second one is a dFID baseline). An order is `robust_best` when it is below every other
    present candidate in every space. None with fewer than two spaces or candidates."""
    pol = results["policies"]
    present = [c for c in candidates if c in pol and "spaces" in pol[c]]
    names = results.get("feature_spaces", {}).get("names", [])
    if len(present) < 2 or len(names) < 2:
        return None
    best = {s: min(present, key=lambda n: pol[n]["spaces"][s]["fid"]) for s in names}
    pairs = {a: {b: across_spaces(pol[a]["spaces"], b) for b in present
                 if b != a and f"dfid_vs_{b}_ci" in pol[a]["spaces"][names[0]]} for a in present}
    robust_best = [a for a in present
                   if len(pairs[a]) == len(present) - 1 and all(p["robust"] == "below" for p in pairs[a].values())]
    return {"spaces": names, "held_out": results["feature_spaces"].get("held_out"), "candidates": present,
            "best": best, "agree": len(set(best.values())) == 1,
            "robust_best": robust_best[0] if robust_best else None, "pairs": pairs}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(x: list | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"[{x[0]:.{digits}f}, {x[1]:.{digits}f}]"


def _seeds_line(results: dict) -> str:
    S = len(results["sampler_seeds"])
    if results.get("seed_sets", "extra") == "chunks":
        return (f"- fid_seeds: FID of {S} independent sample sets of the same labels at N = fid_seeds_n, mean ± std: "
                f"the {S} disjoint chunks of the main set (every generation batch has its own sampler seed)")
    return f"- fid_seeds: FID of {S} independent sampler seeds ({results['sampler_seeds']}) at N = fid_seeds_n, mean ± std"


def results_markdown(results: dict) -> str:
    """The generation table (every FID at its stated N, reference first), the verdict and, when
    measured, the teacher-forced table."""
    ref = results["fid_reference"]
    others = [k for k in results["references"] if k != ref]
    base = [k[len("dfid_vs_"):] for k in next(iter(results["policies"].values())) if k.startswith("dfid_vs_")
            and not k.endswith(("_ci", "_n"))]
    lines = [
        f"# Evaluation: {results['backbone']}",
        "",
        f"- N = {results['num_samples']} generated samples per policy (column N where a policy differs); FID at "
        f"different N is not comparable. Features: {results['features']}; reference: {ref} split "
        f"({results['num_reference']} images){'; second column: ' + ', '.join(others) if others else ''}",
        "- paired design: sample i of every policy has the same label and the same sampler stream; dFID = "
        "FID(policy) - FID(baseline) on the common first N samples, 95% paired bootstrap interval (negative = better)",
        _seeds_line(results),
        f"- real vs real: FID(reference, {others[0] if others else 'reference halves'}) = "
        f"{results['fid_noise_floor']:.3f} at N = {results['fid_noise_floor_n']}",
        f"- sampling: {json.dumps(results['sampling'])}; seed {results['seed']}; oracles replay their teacher-forced "
        "order of the held-out image whose label conditions the sample",
        "",
        "| policy | N | FID [95% CI] | FID seeds (mean ± std, N) | "
        + " | ".join(f"dFID vs {b} [95% CI]" for b in base)
        + " | precision | recall | class log-prob (nats) [95% CI] | "
        + " | ".join(f"FID vs {o}" for o in others) + (" | " if others else "") + "path | s |",
        "|---" * (9 + len(base) + len(others)) + "|",
    ]
    for name, r in results["policies"].items():
        seeds = f"{r['fid_seeds_mean']:.2f} ± {_fmt(r['fid_seeds_std'])} ({r['fid_seeds_n']})"
        d = " | ".join(f"{r[f'dfid_vs_{b}']:+.2f} {_ci(r[f'dfid_vs_{b}_ci'])}" if f"dfid_vs_{b}" in r else "n/a"
                       for b in base)
        o = " | ".join(_fmt(r.get(f"fid_{x}"), 3) for x in others)
        lines.append(f"| {name} | {r['num_samples']} | {r['fid']:.3f} {_ci(r['fid_ci'])} | {seeds} | {d} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {_fmt(r['class_logprob'], 3)} "
                     f"{_ci(r['class_logprob_ci'], 3)} | {o}{' | ' if others else ''}{r['generation_path']} | "
                     f"{r['seconds']} |")
    lp = [b for b in base if any(f"logprob_vs_{b}" in r for r in results["policies"].values())]
    if lp:
        lines += ["", "Paired per-sample difference of log p(conditioning class | sample) under the classifier "
                  "(nats, 95% CI; positive = more recognisable than the baseline's sample of the same label and "
                  "sampler stream):", "",
                  "| policy | " + " | ".join(f"vs {b}" for b in lp) + " |", "|---" * (1 + len(lp)) + "|"]
        for name, r in results["policies"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{r[f'logprob_vs_{b}']:+.4f} {_ci(r[f'logprob_vs_{b}_ci'], 4)}" if f"logprob_vs_{b}" in r else "n/a"
                for b in lp) + " |")
    v = results.get("verdict")
    if v:
        lines += ["", f"**Best learned planner: {v['best_learned']}** (FID {v['fid']:.3f}). Its FID is "
                  + "; ".join(f"{w['says']} {b}'s (dFID {w['dfid']:+.2f}, 95% CI {_ci(w['ci'])}, N = {w['n']})"
                              + (f"; across the feature spaces: {w['robust']}" if "robust" in w else "")
                              for b, w in v["vs"].items()) + "."]
    lines += spaces_table(results)
    lines += cost_table(results)
    if results["num_images_teacher_forced"]:
        lines += teacher_forced_table(results)
    lines.append("")
    return "\n".join(lines)


def spaces_table(results: dict) -> list[str]:
    """Every policy's Fréchet distance in every feature space, its paired dFID against each baseline
    per space, and `spaces_verdict` in words (markdown lines, a blank line first; none with one space)."""
    fsp = results.get("feature_spaces")
    if not fsp or len(fsp["names"]) < 2:
        return []
    names, pol = fsp["names"], results["policies"]
    held = fsp.get("held_out")
    label = {s: s + (" (held out)" if s == held else "") for s in names}
    lines = ["", f"Fréchet distance in every feature space (reference: {results['fid_reference']}; each space fitted or "
             f"trained on the train split only, or on nothing: {', '.join(names)}). The held-out space "
             f"({held or 'none'}) is used by nothing that is tuned. FD [95% CI] / recall:", "",
             "| policy | " + " | ".join(label[s] for s in names) + " |", "|---" * (1 + len(names)) + "|"]
    for name, r in pol.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{r['spaces'][s]['fid']:.3f} {_ci(r['spaces'][s]['fid_ci'])} / {r['spaces'][s]['recall']:.3f}"
            for s in names) + " |")
    base = [k[len("dfid_vs_"):-len("_ci")] for k in next(iter(pol.values()))["spaces"][names[0]] if k.endswith("_ci")
            and k.startswith("dfid_vs_")]
    for b in base:
        lines += ["", f"Paired dFID vs {b} in every space (95% CI; robust = the same side of 0 in every space):", "",
                  "| policy | " + " | ".join(label[s] for s in names) + " | robust |", "|---" * (2 + len(names)) + "|"]
        for name, r in pol.items():
            sp = r["spaces"]
            if f"dfid_vs_{b}" not in sp[names[0]] or name == b:
                continue
            lines.append(f"| {name} | " + " | ".join(f"{sp[s][f'dfid_vs_{b}']:+.3f} {_ci(sp[s][f'dfid_vs_{b}_ci'])}"
                                                    for s in names) + f" | {across_spaces(sp, b)['robust']} |")
    v = results.get("spaces_verdict")
    if v:
        agree = "the spaces agree" if v["agree"] else "the spaces disagree"
        lines += ["", f"Best of {', '.join(v['candidates'])} per space: "
                  + "; ".join(f"{s}: {b}" for s, b in v["best"].items()) + f" ({agree}). "
                  + (f"**{v['robust_best']}** is below every other one in every space." if v["robust_best"] else
                     "No order is below every other one in every space.")]
    return lines


def steps_verdict(results: dict, passes: int = 16, reference: str = "raster") -> dict | None:
    """Target 1 of parallel decoding: the best schedule at `passes` forwards per image against the
    token-by-token `reference`'s fid_seeds spread [min, max]. None without both."""
    pol = results["policies"]
    at = {n: r for n, r in pol.items() if "@" in n and r.get("forward_passes_per_image") == passes}
    if not at or reference not in pol:
        return None
    best = min(at, key=lambda n: at[n]["fid"])
    lo, hi = min(pol[reference]["fid_seeds"]), max(pol[reference]["fid_seeds"])
    fid = at[best]["fid"]
    says = "better than" if fid < lo else ("within" if fid <= hi else "worse than")
    return {"passes": passes, "best": best, "fid": fid, "reference": reference, "spread": [lo, hi],
            "reference_passes": pol[reference].get("forward_passes_per_image"), "says": says}


def cost_table(results: dict) -> list[str]:
    """Forwards per image and generation speed of every policy (markdown lines, a blank line first)."""
    pol = results["policies"]
    if not any("forward_passes_per_image" in r for r in pol.values()):
        return []
    lines = ["", "Cost: sequential backbone forwards per image, and images per second of generation (wall time of "
             "the slowest process, decoding to pixels included, features not) measured in this run. Schedules "
             "`<order>@<S>` decode S forwards per image, each sampling many tokens (`c`: cosine sizes).", "",
             "| policy | forwards / image | samples/s | FID [95% CI] | dFID vs raster [95% CI] |", "|---|---|---|---|---|"]
    for name, r in pol.items():
        d = f"{r['dfid_vs_raster']:+.2f} {_ci(r['dfid_vs_raster_ci'])}" if "dfid_vs_raster" in r else "n/a"
        lines.append(f"| {name} | {_fmt(r.get('forward_passes_per_image'), 1)} | {_fmt(r.get('samples_per_s'), 1)} | "
                     f"{r['fid']:.3f} {_ci(r['fid_ci'])} | {d} |")
    v = results.get("steps_verdict")
    if v:
        lines += ["", f"At {v['passes']} forwards per image the best schedule is **{v['best']}** (FID {v['fid']:.3f}), "
                  f"{v['says']} token-by-token {v['reference']}'s fid_seeds spread [{v['spread'][0]:.3f}, "
                  f"{v['spread'][1]:.3f}] ({_fmt(v['reference_passes'], 0)} forwards)."]
    return lines


def teacher_forced_table(results: dict) -> list[str]:
    """The teacher-forced table of `results` (markdown lines, a blank line first)."""
    lines = ["", f"Teacher-forced, {results['num_images_teacher_forced']} held-out images: return = discounted "
             f"{results['reward']} return (gamma {results['gamma']} per block, nats); oracle agreement on the "
             f"first {results['num_images_agreement']}.", "",
             "| policy | return | order NLL (bits/token) | AUC L_rest (nats/token) | oracle agreement | "
             "decisions |", "|---|---|---|---|---|---|"]
    for name, r in results["policies"].items():
        lines.append(f"| {name} | {r['return']:.2f} | {r['order_nll_bits']:.4f} | {r['auc_remaining_loss']:.4f} "
                     f"| {_fmt(r.get('oracle_agreement'), 3)} | {r['decisions_per_episode']:.1f} |")
    return lines
