"""The quality job end to end on the embedded default (quick mode), and its exact resume."""

import json

import pytest
import torch

from orderplan.config.common import compose, to_typed
from orderplan.infra.checkpoint import load_safetensors
from orderplan.train.quality import QualityRun, run_quality

QUICK = ["grpo.iterations=2", "grpo.groups=2", "grpo.group_size=3", "grpo.minibatch_size=16", "curve_samples=12",
         "curve_every=1", "grpo.ckpt_every=1"]


def _run(tmp_path, name, extra=(), preset="quality"):
    return to_typed(compose(preset, [f"run_dir={tmp_path / name}", *QUICK, *extra]), QualityRun)


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_quality_quick_mode_writes_the_head_the_curve_and_a_summary(tmp_path):
    summary = run_quality(_run(tmp_path, "q"))
    out = tmp_path / "q"
    assert (out / "orderhead.safetensors").is_file() and (out / "summary.json.sha256").is_file()
    curve = json.loads((out / "curve.json").read_text())["points"]
    assert [p["iteration"] for p in curve] == [0, 1, 2]
    heads = sorted(p.name for p in (out / "curve").glob("*.safetensors"))
    assert heads == ["iter_00000.safetensors", "iter_00001.safetensors", "iter_00002.safetensors"]
    assert all(0 <= p["pixel_pca"]["recall"] <= 1 and p["pixel_pca"]["fd"] > 0 for p in curve)
    hist = summary["history"]
    assert len(hist) == 2 and all(h["kl"] >= 0 and h["policy_entropy"] > 0 for h in hist)
    assert summary["updates"] == 2 * 2 * 6  # iterations x epochs x minibatches (6 rows x 16 decisions / 16)


@pytest.mark.slow
def test_quality_resumes_exactly(tmp_path):
    run_quality(_run(tmp_path, "straight"))
    run_quality(_run(tmp_path, "cut", ["grpo.iterations=1"]))
    run_quality(_run(tmp_path, "cut"))  # picks up at iteration 1
    a, _ = load_safetensors(tmp_path / "straight" / "orderhead.safetensors")
    b, _ = load_safetensors(tmp_path / "cut" / "orderhead.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="kl_coef"):
        run_quality(_run(tmp_path, "cut", ["grpo.kl_coef=0.5", "grpo.iterations=3"]))


@pytest.mark.slow
def test_quality_on_the_discriminator_reward_resumes_exactly(tmp_path):
    """AdaNAT's reward: the discriminator, its optimiser, minibatch stream and buffer resume with the head."""
    quick = ["reward.discriminator.steps=3", "reward.discriminator.steps_per_iteration=2",
             "reward.discriminator.buffer=10"]
    straight = run_quality(_run(tmp_path, "straight", quick, preset="quality_discriminator"))
    run_quality(_run(tmp_path, "cut", [*quick, "grpo.iterations=1"], preset="quality_discriminator"))
    resumed = run_quality(_run(tmp_path, "cut", quick, preset="quality_discriminator"))
    a, _ = load_safetensors(tmp_path / "straight" / "orderhead.safetensors")
    b, _ = load_safetensors(tmp_path / "cut" / "orderhead.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the paid reward is the discriminator's log-odds (not the FD share) and continues exactly after the cut
    for h, g in zip(straight["history"], resumed["history"]):
        assert h["reward"] == g["reward"] and h["discriminator_loss"] == g["discriminator_loss"]
    assert "discriminator_log_odds" in straight["curve"][0] and 0 <= straight["history"][-1]["called_real"] <= 1
