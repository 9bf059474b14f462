"""Stage 3-4 (seed 000): behaviour cloning of the OrderHead on oracle labels.

Data: the oracle data set of `scripts/build_oracle.py` (image index + revealed-block prefix + the
full utility vector per state), configured by `oracle` (`OracleConfig`, the build's own fields),
built or extended on the fly when it lacks images; a set of another identity in oracle.out_dir is
refused, and exactly the requested seeded image subset is trained on (`load_or_build_oracle`).
Hidden states are recomputed by the frozen backbone: every episode is replayed once through the
env core and the block-pooled hidden states of its recorded states are kept in memory
(`episode_features`, `BCData`), so training steps only run the OrderHead.

Loss: cross-entropy on the oracle argmax block (or, with `bc.targets=soft`, on softmax(u / tau)
over the unrevealed blocks). The latent-reasoning depth R follows a curriculum (`bc.R_schedule`,
e.g. [0, 1, 2]: equal shares of the steps), on the same parameters. Optional DAgger rounds add
states visited by the current learner (labels from the oracle). Exact resume: the minibatch of
step s is drawn from a generator seeded by (seed, s); the head's init and the dropout stream come
from their own named seeds (`orderplan.infra.seeding`: (seed, "bc", "orderhead_init") and (seed, "bc",
"train")), so nothing drawn before (an oracle set built in the same process, an init head, the
joint tuner's GPT) shifts them; model, optimizer, RNG states and the records of the DAgger rounds
done (a resume replays them: the learner that visited their states is gone) are checkpointed
atomically.

Limited joint tuning (seed Stage 5, `bc.joint.top_n > 0`, off by default): from step
`bc.joint.start_step` on, the top n transformer blocks of the GPT (and, with `tune_output`, its final
norm and output projection) are trained together with the OrderHead. Objective, for the tuned
backbone parameters theta_G: L = L_AR + lambda * L_OH, lambda = `bc.joint.lam`, where L_AR is the
backbone's own block-RAR training loss (`orderplan.train.backbone.ar_loss`, nats/token, on a batch of
`ar_batch_size` train images in random block orders, `ar_batch` as in Stage 1) and L_OH the BC
cross-entropy above (nats/state). The OrderHead's gradient is that of L_OH alone (L_AR does not
depend on it; lambda only rescales the backbone's share), so with lambda -> 0 the backbone just
keeps training on L_AR and the head sees its features. For L_OH the hidden states of the minibatch
are recomputed by the tuned GPT in one causal pass per state (`state_features`, equal to the env's
incremental features up to float rounding), with autograd reaching only the unfrozen blocks; the
GPT is kept in eval mode (no dropout), as the frozen backbone is. The oracle labels are NOT
recomputed: they stay those of the original backbone (the data set of `oracle.out_dir`), and DAgger
rollouts and their labels also use the original backbone. The tuned GPT is written to
run_dir/gpt.safetensors and the held-out report scores every policy on it, next to the backbone's
held-out bits/token before and after tuning.

Generated states (`states=generated`, configs/bc_generated.yaml): instead of the
oracle set, BC trains on states visited while generating (the model's own samples, no ground
truth), labelled by the argmax of the expected-oracle utility û(a|S) (`generated:`,
`orderplan.train.generated_states`; built into generated.out_dir when missing, reused when its
identity matches). The roll-in that visits them is the init head (`bc.init_from`, played greedily)
or random blocks (`generated.roll_in=random`). Features come from replaying each recorded prefix
teacher-forced on its generated grid, which reproduces the state generation visited. Everything
else (R schedule, checkpoints, resume, the teacher-forced held-out report) is unchanged; DAgger and
joint tuning are teacher-forced ideas and are refused.

`bc.init_from`: an OrderHead file (`save_orderhead`) the head starts from, in either mode; its
architecture must match the run's (agent sizes, beliefs, class conditioning, backbone width and
geometry); dropout and R are the run's. Its sha256 joins the checkpoint identity.

Under torchrun (`orderplan.infra.distributed`): DistributedDataParallel over the OrderHead. Rank r
replays the episodes r::W for the features (gathered back on every rank) and computes the rows r::W
of each step's global minibatch, its loss weighted W * sum / batch so that DDP's gradient average is
the one-process gradient; a missing oracle set is built sharded. DAgger rounds are collected on rank
0 and broadcast, a generated-state set is built by rank 0 alone; rank 0 writes every file and runs
the report. Checkpoints leave W out of their identity (the step's math does not depend on it); each
rank draws its own dropout masks (rank 0 the one-process stream). Joint tuning runs in one process only."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from orderplan.eval.report import EvalSpec, check_eval_spec, heldout_report, print_report
from orderplan.planner.orderhead import OrderHead, OrderHeadConfig, load_orderhead, orderhead_config_for, save_orderhead
from orderplan.planner.policies import OrderHeadPolicy
from orderplan.train.features import episode_observations
from orderplan.train.generated_states import GeneratedStatesConfig, check_generated_states, load_or_build_generated
from orderplan.train.joint import JointConfig, JointTuner, check_joint_config
from orderplan.train.oracle_data import (
    MANIFEST,
    RECORD_KEYS,
    BuildOracleRun,
    OracleConfig,
    OracleDataset,
    build_identity,
    build_oracle,
    check_oracle_config,
    collect_states,
    select_images,
)
from orderplan.infra.checkpoint import (
    CheckpointManager,
    atomic_write_json,
    check_identity,
    load_safetensors,
    rng_state,
    set_rng_state,
    sha256_file,
)
from orderplan.config.common import BackboneConfig, RunConfig, check_run_config
from orderplan.infra.integrity import remove_with_record
from orderplan.infra.paths import resolve_path
from orderplan.model.loading import check_backbone_config
from orderplan.infra.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_object,
    close_distributed,
    gather_rows,
    gather_strided,
    init_distributed,
    shard_indices,
)
from orderplan.model.loading import backbone_gpt_config, random_weights_tag, save_gpt
from orderplan.infra.run_utils import Logger, job_dir, progress
from orderplan.infra.seeding import isolated_rng, seed_global
from orderplan.infra.validation import check_choice, check_int, check_int_list, check_positive, check_range
from orderplan.env.core import EnvConfig, OrderPlanningCore, check_env_config
from orderplan.env.factory import make_core


@dataclass
class AgentSpec:
    """OrderHead size (fields of OrderHeadConfig; the backbone dim and geometry are filled in).
    d_model and n_heads default to null: scaled to the backbone by `orderhead_config_for`
    (d = 128 on the tiny default, 384 on GPT-B, 512 on GPT-L/XL)."""

    d_model: int | None = None  # null = scaled to the backbone's width
    n_heads: int | None = None  # null = d_model // 64, at least 4
    n_latents: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1


@dataclass
class BCConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    targets: str = "argmax"  # argmax | soft (softmax(u / soft_tau) over the unrevealed blocks)
    soft_tau: float = 1.0  # temperature (nats) of the soft targets
    # latent reasoning steps of the OrderHead: equal shares of bc.steps each, the same parameters
    R_schedule: list[int] = field(default_factory=lambda: [0, 1, 2])
    dagger_rounds: int = 0  # extra rounds of learner-visited states (labels from the oracle)
    dagger_images: int = 64  # train images per DAgger round
    replay_batch: int = 32  # episodes replayed together when recomputing hidden states
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    # limited joint tuning (seed Stage 5): off while joint.top_n = 0 (the default); needs env.beliefs=false.
    # The oracle labels stay those of the original backbone; a tuning run writes run_dir/gpt.safetensors
    joint: JointConfig = field(default_factory=JointConfig)
    # an OrderHead .safetensors the head starts from (same agent sizes and env.beliefs); null = a fresh init
    init_from: str | None = None


@dataclass
class BCRun(RunConfig):
    """Schema of the bc job (preset src/orderplan/configs/bc.yaml; `python scripts/bc.py key=value ...`);
    every default lives here. Behaviour cloning of the OrderHead on oracle labels."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    # the oracle data set (scripts/build_oracle.py), built into oracle.out_dir here when missing
    oracle: OracleConfig = field(default_factory=OracleConfig)
    # OrderHead size (the backbone dim and block geometry are filled in)
    agent: AgentSpec = field(default_factory=AgentSpec)
    bc: BCConfig = field(default_factory=BCConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    run_dir: str = "runs/bc/tiny_mnist"
    # seed of the oracle data set (its images and behaviour); null = `seed`. Several seeds can share one set
    oracle_seed: int | None = None
    # teacher_forced: oracle labels on real train images (the `oracle` set) | generated: expected-oracle labels
    # on states visited while generating (the `generated` set; preset src/orderplan/configs/bc_generated.yaml)
    states: str = "teacher_forced"
    # the generated-state set of states=generated, built into generated.out_dir here when missing
    # (orderplan.train.generated_states)
    generated: GeneratedStatesConfig = field(default_factory=GeneratedStatesConfig)


STATES = ("teacher_forced", "generated")


def targets_from_utilities(util: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """Training targets [S, N]: one-hot of the argmax (kind=argmax) or softmax(u / tau) over the
    unrevealed blocks (kind=soft; u = -inf on revealed blocks gives them probability 0)."""
    if kind == "argmax":
        return F.one_hot(util.argmax(-1), util.shape[-1]).float()
    if kind == "soft":
        return torch.softmax(util.float() / tau, -1)
    raise ValueError(f"bc.targets must be argmax or soft, got {kind!r}")


def bc_loss(model: OrderHead, hidden: torch.Tensor, mask: torch.Tensor, util: torch.Tensor, targets: str = "argmax",
            tau: float = 1.0, R: int | None = None, label: torch.Tensor | None = None,
            beliefs: dict[str, torch.Tensor] | None = None):
    """Cross-entropy of the OrderHead's masked next-block distribution against the oracle targets.
    hidden [B, N, D] (or [B, L, D]), mask [B, N] revealed blocks, util [B, N] (-inf on revealed),
    label [B] (class-conditioned planners), beliefs: entropy [B, L] and query_hidden [B, N, D]
    (belief planners). Returns (loss, OrderHeadOutput)."""
    rows, out = bc_state_losses(model, hidden, mask, util, targets, tau, R, label, beliefs)
    return rows.mean(), out


def bc_state_losses(model: OrderHead | DistributedDataParallel, hidden: torch.Tensor, mask: torch.Tensor,
                    util: torch.Tensor, targets: str = "argmax", tau: float = 1.0, R: int | None = None,
                    label: torch.Tensor | None = None, beliefs: dict[str, torch.Tensor] | None = None):
    """`bc_loss` per state: (cross-entropy [B] in nats, OrderHeadOutput). `model` may be a
    DistributedDataParallel around the OrderHead: it is then called through its forward, which
    DDP must see to reduce the step's gradients."""
    if isinstance(model, DistributedDataParallel):
        obs = {"hidden": hidden, "block_mask": mask, **({"label": label} if label is not None else {}),
               **(beliefs or {})}
        out = model(obs, R=R)
    else:
        out = model.plan(hidden, mask, R=R, label=label, **(beliefs or {}))
    target = targets_from_utilities(util, targets, tau)
    logp = torch.log_softmax(out.logits.float(), -1).masked_fill(mask, 0.0)  # revealed: -inf * 0 -> 0; float32 always
    return -(target * logp).sum(-1), out


def r_at(step: int, steps: int, schedule: list[int]) -> int:
    """The latent-reasoning depth of `step`: the schedule's entries in equal shares of the steps."""
    return schedule[min(len(schedule) - 1, step * len(schedule) // max(steps, 1))]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def oracle_build_run(run: BCRun) -> BuildOracleRun:
    """The build of `run.oracle`: the train split of the run's backbone, plain one-block actions,
    the run's device and seed (`oracle_seed` when set: seeds of one planner can share one data set).
    The labels do not depend on the observation, so the build never computes belief features."""
    shared = {f.name: getattr(run.oracle, f.name) for f in fields(OracleConfig)}
    seed = run.seed if run.oracle_seed is None else run.oracle_seed
    return BuildOracleRun(**shared, backbone=run.backbone, env=replace(run.env, split="train", budget=None, beliefs=False),
                          device=run.device, seed=seed, split="train")


def load_or_build_oracle(run: BCRun, num_total: int, ctx: DistContext | None = None) -> OracleDataset:
    """The records of exactly the images `run.oracle` asks for, select_images(num_total,
    oracle.num_images, seed) of the train split's `num_total` images.

    A set in oracle.out_dir must have the identity of this build (`build_identity`: kind,
    behaviour, weight, states_per_image, seed, backbone weights by sha256, data, ...), else
    ValueError names the differing fields. When it lacks some of the images (or is missing), it is
    built, resumed or extended first (a larger num_images with the same seed selects a superset);
    a larger set is read down to the requested subset. The build leaves the global RNG as it was,
    so a run that builds its data equals one that finds it.

    Under torchrun (`ctx` of W > 1) every rank reads the directory, and when the set must be built
    all of them enter `build_oracle` together, which shards the images (rank r builds images[r::W])
    and has rank 0 alone write the manifest: the set is never built twice at once."""
    build = oracle_build_run(run)
    root = Path(build.out_dir)
    images = select_images(num_total, build.num_images, build.seed)
    ds = None
    if (root / MANIFEST).is_file():
        ds = OracleDataset(root)
        check_identity(ds.manifest["identity"], build_identity(build), root / MANIFEST,
                       f"Set oracle.out_dir to another directory to build this set there, or delete {root} to "
                       "rebuild it.", what="the oracle data there was built with a different setup")
        have = int(torch.isin(images, ds.images).sum())
        if have < len(images):
            print(f"{root} holds {have} of the {len(images)} images of oracle.num_images={build.num_images}: "
                  "extending it")
            ds = None
    else:
        print(f"oracle data not found in {root}: building it (scripts/build_oracle.py)")
    if ctx is not None and ctx.distributed:
        # build_oracle is collective (a gather and barriers): every rank enters it or none. The files
        # were read before any rank could write, so the ranks agree unless the directory changed under them.
        votes = all_gather_objects(ds is None, ctx)
        if len(set(votes)) > 1:
            raise RuntimeError(f"ranks disagree on whether {root} must be built ({votes}): was it changed during "
                               "the start of the run?")
    if ds is None:
        with torch.random.fork_rng(devices=[]):  # building a GPT draws its random init from the global RNG
            build_oracle(build)
        ds = OracleDataset(root)
    return ds.subset(images)


def sharded_episode_observations(core: OrderPlanningCore, rec: dict[str, torch.Tensor],
                                 ctx: DistContext | None = None) -> dict[str, torch.Tensor]:
    """`episode_observations` of records (image_index [S], prefix [S, N], length [S]), the replay
    split by episode under torchrun: rank r replays the sorted distinct images r::W (an episode is
    replayed whole on one rank, so no replay work is repeated), then every rank gathers all S rows.
    Shapes and dtypes as `episode_observations`; one process replays everything."""
    image_index = rec["image_index"].cpu().long()
    if ctx is None or not ctx.distributed:
        return episode_observations(core, image_index, rec["prefix"], rec["length"])
    images = image_index.unique()
    rows = torch.nonzero(torch.isin(image_index, images[shard_indices(len(images), ctx.rank, ctx.world)])).flatten()
    obs = episode_observations(core, image_index[rows], rec["prefix"].cpu()[rows], rec["length"].cpu()[rows])
    return {k: gather_rows(v, rows, len(image_index), ctx) for k, v in sorted(obs.items())}


@dataclass
class BCData:
    """The training states in memory (S of them, CPU): block-pooled hidden states `hidden` [S, N, D]
    float32 and block masks `mask` [S, N] from the frozen backbone, oracle utilities `util` [S, N]
    (nats, -inf on revealed blocks), class labels `labels` [S], and the stored states themselves
    (`image_index` [S], `prefix` [S, N], `length` [S]) that joint tuning replays on the tuned GPT.
    With env.beliefs also the belief features `entropy` [S, L] (nats) and `query_hidden` [S, N, D]."""

    hidden: torch.Tensor
    mask: torch.Tensor
    util: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    prefix: torch.Tensor
    length: torch.Tensor
    entropy: torch.Tensor | None = None
    query_hidden: torch.Tensor | None = None

    @classmethod
    def from_records(cls, core: OrderPlanningCore, rec: dict[str, torch.Tensor],
                     ctx: DistContext | None = None) -> BCData:
        """Features of oracle records (keys of `oracle_data.RECORD_KEYS`) replayed on `core`. Under
        torchrun (`ctx` of W > 1) rank r replays the episodes (images) r::W only and every rank
        gets all S states' features back (`gather_rows`: moved, never reduced)."""
        obs = sharded_episode_observations(core, rec, ctx)
        image_index = rec["image_index"].cpu()
        return cls(obs["hidden"], obs["block_mask"], rec["utilities"].clone(), core.labels.cpu()[image_index],
                   image_index.clone(), rec["prefix"].cpu().clone(), rec["length"].cpu().clone(),
                   obs.get("entropy"), obs.get("query_hidden"))

    def __len__(self) -> int:
        return len(self.util)

    def beliefs(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The belief inputs of `OrderHead.plan` for states idx (empty without beliefs)."""
        if self.entropy is None:
            return {}
        return {"entropy": self.entropy[idx].to(device), "query_hidden": self.query_hidden[idx].to(device)}

    def extend(self, more: BCData) -> None:
        """Append `more`'s states (a DAgger round) after these."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(more, f.name)
            setattr(self, f.name, None if a is None else torch.cat([a, b]))


def _check_bc_values(run: BCRun, check_paths: bool) -> None:
    """Every BCRun field in its range, named by its dotted key (src/orderplan/infra/validation.py)."""
    bc = run.bc
    check_run_config(run)
    num_blocks = check_backbone_config(run.backbone, check_paths=check_paths)
    check_env_config(run.env, num_blocks=num_blocks)
    check_oracle_config(run.oracle, "oracle.", num_blocks)
    check_int("oracle_seed", run.oracle_seed, allow_none=True, note=" (null = seed)")
    for name in ("d_model", "n_heads"):
        check_int(f"agent.{name}", getattr(run.agent, name), 1, allow_none=True, note=" (null = scaled to the backbone)")
    check_int("agent.n_latents", run.agent.n_latents, 1)
    check_positive("agent.mlp_ratio", run.agent.mlp_ratio)
    check_range("agent.dropout", run.agent.dropout, 0.0, 1.0, hi_open=True)
    for name in ("steps", "batch_size", "dagger_images", "replay_batch", "log_every", "ckpt_every",
                 "keep_checkpoints"):
        check_int(f"bc.{name}", getattr(bc, name), 1)
    check_int("bc.dagger_rounds", bc.dagger_rounds, 0, note=" (0 = no DAgger)")
    check_positive("bc.lr", bc.lr)
    check_range("bc.weight_decay", bc.weight_decay, 0.0)
    check_positive("bc.grad_clip", bc.grad_clip)
    check_choice("bc.targets", bc.targets, ("argmax", "soft"))
    check_positive("bc.soft_tau", bc.soft_tau, note=" (nats)")
    check_int_list("bc.R_schedule", bc.R_schedule, 0)
    check_joint_config(bc.joint, backbone_gpt_config(run.backbone).n_layer, bc.steps)
    check_eval_spec(run.eval)


def check_bc_run(run: BCRun, check_paths: bool = True) -> None:
    """Refuse a configuration train_bc cannot run, before any heavy work (ValueError naming the key
    and its allowed range, or the fix; with `check_paths`, FileNotFoundError for a missing
    bc.init_from or backbone weights)."""
    bc = run.bc
    _check_bc_values(run, check_paths)
    if run.states not in STATES:
        raise ValueError(f"states must be one of {STATES}, got {run.states!r}")
    if bc.joint.top_n and run.env.beliefs:
        raise ValueError("joint tuning (bc.joint.top_n > 0) recomputes hidden states in one causal pass per state, "
                         "which has no query rows: it does not support env.beliefs=true")
    if run.states == "generated":
        check_generated_states(run.generated)
        if bc.dagger_rounds:
            raise ValueError("states=generated does not run DAgger (bc.dagger_rounds > 0): its rounds label "
                             "teacher-forced learner states with the ground-truth oracle; set bc.dagger_rounds=0")
        if bc.joint.top_n:
            raise ValueError("states=generated does not run joint tuning (bc.joint.top_n > 0): it tunes the backbone "
                             "on teacher-forced states while the û labels stay the frozen one's; set bc.joint.top_n=0")
        if run.generated.roll_in == "init" and not bc.init_from:
            raise ValueError("states=generated with generated.roll_in=init rolls in with the init head: set "
                             "bc.init_from to an OrderHead .safetensors (e.g. a teacher-forced BC run's "
                             "orderhead.safetensors), or set generated.roll_in=random")
    if bc.init_from and check_paths:
        resolve_path(bc.init_from, what="bc.init_from (OrderHead weights)")


def head_config(run: BCRun, core: OrderPlanningCore) -> OrderHeadConfig:
    """The run's OrderHead config: agent sizes, R = max(R_schedule), the backbone's width, geometry
    and classes, belief inputs when env.beliefs."""
    return orderhead_config_for(core.D, core.geom, **asdict(run.agent), R=max(run.bc.R_schedule),
                                num_classes=core.gpt.cfg.num_classes, beliefs=run.env.beliefs,
                                backbone_weights=random_weights_tag(run.backbone))


@dataclass
class InitHead:
    """The head of bc.init_from, rebuilt with the run's config (eval mode), and its file's sha256."""

    model: OrderHead
    path: Path
    sha256: str


_FREE_HEAD_FIELDS = ("dropout", "R")  # the run's own: neither shapes a parameter


def load_init_head(run: BCRun, cfg: OrderHeadConfig, device: torch.device) -> InitHead | None:
    """bc.init_from's head (None when unset). Its config must equal the run's `cfg` except for
    dropout and R, else ValueError naming the differing fields. The global RNG is left as it was
    (building a head draws a random init), so the run's own init equals that of a fresh run."""
    if not run.bc.init_from:
        return None
    path = resolve_path(run.bc.init_from, what="bc.init_from (OrderHead weights)")
    with torch.random.fork_rng(devices=[]):
        loaded = load_orderhead(path)
        diff = [f"{f.name}: file {getattr(loaded.cfg, f.name)!r} vs run {getattr(cfg, f.name)!r}"
                for f in fields(OrderHeadConfig)
                if f.name not in _FREE_HEAD_FIELDS and getattr(loaded.cfg, f.name) != getattr(cfg, f.name)]
        if diff:
            raise ValueError(f"bc.init_from {path}: its OrderHead does not match this run's ({'; '.join(diff)}). "
                             "The run's head follows agent.*, env.beliefs and the backbone: set them as the file's "
                             "run had them, or train from another head")
        model = OrderHead(cfg)
        model.load_state_dict(loaded.state_dict())
    return InitHead(model.to(device).eval(), path, sha256_file(path))


@dataclass
class TrainingStates:
    """What BC trains on: the states' features and labels (`data`), the label kind, the checkpoint
    identity entries of the source, the train images used (DAgger draws others) and summary entries."""

    data: BCData
    kind: str
    identity: dict
    used: torch.Tensor
    summary: dict = field(default_factory=dict)


def oracle_states(run: BCRun, core: OrderPlanningCore, ctx: DistContext | None = None) -> TrainingStates:
    """states=teacher_forced: the oracle set's records (built when missing, sharded under torchrun),
    features replayed on the real train images (sharded by episode under torchrun)."""
    ds = load_or_build_oracle(run, core.num_images, ctx)
    print(f"oracle data: {len(ds)} states from {len(ds.images)} images ({ds.kind}); "
          f"recomputing hidden states with the frozen backbone")
    data = BCData.from_records(core, {"image_index": ds.image_index, "prefix": ds.prefix, "length": ds.length,
                                      "utilities": ds.utilities}, ctx)
    identity = {"oracle_dir": str(Path(run.oracle.out_dir).resolve()), "oracle": ds.manifest["identity"],
                "states": len(ds)}
    return TrainingStates(data, ds.kind, identity, ds.image_index)


def generated_states(run: BCRun, core: OrderPlanningCore, init: InitHead | None,
                     ctx: DistContext | None = None) -> TrainingStates:
    """states=generated: the generated-state set (built when missing, rolled in by the init head),
    its features replayed teacher-forced on the generated grids, which reproduces the visited states
    without ground truth. Labels: the expected oracle û (nats). Under torchrun rank 0 alone builds a
    missing set (the build is not sharded) while the others wait, then every rank reads it."""
    gen = run.generated
    seed = run.seed if gen.seed is None else gen.seed
    gs = _main_first(ctx, lambda: load_or_build_generated(gen, core.bb, run.env, seed, init.model if init else None,
                                                          init.sha256 if init else None))
    print(f"generated states: {len(gs)} states of {len(gs.codes)} generated images (expected_oracle, "
          f"K={gen.belief_samples}, roll_in={gen.roll_in}); recomputing hidden states on the generated grids")
    replay_core = OrderPlanningCore(core.bb, gs.codes, gs.labels, core.cfg, core.B, seed=run.seed)
    data = BCData.from_records(replay_core, gs.records(), ctx)
    identity = {"state_source": "generated", "generated_dir": str(Path(gen.out_dir).resolve()),
                "generated": gs.manifest["identity"], "states": len(gs)}
    summary = {"generated": {"out_dir": gen.out_dir, "images": len(gs.codes), "states": len(gs),
                             "identity": gs.manifest["identity"], "build": gs.manifest.get("build"),
                             "utility": gs.manifest.get("utility")}}
    return TrainingStates(data, "expected_oracle", identity, torch.zeros(0, dtype=torch.long), summary)


def _main_first(ctx: DistContext | None, load):
    """`load()` on rank 0 first (it may build files), then, after a barrier, on the other ranks
    (which find them); just `load()` in one process."""
    if ctx is None or not ctx.distributed:
        return load()
    out = load() if ctx.main else None
    barrier(ctx)
    return out if ctx.main else load()


class DaggerRounds:
    """DAgger: at fixed steps, states visited by the current (greedy) learner on train images not
    used yet, labelled by the oracle. Round r draws its images and behaviour from seeds of
    (seed, r) only. Under torchrun rank 0 alone collects a round (every rank holds the same
    learner) and broadcasts its record; the features of its states are replayed sharded."""

    def __init__(self, run: BCRun, core: OrderPlanningCore, kind: str, used: torch.Tensor,
                 ctx: DistContext | None = None):
        bc = run.bc
        self.run, self.core, self.kind, self.ctx = run, core, kind, ctx
        self.steps = [bc.steps * (r + 1) // (bc.dagger_rounds + 1) for r in range(bc.dagger_rounds)]
        self.used = set(used.tolist())

    def due(self, done: int, step: int) -> bool:
        """Whether round `done` (rounds done so far) starts at `step`."""
        return done < len(self.steps) and step >= self.steps[done]

    def add(self, data: BCData, r: int, model: OrderHead) -> dict[str, torch.Tensor]:
        """Append round r's states to `data` (the model is left in train mode). Returns the round's
        record: its images [M] and the oracle records of the states (`collect_states` keys), what a
        checkpoint keeps so that a resume replays the round instead of collecting it again (the
        learner that visited the states is gone by then)."""
        main = self.ctx is None or self.ctx.main
        round_rec = self._collect(r, model) if main else None
        if self.ctx is not None:
            round_rec = broadcast_object(round_rec, self.ctx)
        self.replay(data, r, round_rec)
        return round_rec

    def _collect(self, r: int, model: OrderHead) -> dict[str, torch.Tensor]:
        """Round r's record (`add`), collected by the greedy learner `model` (left in train mode)."""
        run, core = self.run, self.core
        pool = torch.tensor([i for i in select_images(core.num_images, None, run.seed).tolist() if i not in self.used])
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(run.seed + 100 + r))
        imgs = pool[perm[:run.bc.dagger_images]]
        learner = OrderHeadPolicy(model.eval(), greedy=True)
        rec = collect_states(core, lambda obs: learner.act(obs), imgs, self.kind, run.oracle.weight,
                             generator=torch.Generator().manual_seed(run.seed + 200 + r))
        model.train()
        return {"images": imgs.clone(), **rec}

    def replay(self, data: BCData, r: int, round_rec: dict[str, torch.Tensor]) -> None:
        """Append the states of round r's record (`add`) to `data`: their features are recomputed by
        the frozen backbone, exactly as when the round was collected."""
        self.used.update(round_rec["images"].tolist())
        data.extend(BCData.from_records(self.core, {k: round_rec[k] for k in RECORD_KEYS}, self.ctx))
        print(f"DAgger round {r + 1}: +{len(round_rec['image_index'])} learner-visited states ({len(data)} in all)")


def _checkpoint_identity(run: BCRun, states: TrainingStates, tuner: JointTuner | None,
                         init: InitHead | None) -> dict:
    """What a resumed run must share with its checkpoint (bc.steps may grow: the run continues)."""
    bc = run.bc
    identity = {"agent": asdict(run.agent), **states.identity, "targets": bc.targets,
                "soft_tau": bc.soft_tau, "R_schedule": list(bc.R_schedule), "batch_size": bc.batch_size,
                "lr": bc.lr, "seed": run.seed, "backbone": run.backbone.name}
    if run.env.beliefs:  # (absent when off, so checkpoints of plain planners keep resuming)
        identity["beliefs"] = True
    if tuner:  # (absent when off, so a joint checkpoint does not resume as a plain run, nor the reverse)
        identity["joint"] = {**asdict(bc.joint), "gpt_weights": str(tuner.base)}
    if init:  # (absent without bc.init_from, as above)
        identity["init_from_sha256"] = init.sha256
    return identity


def _make_tuner(run: BCRun, device: torch.device, core: OrderPlanningCore) -> tuple[JointTuner | None, dict | None]:
    """The joint tuner and the backbone's held-out bits/token before tuning (None, None when off)."""
    if not run.bc.joint.top_n:
        return None, None
    with torch.random.fork_rng(devices=[]):  # the global RNG (head dropout) stays that of a plain BC run
        tuner = JointTuner(run, device, core.codes, core.labels)
        if (Path(run.run_dir) / "gpt.safetensors").resolve() == tuner.base.resolve():
            raise ValueError(f"run_dir {run.run_dir} holds the backbone being tuned (backbone.gpt_weights): joint "
                             "tuning writes run_dir/gpt.safetensors, use another run_dir")
        return tuner, tuner.heldout_bits(run.backbone)


def _restore(ckpts: CheckpointManager, identity: dict, model: OrderHead, opt: torch.optim.Optimizer,
             tuner: JointTuner | None, ctx: DistContext | None = None) -> tuple[int, list[dict], int, list[dict] | None]:
    """Load the latest checkpoint, if any, into model / optimizer / tuner / RNG after checking its
    identity. Returns (step, history, DAgger rounds done, their records (None in checkpoints written
    before they were kept)); (0, [], 0, []) for a fresh run. Every rank reads the checkpoint; rank r
    takes back its own RNG state (`rng_by_rank`) when the checkpoint was written by as many ranks,
    else rank 0 takes `rng` and the other ranks keep their fresh dropout streams."""
    ckpt = ckpts.load_latest()
    if ckpt is None:
        return 0, [], 0, []
    check_identity(ckpt.get("identity", {}), identity, ckpts.latest(),
                   f"Use a new run_dir or delete {ckpts.ckpt_dir}.", what="cannot resume, the run changed")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if tuner:
        tuner.load_state_dict(ckpt["joint"])
    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world)
    by_rank = ckpt.get("rng_by_rank")  # only in checkpoints of W > 1 processes
    if by_rank is not None and len(by_rank) == world:
        set_rng_state(by_rank[rank])
    else:
        if rank == 0:
            set_rng_state(ckpt["rng"])
        if world > 1 or by_rank is not None:
            print(f"note: the checkpoint was written by {len(by_rank or [0])} process(es), this run has {world}: "
                  "the weights, optimizer and minibatches continue exactly, the dropout masks of ranks > 0 do not")
    print(f"resumed from {ckpts.latest()} at step {int(ckpt['step'])}")
    done = int(ckpt["dagger_done"])
    records = ckpt.get("dagger_records", None if done else [])
    return int(ckpt["step"]), list(ckpt["history"]), done, None if records is None else list(records)


@dataclass
class StepOut:
    """One optimisation step: the minibatch, its depth R, the BC loss (nats/state) and, in joint
    steps, L_AR (nats/token). Under torchrun `loss` and `logits` are this rank's share: the sum
    of its states' losses / batch size and the logits of its minibatch rows r::W (`_log` joins them)."""

    idx: torch.Tensor
    R: int
    loss: torch.Tensor
    logits: torch.Tensor
    loss_ar: torch.Tensor | None


def _train_step(run: BCRun, step: int, data: BCData, model: OrderHead | DistributedDataParallel,
                opt: torch.optim.Optimizer, tuner: JointTuner | None, device: torch.device,
                ctx: DistContext | None = None) -> StepOut:
    """Step `step`: the minibatch drawn from (seed, step) only (exact resume), one update of the
    head (and, from bc.joint.start_step on, of the tuned backbone). Under torchrun (`model` the
    DDP-wrapped head) every rank draws the same global minibatch and computes its rows r::W."""
    bc, jc = run.bc, run.bc.joint
    gen = torch.Generator().manual_seed(run.seed * 1_000_003 + step)
    idx = torch.randint(len(data), (bc.batch_size,), generator=gen)
    R = r_at(step, bc.steps, bc.R_schedule)
    if ctx is not None and ctx.distributed:
        return _sharded_step(run, idx, R, data, model, opt, device, ctx)
    joint = tuner is not None and step >= jc.start_step
    if joint:
        h, m = tuner.features(data.image_index[idx], data.labels[idx], data.prefix[idx], data.length[idx])
        if h.requires_grad:  # the backbone's share of L_OH is lambda * its gradient; the head's is 1
            h.register_hook(lambda g: g * jc.lam)
    else:
        h, m = data.hidden[idx].to(device), data.mask[idx].to(device)
    loss, out = bc_loss(model, h, m, data.util[idx].to(device), bc.targets, bc.soft_tau, R, data.labels[idx].to(device),
                        data.beliefs(idx, device))
    opt.zero_grad(set_to_none=True)
    loss_ar = None
    if joint:
        tuner.opt.zero_grad(set_to_none=True)
        loss_ar = tuner.ar_loss(step)
        (loss + loss_ar).backward()  # head: grad L_OH; tuned backbone: grad (L_AR + lam * L_OH)
        torch.nn.utils.clip_grad_norm_(tuner.params, jc.grad_clip)
        tuner.opt.step()
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), bc.grad_clip)
    opt.step()
    return StepOut(idx, R, loss.detach(), out.logits.detach(), None if loss_ar is None else loss_ar.detach())


def _sharded_step(run: BCRun, idx: torch.Tensor, R: int, data: BCData, model: DistributedDataParallel,
                  opt: torch.optim.Optimizer, device: torch.device, ctx: DistContext) -> StepOut:
    """`_train_step` on rank r of W: the minibatch rows r::W of `idx` [B] (the global minibatch)."""
    bc = run.bc
    mine = idx[shard_indices(len(idx), ctx.rank, ctx.world)]
    rows, out = bc_state_losses(model, data.hidden[mine].to(device), data.mask[mine].to(device),
                                data.util[mine].to(device), bc.targets, bc.soft_tau, R, data.labels[mine].to(device),
                                data.beliefs(mine, device))
    share = rows.sum() / bc.batch_size  # this rank's part of the minibatch mean (nats/state)
    opt.zero_grad(set_to_none=True)
    # DDP averages the ranks' gradients (sum / W): W * share makes that average the gradient of the
    # whole minibatch's mean, the one-process gradient up to float summation order
    (share * ctx.world).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), bc.grad_clip)
    opt.step()
    return StepOut(idx, R, share.detach(), out.logits.detach(), None)


