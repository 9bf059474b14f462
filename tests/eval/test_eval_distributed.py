"""`scripts/evaluate.py` under torchrun: the numbers do not depend on the number of processes, and only
rank 0 writes (2 real gloo processes on CPU).

Tolerance: none. Every rank generates whole sampler batches with their one-process seeds and
extracts features one generation batch at a time, so the gathered features are bit-identical, and
every statistic is computed by rank 0 from the gathered set; results.json must match exactly (the
wall-clock `seconds` aside)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orderplan.eval.sharding import batch_range, figure_indices
from tests.support.dist_eval import evaluate_rank
from tests.support.dist_launch import launch
from tests.support.volatile import strip_volatile


def test_batch_ranges_tile_the_set_in_whole_batches():
    for n in (1, 4, 5, 12, 13):
        for world in (1, 2, 3, 5):
            ranges = [batch_range(n, 4, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
            assert all(lo % 4 == 0 and (hi % 4 == 0 or hi == n) for lo, hi in ranges)
            sizes = [-(-(hi - lo) // 4) for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_figure_indices_hold_the_first_rows_and_each_class_s_first_samples():
    labels = torch.tensor([3, 1, 3, 3, 1, 2, 3, 2])
    assert figure_indices(labels, per_class=2, rows=1).tolist() == [0, 1, 2, 4, 5, 7]
    assert figure_indices(labels, per_class=1, rows=4).tolist() == [0, 1, 2, 3, 5]


def _numbers(res: dict) -> dict:
    """results.json without wall-clock times."""
    return strip_volatile(res)


def _files(written: list[str]) -> set[str]:
    """Written paths without the atomic writers' temp files (.<name>.<pid>.<hex>.tmp)."""
    return {p for p in written if not Path(p).name.startswith(".")}


@pytest.mark.slow  # three launches of a tiny evaluate (~3 min on 2 shared cores)
def test_two_processes_give_the_one_process_results(tmp_path):
    # 3 batches of 4 split 1 + 2, confident_first's single batch leaves rank 0 without any, the oracle
    # plays its 12 teacher-forced orders sharded (1 + 2 batches) and replays them across the shard
    # boundary, snapshots span both ranks' batches, fid_seeds' extra sets are sharded too
    common = ["policies=[raster,random,oracle,confident_first]", "eval.num_samples=12", "eval.gen_batch_size=4",
              "eval.num_images=4", "eval.batch_size=4", "eval.seed_samples=8", "eval.sampler_seeds=[0,1]",
              "eval.seed_sets=extra", "eval.fid_curve=[8,12]", "+eval.policy_samples.confident_first=4", "stats.bootstrap=5",
              "stats.kid_subsets=2", "plots.snapshot_samples=6", "plots.heatmap_images=2", "plots.column_rows=6",
              "eval.npz=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    (single,) = launch(evaluate_rank, 1, [f"run_dir={one}", *common])
    ranks = launch(evaluate_rank, 2, [f"run_dir={two}", *common])

    res1 = json.loads((one / "results.json").read_text())
    res2 = json.loads((two / "results.json").read_text())
    assert _numbers(res2) == _numbers(res1)
    assert res2["policies"]["oracle"]["generation_path"] == "decode"
    assert res2["policies"]["confident_first"]["num_samples"] == 4
    for name in res1["policies"]:
        with np.load(one / f"samples_{name}.npz") as a, np.load(two / f"samples_{name}.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"])
    # the figures too, byte for byte: the gathered images and snapshots are the one-process ones
    pngs = sorted(p.name for p in one.glob("*.png"))
    assert len(pngs) == 13 and all((one / f).read_bytes() == (two / f).read_bytes() for f in pngs)
    # every rank returns rank 0's table; rank 1 writes nothing but (if it prints) its console log
    assert all(r["returned_is_file"] for r in [single, *ranks])
    assert set(ranks[1]["written"]) <= {"evaluate.rank1.log"}
    assert "results.json" in ranks[0]["written"] and "policies/oracle.pt" in ranks[0]["written"]
    assert _files(ranks[0]["written"]) == _files(single["written"])

    # a rerun reuses every finished policy (rank 0 decides, every rank skips) and gives the same table
    again = launch(evaluate_rank, 2, [f"run_dir={two}", *common])
    assert _numbers(json.loads((two / "results.json").read_text())) == _numbers(res1)
    assert not any(p.startswith("policies/") for p in again[0]["written"])
    assert set(again[1]["written"]) <= {"evaluate.rank1.log"}
