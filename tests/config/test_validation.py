"""Config validation (src/orderplan/infra/validation.py and the one validation function per schema): every
default in configs/ passes, a bad value fails naming its dotted key and allowed range, and a run
function refuses it before writing anything to its run_dir."""

import math
import pytest

from orderplan.config.common import CONFIG_DIR, compose, to_typed
from orderplan.infra.validation import (check_budgets, check_gamma, check_int, check_int_list, check_path_exists,
                                 check_positive, check_probability, check_range)
from orderplan.train.compare_orders import check_compare_run


# -- the helpers ----------------------------------------------------------------------------------


def test_check_int_names_key_value_and_range():
    check_int("bc.steps", 1, 1)
    with pytest.raises(ValueError, match=r"bc\.steps must be an integer >= 1, got -5"):
        check_int("bc.steps", -5, 1)
    with pytest.raises(ValueError, match=r"an integer in \[0, 6\].*got 7"):
        check_int("bc.joint.top_n", 7, 0, 6)
    for bad in (2.5, True, "3", None):  # True >= 1 in Python: booleans are refused explicitly
        with pytest.raises(ValueError, match="x.n"):
            check_int("x.n", bad, 1)
    check_int("x.n", None, 1, allow_none=True)


def test_check_range_intervals_and_non_finite():
    check_positive("lr", 1e-3)
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match=r"lr must be a number > 0"):
            check_positive("lr", bad)
    check_gamma("ppo.gamma", 1.0)
    with pytest.raises(ValueError, match=r"ppo\.gamma must be a number in \(0, 1\], got 0"):
        check_gamma("ppo.gamma", 0)
    check_probability("p", 0.0)
    check_probability("p", 1.0)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got 1.5"):
        check_probability("p", 1.5)
    with pytest.raises(ValueError, match=r"b1 must be a number in \[0, 1\)"):
        check_range("b1", 1.0, 0.0, 1.0, hi_open=True)


def test_check_budgets_and_lists():
    check_budgets("env.budget", [1, 2, 16], 16)
    with pytest.raises(ValueError, match=r"env\.budget\[1\] must be an integer in \[1, 16\] \(the number of blocks\), "
                                         r"got 999"):
        check_budgets("env.budget", [1, 999], 16)
    with pytest.raises(ValueError, match=r"env\.budget must be a non-empty list"):
        check_budgets("env.budget", [], 16)
    with pytest.raises(ValueError, match=r"env\.budget\[0\]"):
        check_budgets("env.budget", [0, 1], 16)
    with pytest.raises(ValueError, match="distinct"):
        check_int_list("seeds", [0, 0], distinct=True)