def _log(s: StepOut, data: BCData, done: int, history: list[dict], logger: Logger, bar,
         ctx: DistContext | None = None) -> None:
    """Append step `done`'s loss, agreement with the oracle argmax and R to the history and the logger.
    Under torchrun every rank calls it (it joins the ranks' shares: the loss summed, the logits gathered)."""
    if ctx is not None and ctx.distributed:
        total = s.loss.clone()
        dist.all_reduce(total)
        s = replace(s, loss=total, logits=gather_strided(s.logits, len(s.idx), ctx))
    acc = float((s.logits.argmax(-1).cpu() == data.util[s.idx].argmax(-1)).float().mean())
    bar.set_postfix(loss=f"{float(s.loss):.3f}", acc=f"{acc:.2f}", R=s.R)
    history.append({"step": done, "loss": float(s.loss), "train_agreement": acc, "R": s.R})
    logger.log({"train/loss": float(s.loss), "train/agreement": acc, "train/R": s.R}, done)
    if s.loss_ar is not None:
        history[-1]["loss_ar"] = float(s.loss_ar)
        logger.log({"train/loss_ar": float(s.loss_ar)}, done)


def _save_weights(run: BCRun, model: OrderHead, tuner: JointTuner | None, bits_before: dict | None,
                  kind: str) -> tuple[Path, BackboneConfig, dict | None]:
    """Write run_dir/orderhead.safetensors (and, when tuned, run_dir/gpt.safetensors). Returns the
    head's path, the backbone the report scores on (the tuned GPT when tuned) and the joint summary."""
    bc, jc = run.bc, run.bc.joint
    run_dir = Path(run.run_dir)
    weights, gpt_path = run_dir / "orderhead.safetensors", run_dir / "gpt.safetensors"
    eval_backbone, joint_summary = run.backbone, None
    if tuner:
        tuner.gpt.eval()
        bits_after = tuner.heldout_bits(run.backbone)
        joint_summary = {"top_n": jc.top_n, "lam": jc.lam, "lr": jc.lr, "start_step": jc.start_step,
                         "tuned_blocks": tuner.blocks, "tuned_params": tuner.names,
                         "base_weights": str(tuner.base), "gpt_weights": str(gpt_path),
                         "heldout_bits_before": bits_before, "heldout_bits_after": bits_after}
        save_gpt(tuner.gpt, gpt_path, {"stage": "bc_joint", "steps": bc.steps, "top_n": jc.top_n, "lam": jc.lam,
                                       "tuned_blocks": tuner.blocks, "tuned_params": tuner.names,
                                       "base_weights": str(tuner.base), "base_sha256": sha256_file(tuner.base),
                                       "heldout_bits_before": bits_before, "heldout_bits_after": bits_after})
        eval_backbone = replace(run.backbone, gpt_weights=str(gpt_path.resolve()))  # every policy on the tuned GPT
    elif gpt_path.is_file() and load_safetensors(gpt_path)[1].get("stage") == "bc_joint":
        # the tuned backbone of an earlier joint run in this run_dir does not belong to this planner (PPO would use it)
        print(f"removing {gpt_path}: left by an earlier joint-tuning run, this run's planner uses the frozen backbone")
        remove_with_record(gpt_path)  # and its checksum record
    save_orderhead(model, weights, {"stage": "bc", "steps": bc.steps, "oracle_kind": kind,
                                    "backbone": run.backbone.name, "states": run.states,
                                    **({"gpt_weights": str(gpt_path)} if tuner else {})})
    return weights, eval_backbone, joint_summary


