"""Stage 2 (seed 000): the oracle data set for behaviour cloning.

A record is one visited state of a teacher-forced episode, stored compactly:

    image_index  int         the image (index into the split's token data)
    prefix       [N] long    the revealed blocks in reveal order, -1 padded
    length       int         how many blocks are revealed
    utilities    [N] float32 the oracle utility of every block from that state (-inf on revealed)

plus the utility kind (one per data set, in the manifest). Hidden states are *not* stored: a
learner recomputes them with the frozen backbone by replaying the prefix (`orderplan.train.features.replay_states`), which
costs N cached steps per batch and keeps the data set at ~100 bytes per state at any model size.

On disk (`out_dir`): `shard_{rank:03d}_{chunk:05d}.pt` (one chunk of images, written atomically),
`progress_{rank:03d}.json` (the chunks a rank has finished, moved only after the shard is
complete: a rerun skips finished images exactly and overwrites a shard left orphaned by a crash),
and `manifest.json` (written by rank 0 once every rank is done: the identity of the build, the
shard list, counts). The identity (`build_identity`) is every config field that shapes the data,
with the GPT weights by sha256; a rerun against a directory built differently (kind, behaviour,
seed, states_per_image, backbone weights, data, ...) raises ValueError naming the differing fields
instead of mixing two data sets, and so does a BC run reading it (`orderplan.train.bc`).

Every shard, progress file and the manifest carries a checksum record (`orderplan.infra.integrity`)
and is checked before it is read: a damaged shard is refused by name (`OracleDataset`) and rebuilt,
from the same images and seed, by the next build_oracle run on the directory.

Under torchrun, rank r builds images[r::world] (its own shards and progress file); rank 0 checks
that every image is covered exactly once and writes the manifest after a barrier.

Randomness (random behaviour, the subset of states kept) is drawn from a generator seeded by
(seed, the chunk's first image), so an interrupted and resumed build equals an uninterrupted one."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import torch

from orderplan.infra.checkpoint import atomic_torch_save, atomic_write_json, check_identity, load_torch_checkpoint, sha256_file
from orderplan.infra.integrity import IntegrityError, read_json_checked, remove_with_record, verify_file
from orderplan.config.common import BackboneConfig
from orderplan.infra.paths import resolve_path
from orderplan.model.loading import check_backbone_config
from orderplan.oracle.future_loss import UtilityKind, WeightKind
from orderplan.infra.run_utils import job_dir
from orderplan.infra.validation import check_choice, check_int
from orderplan.train.features import check_replay_core, replay_states
from orderplan.env.actions import random_valid_action  # its plain rule is exactly this data set's draw
from orderplan.env.core import EnvConfig, check_env_config
from orderplan.env.episodes import play_episodes

__all__ = [
    "RECORD_KEYS",
    "OracleConfig",
    "BuildOracleRun",
    "OracleDataset",
    "collect_states",
    "replay_states",
    "select_images",
    "oracle_identity",
    "build_identity",
    "check_out_dir",
    "build_shards",
    "write_manifest",
    "build_oracle",
]

RECORD_KEYS = ("image_index", "prefix", "length", "utilities")
BEHAVIOURS = ("random", "oracle")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Behaviour = str | Callable[[dict[str, torch.Tensor]], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Collecting states
# ----------------------------------------------------------------------------------------------


def _behaviour_action(core, behaviour: Behaviour, util: torch.Tensor | None,
                      generator: torch.Generator) -> torch.Tensor:
    """Next block [B] of every row under `behaviour` (values on finished rows are ignored)."""
    if callable(behaviour):
        action = behaviour(core.observation())
        if not isinstance(action, torch.Tensor):
            raise ValueError(f"a behaviour callable must return a tensor [B], got {type(action).__name__}")
        return action
    if behaviour == "oracle":
        return util.argmax(-1)
    if behaviour == "random":
        return random_valid_action(~core.revealed, generator)
    raise ValueError(f"unknown behaviour {behaviour!r}; use one of {BEHAVIOURS} or a callable obs -> action")


@torch.no_grad()
def collect_states(core, behaviour: Behaviour, image_index: torch.Tensor, kind: str = "future_loss",
                   weight: str | None = None, states_per_image: int | None = None,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Run one teacher-forced episode per image of `image_index` [M] (core.B at a time) under
    `behaviour` ("random", "oracle" = argmax of the `kind` utilities, or a callable
    `f(obs) -> action [B]` such as the current learner for DAgger) and record the oracle utilities
    (`core.oracle_utilities(kind, weight)`) at the visited states: every state before the last
    action (N per image), or a random subset of `states_per_image` of them per image.

    Returns CPU tensors keyed by RECORD_KEYS, records grouped by batch then step:
    image_index [S], prefix [S, N], length [S] (long), utilities [S, N] float32.
    The core's episodes are reset; its image pool and state are otherwise untouched."""
    check_replay_core(core)
    if states_per_image is not None and states_per_image < 1:
        raise ValueError(f"states_per_image must be >= 1 (or None for all), got {states_per_image}")
    generator = generator or torch.Generator().manual_seed(0)
    image_index = torch.as_tensor(image_index).long().flatten().cpu()
    B, N, dev = core.B, core.N, core.device
    out: dict[str, list[torch.Tensor]] = {k: [] for k in RECORD_KEYS}
    for i0 in range(0, len(image_index), B):
        idx = image_index[i0:i0 + B]
        n = len(idx)
        real = torch.arange(B, device=dev) < n
        if states_per_image is None or states_per_image >= N:
            keep = torch.ones(B, N, dtype=torch.bool)
        else:  # a random subset of the steps of each episode
            order = torch.rand(B, N, generator=generator).argsort(-1)
            keep = torch.zeros(B, N, dtype=torch.bool).scatter_(1, order[:, :states_per_image], True)
        keep = keep.to(dev) & real[:, None]

        def act(obs: dict[str, torch.Tensor], keep: torch.Tensor = keep) -> torch.Tensor:
            rec = keep[:, int(core.steps[0])]  # plain actions: row 0 (always real) has revealed t blocks
            util = None
            if behaviour == "oracle" or bool(rec.any()):
                util = core.oracle_utilities(kind, weight)
            if bool(rec.any()):
                out["image_index"].append(core.image_index[rec].cpu())
                out["prefix"].append(core.history[rec].cpu())
                out["length"].append(core.steps[rec].cpu())
                out["utilities"].append(util[rec].float().cpu())
            return _behaviour_action(core, behaviour, util, generator).to(dev).long()

        # padding rows are reset with an image of the batch but never stepped nor recorded
        play_episodes(core, torch.cat([idx, idx[:1].expand(B - n)]).to(dev), act, rows=real)
    if not out["image_index"]:
        return {"image_index": torch.zeros(0, dtype=torch.long), "prefix": torch.zeros(0, N, dtype=torch.long),
                "length": torch.zeros(0, dtype=torch.long), "utilities": torch.zeros(0, N)}
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# The sharded, resumable build
# ----------------------------------------------------------------------------------------------


