"""Best of G orders (src/orderplan/eval/headroom.py): the selection rule, draws that differ only by
their orders, and the job end to end in quick mode."""

import json
from dataclasses import replace

import pytest
import torch

from orderplan.config.common import BackboneConfig
from orderplan.data.tokens import load_token_data
from orderplan.env.core import EnvConfig
from orderplan.eval.headroom import HeadroomRun, run_headroom, select
from orderplan.eval.rollouts import generate_samples
from orderplan.model.loading import build_backbone
from orderplan.model.sampling import SamplingConfig
from orderplan.planner.policies import FixedOrderPolicy, make_policy


def test_select_keeps_the_best_or_worst_draw_and_the_lowest_on_ties():
    scores = torch.tensor([[1.0, 3.0, 2.0, 5.0],
                           [3.0, 3.0, 0.0, 4.0],
                           [2.0, 1.0, 0.0, 6.0]])  # [G = 3, N = 4]
    assert select(scores, "best").tolist() == [1, 0, 0, 2]
    assert select(scores, "worst").tolist() == [0, 2, 1, 1]
    assert select(scores, "best", first=2).tolist() == [1, 0, 0, 0]
    assert select(scores, "best", first=1).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="finite"):
        select(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), "best")
    with pytest.raises(ValueError, match="best or worst"):
        select(scores, "median")


@pytest.fixture(scope="module")
def tiny():
    bb = build_backbone(BackboneConfig(), device="cpu")
    _, labels = load_token_data(BackboneConfig(), "heldout")
    return bb, labels[::50][:6]


def test_draws_of_a_pair_differ_only_by_their_orders(tiny):
    """draw d redraws the policy's choices and nothing else: with position noise, replaying draw 1's
    orders on draw 0's stream gives draw 1's tokens, so what a critic chooses between is the order."""
    bb, labels = tiny
    env = EnvConfig(sampling=SamplingConfig(cfg_scale=2.0, noise="position"))

    def sampled(core):
        return make_policy("confident_sampled", core, seed=0)

    d0 = generate_samples(sampled, bb, labels, env, batch_size=6, seed=5, num_snapshots=0)
    again = generate_samples(sampled, bb, labels, env, batch_size=6, seed=5, num_snapshots=0, draw=0)
    d1 = generate_samples(sampled, bb, labels, env, batch_size=6, seed=5, num_snapshots=0, draw=1)
    assert torch.equal(d0.tokens, again.tokens) and torch.equal(d0.blocks, again.blocks)  # draw 0: the table's stream
    assert torch.equal(d1.labels, d0.labels)
    assert not torch.equal(d1.blocks, d0.blocks)  # other orders...
    replay = generate_samples(lambda core: FixedOrderPolicy(d1.blocks), bb, labels, env, batch_size=6, seed=5,
                              num_snapshots=0)
    assert torch.equal(replay.tokens, d1.tokens)  # ...and nothing else
    # a deterministic policy has no choices to redraw
    first = [generate_samples(lambda core: make_policy("confident_first", core), bb, labels, env, batch_size=6,
                              seed=5, num_snapshots=0, draw=d) for d in (0, 1)]
    assert torch.equal(first[0].tokens, first[1].tokens)


def test_headroom_refuses_a_calibration_seed_the_evaluation_samples_with(tmp_path):
    with pytest.raises(ValueError, match="calibration_seed 1 is one of the evaluation's sampler seeds"):
        run_headroom(HeadroomRun(run_dir=str(tmp_path / "h"), calibration_seed=1))


QUICK = dict(num_samples=16, draws=4, calibration_samples=8, gen_batch_size=8, bootstrap=10,
             baselines=["random", "confident_first"])