def _finish(run: BCRun, model: OrderHead, tuner: JointTuner | None, bits_before: dict | None, kind: str,
            device: torch.device, logger: Logger, t0: float, extra: dict) -> dict:
    """Save the weights, run the held-out report, write run_dir/summary.json (report + `extra`,
    wall time since `t0`)."""
    model.eval()
    weights, eval_backbone, joint_summary = _save_weights(run, model, tuner, bits_before, kind)
    report = heldout_report(eval_backbone, run.env, run.eval, model, device, run.seed, run.oracle.kind)
    logger.log({f"eval/return_{k}": v for k, v in report["returns"].items()}, run.bc.steps)
    logger.close()
    summary = {**report, "stage": "bc", "weights": str(weights), "params": sum(p.numel() for p in model.parameters()),
               **extra, "wall_time_s": time.time() - t0, "config": asdict(run)}
    if joint_summary:
        summary["joint"] = joint_summary
    atomic_write_json(Path(run.run_dir) / "summary.json", summary, checksum=True)
    print_report(summary)
    return summary


DIST_TIMEOUT_MIN = 12 * 60  # ranks > 0 wait while rank 0 alone builds generated states or runs the report


def check_bc_world(run: BCRun, world: int) -> None:
    """Refuse what W > 1 processes cannot run (ValueError naming the key): joint tuning (the tuned
    GPT blocks and their L_AR batch are not sharded), a minibatch smaller than the world."""
    if world <= 1:
        return
    if run.bc.joint.top_n:
        raise ValueError(f"bc.joint.top_n > 0 (joint tuning) runs in one process only, this run has {world} "
                         "(torchrun): run it with python, or set bc.joint.top_n=0")
    if run.bc.batch_size < world:
        raise ValueError(f"bc.batch_size ({run.bc.batch_size}) must be >= the number of processes ({world}): "
                         "each rank computes its rows r::W of the minibatch")