def select_images(num_total: int, num_images: int | None, seed: int) -> torch.Tensor:
    """The images to build, sorted: a seeded random subset of `num_images` of the split's
    `num_total` (a larger `num_images` with the same seed extends the same subset); None = all."""
    if num_images is None or num_images >= num_total:
        return torch.arange(num_total)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1 (or null for the whole split), got {num_images}")
    perm = torch.randperm(num_total, generator=torch.Generator().manual_seed(seed))
    return perm[:num_images].sort().values


def oracle_identity(kind: str, behaviour: str, split: str, backbone: str, data: str, num_blocks: int,
                    states_per_image: int | None, seed: int, weight: str | None = None,
                    neighbour_weight: float = 0.5, **extra) -> dict:
    """What makes two builds the same data set; a resume refuses a directory whose identity
    differs. The extrapolative weighting only counts for kind=extrapolative."""
    ident = {"format": FORMAT_VERSION, "kind": kind, "behaviour": behaviour, "split": split, "backbone": backbone,
             "data": data, "num_blocks": num_blocks, "states_per_image": states_per_image, "seed": seed,
             "weight": weight if kind == "extrapolative" else None,
             "neighbour_weight": neighbour_weight if kind == "extrapolative" and weight == "neighbours" else None}
    ident.update(extra)
    return ident


def _check_identity(saved: dict, now: dict, where: Path) -> None:
    check_identity(saved, now, where, f"Use another out_dir, or delete {where.parent} to rebuild it.",
                   what="the oracle data there was built with a different setup")


def _progress_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"progress_{rank:03d}.json"


def _shard_name(rank: int, chunk: int) -> str:
    return f"shard_{rank:03d}_{chunk:05d}.pt"


def rebuild_hint(out_dir: Path) -> str:
    """How to rebuild a damaged file of the oracle set in `out_dir` (for integrity errors)."""
    return (f"rerun `python scripts/build_oracle.py out_dir={out_dir}` with the settings it was built with: it "
            f"rebuilds damaged shards and the manifest (a damaged progress file: delete {out_dir} and rebuild)")


