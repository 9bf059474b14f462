"""The schedule_nll job (orderplan.eval.schedule_nll): each schedule's held-out NLL is the
teacher-forced generate_parallel NLL of its grids, one token per step is the backbone's chain rule
(so its excess is exactly 0), random@S scores the same block orders at every S, and the job writes
its table."""

import json

import torch

from orderplan.config.common import compose, to_typed
from orderplan.eval.schedule_nll import ScheduleNLLRun, run_schedule_nll, schedule_nll
from orderplan.infra.seeding import generator
from orderplan.model.parallel import ParallelSchedule
from orderplan.model.blocks import BlockGeometry
from tests.conftest import randomized_gpt


def test_one_token_per_step_is_the_chain_rule_for_every_order():
    """random@64 is the backbone's chain-rule NLL in the drawn orders, and random@16 draws the same orders
    (replayed through the one-token schedule's order); batching does not change a grid's score."""
    model, geom = randomized_gpt(seed=1), BlockGeometry(8, 8, 2)
    g = torch.Generator().manual_seed(0)
    codes, labels = torch.randint(0, 256, (5, 64), generator=g), torch.tensor([0, 3, 3, 7, 9])
    one = ParallelSchedule("random", 64)
    a = schedule_nll(model, geom, codes, labels, one, batch_size=5, seed=2)
    b = schedule_nll(model, geom, codes, labels, one, batch_size=2, seed=2)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # float32 sums in another batch shape
    orders = one.token_orders(5, geom, generator(2, "schedule_nll", "random"))
    logp = torch.log_softmax(model.forward_train(codes, labels, orders).double(), -1)
    chain = -logp.gather(-1, codes.gather(1, orders)[..., None])[..., 0].sum(1)
    torch.testing.assert_close(a, chain, atol=1e-4, rtol=1e-6)
    four = schedule_nll(model, geom, codes, labels, ParallelSchedule("random", 16), batch_size=5, seed=2)
    assert bool((four != a).all())


def test_the_job_writes_its_table(tmp_path):
    run = to_typed(compose("schedule_nll", [f"run_dir={tmp_path}", "schedules=[raster@16,confident@8c,raster@64]",
                                            "num_images=6", "bootstrap=20"]), ScheduleNLLRun)
    res = run_schedule_nll(run)
    rows = res["schedules"]
    assert list(rows) == ["raster@16", "confident@8c", "raster@64"] and res["num_images"] == 6
    assert rows["raster@64"]["excess_vs_one_token"] == 0.0 and rows["raster@64"]["excess_ci"] == [0.0, 0.0]
    for r in rows.values():
        assert r["nll_ci"][0] <= r["nll_per_token"] <= r["nll_ci"][1]
    assert json.loads((tmp_path / "results.json").read_text())["schedules"] == rows
    assert "| confident@8c | 8 |" in (tmp_path / "results.md").read_text()
