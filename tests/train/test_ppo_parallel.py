"""configs/ppo_parallel.yaml: the budget router trained with parallel decoding (env.parallel) writes a
summary that names it, and evaluation generates with that head the same way, one forward per decision."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from orderplan.config.common import compose, to_typed
from orderplan.model.blocks import BlockGeometry
from orderplan.model.loading import backbone_gpt_config
from orderplan.planner.orderhead import save_orderhead
from orderplan.train.ppo_run import PPORun, run_ppo, train_env_config
from tests.train.test_ppo_generate import belief_head, needs_default


def test_the_config_is_the_parallel_router():
    run = to_typed(compose("ppo_parallel"), PPORun)
    env = train_env_config(replace(run, agent=replace(run.agent, init_from="unused")))
    assert (env.mode, env.parallel, env.query, env.budget) == ("generate", True, "full", [1, 2, 4, 8])
    assert env.coherence > 0 and env.decision_cost > 0 and run.agent.router


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
@needs_default
def test_parallel_router_trains_and_generates_in_parallel(tmp_path):
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation

    run = to_typed(compose("ppo_parallel", [f"run_dir={tmp_path / 'run'}", "batch_size=2", "ppo.frames_per_batch=32",
                                            "ppo.total_frames=64", "ppo.minibatch_size=16", "ppo.epochs=1",
                                            "eval.num_images=2", "eval.batch_size=2", "eval.baselines=[random]"]),
                 PPORun)
    init = tmp_path / "init" / "orderhead.safetensors"
    g = backbone_gpt_config(run.backbone)
    save_orderhead(belief_head(g.dim, BlockGeometry(g.grid_h, g.grid_w, run.backbone.block_size)), init)
    run_ppo(replace(run, agent=replace(run.agent, init_from=str(init))))
    head = Path(run.run_dir) / "orderhead.safetensors"
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    assert summary["train_parallel"] is True and summary["train_coherence"] == 1.0
    res = run_evaluation(to_typed(compose("evaluate", [
        f"run_dir={tmp_path / 'eval'}", f"policies=[{head}]", "eval.num_samples=4", "eval.num_images=0",
        "eval.gen_batch_size=4", "eval.seed_samples=2", "eval.sampler_seeds=[0,1]", "eval.fid_curve=[4]",
        "stats.bootstrap=2", "stats.kid_subsets=2", "plots.snapshot_samples=1", "plots.column_rows=1"]), EvaluateRun))
    row = next(iter(res["policies"].values()))
    assert row["generation_path"] == "env" and "parallel decoding" in row["source"]
    # one forward per decision plus the reset's query: parallel decoding, not T advances per block
    assert row["forward_passes_per_image"] == pytest.approx(row["decisions_per_sample"] + 1)
    assert row["decisions_per_sample"] <= 16
