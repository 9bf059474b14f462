"""`scripts/evaluate.py eval.num_samples=0`: teacher-forced rows only, for backbones without a VQ decoder or
feature network (the random-weight GPT-B smoke backbone); its rows are the teacher-forced metrics of the
orders the policies play, and generation-only inputs are neither required nor read."""

import json
import math

import pytest
import torch

from orderplan.eval.rollouts import balanced_images, teacher_forced_metrics
from orderplan.eval.evaluate import EvaluateRun, check_evaluate_run, run_evaluation
from orderplan.config.common import compose, to_typed
from orderplan.model.loading import build_backbone
from orderplan.data.tokens import load_token_data


def _run(tmp_path, *over: str) -> EvaluateRun:
    return to_typed(compose("evaluate", [f"run_dir={tmp_path}", *over]), EvaluateRun)


def test_num_samples_zero_is_teacher_forced_only_and_checked(tmp_path):
    check_evaluate_run(_run(tmp_path, "eval.num_samples=0", "features.classifier_path=missing.safetensors"))
    with pytest.raises(ValueError, match="eval.num_samples"):
        check_evaluate_run(_run(tmp_path, "eval.num_samples=1"))
    with pytest.raises(ValueError, match="eval.num_images >= 1"):
        check_evaluate_run(_run(tmp_path, "eval.num_samples=0", "eval.num_images=0"))
    with pytest.raises(FileNotFoundError):  # generating reads the classifier
        check_evaluate_run(_run(tmp_path, "features.classifier_path=missing.safetensors"))


def test_teacher_forced_only_rows_are_the_replayed_metrics(tmp_path):
    run = _run(tmp_path, "policies=[raster,random]", "eval.num_samples=0", "eval.num_images=3", "eval.batch_size=3",
               "eval.agreement_images=0", "eval.rewards=[future_loss,anytime]")
    res = run_evaluation(run)
    assert res["num_samples"] == 0 and set(res["policies"]) == {"raster", "random"}
    assert json.loads((tmp_path / "results.json").read_text())["policies"].keys() == res["policies"].keys()
    assert "teacher-forced only" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("samples_*.png"))  # nothing generated
    # the raster row equals the metrics of the raster order replayed on the same held-out images
    bb = build_backbone(run.backbone)
    codes, labels = load_token_data(run.backbone, "heldout")
    images = balanced_images(labels)[:3]
    raster = torch.arange(16).expand(3, 16)
    want = teacher_forced_metrics(raster, bb, codes, labels, run.env, ["future_loss", "anytime"], run.eval.gamma, 3,
                                  image_index=images)
    row = res["policies"]["raster"]
    assert row["returns"] == pytest.approx(want["returns"], rel=1e-6)
    assert row["order_nll_bits"] == pytest.approx(want["order_nll_bits"], rel=1e-6)
    assert all(math.isfinite(r["auc_remaining_loss"]) for r in res["policies"].values())
