"""scripts/power.py: the power study's checks, its N extrapolation, and a tiny run that resumes from
its saved chunks to the same report, with the chunked features equal to one-shot generation's."""

import json
import math

import pytest
import torch

from orderplan.eval.power import PowerRun, PowerSpec, check_power, required_n, run_power
from orderplan.config.common import compose, to_typed


@pytest.mark.parametrize("change,match", [
    ({"b": "raster"}, "must differ"),
    ({"chunk": 750}, "multiple of eval.gen_batch_size"),
    ({"max_samples": 100}, "max_samples"),
    ({"checkpoints": [5000, 7500]}, "multiples of power.chunk"),
    ({"target_ratio": 0.0}, "target_ratio"),
    ({"max_minutes": -1.0}, "max_minutes"),
])
def test_bad_power_settings_name_the_key(change, match):
    spec = PowerSpec(**change)
    with pytest.raises(ValueError, match=match):
        check_power(spec, 500)


def test_required_n_follows_the_inverse_square_root():
    # half-width 2 at N=100 and 1 at N=400 (exactly c / sqrt(N), c = 20); |dFID| = 0.6, ratio 1/3 -> 0.2
    points = [{"n": 100, "half_width": 2.0, "dfid": 0.5}, {"n": 400, "half_width": 1.0, "dfid": 0.6}]
    assert required_n(points, 1 / 3) == pytest.approx((20 / 0.2) ** 2)
    assert required_n([{"n": 10, "half_width": 1.0, "dfid": 0.0}], 1 / 3) is None


def test_the_power_config_composes():
    run = to_typed(compose("power"), PowerRun)
    assert (run.power.a, run.power.b) == ("raster", "random") and run.power.max_samples == 320000
    check_power(run.power, run.eval.gen_batch_size)


def test_oracles_are_refused(tmp_path):
    run = to_typed(compose("power", [f"run_dir={tmp_path}", "power.a=oracle", "power.chunk=500",
                                     "power.checkpoints=[500]", "power.max_samples=500"]), PowerRun)
    with pytest.raises(ValueError, match="pick policies without ground truth"):
        run_power(run)


@pytest.mark.slow  # two policies x 12 samples, twice (~20 s on 2 cores)
def test_tiny_power_study_resumes_to_the_same_report(tmp_path):
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation

    common = ["eval.gen_batch_size=6", "stats.bootstrap=5"]
    overrides = [f"run_dir={tmp_path / 'power'}", *common, "power.chunk=6", "power.checkpoints=[6,12]",
                 "power.max_samples=12"]
    first = run_power(to_typed(compose("power", overrides), PowerRun))
    assert first["stop"] in ("max_samples", "separated") and [p["n"] for p in first["points"]][0] == 6
    for p in first["points"]:
        assert p["ci"][0] < p["ci"][1] and math.isclose(p["half_width"], (p["ci"][1] - p["ci"][0]) / 2)
    chunks = sorted((tmp_path / "power" / "chunks").rglob("*.pt"))
    assert len(chunks) == 2 * len(first["points"])
    again = run_power(to_typed(compose("power", overrides), PowerRun))  # every chunk reused

    def numbers(points):
        return [{k: v for k, v in p.items() if k != "minutes"} for p in points]

    assert numbers(again["points"]) == numbers(first["points"])
    assert numbers(json.loads((tmp_path / "power" / "power.json").read_text())["points"]) == numbers(first["points"])
    # the chunked set is evaluate's set: same features as one-shot generation of 12 samples
    res = run_evaluation(to_typed(compose("evaluate", [f"run_dir={tmp_path / 'eval'}", *common, "policies=[raster,random]",
                                                       "eval.num_samples=12", "eval.num_images=0", "eval.sampler_seeds=[0]",
                                                       "eval.fid_curve=[12]", "eval.dfid_baselines=[random]",
                                                       "stats.kid_subsets=2", "plots.column_rows=2"]), EvaluateRun))
    if first["n"] == 12:
        assert res["policies"]["raster"]["dfid_vs_random"] == pytest.approx(first["points"][-1]["dfid"], abs=1e-9)
    features = torch.cat([torch.load(p)["features"] for p in sorted((tmp_path / "power" / "chunks" / "raster").glob("*.pt"))])
    assert features.shape[0] == first["n"]
