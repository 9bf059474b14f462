"""The package as a user installs it: `pip install .` (not editable) puts `orderplan` and nothing
else at the top level, ships the presets and the embedded default, and its console script runs
the main job from another directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_runs_bc_from_another_directory(tmp_path):
    """A wheel built from the checkout, installed into its own target directory (dependencies come
    from this environment), then `orderplan-bc` with a small budget in an empty directory. The run
    must use the installed copy (its configs and artifacts), not the checkout."""
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                            "--target", str(site), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin")
    assert top == ["orderplan"], top  # no generic top-level names (backbone, envs, agents)
    assert (site / "orderplan/configs/bc.yaml").exists()
    assert (site / "orderplan/artifacts/tiny_mnist/gpt.safetensors").exists()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    where = subprocess.run([sys.executable, "-c", "import orderplan; print(orderplan.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    for generic in ("envs", "backbone", "agents"):
        probe = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=work, env=env, capture_output=True,
                               text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (generic, probe.stderr)

    script = site / "bin" / "orderplan-bc"
    assert script.exists(), sorted(p.name for p in (site / "bin").iterdir())
    small = ["oracle.num_images=4", "oracle.batch_size=4", "oracle.chunk_images=4", "bc.steps=4", "bc.log_every=2",
             "bc.ckpt_every=4", "bc.replay_batch=4", "eval.num_images=2", "eval.batch_size=2",
             "eval.baselines=[raster,random]", "run_dir=run", "oracle.out_dir=oracle"]
    proc = subprocess.run([sys.executable, str(script), *small], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "run" / "orderhead.safetensors").exists() and (work / "run" / "summary.json").exists()
    # `python -m orderplan JOB` reaches the same jobs, and names them when asked for one it lacks
    bad = subprocess.run([sys.executable, "-m", "orderplan", "no_such_job"], cwd=work, env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "bc" in bad.stderr and "no_such_job" in bad.stderr