@pytest.mark.slow  # three small jobs (~2 min on 2 cores)
def test_headroom_job_selects_by_its_critics_and_reuses_its_draws(tmp_path, capsys):
    from orderplan.eval.alignment import JudgeSpec
    from orderplan.eval.discriminator import DiscriminatorSpec

    run = HeadroomRun(run_dir=str(tmp_path / "h"), judge=JudgeSpec(epochs=1), discriminator=DiscriminatorSpec(steps=2),
                      **QUICK)
    res = run_headroom(run)
    sets = res["sets"]
    assert set(sets) == {"draw0", "draw1", "draw2", "draw3", "random", "confident_first"} | {
        f"{k}_{c}" for k in ("best", "worst", "best2") for c in ("discriminator_vq", "judge")}
    for c in ("discriminator_vq", "judge"):
        draws = [sets[f"draw{d}"]["critics"][c] for d in range(4)]
        # per pair the best is >= every draw, so its mean is >= every draw's mean (and the worst's <=)
        assert sets[f"best_{c}"]["critics"][c] >= max(draws) - 1e-12
        assert sets[f"worst_{c}"]["critics"][c] <= min(draws) + 1e-12
        assert sets[f"best_{c}"]["critics"][c] >= sets[f"best2_{c}"]["critics"][c] >= max(draws[:2]) - 1e-12
        verdict = res["verdict"][c]
        assert set(verdict) == {"draw0", "random", "confident_first"}
        for b, v in verdict.items():  # the verdict says what the table says
            cells = sets[f"best_{c}"]["spaces"]
            assert v["below_in_every_space"] == all(x[f"dfd_vs_{b}_ci"][1] < 0 for x in cells.values())
            assert v["recall_within_0.01"] == all(cells[sp]["recall"] >= sets[b]["spaces"][sp]["recall"] - 0.01
                                                  for sp in cells)
    for name, row in sets.items():
        for sp in res["spaces"]:
            cell = row["spaces"][sp]
            assert cell["fd_ci"][0] <= cell["fd"] <= cell["fd_ci"][1] + 1e-9, (name, sp)
            assert ("dfd_vs_draw0" in cell) == (name != "draw0")
            # selections and draw 0 face every baseline; the other draws and the baselines face draw 0 only
            assert ("dfd_vs_random" in cell) == (name.startswith(("best", "worst")) or name == "draw0"), (name, sp)
    # draw 0 against itself is absent; draw 0 against the baseline is minus the baseline against it
    cf = sets["confident_first"]["spaces"]["pixel_pca"]["dfd_vs_draw0"]
    assert sets["draw0"]["spaces"]["pixel_pca"]["dfd_vs_confident_first"] == pytest.approx(-cf, abs=1e-9)
    assert res["spaces"] == ["classifier", "autoencoder", "pixel_pca", "random_relu"]
    assert res["sampling"]["noise"] == "position"
    capsys.readouterr()
    # a second run reuses every generated set (checksummed caches) and reproduces the table
    again = run_headroom(run)
    assert capsys.readouterr().out.count("generated in an earlier run") == 7  # 4 draws, 2 baselines, calibration
    assert json.dumps(again["sets"], sort_keys=True) == json.dumps(sets, sort_keys=True)
    assert "Best of 4 orders of confident_sampled" in (tmp_path / "h" / "results.md").read_text()
    # seed 1 replicates the procedure: draws 4..7 and its own critics, the same baselines (shared cache)
    one = run_headroom(replace(run, seed=1, run_dir=str(tmp_path / "h1"), members_dir=str(tmp_path / "h" / "members")))
    out = capsys.readouterr().out
    assert out.count("generated in an earlier run") == 2  # the two baselines
    assert one["draw_indices"] == [4, 7]
    for sp in res["spaces"]:  # the same baseline samples (the intervals' resamples follow the seed)
        assert one["sets"]["random"]["spaces"][sp]["fd"] == sets["random"]["spaces"][sp]["fd"]
    assert one["sets"]["draw0"]["spaces"]["pixel_pca"]["fd"] != sets["draw0"]["spaces"]["pixel_pca"]["fd"]
    # the control: the G samples of a pair differ by their noise; draw 0 is the same set as above
    ctrl = run_headroom(HeadroomRun(run_dir=str(tmp_path / "n"), members_dir=str(tmp_path / "h" / "members"),
                                    vary="noise", critics=["judge"], judge=JudgeSpec(epochs=1),
                                    **{**QUICK, "draws": 2, "baselines": ["random"]}))
    assert capsys.readouterr().out.count("generated in an earlier run") == 2  # draw 0 and the baseline
    assert ctrl["vary"] == "noise"
    assert ctrl["sets"]["draw0"]["spaces"]["pixel_pca"]["fd"] == sets["draw0"]["spaces"]["pixel_pca"]["fd"]
    assert ctrl["sets"]["draw1"]["spaces"]["pixel_pca"]["fd"] != sets["draw1"]["spaces"]["pixel_pca"]["fd"]
    # a deterministic pool offers no choice of order
    with pytest.raises(ValueError, match="deterministic"):
        run_headroom(HeadroomRun(run_dir=str(tmp_path / "d"), pool="confident_first", critics=["judge"],
                                 **{**QUICK, "draws": 2, "baselines": ["raster"]}))