def _ddp(model: OrderHead, ctx: DistContext) -> OrderHead | DistributedDataParallel:
    """The head DDP-wrapped when W > 1 (its parameters broadcast from rank 0), else itself."""
    if not ctx.distributed:
        return model
    # find_unused_parameters: the value / router heads never get a BC gradient and the reasoning core
    # none at R = 0; their grads stay None, as in one process (AdamW skips them). The head's buffers
    # are constants (block rows / columns): synced once at init, not every forward.
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=True, forward_sync_buffers=False)


@job_dir("bc")
def train_bc(run: BCRun) -> dict:
    """Behaviour cloning + the held-out report. Writes run_dir/{orderhead.safetensors, summary.json}
    (and what it prints to run_dir/bc.log). Returns the summary.

    Under torchrun (W processes, `orderplan.infra.distributed`): the oracle set is built sharded when
    missing, each rank replays the episodes r::W for the features, and each step every rank draws
    the same global minibatch, computes its rows r::W and DDP averages the head's gradients, so a
    step equals the one-process step up to float summation order (dropout masks aside: each rank
    draws its own). Rank 0 alone writes checkpoints, weights, the summary and metrics and runs the
    held-out report; the other ranks return {"rank", "world"}."""
    t0 = time.time()
    check_bc_run(run)
    ctx = init_distributed(run.device, timeout_minutes=DIST_TIMEOUT_MIN)
    check_bc_world(run, ctx.world)
    bc = run.bc
    device = ctx.device
    seed_global(run.seed, "bc", "setup")  # what setup draws (a GPT's init, overwritten by its weights)
    train_env = replace(run.env, split="train", budget=None)
    core = make_core(run.backbone, env=train_env, batch_size=bc.replay_batch, device=device, seed=run.seed)
    cfg = head_config(run, core)
    init = load_init_head(run, cfg, device)  # before the data: the generated set is rolled in with it
    states = generated_states(run, core, init, ctx) if run.states == "generated" else oracle_states(run, core, ctx)
    data = states.data
    check_joint_config(bc.joint, core.gpt.cfg.n_layer, bc.steps)
    # its own stream: the init must not depend on what was drawn before (an in-process data build)
    with isolated_rng(run.seed, "bc", "orderhead_init"):
        model = OrderHead(cfg).to(device)
    if init:
        model.load_state_dict(init.model.state_dict())
        print(f"starting from {init.path} (sha256 {init.sha256[:12]})")
    opt = torch.optim.AdamW(model.parameters(), lr=bc.lr, weight_decay=bc.weight_decay)
    tuner, bits_before = _make_tuner(run, device, core)
    ckpts = CheckpointManager(Path(run.run_dir) / "checkpoints", keep_last=bc.keep_checkpoints)
    identity = _checkpoint_identity(run, states, tuner, init)
    # dropout; a checkpoint's RNG states replace it on resume. Rank 0's stream is the one-process one
    seed_global(run.seed, "bc", "train", *(("rank", ctx.rank) if ctx.rank else ()))
    start, history, dagger_done, dagger_records = _restore(ckpts, identity, model, opt, tuner, ctx)
    dagger = DaggerRounds(run, core, states.kind, states.used, ctx)
    if dagger_records is None:  # a checkpoint written before rounds were kept: collect them again
        print("note: this checkpoint does not keep its DAgger states; collecting them again with the resumed "
              "learner, so the run will not equal an uninterrupted one")
        with torch.random.fork_rng(devices=[]):
            dagger_records = [dagger.add(data, r, model) for r in range(dagger_done)]
    else:  # replay the stored rounds: the learner that visited their states is the one of back then
        for r, round_rec in enumerate(dagger_records):
            dagger.replay(data, r, round_rec)
    logger = Logger(run, Path(run.run_dir), enabled=ctx.main, job="bc")
    model.train()
    net = _ddp(model, ctx)
    bar = progress(range(start, bc.steps), initial=start, total=bc.steps, desc="bc", disable=not ctx.main)
    for step in bar:
        if dagger.due(dagger_done, step):
            dagger_records.append(dagger.add(data, dagger_done, model))
            dagger_done += 1
        out = _train_step(run, step, data, net, opt, tuner, device, ctx)
        done = step + 1
        if done % bc.log_every == 0 or done == bc.steps:
            _log(out, data, done, history, logger, bar, ctx)
        if done % bc.ckpt_every == 0 or done == bc.steps:
            rngs = all_gather_objects(rng_state(), ctx) if ctx.distributed else None
            if ctx.main:
                ckpts.save(done, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                                  "rng": rng_state(), **({"rng_by_rank": rngs} if rngs else {}), "history": history,
                                  "dagger_done": dagger_done, "dagger_records": dagger_records, "identity": identity,
                                  **({"joint": tuner.state_dict()} if tuner else {})})
    bar.close()
    if not ctx.main:
        close_distributed(ctx)  # waits at a barrier for rank 0's report
        return {"rank": ctx.rank, "world": ctx.world}
    extra = {"train_states": len(data), "steps": bc.steps, "resumed_from": start, "history": history,
             "states": run.states, **states.summary}
    if init:
        extra["init_from"] = {"path": str(init.path), "sha256": init.sha256}
    if ctx.distributed:
        extra["world_size"] = ctx.world
    summary = _finish(run, model, tuner, bits_before, states.kind, device, logger, t0, extra)
    close_distributed(ctx)
    return summary
