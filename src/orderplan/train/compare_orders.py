"""`scripts/compare_orders.py`: is a learned order better than the obvious ones? One command trains
BC and PPO with several seeds, with and without the belief observation, and scores every policy on
the same held-out images (`orderplan.eval.comparison`).

Runs (all under run_dir, each resumable, skipped when its summary.json is there):
    bc_<obs>_s<seed>/       scripts/bc.py with seed=<seed>, env.beliefs=<obs == belief>; every seed
                            reads one oracle data set (oracle_seed, in run_dir/oracle)
    ppo_<obs>_s<seed>/      scripts/ppo.py from that BC planner, ppo.seed=<seed>
    router_<obs>_s<seed>/   scripts/ppo.py agent.router=true from the BC planner of the observation
                            `router_observation` (the budget router; seeds `router_seeds`)
`bc_overrides` / `ppo_overrides` are passed to every BC / PPO run (e.g. shorter runs for tests);
otherwise every run uses the defaults of configs/bc.yaml and configs/ppo.yaml.

Scoring is resumable too: each scored (row, seed) is kept in run_dir/scores/ with the identity of
what produced it (policy or checkpoint sha256, images, gamma, agreement images, belief samples, seed,
backbone) and reused by a rerun with the same identity (`stage=score` re-makes the table).

Table rows (results.json, results.md): raster, random, the six heuristic orders, confident_first,
uncertain_first, spread_confident, confident_sampled, expected_oracle, oracle, then BC and PPO per
observation (seeds pooled), the R ablation (the same BC and PPO checkpoints of `ablation_observation`
at each R of `R_values`) and the router. Columns: return with a 95% interval over images and seeds, gap closed, oracle agreement,
regret, backbone forwards per decision, wall time of the scoring (and of the training, per run)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


from orderplan.eval.comparison import PolicyScores, comparison_rows, markdown_table, score_policy
from orderplan.eval.rollouts import balanced_images
from orderplan.planner.orderhead import load_orderhead
from orderplan.planner.policies import BELIEF_POLICIES, FIXED_ORDERS, make_policy
from orderplan.train.bc import BCRun, check_bc_run, train_bc
from orderplan.train.ppo_run import PPORun, check_ppo_run, run_ppo
from orderplan.infra.checkpoint import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_cache, sha256_file
from orderplan.infra.integrity import read_json_checked
from orderplan.config.common import BackboneConfig, RunConfig, check_run_config, compose, to_typed
from orderplan.model.loading import check_backbone_config
from orderplan.model.loading import backbone_identity
from orderplan.infra.run_utils import job_dir, setup_device
from orderplan.infra.validation import check_choice, check_gamma, check_int, check_int_list, check_range
from orderplan.env.core import EnvConfig, check_env_config
from orderplan.env.factory import make_core
from orderplan.env.rewards import GAMMA

OBSERVATIONS = ("block", "belief")  # env.beliefs = false / true


@dataclass
class CompareEval:
    num_images: int = 200  # held-out images, class-balanced, the same for every policy
    batch_size: int = 20  # episodes together (a divisor of num_images wastes no rows)
    gamma: float = GAMMA  # discount per decision of the returns (orderplan.env.rewards.GAMMA)
    agreement_images: int = 100  # oracle agreement / regret on the first images (one oracle pass per decision)
    ablation_agreement_images: int = 40  # the same for the R-ablation rows (many checkpoints: kept cheaper)
    oracle_kind: str = "future_loss"
    baselines: list[str] = field(default_factory=lambda: ["raster", "random", *[o for o in FIXED_ORDERS if o != "raster"],
                                                          *BELIEF_POLICIES, "oracle"])
    bootstrap: int = 2000  # resamples of the return intervals
    level: float = 0.95


@dataclass
class CompareRun(RunConfig):
    """Schema of the compare_orders job (preset src/orderplan/configs/compare_orders.yaml;
    `python scripts/compare_orders.py key=value ...`); every default lives here. Is a learned order better
    than the obvious ones? `seed` seeds the evaluation (the random baseline, expected_oracle's samples)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    run_dir: str = "runs/compare/tiny_mnist"
    # BC and PPO seeds (planner init, minibatches, PPO's actions)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # block: env.beliefs=false (hidden states only) | belief: + entropy and query_hidden (the model's beliefs)
    observations: list[str] = field(default_factory=lambda: list(OBSERVATIONS))
    # one oracle data set (run_dir/oracle) for every seed (the seeds vary the planners, not the labels)
    oracle_seed: int = 0
    ppo: bool = True  # also fine-tune each BC planner with PPO
    # PPO with the budget router (agent.router=true) from these seeds' BC planners
    router_seeds: list[int] = field(default_factory=lambda: [0])
    router_observation: str = "belief"
    ablation_observation: str = "belief"  # whose BC / PPO checkpoints the R ablation re-scores at each of R_values
    stage: str = "all"  # all | train (train what is missing, no table) | score (the table from what is trained)
    R_values: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    bc_overrides: list[str] = field(default_factory=list)  # passed to every BC run, e.g. [bc.steps=100]
    ppo_overrides: list[str] = field(default_factory=list)  # passed to every PPO run
    eval: CompareEval = field(default_factory=CompareEval)


def check_compare_run(run: CompareRun, check_paths: bool = True) -> None:
    """Every field in its range (ValueError naming the key), before anything trains: the
    backbone (weights must exist with `check_paths`), env, seeds, eval, and the BC and PPO
    configs that bc_overrides / ppo_overrides make (composed and validated here, so a typo in
    an override fails now rather than after the first planners have trained)."""
    bad = [o for o in [*run.observations, run.router_observation, run.ablation_observation]
           if o not in OBSERVATIONS]
    if bad:
        raise ValueError(f"observations must be among {OBSERVATIONS}, got {bad}")
    check_run_config(run)
    num_blocks = check_backbone_config(run.backbone, check_paths=check_paths)
    check_env_config(run.env, num_blocks=num_blocks)
    check_int_list("seeds", run.seeds, distinct=True)
    check_int_list("router_seeds", run.router_seeds, nonempty=False, distinct=True)
    check_int("oracle_seed", run.oracle_seed)
    ev = run.eval
    check_int("eval.num_images", ev.num_images, 1)
    check_int("eval.batch_size", ev.batch_size, 1)
    check_gamma("eval.gamma", ev.gamma)
    check_int("eval.agreement_images", ev.agreement_images, 0, note=" (0 = off)")
    check_int("eval.ablation_agreement_images", ev.ablation_agreement_images, 0, note=" (0 = off)")
    check_choice("eval.oracle_kind", ev.oracle_kind, ("future_loss", "extrapolative"))
    names = [*FIXED_ORDERS, "random", *BELIEF_POLICIES, "oracle", "oracle_extrapolative"]
    unknown = [b for b in ev.baselines if b not in names]
    if unknown:
        raise ValueError(f"eval.baselines: {unknown} are not policy names; choose from {', '.join(names)}")
    check_int("eval.bootstrap", ev.bootstrap, 1)
    check_range("eval.level", ev.level, 0.0, 1.0, lo_open=True, hi_open=True)
    check_choice("stage", run.stage, ("all", "train", "score"))
    check_int_list("R_values", run.R_values, 0, nonempty=False)
    obs, seed = run.observations[0] if run.observations else "block", run.seeds[0]
    try:
        check_bc_run(_bc_run(run, obs, seed), check_paths=False)  # bc_overrides, as every BC run gets them
    except ValueError as e:
        raise ValueError(f"the BC runs of this comparison (bc_overrides={run.bc_overrides}): {e}") from e
    if run.ppo or run.router_seeds:
        try:  # check_paths=False: agent.init_from is the BC head trained first
            check_ppo_run(_ppo_run(run, obs, seed, router=False), check_paths=False)
        except ValueError as e:
            raise ValueError(f"the PPO runs of this comparison (ppo_overrides={run.ppo_overrides}): {e}") from e


# -- training -------------------------------------------------------------------------------------


def _done(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and (run_dir / "orderhead.safetensors").is_file()


def _bc_run(run: CompareRun, obs: str, seed: int) -> BCRun:
    root = Path(run.run_dir)
    overrides = [*run.bc_overrides, f"run_dir={root / f'bc_{obs}_s{seed}'}", f"seed={seed}",
                 f"oracle_seed={run.oracle_seed}", f"oracle.out_dir={root / 'oracle'}",
                 f"env.beliefs={str(obs == 'belief').lower()}"]
    bc = to_typed(compose("bc", overrides), BCRun)
    return replace(bc, backbone=run.backbone, device=run.device)


def _ppo_run(run: CompareRun, obs: str, seed: int, router: bool) -> PPORun:
    root = Path(run.run_dir)
    name = f"{'router' if router else 'ppo'}_{obs}_s{seed}"
    overrides = [*run.ppo_overrides, f"run_dir={root / name}", f"seed={seed}", f"ppo.seed={seed}",
                 f"agent.init_from={root / f'bc_{obs}_s{seed}' / 'orderhead.safetensors'}",
                 f"env.beliefs={str(obs == 'belief').lower()}", f"agent.router={str(router).lower()}"]
    ppo = to_typed(compose("ppo", overrides), PPORun)
    return replace(ppo, backbone=run.backbone, device=run.device)


def train_all(run: CompareRun) -> dict[str, float]:
    """Train (or find) every planner of the comparison; returns the training wall time of each run
    dir that was trained in this call (s)."""
    walls: dict[str, float] = {}
    bc = [(o, s) for o in run.observations for s in run.seeds]
    bc += [(run.router_observation, s) for s in run.router_seeds if (run.router_observation, s) not in bc]
    jobs = [("bc", o, s) for o, s in bc]  # every PPO / router run starts from the BC planner of its (obs, seed)
    if run.ppo:
        jobs += [("ppo", o, s) for o in run.observations for s in run.seeds]
    jobs += [("router", run.router_observation, s) for s in run.router_seeds]
    for kind, obs, seed in jobs:
        job = _bc_run(run, obs, seed) if kind == "bc" else _ppo_run(run, obs, seed, kind == "router")
        out = Path(job.run_dir)
        if _done(out):
            print(f"[compare] {out.name}: done, skipped")
            continue
        print(f"[compare] training {out.name}", flush=True)
        t0 = time.time()
        train_bc(job) if kind == "bc" else run_ppo(job)
        walls[out.name] = time.time() - t0
    return walls


# -- scoring --------------------------------------------------------------------------------------


def _train_wall(run_dir: Path) -> float | None:
    p = run_dir / "summary.json"
    return read_json_checked(p, required=False).get("wall_time_s") if p.is_file() else None


def score_all(run: CompareRun) -> list[PolicyScores]:
    """Every row of the table, on one held-out core (teacher-forced, env.beliefs on: the belief
    features are only read by the planners that want them)."""
    root, ev = Path(run.run_dir), run.eval
    device = setup_device(run.device)
    env = replace(run.env, mode="teacher_forced", split="heldout", reward="future_loss", decision_cost=0.0,
                  budget=None, gamma=None, beliefs=True)
    core = make_core(run.backbone, env=env, batch_size=ev.batch_size, device=device, seed=run.seed)
    images = balanced_images(core.labels, ev.num_images)
    n_agree = min(ev.agreement_images, len(images))
    scores: list[PolicyScores] = []

    base_identity = {"images": images.tolist(), "gamma": ev.gamma, "oracle_kind": ev.oracle_kind, "seed": run.seed,
                     "belief_samples": env.belief_samples, "backbone": backbone_identity(run.backbone, device)}

    def score(name, make, group, c=core, agree=n_agree, source=None):
        identity = {**base_identity, "row": name, "source": source or name, "agreement_images": agree,
                    "budget": c.cfg.budget}
        cache = root / "scores" / f"{name}__{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}.pt"
        saved = load_cache(cache, identity, "[compare]")
        if saved is not None:
            print(f"[compare] {name}: scored before ({cache.name})", flush=True)
            return PolicyScores(**saved["scores"])
        print(f"[compare] scoring {name}", flush=True)
        c.seed(run.seed)  # every policy sees the same generator states (expected_oracle's samples)
        out = score_policy(name, make, c, images, ev.gamma, agree, ev.oracle_kind, group)
        # plain fields (tensors, numbers, str, dict): loadable with weights_only=True
        atomic_torch_save({"identity": identity, "scores": {f.name: getattr(out, f.name) for f in fields(out)}},
                          cache, checksum=True)
        return out

    for name in ev.baselines:
        kwargs = {"seed": run.seed} if name in ("random", "confident_sampled") else {}
        scores.append(score(name, lambda c, n=name, k=kwargs: make_policy(n, c, **k), "baseline"))

    def learned(prefix: str, obs: str, R: int | None = None, seeds=run.seeds, c=core) -> PolicyScores | None:
        parts = []
        for seed in seeds:
            path = root / f"{prefix}_{obs}_s{seed}" / "orderhead.safetensors"
            if not path.is_file():
                print(f"[compare] missing {path}: row skipped")
                return None
            model = load_orderhead(path, hidden_dim=c.D, geometry=c.geom, device=device)
            label = f"{prefix}_{obs}" + ("" if R is None else f"_R{R}")
            agree = n_agree if R is None else min(ev.ablation_agreement_images, n_agree)
            parts.append(score(label, lambda cc, m=model: make_policy("orderhead", cc, model=m, R=R), prefix, c, agree,
                               source=f"{path.parent.name}:{sha256_file(path)}:R={R}"))
        row = PolicyScores.stack(parts[0].name, parts, group=prefix)
        walls = [_train_wall(root / f"{prefix}_{obs}_s{s}") for s in seeds]
        row.notes = {"train_wall_s": [w for w in walls if w is not None], "observation": obs,
                     "R": R if R is not None else "checkpoint"}
        return row

    for prefix in (["bc", "ppo"] if run.ppo else ["bc"]):
        for obs in run.observations:
            row = learned(prefix, obs)
            if row is not None:
                scores.append(row)
    for prefix in (["bc", "ppo"] if run.ppo else ["bc"]):
        for R in run.R_values:
            row = learned(prefix, run.ablation_observation, R)
            if row is not None:
                row.group = "R ablation"
                scores.append(row)
    if run.router_seeds:
        router_path = root / f"router_{run.router_observation}_s{run.router_seeds[0]}" / "orderhead.safetensors"
        if router_path.is_file():
            budgets = load_orderhead(router_path).cfg.budgets
            rcore = make_core(run.backbone, env=replace(env, budget=budgets), batch_size=ev.batch_size, device=device,
                              seed=run.seed)
            row = learned("router", run.router_observation, None, run.router_seeds, rcore)
            if row is not None:
                scores.append(row)
    return scores


@job_dir("compare_orders")
def compare_orders(run: CompareRun) -> dict:
    """Train what is missing, score every policy, write run_dir/results.json and results.md."""
    check_compare_run(run)
    t0 = time.time()
    walls = train_all(run) if run.stage in ("all", "train") else {}
    if run.stage == "train":
        return {"trained_this_call_s": walls}
    scores = score_all(run)
    rows = comparison_rows(scores, run.eval.bootstrap, run.eval.level, run.seed)
    table = markdown_table(rows)
    root = Path(run.run_dir)
    results = {"rows": rows, "num_images": scores[0].returns.shape[1] if scores else 0, "gamma": run.eval.gamma,
               "seeds": run.seeds, "router_seeds": run.router_seeds, "oracle_seed": run.oracle_seed,
               "belief_samples": run.env.belief_samples, "trained_this_call_s": walls,
               "wall_time_s": time.time() - t0, "config": asdict(run)}
    atomic_write_json(root / "results.json", results)
    atomic_write_bytes(root / "results.md", (table + "\n").encode())
    print(table)
    return results

