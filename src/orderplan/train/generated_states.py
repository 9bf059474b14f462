"""The generated-state data set, for BC on the states generation visits.

Teacher-forced BC (`orderplan.train.bc`, the oracle data set) only sees states made of real train
images. Generation visits states made of the model's own samples, where no ground truth exists. This
module records such states with the ground-truth-free label: the expected-oracle utility û(a|S)
(`OrderPlanningCore.expected_utilities`, K sampled completions per candidate block; its argmax is
the `expected_oracle` policy's choice).

Build (`build_generated_states`): `num_images` images are generated in generation mode
(`env.mode=generate`, `reward=entropy`, the `sampling` knobs); image i is conditioned on class
i % num_classes (class-balanced). The roll-in behaviour is the init OrderHead played greedily
(`roll_in=init`) or uniformly random blocks (`roll_in=random`). At every decision, BEFORE acting,
û(.|S) [B, N] is computed and the state is recorded in the oracle data set's record format:

    image_index  [S] long        the image, an index into this set's generated grids
    prefix       [S, N] long     the revealed blocks in reveal order, -1 padded
    length       [S] long        how many blocks are revealed
    utilities    [S, N] float32  û(a|S) in nats, -inf exactly on the revealed blocks

plus the generated token grids `codes` [M, L] long and their classes `labels` [M] long. Replaying a
recorded prefix teacher-forced on its generated grid reproduces exactly the state generation
visited (the same tokens in the same order), so `BCData.from_records` on a teacher-forced core over
(codes, labels) gives the training features without any ground truth.

Cost: û costs 1 + K * C backbone forwards per state (C = unrevealed blocks), so an image of N blocks
costs N + K * N (N + 1) / 2 forwards on top of generating it (K = 4, N = 16: 560).

Randomness: every state's draws come from the core's own generators, reseeded before each decision
with `core.seed(stream_seed(seed, batch, step))` (the sampled block of that step and the K
completions of û; `stream_seed` is sha256-based, the same in every process), and the random roll-in
from a generator of (seed, batch). The global torch RNG is left as it was (`fork_rng`), so building
the set in-process changes nothing downstream. The same config gives the same set; batch_size is
part of it (the rows of a batch share their generators).

On disk (`out_dir`): `states.pt` (records, codes, labels; written atomically) and `manifest.json`
(written after it: the identity of the set, counts, its sha256, utility statistics, build cost), each
with its checksum record, checked before the set is read. A
rerun with the same identity reuses the set; another identity raises ValueError naming the
differing fields. An unfinished build (no manifest) is rebuilt from scratch."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from orderplan.planner.orderhead import OrderHead
from orderplan.planner.policies import OrderHeadPolicy, RandomPolicy
from orderplan.infra.checkpoint import atomic_torch_save, atomic_write_json, check_identity, load_torch_checkpoint, sha256_file
from orderplan.infra.integrity import read_json_checked
from orderplan.infra.paths import resolve_path
from orderplan.model.loading import Backbone, random_weights_tag
from orderplan.infra.run_utils import progress
from orderplan.model.sampling import SamplingConfig, check_sampling
from orderplan.infra.validation import check_int
from orderplan.env.core import EnvConfig, OrderPlanningCore
from orderplan.env.episodes import play_episodes

__all__ = [
    "RECORD_KEYS",
    "ROLL_INS",
    "GeneratedStatesConfig",
    "GeneratedStates",
    "stream_seed",
    "generation_env",
    "generation_core",
    "roll_in_behaviour",
    "collect_generated_states",
    "generated_identity",
    "set_env",
    "build_generated_states",
    "load_or_build_generated",
]

RECORD_KEYS = ("image_index", "prefix", "length", "utilities")  # as orderplan.train.oracle_data
ROLL_INS = ("init", "random")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATES_FILE = "states.pt"

Obs = dict[str, torch.Tensor]
Act = Callable[[Obs], torch.Tensor]
RollIn = Callable[[int], Act]  # batch index -> the behaviour of that batch's episodes


@dataclass
class GeneratedStatesConfig:
    """The `generated:` section of the bc job (orderplan.train.bc.BCRun; preset
    src/orderplan/configs/bc_generated.yaml): which generated-state set a BC run with `states=generated`
    trains on, and how it is built (into out_dir, when missing)."""

    out_dir: str = "runs/generated_states/tiny_mnist"  # states.pt + manifest.json
    num_images: int = 64  # generated images; image i has class i % num_classes; every state of one episode each
    batch_size: int = 16  # episodes generated together (part of the identity: rows share generators)
    # K: sampled completions per candidate block of the label û (cost: 1 + K * C backbone forwards per state)
    belief_samples: int = 4
    roll_in: str = "init"  # init: the init OrderHead (bc.init_from), greedy | random: uniform blocks
    # generation (LlamaGen's knobs); cfg_scale 2.0 as in evaluation (scripts/evaluate.py, eval.sampling)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0))
    seed: int | None = None  # null = the run's seed


def check_generated_states(cfg: GeneratedStatesConfig) -> None:
    """Raise ValueError on a bad field (cheap: call it before any heavy work)."""
    if cfg.roll_in not in ROLL_INS:
        raise ValueError(f"generated.roll_in must be one of {ROLL_INS}, got {cfg.roll_in!r}")
    for name in ("num_images", "batch_size", "belief_samples"):
        check_int(f"generated.{name}", getattr(cfg, name), 1)
    check_sampling(cfg.sampling, "generated.sampling")
    check_int("generated.seed", cfg.seed, allow_none=True, note=" (null = the run's seed)")


@dataclass
class GeneratedStates:
    """A finished generated-state set in memory (CPU): the records (RECORD_KEYS, see the module
    docstring), the generated grids `codes` [M, L] long, their classes `labels` [M] long and the
    `manifest`."""

    image_index: torch.Tensor
    prefix: torch.Tensor
    length: torch.Tensor
    utilities: torch.Tensor
    codes: torch.Tensor
    labels: torch.Tensor
    manifest: dict

    def __len__(self) -> int:
        return len(self.image_index)

    def records(self) -> dict[str, torch.Tensor]:
        """The records keyed by RECORD_KEYS (the input of `BCData.from_records`)."""
        return {k: getattr(self, k) for k in RECORD_KEYS}

    @classmethod
    def load(cls, root: str | Path) -> GeneratedStates:
        """Read a set written by `build_generated_states`; ValueError if it is incomplete or altered."""
        root = Path(root)
        manifest = _read_manifest(root)
        blob = load_torch_checkpoint(root / manifest["file"], _rebuild_hint(root), required=True)
        return cls(**{k: blob[k] for k in (*RECORD_KEYS, "codes", "labels")}, manifest=manifest)


# ----------------------------------------------------------------------------------------------
# Collecting states
# ----------------------------------------------------------------------------------------------


def stream_seed(seed: int, *keys: object) -> int:
    """A 62-bit seed for one random stream, from the set's seed and the stream's keys (sha256 of
    their repr: the same in every process, unlike `hash()`, and unrelated for nearby keys)."""
    text = repr((int(seed), *keys)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") % (2**62)


def generation_env(env: EnvConfig, cfg: GeneratedStatesConfig, beliefs: bool) -> EnvConfig:
    """The generation-mode env of the build: `env` (a BC run's, teacher-forced) switched to
    generation with the set's sampling knobs and K, plain one-block actions, no decision cost.
    `beliefs`: whether the observation carries the belief features (the roll-in head reads them).
    Other env fields (e.g. oracle_chunk) are the run's."""
    return replace(env, mode="generate", reward="entropy", split="train", budget=None, decision_cost=0.0,
                   gamma=None, sampling=replace(cfg.sampling), belief_samples=int(cfg.belief_samples),
                   beliefs=bool(beliefs))


def generation_core(bb: Backbone, env: EnvConfig, num_images: int, batch_size: int,
                    codes: torch.Tensor | None = None) -> OrderPlanningCore:
    """A generation-mode core over `num_images` class-balanced conditioning labels (image i has
    class i % num_classes). `codes` [M, L]: the core's image pool; generation never reads it (only
    the labels), so it defaults to zeros (tests pass other grids to show that)."""
    L, C = bb.gpt.cfg.num_tokens, bb.gpt.cfg.num_classes
    labels = torch.arange(num_images) % C
    codes = torch.zeros(num_images, L, dtype=torch.long) if codes is None else codes
    if tuple(codes.shape) != (num_images, L):
        raise ValueError(f"codes must be [num_images={num_images}, L={L}], got {tuple(codes.shape)}")
    return OrderPlanningCore(bb, codes, labels, env, batch_size, seed=0)


def roll_in_behaviour(kind: str, head: OrderHead | None, seed: int) -> RollIn:
    """The roll-in of batch j: the init head played greedily (`init`; its dropout off) or uniform
    random blocks from a generator of (seed, j) (`random`)."""
    if kind == "init":
        if head is None:
            raise ValueError("generated.roll_in=init plays the init OrderHead: set bc.init_from (or roll_in=random)")
        policy = OrderHeadPolicy(head.eval(), greedy=True)
        return lambda j: policy.act
    if kind == "random":
        return lambda j: RandomPolicy(seed=stream_seed(seed, "roll_in", j)).act
    raise ValueError(f"generated.roll_in must be one of {ROLL_INS}, got {kind!r}")


def _candidates(revealed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Candidates [B, C] of û: every unrevealed block of the rows in `rows` [B] bool, ascending and
    packed left (as `expected_utilities` does by default); -1 pads, and fills the other rows so
    padding rows of a partial batch are never branched (they would cost K * N forwards each)."""
    C = int((~revealed[rows]).sum(1).max())
    idx = torch.sort(revealed.to(torch.int8), dim=1, stable=True).indices[:, :C]
    cand = torch.where(revealed.gather(1, idx), -1, idx)
    return cand.masked_fill(~rows[:, None], -1)


@torch.no_grad()
def _collect_batch(core: OrderPlanningCore, idx: torch.Tensor, act: Act, K: int, seed: int, j: int,
                   out: dict[str, list[torch.Tensor]]) -> int:
    """Generate images idx [n] (n <= B) as batch j and append every state's record to `out`, and
    the grids to out["codes"]. Returns the backbone forwards û cost."""
    B, dev = core.B, core.device
    n = len(idx)
    real = torch.arange(B, device=dev) < n
    forwards = 0

    def decide(obs: Obs) -> torch.Tensor:
        nonlocal forwards
        t = int(core.steps[0])  # plain actions: every real row (row 0 is one) has revealed t blocks
        core.seed(stream_seed(seed, j, t))  # this step's sampled block and the K completions of û
        bu = core.expected_utilities(K, candidates=_candidates(core.revealed, real))
        forwards += int(bu.forwards[real].sum())
        out["image_index"].append(idx.clone())
        out["prefix"].append(core.history[real].cpu())
        out["length"].append(core.steps[real].cpu())
        out["utilities"].append(bu.util[real].float().cpu())
        return act(obs)

    # padding rows are reset on an image of the batch but never stepped nor recorded
    play_episodes(core, torch.cat([idx, idx[:1].expand(B - n)]).to(dev), decide, rows=real)
    out["codes"].append(core.x[:n].cpu())
    return forwards


@torch.no_grad()
def collect_generated_states(core: OrderPlanningCore, roll_in: RollIn, K: int, seed: int,
                             show_progress: bool = False) -> dict[str, torch.Tensor]:
    """Generate one episode per image of `core`'s pool (core.B at a time; batch j = images
    [j B, (j + 1) B)) under the roll-in and record û at every state before acting (module
    docstring). Returns CPU tensors: the RECORD_KEYS (records grouped by batch, then step), codes
    [M, L] long (the generated grids), labels [M] long, and forwards (0-dim long: û's total cost)."""
    if core.cfg.mode != "generate":
        raise ValueError("generated states come from generation: build the core with env.mode=generate")
    if core.router:
        raise ValueError("generated states use plain one-block actions: set env.budget=null")
    M, B = core.num_images, core.B
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (*RECORD_KEYS, "codes")}
    forwards = 0
    bar = progress(total=M, desc="generated states", unit="img", disable=not show_progress)
    for j, i0 in enumerate(range(0, M, B)):
        idx = torch.arange(i0, min(i0 + B, M))
        forwards += _collect_batch(core, idx, roll_in(j), K, seed, j, out)
        bar.update(len(idx))
    bar.close()
    rec = {k: torch.cat(v) for k, v in out.items()}
    rec["labels"] = core.labels.cpu().clone()
    rec["forwards"] = torch.tensor(forwards)
    return rec


# ----------------------------------------------------------------------------------------------
# The stored set
# ----------------------------------------------------------------------------------------------


def generated_identity(cfg: GeneratedStatesConfig, bb: Backbone, gen_env: EnvConfig, seed: int,
                       init_sha256: str | None) -> dict:
    """What makes two builds the same set (every field that shapes the records or the grids): the
    set's config (out_dir aside), the backbone by name and GPT weights' sha256, the geometry, every
    field of the generation env `gen_env` as "env.<field>" (e.g. oracle_chunk groups û's draws; new
    env fields join on their own) and, for roll_in=init, the init head's sha256 (a random roll-in
    does not depend on the head, so such a set serves any head)."""
    weights = resolve_path(bb.cfg.gpt_weights, what="GPT weights") if bb.cfg.gpt_weights else None
    ident = {"format": FORMAT_VERSION, "backbone": bb.cfg.name,
             "gpt_weights_sha256": sha256_file(weights) if weights else None,
             **({"gpt_random_weights": tag} if (tag := random_weights_tag(bb.cfg)) else {}),
             "num_blocks": bb.geometry.num_blocks, "num_classes": bb.gpt.cfg.num_classes,
             "num_images": int(cfg.num_images), "batch_size": int(cfg.batch_size),
             "belief_samples": int(cfg.belief_samples), "roll_in": cfg.roll_in, "sampling": asdict(cfg.sampling),
             "seed": int(seed), "init_sha256": init_sha256 if cfg.roll_in == "init" else None}
    # sampling and belief_samples are the set's own fields above: not named twice
    ident.update({f"env.{k}": v for k, v in asdict(gen_env).items() if k not in ("sampling", "belief_samples")})
    return ident


def set_env(cfg: GeneratedStatesConfig, env: EnvConfig, head: OrderHead | None) -> EnvConfig:
    """The generation env of the set: `generation_env` with belief features exactly when the roll-in
    head reads them."""
    return generation_env(env, cfg, beliefs=cfg.roll_in == "init" and head is not None and head.cfg.beliefs)


def _rebuild_hint(root: Path) -> str:
    return f"delete {root}; the next BC run that reads it (e.g. --config-name bc_generated) builds it again"


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {root}: the generated-state set is missing or unfinished")
    return read_json_checked(path, _rebuild_hint(root))


def _utility_stats(util: torch.Tensor) -> dict:
    """Mean over states of max_a û (nats) and how often each block is the label."""
    if not len(util):
        return {"mean_max": 0.0, "argmax_histogram": []}
    return {"mean_max": float(util.max(-1).values.mean()),
            "argmax_histogram": torch.bincount(util.argmax(-1), minlength=util.shape[1]).tolist()}


def build_generated_states(cfg: GeneratedStatesConfig, bb: Backbone, env: EnvConfig, seed: int,
                           head: OrderHead | None = None, init_sha256: str | None = None,
                           show_progress: bool = True) -> dict:
    """Build the set of `cfg` into cfg.out_dir (overwriting an unfinished one): states.pt, then
    manifest.json. `env`: the BC run's env (generation settings are taken from `cfg`); `head`: the
    roll-in OrderHead (roll_in=init). The global RNG is left as it was. Returns the manifest."""
    check_generated_states(cfg)
    gen_env = set_env(cfg, env, head)
    identity = generated_identity(cfg, bb, gen_env, seed, init_sha256)
    root = Path(cfg.out_dir)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):  # nothing here may move the global stream (BC's init, dropout)
        core = generation_core(bb, gen_env, cfg.num_images, cfg.batch_size)
        rec = collect_generated_states(core, roll_in_behaviour(cfg.roll_in, head, seed), cfg.belief_samples, seed,
                                       show_progress)
    seconds = time.time() - t0
    forwards = int(rec.pop("forwards"))
    atomic_torch_save(rec, root / STATES_FILE, checksum=True)
    S = len(rec["image_index"])
    manifest = {"identity": identity, "file": STATES_FILE, "sha256": sha256_file(root / STATES_FILE),
                "counts": {"images": int(cfg.num_images), "states": S},
                "utility": _utility_stats(rec["utilities"]),
                "build": {"seconds": seconds, "seconds_per_state": seconds / max(S, 1),
                          "forwards": forwards, "forwards_per_state": forwards / max(S, 1)}}
    atomic_write_json(root / MANIFEST, manifest, checksum=True)  # last: its presence means the set is complete
    print(f"generated states: {S} states of {cfg.num_images} generated images in {seconds:.1f}s "
          f"({seconds / max(S, 1):.3f} s/state, {forwards / max(S, 1):.1f} forwards/state) -> {root}")
    return manifest


def load_or_build_generated(cfg: GeneratedStatesConfig, bb: Backbone, env: EnvConfig, seed: int,
                            head: OrderHead | None = None, init_sha256: str | None = None,
                            show_progress: bool = True) -> GeneratedStates:
    """The set of `cfg`: the one in cfg.out_dir when its identity (`generated_identity`) matches,
    else ValueError naming the differing fields; built first when out_dir holds none."""
    check_generated_states(cfg)
    root = Path(cfg.out_dir)
    if (root / MANIFEST).is_file():
        now = generated_identity(cfg, bb, set_env(cfg, env, head), seed, init_sha256)
        check_identity(_read_manifest(root)["identity"], now,
                       root / MANIFEST, f"Set generated.out_dir to another directory to build this set there, or "
                       f"delete {root} to rebuild it.", what="the generated states there were built with a "
                       "different setup")
    else:
        print(f"generated states not found in {root}: building them ({cfg.num_images} images, "
              f"K={cfg.belief_samples}, roll_in={cfg.roll_in})")
        build_generated_states(cfg, bb, env, seed, head, init_sha256, show_progress)
    return GeneratedStates.load(root)
