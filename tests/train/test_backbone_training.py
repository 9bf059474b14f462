"""Stage-1 training: the script runs, writes a checkpoint and summary, resumes exactly, runs under
torchrun with 2 CPU processes, and its data/order schedule is what the docs say."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.infra.checkpoint import load_safetensors
from orderplan.train.backbone import batch_indices, make_orders, random_ratio

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "train_backbone.py"


def _overrides(codes: Path, run_dir: Path, steps: int, **extra) -> list[str]:
    args = {
        "run_dir": run_dir, "train.max_steps": steps, "train.batch_size": 8, "train.log_every": 2,
        "train.eval_every": 1000, "train.ckpt_every": 4, "train.warmup_steps": 2,
        "backbone.data.kind": "codes", "backbone.data.codes_dir": codes, "backbone.vq_weights": "null",
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()] + ["+backbone.gpt.overrides.n_layer=2"]


def _run(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + args
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run_dir / "gpt.safetensors")[0]


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_script_writes_checkpoint_summary_and_resumes_exactly(toy_codes, tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    _run(_overrides(toy_codes, resumed, 4))
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == 0
    assert set(summary["heldout_bits_per_token"]) >= {"raster", "random_block_order"}
    assert (resumed / "checkpoints" / "step_00000004.pt").exists()
    out = _run(_overrides(toy_codes, resumed, 6)).stdout  # a larger max_steps continues the run
    assert "resumed from" in out
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 4
    # exactness: interrupted at step 3 (stop_at) and rerun == one uninterrupted run
    interrupted = tmp_path / "interrupted"
    _run(_overrides(toy_codes, interrupted, 8, **{"train.stop_at": 3}))
    assert not (interrupted / "gpt.safetensors").exists()
    assert "resumed from" in _run(_overrides(toy_codes, interrupted, 8)).stdout
    _run(_overrides(toy_codes, straight, 8))
    resumed = interrupted
    a, b = _weights(resumed), _weights(straight)
    for k in a:
        assert torch.equal(a[k], b[k]), f"resume is not exact: {k} differs"


def test_resume_refuses_a_changed_run(toy_codes, tmp_path, monkeypatch):
    """In process (the script's own resume runs in the slow test above): a rerun with another batch
    size is refused before it trains, and the first run's weights are left as they were."""
    from orderplan.config.common import TrainBackboneRun, compose, to_typed
    from orderplan.train.backbone import train_backbone

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    train_backbone(to_typed(compose("train_backbone", _overrides(toy_codes, run_dir, 4)), TrainBackboneRun))
    before = _weights(run_dir)
    changed = to_typed(compose("train_backbone", _overrides(toy_codes, run_dir, 8, **{"train.batch_size": 4})),
                       TrainBackboneRun)
    with pytest.raises(ValueError, match="cannot resume"):
        train_backbone(changed)
    after = _weights(run_dir)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_torchrun_ddp_two_cpu_processes(toy_codes, tmp_path):
    run_dir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    _run(_overrides(toy_codes, run_dir, 4), launcher)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert torch.isfinite(torch.tensor(summary["heldout_bits_per_token"]["raster"]))


def test_random_ratio_schedule():
    assert random_ratio(0, 100, 1.0, 0.0) == 1.0 and random_ratio(99, 100, 1.0, 0.0) == 1.0
    assert random_ratio(49, 100, 0.5, 0.25) == 1.0
    assert random_ratio(50 + 12, 100, 0.5, 0.25) == pytest.approx(1 - 12 / 25)
    assert random_ratio(80, 100, 0.5, 0.25) == 0.0


def test_batches_cover_every_image_once_per_epoch_across_ranks():
    n, batch, world = 24, 4, 2
    seen = torch.cat([batch_indices(n, batch, step, seed=3, rank=r, world=world)
                      for step in range(n // (batch * world)) for r in range(world)])
    assert sorted(seen.tolist()) == list(range(n))
    again = batch_indices(n, batch, 1, seed=3, rank=1, world=world)
    assert torch.equal(again, batch_indices(n, batch, 1, seed=3, rank=1, world=world))


def test_orders_are_block_orders_with_raster_inside_blocks():
    geom = BlockGeometry(8, 8, 2)
    orders = make_orders(geom, 16, 1.0, torch.Generator().manual_seed(0))
    for o in orders:
        assert sorted(o.tolist()) == list(range(64))
        blocks = o.view(16, 4)
        for blk in blocks:  # each group of 4 is one block, in in-block raster order
            assert torch.equal(blk, geom.block_tokens[geom.token_block[blk[0]]])
    raster = make_orders(geom, 4, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(raster[0], geom.token_order(torch.arange(16)))


def test_train_backbone_yaml_matches_its_schema():
    """Every YAML key exists in the dataclass and the defaults agree, so library and CLI runs match."""
    from orderplan.config.common import TrainBackboneRun, compose, to_typed

    assert to_typed(compose("train_backbone"), TrainBackboneRun) == TrainBackboneRun()
    with pytest.raises(Exception, match="max_step"):
        to_typed(compose("train_backbone", ["+train.max_step=3"]), TrainBackboneRun)