def _read_json(path: Path) -> dict:
    """A progress file or the manifest, after its checksum is checked."""
    return read_json_checked(path, rebuild_hint(path.parent))


def _read_progress(out_dir: Path) -> dict[int, dict]:
    """Every rank's progress file in out_dir, by rank."""
    out = {}
    for p in sorted(out_dir.glob("progress_*.json")):
        prog = _read_json(p)
        out[int(prog["rank"])] = prog
    return out


def _write_progress(path: Path, progress: dict) -> None:
    atomic_write_json(path, progress, checksum=True)


def check_out_dir(out_dir: str | Path, identity: dict) -> None:
    """Raise ValueError if out_dir holds (part of) a build with a different identity."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).is_file():
        try:
            saved = _read_json(out_dir / MANIFEST)
        except IntegrityError as e:  # rebuilt from the progress files and shards at the end of the build
            print(f"{e}\n(the manifest is written again at the end of this build)")
        else:
            _check_identity(saved["identity"], identity, out_dir / MANIFEST)
    for rank, prog in _read_progress(out_dir).items():
        _check_identity(prog["identity"], identity, _progress_path(out_dir, rank))


def build_shards(core, out_dir: str | Path, image_index: torch.Tensor, identity: dict, *,
                 behaviour: Behaviour = "random", kind: str = "future_loss", weight: str | None = None,
                 states_per_image: int | None = None, chunk_images: int = 64, seed: int = 0,
                 rank: int = 0, world: int = 1, show_progress: bool = True) -> dict:
    """Build (or resume) this rank's share images[rank::world] of the data set in out_dir.

    Images already finished by any rank (per the progress files) are skipped; the rest go in
    chunks of `chunk_images`: collect, write the shard atomically, then record it in this rank's
    progress file. A shard of this rank not listed there (a crash between the two writes) is
    deleted first and rebuilt. Returns this run's counts for this rank."""
    from orderplan.infra.run_utils import progress as progress_bar

    if chunk_images < 1:
        raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_out_dir(out_dir, identity)
    everyone = _read_progress(out_dir)
    done = {i for prog in everyone.values() for c in prog["chunks"] for i in c["images"]}
    mine = everyone.get(rank, {"rank": rank, "identity": identity, "chunks": []})
    listed = {c["file"] for c in mine["chunks"]}
    for orphan in out_dir.glob(f"shard_{rank:03d}_*.pt"):
        if orphan.name not in listed:
            remove_with_record(orphan)
    share = [int(i) for i in torch.as_tensor(image_index).long()[rank::world].tolist()]
    todo = [i for i in share if i not in done]
    chunks = [todo[i:i + chunk_images] for i in range(0, len(todo), chunk_images)]
    bar = progress_bar(total=len(share), initial=len(share) - len(todo), disable=not show_progress or rank != 0,
                       desc=f"oracle[{rank}/{world}]" if world > 1 else "oracle", unit="img")
    states, t0 = 0, time.time()

    def build_chunk(images: list[int], name: str) -> int:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + images[0])
        rec = collect_states(core, behaviour, torch.tensor(images), kind, weight, states_per_image, gen)
        shard = {"image_index": rec["image_index"], "prefix": rec["prefix"].to(torch.int16),
                 "length": rec["length"].to(torch.int16), "utilities": rec["utilities"],
                 "images": torch.tensor(images), "kind": kind}
        atomic_torch_save(shard, out_dir / name, checksum=True)
        return len(rec["image_index"])

    # finished chunks whose shard is damaged or gone are rebuilt in place: the same images and seed give
    # the same records, so the progress file and the other shards stay valid
    for c in mine["chunks"]:
        try:
            verify_file(out_dir / c["file"], rebuild_hint(out_dir))
        except (IntegrityError, FileNotFoundError) as e:
            print(f"{e}\nrebuilding {c['file']} ({len(c['images'])} images)")
            n = build_chunk(c["images"], c["file"])
            if n != c["states"]:
                raise RuntimeError(f"{out_dir / c['file']}: rebuilt with {n} states, the progress file says "
                                   f"{c['states']}: the build is not reproducible here; delete {out_dir} and rebuild")
    for images in chunks:
        name = _shard_name(rank, len(mine["chunks"]))
        n = build_chunk(images, name)
        mine["chunks"].append({"file": name, "images": images, "states": n})
        _write_progress(_progress_path(out_dir, rank), mine)  # the chunk counts only from here on
        states += n
        bar.update(len(images))
    bar.close()
    return {"rank": rank, "images_built": len(todo), "images_skipped": len(share) - len(todo), "states_built": states,
            "chunks_built": len(chunks), "seconds": time.time() - t0}


