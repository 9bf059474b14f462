"""The GPT-B smoke chain (`scripts/smoke_gpt_b.py`): the real scripts, one subprocess each, with the
overrides a user would type, at LlamaGen GPT-B geometry (16x16 tokens, vocab 16384, 4x4 blocks -> 16
blocks) on seeded random weights (`configs/backbone/llamagen_b_random.yaml`) and synthetic codes:

    extract_codes (source=synthetic) -> build_oracle -> bc -> ppo -> evaluate (teacher-forced only)

Every stage writes under one run root (root/codes, root/oracle, root/bc, root/ppo, root/evaluate);
root/smoke_summary.json records each stage's command and wall time (seconds). Budgets are tiny: the
chain checks that the pieces fit together at full-scale shapes, its numbers say nothing about orders.

Generation is skipped (`eval.num_samples=0`): GPT-B's VQ decoder and an ImageNet feature network
(InceptionV3) are weight files nothing here may download, and random stand-ins would make FID
meaningless, so evaluate reports the teacher-forced rows only.

Depth: `n_layer` (default 2) overrides GPT-B's 12 layers (`backbone.gpt.overrides`); width, heads,
vocab and the block geometry stay GPT-B's. Oracle utilities cost O(N^2) query rows per episode, so
full depth takes several times longer on CPU (docs/scaling.md, "GPT-B smoke")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from orderplan.infra.checkpoint import atomic_write_json

STAGES = ("extract_codes", "build_oracle", "bc", "ppo", "evaluate")


@dataclass
class SmokeConfig:
    """Sizes of the smoke chain (each field a tiny budget of one stage)."""

    root: str = "runs/smoke_gpt_b"  # run root: every stage's output dir lies under it
    n_layer: int = 2  # GPT-B depth override (12 = the full GPT-B stack)
    seed: int = 0  # every stage's seed (and the random weights' seed: backbone.random_weights)
    oracle_images: int = 4  # train images of the oracle set
    states_per_image: int = 2  # oracle states kept per episode (each costs N candidate blocks of query rows)
    bc_steps: int = 6
    ppo_rows: int = 2  # env rows collected together; one PPO iteration = ppo_rows episodes of 16 decisions
    report_images: int = 1  # held-out images of the BC / PPO reports (each adds an oracle pass per decision)
    eval_images: int = 2  # held-out images of evaluate's teacher-forced rows
    agreement_images: int = 0  # evaluate's oracle agreement (an oracle pass per decision per policy)


def stage_commands(cfg: SmokeConfig) -> dict[str, list[str]]:
    """{stage: argv after the interpreter}: `python -m orderplan <stage>` with its overrides, in chain order."""
    root = Path(cfg.root).expanduser().resolve()
    codes, oracle, bc, ppo = root / "codes", root / "oracle", root / "bc", root / "ppo"
    backbone = ["backbone=llamagen_b_random", f"+backbone.gpt.overrides.n_layer={cfg.n_layer}",
                f"backbone.random_weights={cfg.seed}", f"backbone.data.codes_dir={codes}"]
    oracle_set = [f"num_images={cfg.oracle_images}", f"states_per_image={cfg.states_per_image}",
                  f"batch_size={cfg.oracle_images}", f"chunk_images={cfg.oracle_images}"]
    report = [f"eval.num_images={cfg.report_images}", f"eval.batch_size={cfg.report_images}",
              "eval.baselines=[raster,random]"]  # the oracle baseline would add a full oracle episode per image
    job = lambda name: ["-m", "orderplan", name]  # noqa: E731  (the installed package's jobs, from any directory)
    return {
        "extract_codes": [*job("extract_codes"), "backbone=llamagen_b_random", "source=synthetic",
                          f"out_dir={codes}", f"synthetic.seed={cfg.seed}", "progress=false"],
        "build_oracle": [*job("build_oracle"), *backbone, f"out_dir={oracle}", f"seed={cfg.seed}", *oracle_set],
        "bc": [*job("bc"), *backbone, f"run_dir={bc}", f"seed={cfg.seed}", f"oracle.out_dir={oracle}",
               *(f"oracle.{o}" for o in oracle_set), f"bc.steps={cfg.bc_steps}",
               f"bc.batch_size={cfg.oracle_images * cfg.states_per_image}", "bc.log_every=2",
               # replay rows = oracle images: padding rows would pay every step's query rows for nothing
               f"bc.replay_batch={cfg.oracle_images}",
               f"bc.ckpt_every={cfg.bc_steps}", *report],
        "ppo": [*job("ppo"), *backbone, f"run_dir={ppo}", f"seed={cfg.seed}",
                f"agent.init_from={bc / 'orderhead.safetensors'}", f"batch_size={cfg.ppo_rows}",
                f"ppo.frames_per_batch={16 * cfg.ppo_rows}", f"ppo.total_frames={16 * cfg.ppo_rows}",
                f"ppo.minibatch_size={8 * cfg.ppo_rows}", "ppo.epochs=1", *report],
        "evaluate": [*job("evaluate"), *backbone, f"run_dir={root / 'evaluate'}", f"seed={cfg.seed}",
                     "policies=[raster,random,oracle,bc,ppo]", f"checkpoints.bc={bc / 'orderhead.safetensors'}",
                     f"checkpoints.ppo={ppo / 'orderhead.safetensors'}", "eval.num_samples=0",
                     f"eval.num_images={cfg.eval_images}", f"eval.batch_size={cfg.eval_images}",
                     f"eval.agreement_images={cfg.agreement_images}",
                     "eval.rewards=[future_loss]"],  # each reward is one more replay of every order (+ likelihood)
    }


def run_smoke(cfg: SmokeConfig, python: str = sys.executable) -> dict:
    """Run every stage in order (output streamed to this process's stdout / stderr); a failing stage
    raises RuntimeError naming it and its command. Returns (and writes to root/smoke_summary.json)
    {"config", "stages": {stage: {"seconds", "command"}}, "total_s"}."""
    root = Path(cfg.root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    summary: dict = {"config": asdict(cfg), "stages": {}}
    t_all = time.perf_counter()
    for name, argv in stage_commands(cfg).items():
        cmd = [python, *argv]
        print(f"[smoke] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"smoke stage {name} failed (exit {rc}) after {seconds:.0f} s: {' '.join(cmd)}")
        summary["stages"][name] = {"seconds": round(seconds, 1), "command": cmd}
        print(f"[smoke] {name}: {seconds:.1f} s", flush=True)
    summary["total_s"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(root / "smoke_summary.json", summary)
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in summary["stages"].items())
    print(f"[smoke] done in {summary['total_s']:.0f} s ({times}) -> {root}", flush=True)
    return summary
