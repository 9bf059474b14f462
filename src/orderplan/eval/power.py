"""`scripts/power.py`: how many samples does it take to tell two orders apart by FID?

Generates two policies' sample sets in chunks (the same labels, sampler streams and sample indices as
`scripts/evaluate.py`: sample i of a chunked set is sample i of evaluate's set), keeps only their
classifier / Inception features, and after each checkpoint N computes the paired dFID = FID(a) -
FID(b) with its paired bootstrap interval (src/orderplan/eval/sample_metrics.py). It stops at the first
checkpoint whose interval half-width is under `power.target_ratio` x |dFID| (the two orders are
separated with that precision; the interval holds the reference statistics fixed unless
`power.resample_reference`, and both intervals are reported), at `power.max_samples`, or when `power.max_minutes` run out, and says
which. Either way it fits half-width = c / sqrt(N) to the measured checkpoints and reports the N the
target would take.

Optional stopping: the checkpoints are looked at as they come, so the interval at the stopping N
covers a little less than its nominal level; the whole half-width-vs-N table is written, so a reader
can judge the curve rather than the last point.

Resumable: each finished chunk's features are written (atomically) to
run_dir/chunks/<policy>/<c>.pt with the identity of everything that shapes them; a rerun reuses the
chunks of the same setup and produces the same report.

Outputs in run_dir: power.json, power.md, power.png (half-width and |dFID| / 3 against N)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from orderplan.eval.fid import extract_features
from orderplan.eval.rollouts import balanced_images, generate_samples
from orderplan.eval.evaluate import (EvaluateRun, PolicySpec, _check_options, _sampler_seed, generation_env,
                                   generation_labels, policy_identity, reference_images, reference_name,
                                   resolve_policy)
from orderplan.eval.sample_metrics import paired_fid_delta
from orderplan.infra.checkpoint import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_cache
from orderplan.infra.cpu_heap import keep_freed_heap_memory
from orderplan.model.loading import Backbone, build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.infra.run_utils import job_dir, progress, setup_device


@dataclass
class PowerSpec:
    a: str = "raster"  # dFID = FID(a) - FID(b); policies without ground truth (not the oracles)
    b: str = "random"
    chunk: int = 5000  # samples per saved chunk (a multiple of eval.gen_batch_size)
    checkpoints: list[int] = field(default_factory=lambda: [5000, 10000, 20000, 40000, 80000, 160000, 320000])
    max_samples: int = 320000  # per policy; ~45 min per 160k on 2 idle cores (fixed orders decode at ~120/s)
    # separated when the interval (stats.level, 95%) half-width < target_ratio * |dFID|
    target_ratio: float = 1 / 3
    max_minutes: float | None = None  # stop after the chunk that crosses this wall-clock budget (the report says so)
    # the interval the target is judged on: false = the generated samples' noise with the reference
    # statistics held fixed (FID's convention); true = the reference set resampled as well. Both are
    # reported; a finite reference puts a floor under the second that no N removes.
    resample_reference: bool = False
    stop_when_separated: bool = True  # false: go on to max_samples (the whole curve, e.g. from saved chunks)


@dataclass
class PowerRun(EvaluateRun):
    """Schema of the power job (preset src/orderplan/configs/power.yaml; `python scripts/power.py`); every
    default lives here. An evaluate run (backbone, env, eval.sampling, features, stats) plus the `power`
    block: how many samples separate two orders by FID. `policies` is unused: the two policies are power.a
    and power.b."""

    power: PowerSpec = field(default_factory=PowerSpec)
    run_dir: str = "runs/power/tiny_mnist"


def check_power(p: PowerSpec, gen_batch_size: int) -> None:
    """Reject a power block that cannot run, naming the key and the allowed range."""
    if p.a == p.b:
        raise ValueError(f"power.a and power.b must differ, got {p.a!r} twice")
    if p.chunk < 1 or p.chunk % gen_batch_size:
        raise ValueError(f"power.chunk must be a positive multiple of eval.gen_batch_size ({gen_batch_size}), "
                         f"got {p.chunk}")
    if p.max_samples < p.chunk:
        raise ValueError(f"power.max_samples must be >= power.chunk ({p.chunk}), got {p.max_samples}")
    if not p.checkpoints or any(n < 2 or n % p.chunk for n in p.checkpoints):
        raise ValueError(f"power.checkpoints must be multiples of power.chunk ({p.chunk}), got {p.checkpoints}")
    if not 0 < p.target_ratio <= 1:
        raise ValueError(f"power.target_ratio must be in (0, 1], got {p.target_ratio}")
    if p.max_minutes is not None and p.max_minutes <= 0:
        raise ValueError(f"power.max_minutes must be > 0 or null, got {p.max_minutes}")


def check_power_run(run: PowerRun, check_paths: bool = True) -> None:
    """Validate configs/power.yaml's schema before anything loads: the evaluate fields
    (`orderplan.eval.evaluate._check_options`) and the power block (`check_power`)."""
    _check_options(run, check_paths)
    check_power(run.power, run.eval.gen_batch_size)


def required_n(points: list[dict], ratio: float) -> float | None:
    """N at which half-width = ratio * |dFID|, from half-width = c / sqrt(N) fitted (least squares in
    log space, slope fixed at -1/2) to the measured `points` (dicts with n, half_width) and the last
    |dFID|; None when dFID is 0."""
    d = abs(points[-1]["dfid"])
    if d == 0:
        return None
    log_c = sum(math.log(p["half_width"]) + 0.5 * math.log(p["n"]) for p in points) / len(points)
    return (math.exp(log_c) / (ratio * d)) ** 2


def _chunk_features(spec: PolicySpec, run: PowerRun, bb: Backbone, labels: torch.Tensor, c: int, extractor,
                    device: torch.device, identity: str, path: Path) -> torch.Tensor:
    """Features [chunk, F] (float64) of chunk c of a policy's set, from `path` when it holds the same
    identity, else generated and saved there."""
    done = load_cache(path, identity, "[power]")
    if done is not None:
        return done["features"]
    ev, C = run.eval, run.power.chunk
    env = generation_env(spec, run)
    samples = generate_samples(spec.make, bb, labels[c * C:(c + 1) * C], env, ev.gen_batch_size,
                               _sampler_seed(run, ev.sampler_seeds[0]), num_snapshots=0, first_index=c * C)
    feats = extract_features(extractor, samples.images, run.features.batch_size, device).double()
    atomic_torch_save({"identity": identity, "features": feats}, path, checksum=True)
    return feats


@job_dir("power")
def run_power(run: PowerRun) -> dict:
    """The study of the module doc; returns what power.json holds."""
    from orderplan.eval.feature_net import make_feature_extractor  # torchmetrics' inception import is heavy

    t_start = time.time()
    p, ev = run.power, run.eval
    check_power_run(run)
    device, run_dir = setup_device(run.device), Path(run.run_dir)
    if device.type == "cpu":  # faster CPU generation, the same numbers (src/orderplan/infra/cpu_heap.py)
        keep_freed_heap_memory()
    bb = build_backbone(run.backbone, device=device)
    specs = [resolve_policy(name, run, bb) for name in (p.a, p.b)]
    for s in specs:
        if s.ground_truth:
            raise ValueError(f"power: {s.name} replays held-out images' orders; pick policies without ground truth")
    _, heldout_labels = load_token_data(run.backbone, "heldout")
    labels = generation_labels(heldout_labels, balanced_images(heldout_labels), p.max_samples)
    extractor = make_feature_extractor(run.features.kind, run.features.classifier_path,
                                       run.features.inception_weights).to(device).eval()
    side = bb.gpt.cfg.grid_h * (bb.vq.config.downsample_factor if bb.vq is not None else 1)
    real = extract_features(extractor, reference_images(run, side, run.features.reference), run.features.batch_size,
                            device).double()
    identities = {s.name: f"{policy_identity(s, run)}|chunk={p.chunk}|batch={ev.gen_batch_size}" for s in specs}
    checkpoints = sorted({n for n in p.checkpoints if n <= p.max_samples} | {p.max_samples - p.max_samples % p.chunk})
    feats: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    points: list[dict] = []
    stop, first_separated = "max_samples", None
    bar = progress(total=checkpoints[-1] // p.chunk, desc=f"power {p.a} vs {p.b}: chunks")
    for c in range(checkpoints[-1] // p.chunk):
        for s in specs:
            path = run_dir / "chunks" / s.name / f"{c:05d}.pt"
            feats[s.name].append(_chunk_features(s, run, bb, labels, c, extractor, device, identities[s.name], path))
        bar.update(1)
        n = (c + 1) * p.chunk
        out_of_time = p.max_minutes is not None and time.time() - t_start > 60 * p.max_minutes
        if n in checkpoints or out_of_time:  # a budget stop still reports the N it reached
            fa, fb = (torch.cat(feats[s.name]) for s in specs)
            both = {flag: paired_fid_delta(real, fa, fb, run.stats.bootstrap, run.stats.level, run.seed, flag)
                    for flag in (False, True)}
            d = both[p.resample_reference]
            hw = (d.hi - d.lo) / 2
            points.append({"n": n, "dfid": d.delta, "ci": [d.lo, d.hi], "half_width": hw,
                           "ratio": hw / abs(d.delta) if d.delta else math.inf,
                           "ci_fixed_reference": [both[False].lo, both[False].hi],
                           "ci_resampled_reference": [both[True].lo, both[True].hi],
                           "minutes": round((time.time() - t_start) / 60, 2)})
            print(f"[power] N={n}: dFID({p.a} - {p.b}) = {d.delta:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], "
                  f"half-width / |dFID| = {points[-1]['ratio']:.2f} (target < {p.target_ratio:.2f})", flush=True)
            if points[-1]["ratio"] < p.target_ratio and stop != "separated":
                stop, first_separated = "separated", n
                if p.stop_when_separated:
                    break
        if out_of_time:
            stop = "max_minutes" if stop != "separated" else stop
            break
    bar.close()
    if not points:
        raise RuntimeError(f"power: max_minutes ({p.max_minutes}) ran out before the first checkpoint "
                           f"({checkpoints[0]} samples); the chunks so far are saved for a rerun")
    results = {"a": p.a, "b": p.b, "stop": stop, "separated": stop == "separated", "separated_at": first_separated,
               "points": points,
               "n": points[-1]["n"], "target_ratio": p.target_ratio, "resample_reference": p.resample_reference,
               "required_n_fit": required_n(points, p.target_ratio),
               "reference": reference_name(run.features.reference), "num_reference": len(real),
               "features": run.features.kind, "sampling": asdict(ev.sampling), "bootstrap": run.stats.bootstrap,
               "level": run.stats.level, "seed": run.seed, "backbone": run.backbone.name,
               "seconds": round(time.time() - t_start, 1)}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "power.json", results)
    atomic_write_bytes(run_dir / "power.md", power_markdown(results).encode())
    _plot(run_dir / "power.png", results)
    print(power_markdown(results))
    return results


def power_markdown(r: dict) -> str:
    """The half-width-vs-N table and the conclusion."""
    lines = [f"# dFID({r['a']} - {r['b']}) against N ({r['backbone']})", "",
             f"- paired bootstrap ({r['bootstrap']} resamples, {r['level']:.0%} interval) against the "
             f"{r['reference']} split ({r['num_reference']} images), {r['features']} features; sampling "
             f"{r['sampling']}; seed {r['seed']}",
             f"- target: half-width < {r['target_ratio']:.2f} x |dFID| of the interval with the reference "
             f"{'resampled' if r['resample_reference'] else 'held fixed'}; "
             + (f"**met first at N = {r['separated_at']}** per policy; " if r["separated_at"] else "**not met**; ")
             + f"last N = {r['n']}, after {r['seconds'] / 60:.1f} min", ""]
    if r["required_n_fit"] is not None:
        lines += [f"- half-width = c / sqrt(N) fitted to these points reaches the target at N ~ "
                  f"{r['required_n_fit']:,.0f} per policy (at the last |dFID|)", ""]
    lines += ["| N | dFID [CI] | half-width | half-width / abs(dFID) | CI, reference fixed | CI, reference resampled "
              "| min |", "|---|---|---|---|---|---|---|"]
    for q in r["points"]:
        fx, rs = q["ci_fixed_reference"], q["ci_resampled_reference"]
        lines.append(f"| {q['n']} | {q['dfid']:+.3f} [{q['ci'][0]:+.3f}, {q['ci'][1]:+.3f}] | "
                     f"{q['half_width']:.3f} | {q['ratio']:.2f} | [{fx[0]:+.3f}, {fx[1]:+.3f}] | "
                     f"[{rs[0]:+.3f}, {rs[1]:+.3f}] | {q['minutes']} |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, r: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [q["n"] for q in r["points"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(n, [q["half_width"] for q in r["points"]], "o-", label="95% half-width")
    ax.plot(n, [r["target_ratio"] * abs(q["dfid"]) for q in r["points"]], "s--",
            label=f"{r['target_ratio']:.2f} x |dFID|")
    ax.set(xscale="log", yscale="log", xlabel="samples per policy", ylabel="FID units",
           title=f"dFID({r['a']} - {r['b']}): precision against N")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