def write_manifest(out_dir: str | Path, image_index: torch.Tensor, identity: dict, write: bool = True) -> dict:
    """Rank 0, after every rank finished: check that every image of `image_index` is covered
    exactly once across the progress files, then write manifest.json (identity, shard list, counts,
    utility statistics; only built and returned with write=False). Raises RuntimeError on a lost or
    duplicated image."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, identity)
    everyone = _read_progress(out_dir)
    chunks = [c for r in sorted(everyone) for c in everyone[r]["chunks"]]
    covered = [i for c in chunks for i in c["images"]]
    counts: dict[int, int] = {}
    for i in covered:
        counts[i] = counts.get(i, 0) + 1
    dup = sorted(i for i, k in counts.items() if k > 1)
    lost = sorted(set(int(i) for i in torch.as_tensor(image_index).tolist()) - set(counts))
    if dup or lost:
        raise RuntimeError(f"{out_dir}: images covered more than once {dup[:10]} or never {lost[:10]}")
    n_states, max_sum, hist = 0, 0.0, None
    for c in chunks:
        shard = load_torch_checkpoint(out_dir / c["file"], rebuild_hint(out_dir), required=True)
        u = shard["utilities"]
        if len(u) != c["states"]:
            raise RuntimeError(f"{out_dir / c['file']}: {len(u)} states, progress says {c['states']}")
        n_states += len(u)
        if len(u):
            max_sum += float(u.max(-1).values.sum())
            h = torch.bincount(u.argmax(-1), minlength=u.shape[1])
            hist = h if hist is None else hist + h
    manifest = {
        "identity": identity,
        "kind": identity["kind"],
        "weight": identity.get("weight"),
        "behaviour": identity["behaviour"],
        "split": identity["split"],
        "backbone": identity["backbone"],
        "data": identity["data"],
        "counts": {"images": len(counts), "states": n_states, "shards": len(chunks)},
        "shards": [c["file"] for c in chunks],
        "utility": {"mean_max": max_sum / max(n_states, 1),
                    "argmax_histogram": hist.tolist() if hist is not None else []},
    }
    if write:
        atomic_write_json(out_dir / MANIFEST, manifest, checksum=True)
    return manifest


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


class OracleDataset:
    """A finished oracle data set (`manifest.json` + shards) in memory:
    image_index [S], prefix [S, N], length [S] (long), utilities [S, N] float32; `kind`,
    `manifest`. `ds[i]` is one record as a dict; `oracle_action` [S] the argmax block."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {self.root}: the build is missing or unfinished "
                                    "(rerun scripts/build_oracle.py with the same out_dir to resume it)")
        self.manifest = _read_json(path)
        self.kind: str = self.manifest["kind"]
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in RECORD_KEYS}
        for name in self.manifest["shards"]:
            shard = load_torch_checkpoint(self.root / name, rebuild_hint(self.root), required=True)
            for k in RECORD_KEYS:
                parts[k].append(shard[k])
        N = int(self.manifest["identity"]["num_blocks"])
        empty = {"image_index": torch.zeros(0, dtype=torch.long), "prefix": torch.zeros(0, N, dtype=torch.long),
                 "length": torch.zeros(0, dtype=torch.long), "utilities": torch.zeros(0, N)}
        cat = {k: torch.cat(v) if v else empty[k] for k, v in parts.items()}
        self.image_index = cat["image_index"].long()
        self.prefix = cat["prefix"].long()
        self.length = cat["length"].long()
        self.utilities = cat["utilities"].float()
        if len(self.image_index) != self.manifest["counts"]["states"]:
            raise ValueError(f"{self.root}: {len(self.image_index)} states in the shards, the manifest says "
                             f"{self.manifest['counts']['states']}")

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image_index": self.image_index[i], "prefix": self.prefix[i], "length": self.length[i],
                "utilities": self.utilities[i]}

    @property
    def oracle_action(self) -> torch.Tensor:
        return self.utilities.argmax(-1)

    @property
    def images(self) -> torch.Tensor:
        """The images [M] holding at least one record, sorted."""
        return self.image_index.unique()

    def subset(self, images: torch.Tensor) -> OracleDataset:
        """The records of `images` [M] only, in stored order (a copy sharing the manifest).
        Raises ValueError when one of them has no record here."""
        images = torch.as_tensor(images).long().flatten()
        missing = images[~torch.isin(images, self.image_index)]
        if len(missing):
            raise ValueError(f"{self.root}: no records of images {missing[:10].tolist()} "
                             f"({len(missing)} of the {len(images)} asked for)")
        out = copy.copy(self)
        keep = torch.isin(self.image_index, images)
        for k in RECORD_KEYS:
            setattr(out, k, getattr(self, k)[keep])
        return out


