"""End-to-end smoke test of the main job through the same CLI a user types, on the embedded default
with tiny budgets: build_oracle (inside bc.py) -> bc.py -> ppo.py (plain and with the router)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from orderplan.infra.paths import PACKAGE_ROOT

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
@pytest.mark.skipif(not (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists(), reason="needs the embedded default")
def test_bc_then_ppo_write_their_summaries(tmp_path):
    small_eval = ["eval.num_images=8", "eval.batch_size=8"]
    bc_dir, oracle_dir = tmp_path / "bc", tmp_path / "oracle"
    _run("bc.py", [f"run_dir={bc_dir}", f"oracle.out_dir={oracle_dir}", "oracle.num_images=8", "oracle.batch_size=8",
                   "bc.steps=6", "bc.batch_size=16", "bc.log_every=2", "bc.replay_batch=8", *small_eval])
    bc = json.loads((bc_dir / "summary.json").read_text())
    assert set(bc["returns"]) == {"raster", "random", "confident_first", "oracle", "learned"}
    for key in ("oracle_agreement", "regret", "reward", "gamma"):
        assert key in bc
    assert (bc_dir / "orderhead.safetensors").exists() and (oracle_dir / "manifest.json").exists()

    ppo_args = [f"agent.init_from={bc_dir / 'orderhead.safetensors'}", "batch_size=8", "ppo.frames_per_batch=128",
                "ppo.total_frames=256", "ppo.minibatch_size=64", "ppo.epochs=1", *small_eval]
    _run("ppo.py", [f"run_dir={tmp_path / 'ppo'}", *ppo_args])
    ppo = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert set(ppo["returns"]) == {"raster", "random", "confident_first", "oracle", "learned"} and "regret" in ppo
    assert ppo["bc_return"] == pytest.approx(bc["returns"]["learned"])

    _run("ppo.py", [f"run_dir={tmp_path / 'router'}", "agent.router=true", "env.decision_cost=1.0", *ppo_args])
    router = json.loads((tmp_path / "router" / "summary.json").read_text())["router"]
    hist, d = router["budget_histogram"], router["decisions_per_episode"]
    assert set(hist) == {"1", "2", "4"}
    # the budgets were counted by replaying the report's policy on the report's 8 images
    assert sum(hist.values()) == pytest.approx(8 * d)
    assert router["mean_budget"] == pytest.approx(sum(int(k) * c for k, c in hist.items()) / sum(hist.values()))
    # 16 blocks per episode; a chosen budget is never below the blocks its decision revealed
    assert 16 / 4 <= d <= 16 and router["mean_budget"] >= 16 / d - 1e-9
    assert router["smdp_gamma"] == 0.9  # block-time discounting with ppo.gamma


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_ppo_without_bc_checkpoint_says_what_to_do(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "ppo.py"), f"run_dir={tmp_path}",
                           f"agent.init_from={tmp_path / 'missing.safetensors'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "scripts/bc.py" in proc.stderr
