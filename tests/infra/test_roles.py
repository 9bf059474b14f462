"""The FID feature networks are evaluation-only (issue 23, item 4): inside a training job the
committed classifier and autoencoder refuse to load, under any file name; every training job runs
marked, so any training path that loaded them would fail (and with it the training tests)."""

from __future__ import annotations

import shutil

import pytest

from orderplan.eval.autoencoder import load_autoencoder
from orderplan.eval.feature_net import ClassifierConfig, DigitClassifier, load_classifier, make_feature_extractor, save_classifier
from orderplan.eval.feature_spaces import build_space
from orderplan.infra.paths import PACKAGE_ROOT
from orderplan.infra.roles import TRAINING_JOBS, EvaluationOnlyError, current_training_job, training_job

CLASSIFIER = PACKAGE_ROOT / "artifacts/tiny_mnist/classifier.safetensors"
AUTOENCODER = PACKAGE_ROOT / "artifacts/tiny_mnist/autoencoder.safetensors"


def test_the_feature_networks_refuse_to_load_in_a_training_job(tmp_path):
    load_classifier(CLASSIFIER), load_autoencoder(AUTOENCODER)  # evaluation may
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(CLASSIFIER, copy)
    with training_job("ppo"):
        assert current_training_job() == "ppo"
        for load in (lambda: load_classifier(CLASSIFIER), lambda: load_classifier(copy),
                     lambda: make_feature_extractor("classifier"), lambda: load_autoencoder(AUTOENCODER),
                     lambda: build_space("autoencoder")):
            with pytest.raises(EvaluationOnlyError, match="evaluation-only and the ppo job must not load it"):
                load()
        # a network of its own (a reward model, say) is not the evaluation's and loads
        own = save_classifier(DigitClassifier(ClassifierConfig(num_features=16)), tmp_path / "own.safetensors")
        assert load_classifier(own).num_features == 16
    assert current_training_job() is None


@pytest.mark.parametrize("job,module,entry,check", [
    ("bc", "orderplan.train.bc", "train_bc", "check_bc_run"),
    ("ppo", "orderplan.train.ppo_run", "run_ppo", "check_ppo_run"),
    ("build_oracle", "orderplan.train.oracle_data", "build_oracle", "check_build_oracle_run"),
    ("compare_orders", "orderplan.train.compare_orders", "compare_orders", "check_compare_run"),
    ("quality", "orderplan.train.quality", "run_quality", "check_quality_run"),
])
def test_every_training_job_runs_marked(tmp_path, monkeypatch, job, module, entry, check):
    """The job's first step sees the mark: everything it calls afterwards is inside it."""
    import importlib

    from orderplan.config.common import compose, to_typed
    from orderplan.config.store import schema_of

    mod = importlib.import_module(module)
    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(current_training_job())
        raise Stop

    monkeypatch.setattr(mod, check, spy)
    field = "out_dir" if job == "build_oracle" else "run_dir"
    run = to_typed(compose(job, [f"{field}={tmp_path / 'run'}"]), schema_of(job))
    with pytest.raises(Stop):
        getattr(mod, entry)(run)
    assert seen == [job] and job in TRAINING_JOBS