# ----------------------------------------------------------------------------------------------
# The script: configs/build_oracle.yaml
# ----------------------------------------------------------------------------------------------


@dataclass
class OracleConfig:
    """Which oracle data set, and how it is built: the top level of the build_oracle job (BuildOracleRun,
    preset src/orderplan/configs/build_oracle.yaml) and the `oracle:` section of the bc job
    (orderplan.train.bc.BCRun; a BC run builds it when missing). Declared here only."""

    out_dir: str = "runs/oracle/tiny_mnist"  # shards, progress files, manifest.json, summary.json
    # a seeded subset of the split, every state of one episode each; null = every image.
    # 640: ~4-5 min to build on 1 CPU core
    num_images: int | None = 640
    behaviour: str = "random"  # random | oracle: the policy that visits the states
    kind: str = "future_loss"  # future_loss | extrapolative: the utility stored per state (the BC labels)
    weight: str = "uniform"  # extrapolative weights w(j, a) (kind=extrapolative): uniform | neighbours | distance
    states_per_image: int | None = None  # keep a random subset of the N states per episode; null = all
    batch_size: int = 16  # episodes run together
    chunk_images: int = 64  # images per shard (the unit of resume)


@dataclass
class BuildOracleRun(OracleConfig):
    """Schema of the build_oracle job (preset src/orderplan/configs/build_oracle.yaml;
    `python scripts/build_oracle.py key=value ...`); every default lives here. The OracleConfig fields at
    the top level, plus what the script runs on. Rerunning with the same out_dir resumes (finished images
    are skipped exactly)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    device: str = "cpu"  # cpu | cuda (one GPU per process under torchrun)
    seed: int = 0  # image subset, random behaviour, state subsets
    split: str = "train"  # train | heldout (the env draws from it: env.split follows)


def check_oracle_config(cfg: OracleConfig, prefix: str, num_blocks: int | None) -> None:
    """The OracleConfig fields (`prefix` + field in errors: "" for build_oracle.yaml, "oracle." in
    bc.yaml): counts >= 1, states_per_image in [1, N blocks], known behaviour / kind / weight."""
    check_int(f"{prefix}num_images", cfg.num_images, 1, allow_none=True, note=" (null = every image)")
    check_choice(f"{prefix}behaviour", cfg.behaviour, BEHAVIOURS)
    check_choice(f"{prefix}kind", cfg.kind, get_args(UtilityKind))
    check_choice(f"{prefix}weight", cfg.weight, get_args(WeightKind))
    check_int(f"{prefix}states_per_image", cfg.states_per_image, 1, num_blocks, allow_none=True,
              note=" (the states of one episode; null = all)")
    check_int(f"{prefix}batch_size", cfg.batch_size, 1)
    check_int(f"{prefix}chunk_images", cfg.chunk_images, 1)


def check_build_oracle_run(run: BuildOracleRun, check_paths: bool = True) -> None:
    """Validate configs/build_oracle.yaml's schema before anything is built (ValueError naming the
    key and its range; FileNotFoundError for missing weights with `check_paths`)."""
    num_blocks = check_backbone_config(run.backbone, check_paths=check_paths)
    check_env_config(run.env, num_blocks=num_blocks)
    check_oracle_config(run, "", num_blocks)
    check_choice("split", run.split, ("train", "heldout"))
    if not (run.device == "cpu" or str(run.device).startswith("cuda")):
        raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {run.device!r}")
    check_int("seed", run.seed)


def build_identity(run: BuildOracleRun) -> dict:
    """The identity (`oracle_identity`) of the data set `run` builds, from its config alone (no
    core is built): every field that shapes the stored states and utilities, with the GPT weights
    as their sha256 and the data as `data_fingerprint`. `num_images` is not part of it: a larger
    set of the same identity extends a smaller one (`select_images` nests), and a reader takes the
    subset it asked for (`OracleDataset.subset`). Nor are batch_size and chunk_images: with random
    behaviour or states_per_image they change which draw an image gets, not how it is drawn."""
    from orderplan.model.blocks import BlockGeometry
    from orderplan.model.loading import backbone_gpt_config, random_weights_tag
    from orderplan.data.tokens import data_fingerprint

    gpt = backbone_gpt_config(run.backbone)
    num_blocks = BlockGeometry(gpt.grid_h, gpt.grid_w, run.backbone.block_size).num_blocks
    weights = resolve_path(run.backbone.gpt_weights, what="GPT weights") if run.backbone.gpt_weights else None
    return oracle_identity(run.kind, run.behaviour, run.split, run.backbone.name, data_fingerprint(run.backbone),
                           num_blocks, run.states_per_image, run.seed, run.weight, run.env.neighbour_weight,
                           gpt_weights_sha256=sha256_file(weights) if weights else None,
                           # (only for seeded random weights: sets built from a file keep their identity)
                           **({"gpt_random_weights": tag} if (tag := random_weights_tag(run.backbone)) else {}))


@job_dir("build_oracle", dir_field="out_dir")
def build_oracle(run: BuildOracleRun) -> dict:
    """Build (or resume) the oracle data set of `run` in `run.out_dir`; under torchrun each rank
    builds its share. Returns the summary written to out_dir/summary.json (rank 0; {} elsewhere)."""
    import torch.distributed as dist

    from orderplan.env.factory import make_core
    from orderplan.infra.distributed import close_distributed, init_distributed

    check_build_oracle_run(run)
    if run.behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}, got {run.behaviour!r}")
    if run.env.split != run.split:
        raise ValueError(f"env.split ({run.env.split}) differs from split ({run.split}): set split only")
    # gloo: only barriers and object gathers cross processes here, on CPU and GPU machines alike.
    # Inside BC (which builds a missing set in-process) BC's group is used and left running.
    ctx = init_distributed(run.device, timeout_minutes=12 * 60, backend="gloo")
    rank, world, device = ctx.rank, ctx.world, ctx.device
    t0 = time.time()
    core = make_core(run.backbone, env=run.env, batch_size=run.batch_size, device=device, seed=run.seed)
    images = select_images(core.num_images, run.num_images, run.seed)
    identity = build_identity(run)
    if identity["num_blocks"] != core.N:  # build_identity reads the geometry off the config, the core off the GPT
        raise RuntimeError(f"build_identity says {identity['num_blocks']} blocks, the core has {core.N}")
    out_dir = Path(run.out_dir)
    if rank == 0:
        print(f"oracle data: {len(images)} {run.split} images x {run.states_per_image or core.N} states, "
              f"behaviour={run.behaviour}, kind={run.kind}, backbone={run.backbone.name}, N={core.N} blocks; "
              f"{world} process(es), batch {run.batch_size}, {run.chunk_images} images per shard -> {out_dir}")
    stats = build_shards(core, out_dir, images, identity, behaviour=run.behaviour, kind=run.kind,
                         weight=run.weight, states_per_image=run.states_per_image, chunk_images=run.chunk_images,
                         seed=run.seed, rank=rank, world=world)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, stats)
    else:
        gathered = [stats]
    summary: dict = {}
    if rank == 0:
        manifest = write_manifest(out_dir, images, identity, write=False)
        wall = time.time() - t0
        built = sum(s["images_built"] for s in gathered)
        summary = {
            "counts": manifest["counts"],
            "utility": manifest["utility"],
            "identity": identity,
            "world_size": world,
            "images_built_this_run": built,
            "images_skipped_this_run": sum(s["images_skipped"] for s in gathered),
            "states_built_this_run": sum(s["states_built"] for s in gathered),
            "wall_time_s": wall,
            "build_time_s": max(s["seconds"] for s in gathered),
            "images_per_s": built / max(max(s["seconds"] for s in gathered), 1e-9),
            "config": asdict(run),
        }
        atomic_write_json(out_dir / "summary.json", summary, checksum=True)
        # the manifest last: it marks the set finished, so a crash before it (even while the summary
        # is written) makes the next run finish the build and write both
        atomic_write_json(out_dir / MANIFEST, manifest, checksum=True)
        print(f"{manifest['counts']['states']} states of {manifest['counts']['images']} images in "
              f"{manifest['counts']['shards']} shards ({built} images built in {wall:.1f}s); "
              f"wrote {out_dir / MANIFEST}")
    if world > 1:
        dist.barrier()  # every rank's shards are on disk before any rank goes on (or BC reads them)
    close_distributed(ctx)
    return summary