def test_check_path_exists(tmp_path):
    assert check_path_exists("backbone.gpt_weights", "artifacts/tiny_mnist/gpt.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match=r"bc\.init_from not found: .*missing\.safetensors.*scripts/bc\.py"):
        check_path_exists("bc.init_from", tmp_path / "missing.safetensors", hint="run scripts/bc.py first")
    assert check_path_exists("x", None, allow_none=True) is None


# -- one validation per schema --------------------------------------------------------------------


def _schemas():
    from orderplan.eval.alignment import AlignmentRun, check_alignment_run
    from orderplan.eval.autoencoder import AutoencoderRun, check_autoencoder_run
    from orderplan.eval.classifier_training import ClassifierRun, check_classifier_run
    from orderplan.eval.power import PowerRun, check_power_run
    from orderplan.eval.evaluate import EvaluateRun, check_evaluate_run
    from orderplan.train.bc import BCRun, check_bc_run
    from orderplan.train.compare_orders import CompareRun
    from orderplan.train.oracle_data import BuildOracleRun, check_build_oracle_run
    from orderplan.train.ppo_run import PPORun, check_ppo_run
    from orderplan.config.common import TrainBackboneRun
    from orderplan.train.backbone import check_train_backbone_run
    from orderplan.data.extract import ExtractCodesConfig, check_extract_codes
    from orderplan.train.vq import TrainVQConfig, check_train_vq
    from orderplan.env.factory import EnvRun, check_env_run
    from orderplan.train.quality import QualityRun, check_quality_run
    from orderplan.eval.headroom import HeadroomRun, check_headroom_run
    from orderplan.eval.schedule_nll import ScheduleNLLRun, check_schedule_nll_run

    return {  # config name -> (schema, validation(run, check_paths))
        "bc": (BCRun, check_bc_run), "bc_generated": (BCRun, check_bc_run),
        "build_oracle": (BuildOracleRun, check_build_oracle_run),
        "compare_orders": (CompareRun, check_compare_run),
        "evaluate": (EvaluateRun, check_evaluate_run), "evaluate_generation": (EvaluateRun, check_evaluate_run),
        "evaluate_steps": (EvaluateRun, check_evaluate_run),
        "evaluate_steps_router": (EvaluateRun, check_evaluate_run), "evaluate_spaces": (EvaluateRun, check_evaluate_run),
        "evaluate_quality": (EvaluateRun, check_evaluate_run),
        "evaluate_quality_curve": (EvaluateRun, check_evaluate_run),
        "evaluate_quality_discriminator": (EvaluateRun, check_evaluate_run),
        "extract_codes": (ExtractCodesConfig, check_extract_codes),
        "make_env": (EnvRun, check_env_run),
        "power": (PowerRun, check_power_run),
        "ppo": (PPORun, check_ppo_run), "ppo_generated": (PPORun, check_ppo_run),
        "ppo_parallel": (PPORun, check_ppo_run),
        "train_backbone": (TrainBackboneRun, check_train_backbone_run),
        "train_classifier": (ClassifierRun, lambda run, check_paths: check_classifier_run(run)),
        "train_autoencoder": (AutoencoderRun, lambda run, check_paths: check_autoencoder_run(run)),
        "reward_alignment": (AlignmentRun, lambda run, check_paths: check_alignment_run(run)),
        "train_vq": (TrainVQConfig, lambda run, check_paths: check_train_vq(run)),
        "quality": (QualityRun, check_quality_run), "quality_discriminator": (QualityRun, check_quality_run),
        "headroom": (HeadroomRun, lambda run, check_paths: check_headroom_run(run)),
        "schedule_nll": (ScheduleNLLRun, lambda run, check_paths: check_schedule_nll_run(run)),
    }


# Defaults that name another job's output (a BC head): their paths exist only after that job ran.
NEEDS_EARLIER_RUN = {"bc_generated", "ppo", "ppo_generated", "ppo_parallel", "evaluate_quality", "evaluate_steps_router",
                     "evaluate_quality_curve", "evaluate_quality_discriminator"}


def test_every_config_has_a_validation():
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(_schemas())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_config_defaults_pass_validation(name):
    schema, validate = _schemas()[name]
    run = to_typed(compose(name), schema)
    validate(run, check_paths=name not in NEEDS_EARLIER_RUN)


BAD = [  # (config, override, the key its error must name, a piece of the allowed range)
    ("bc", "bc.steps=-5", "bc.steps", ">= 1"),
    ("bc", "bc.batch_size=0", "bc.batch_size", ">= 1"),
    ("bc", "bc.lr=0", "bc.lr", "> 0"),
    ("bc", "bc.R_schedule=[0,-1]", "bc.R_schedule[1]", ">= 0"),
    ("bc", "agent.dropout=1.0", "agent.dropout", "[0, 1)"),
    ("bc", "oracle.states_per_image=17", "oracle.states_per_image", "[1, 16]"),
    ("bc", "bc.joint.class_dropout=1.5", "bc.joint.class_dropout", "[0, 1]"),
    ("bc", "eval.gamma=0", "eval.gamma", "(0, 1]"),
    ("bc", "env.budget=[1,999]", "env.budget[1]", "[1, 16]"),
    ("bc", "env.sampling.top_p=2", "env.sampling.top_p", "[0, 1]"),
    ("bc", "backbone.block_size=3", "backbone.block_size", "8x8"),
    ("ppo", "backbone.dtype=float16", "backbone.dtype", "auto, float32, bfloat16"),
    ("train_backbone", "backbone.dtype=bfloat16", "backbone.dtype", "float32"),
    ("ppo", "ppo.gae_lambda=1.5", "ppo.gae_lambda", "[0, 1]"),
    ("ppo", "ppo.gamma=0", "ppo.gamma", "(0, 1]"),
    ("ppo", "ppo.epochs=0", "ppo.epochs", ">= 1"),
    ("ppo", "agent.budgets=[1,2,99]", "agent.budgets[2]", "[1, 16]"),
    ("ppo", "batch_size=0", "batch_size", ">= 1"),
    ("evaluate", "eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("evaluate", "stats.level=1.0", "stats.level", "(0, 1)"),
    ("evaluate", "eval.seed_sets=more", "eval.seed_sets", "chunks"),
    ("evaluate", "eval.num_samples=5", "eval.num_samples", "3 chunks"),
    ("evaluate", "eval.sampling.temperature=-1", "eval.sampling.temperature", ">= 0"),
    ("power", "power.target_ratio=2", "power.target_ratio", "(0, 1]"),
    ("build_oracle", "batch_size=0", "batch_size", ">= 1"),
    ("compare_orders", "eval.bootstrap=0", "eval.bootstrap", ">= 1"),
    ("compare_orders", "bc_overrides=['bc.steps=0']", "bc.steps", ">= 1"),
    ("train_backbone", "train.max_steps=0", "train.max_steps", ">= 1"),
    ("train_backbone", "train.class_dropout=2", "train.class_dropout", "[0, 1]"),
    ("train_backbone", "train.log_every=0", "train.log_every", ">= 1"),
    ("train_vq", "train.lr=-1", "train.lr", "> 0"),
    ("train_classifier", "epochs=0", "epochs", ">= 1"),
    ("train_autoencoder", "max_shift=-1", "max_shift", ">= 0"),
    ("reward_alignment", "knn_k=0", "knn_k", ">= 1"),
    ("quality", "grpo.group_size=1", "grpo.group_size", ">= 2"),
    ("quality", "grpo.clip=0", "grpo.clip", "(0, 1]"),
    ("quality", "reward.spaces=[autoencoder]", "reward.spaces", "pixel_pca"),
    ("quality", "reward.kind=fid", "reward.kind", "discriminator"),
    ("quality_discriminator", "reward.discriminator.buffer=0", "reward.discriminator.buffer", ">= 1"),
    ("quality_discriminator", "reward.discriminator.real=train", "reward.discriminator.real", "reconstructions"),
    ("headroom", "draws=1", "draws", ">= 2"),
    ("headroom", "vary=labels", "vary", "noise"),
    ("headroom", "critics=[fid]", "critics", "discriminator_vq"),
    ("headroom", "baselines=[confident_sampled]", "baselines", "pool"),
    ("extract_codes", "batch_size=0", "batch_size", ">= 1"),
    ("make_env", "batch_size=-2", "batch_size", ">= 1"),
]


@pytest.mark.parametrize("name,override,key,allowed", BAD, ids=[f"{n}:{o}" for n, o, _, _ in BAD])
def test_bad_value_names_key_and_range(name, override, key, allowed):
    schema, validate = _schemas()[name]
    run = to_typed(compose(name, [override]), schema)
    with pytest.raises(ValueError) as err:
        validate(run, check_paths=False)
    msg = str(err.value)
    assert msg.startswith(key) or f"{key}=" in msg or f"{key} " in msg, msg
    assert allowed in msg, msg


def test_missing_paths_name_the_key(tmp_path):
    from orderplan.train.ppo_run import PPORun, check_ppo_run
    from orderplan.config.common import TrainBackboneRun
    from orderplan.train.backbone import check_train_backbone_run

    run = to_typed(compose("ppo", [f"agent.init_from={tmp_path / 'none.safetensors'}"]), PPORun)
    with pytest.raises(FileNotFoundError, match=r"agent\.init_from not found.*scripts/bc\.py"):
        check_ppo_run(run)
    run = to_typed(compose("train_backbone", [f"backbone.vq_weights={tmp_path / 'vq.safetensors'}"]), TrainBackboneRun)
    with pytest.raises(FileNotFoundError, match=r"backbone\.vq_weights not found"):
        check_train_backbone_run(run)


# -- run functions refuse before they write -------------------------------------------------------


def _runners():
    from orderplan.eval.alignment import AlignmentRun, reward_alignment
    from orderplan.eval.autoencoder import AutoencoderRun, train_autoencoder
    from orderplan.eval.classifier_training import ClassifierRun, train_classifier
    from orderplan.eval.power import PowerRun, run_power
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation
    from orderplan.train.bc import BCRun, train_bc
    from orderplan.train.compare_orders import CompareRun, compare_orders
    from orderplan.train.oracle_data import BuildOracleRun, build_oracle
    from orderplan.train.ppo_run import PPORun, run_ppo
    from orderplan.config.common import TrainBackboneRun
    from orderplan.data.extract import ExtractCodesConfig, extract_codes
    from orderplan.train.backbone import train_backbone
    from orderplan.train.vq import TrainVQConfig, train_vq
    from orderplan.train.quality import QualityRun, run_quality
    from orderplan.eval.schedule_nll import ScheduleNLLRun, run_schedule_nll
    from orderplan.eval.headroom import HeadroomRun, run_headroom

    return {"bc": (BCRun, train_bc, "run_dir"), "ppo": (PPORun, run_ppo, "run_dir"),
            "evaluate": (EvaluateRun, run_evaluation, "run_dir"), "power": (PowerRun, run_power, "run_dir"),
            "build_oracle": (BuildOracleRun, build_oracle, "out_dir"),
            "compare_orders": (CompareRun, compare_orders, "run_dir"),
            "train_backbone": (TrainBackboneRun, train_backbone, "run_dir"),
            "train_vq": (TrainVQConfig, train_vq, "run_dir"),
            "train_classifier": (ClassifierRun, train_classifier, "run_dir"),
            "train_autoencoder": (AutoencoderRun, train_autoencoder, "run_dir"),
            "reward_alignment": (AlignmentRun, reward_alignment, "run_dir"),
            "quality": (QualityRun, run_quality, "run_dir"),
            "headroom": (HeadroomRun, run_headroom, "run_dir"),
            "schedule_nll": (ScheduleNLLRun, run_schedule_nll, "run_dir"),
            "extract_codes": (ExtractCodesConfig, extract_codes, "out_dir")}


EXISTING = "artifacts/tiny_mnist/gpt.safetensors"  # any existing file: PPO only checks agent.init_from exists first

REFUSED = [
    ("bc", ["bc.steps=-5"], "bc.steps"),
    ("bc", ["oracle.batch_size=0"], "oracle.batch_size"),
    ("ppo", [f"agent.init_from={EXISTING}", "ppo.minibatch_size=0"], "ppo.minibatch_size"),
    ("evaluate", ["eval.gen_batch_size=0"], "eval.gen_batch_size"),
    ("power", ["power.max_minutes=-1"], "power.max_minutes"),
    ("build_oracle", ["chunk_images=0"], "chunk_images"),
    ("compare_orders", ["eval.level=0"], "eval.level"),
    ("train_backbone", ["train.lr=0"], "train.lr"),
    ("train_vq", ["train.batch_size=0"], "train.batch_size"),
    ("train_classifier", ["batch_size=-1"], "batch_size"),
    ("train_autoencoder", ["epochs=0"], "epochs"),
    ("reward_alignment", ["num_samples=2"], "num_samples"),
    ("quality", ["grpo.kl_coef=-1"], "grpo.kl_coef"),
    ("headroom", ["calibration_samples=0"], "calibration_samples"),
    ("schedule_nll", ["schedules=[raster@5x]"], "schedules"),
    ("schedule_nll", ["batch_size=0"], "batch_size"),
    ("extract_codes", ["num_workers=-1"], "num_workers"),
]


@pytest.mark.parametrize("name,overrides,key", REFUSED, ids=[f"{n}:{o[-1]}" for n, o, _ in REFUSED])
def test_run_functions_refuse_bad_values_before_writing(tmp_path, name, overrides, key):
    schema, run_fn, dir_field = _runners()[name]
    out = tmp_path / "out"
    run = to_typed(compose(name, [f"{dir_field}={out}", *overrides]), schema)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run_fn(run)
    assert not out.exists() or not any(out.iterdir())  # no log, checkpoint or summary left behind
