"""Limited joint tuning (seed Stage 5) in BC: the differentiable features equal the env's, only the
declared top-of-GPT parameters move, L_AR and lambda act on the update, the tuned GPT is written,
evaluated and picked up by PPO, and an interrupted joint run resumes bit for bit.

End-to-end runs use a self-contained backbone (a random 2-layer tiny GPT saved with save_gpt, toy
codes), no artifacts needed."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orderplan.env.core import EnvConfig
from orderplan.eval.report import EvalSpec
from orderplan.train.bc import BCConfig, BCRun, train_bc
from orderplan.train.features import episode_features, state_features
from orderplan.train.joint import JointConfig, JointTuner
from orderplan.train.oracle_data import OracleConfig, collect_states
from orderplan.infra.checkpoint import load_safetensors
from orderplan.config.common import BackboneConfig, DataSpec, GPTSpec, compose, to_typed
from orderplan.model.loading import load_gpt, save_gpt
from tests.conftest import randomized_gpt, toy_core, write_toy_codes


def test_state_features_match_episode_features():
    core = toy_core(batch_size=4, n_images=8)
    rec = collect_states(core, "random", torch.arange(6), "future_loss", generator=torch.Generator().manual_seed(2))
    hidden, mask = episode_features(core, rec["image_index"], rec["prefix"], rec["length"])
    idx = torch.randperm(len(rec["length"]), generator=torch.Generator().manual_seed(0))[:40]
    idx = torch.cat([idx, torch.nonzero(rec["length"] == 0).flatten()[:2]])  # empty states too
    h, m = state_features(core.gpt, core.geom, core.codes[rec["image_index"][idx]], core.labels[rec["image_index"][idx]],
                          rec["prefix"][idx], rec["length"][idx])
    torch.testing.assert_close(h, hidden[idx], atol=1e-5, rtol=1e-4)
    assert torch.equal(m, mask[idx])


def test_bc_yaml_matches_its_schema():
    assert to_typed(compose("bc"), BCRun) == BCRun()  # the preset adds no default of its own
    assert BCRun().bc.joint.top_n == 0  # off by default: `python scripts/bc.py` is plain BC
    run = to_typed(compose("bc", ["bc.joint.top_n=2", "bc.joint.lam=0.5"]), BCRun)
    assert run.bc.joint == JointConfig(top_n=2, lam=0.5)
    with pytest.raises(Exception, match="topn"):
        to_typed(compose("bc", ["+bc.joint.topn=1"]), BCRun)


# ----------------------------------------------------------------------------------------------
# End to end on a self-contained backbone
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    codes = write_toy_codes(root / "codes", n_train=48, n_heldout=16)
    weights = root / "gpt.safetensors"
    save_gpt(randomized_gpt(seed=3), weights)
    backbone = BackboneConfig(name="toy", gpt=GPTSpec("tiny", {"n_layer": 2}), gpt_weights=str(weights),
                              vq_weights=None, data=DataSpec("codes", str(codes)))
    oracle = OracleConfig(out_dir=str(root / "oracle"), num_images=6, batch_size=8)
    return root, backbone, oracle


def _run(setup, name: str, **joint) -> BCRun:
    root, backbone, oracle = setup
    bc = BCConfig(steps=4, batch_size=16, replay_batch=8, log_every=2, ckpt_every=2, R_schedule=[0, 1],
                  joint=JointConfig(**{"lr": 1e-3, "ar_batch_size": 8, **joint}))
    # joint tuning recomputes hidden states in one causal pass: the observation without beliefs
    return BCRun(backbone=backbone, oracle=oracle, bc=bc, eval=EvalSpec(num_images=8, batch_size=8),
                 env=EnvConfig(beliefs=False), run_dir=str(root / name))


def _state(path) -> dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_top_block_only_moves_and_the_report_uses_the_tuned_gpt(setup):
    base = _state(setup[1].gpt_weights)
    plain = train_bc(_run(setup, "plain"))
    assert "joint" not in plain and not (Path(plain["weights"]).parent / "gpt.safetensors").exists()

    out = train_bc(_run(setup, "top1", top_n=1))
    j = out["joint"]
    assert j["tuned_blocks"] == [1] and j["top_n"] == 1
    tuned = _state(j["gpt_weights"])
    moved = {k for k in base if not torch.equal(base[k], tuned[k])}
    declared = {k for k in base if k.startswith(("layers.1.", "norm.", "output."))}
    assert moved == declared == set(j["tuned_params"])  # every other parameter is bit-identical
    # the file loads back and says what was tuned from which weights
    model = load_gpt(j["gpt_weights"])
    assert torch.equal(model.layers[1].attention.wqkv.weight, tuned["layers.1.attention.wqkv.weight"])
    meta = load_safetensors(j["gpt_weights"])[1]
    assert meta["tuned_blocks"] == [1] and meta["base_weights"] == str(Path(setup[1].gpt_weights))
    for b in (j["heldout_bits_before"], j["heldout_bits_after"]):
        assert set(b) == {"raster", "random"} and all(torch.isfinite(torch.tensor(v)) for v in b.values())
    assert j["heldout_bits_before"] != j["heldout_bits_after"]
    assert all("loss_ar" in h and torch.isfinite(torch.tensor(h["loss_ar"])) for h in out["history"])
    # the baselines are scored on the tuned backbone (the future-loss returns change with the GPT)
    assert out["returns"]["raster"] != plain["returns"]["raster"]

    no_out = train_bc(_run(setup, "top1_noout", top_n=1, tune_output=False))
    tuned = _state(no_out["joint"]["gpt_weights"])
    assert {k for k in base if not torch.equal(base[k], tuned[k])} == {k for k in base if k.startswith("layers.1.")}

    # a plain BC run in a joint run's directory removes the tuned GPT (it no longer belongs to the planner)
    with pytest.raises(ValueError, match="cannot resume"):  # not from the joint run's checkpoints
        train_bc(_run(setup, "top1_noout"))
    shutil.rmtree(setup[0] / "top1_noout" / "checkpoints")
    train_bc(_run(setup, "top1_noout"))
    assert not (setup[0] / "top1_noout" / "gpt.safetensors").exists()


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_a_run_that_builds_its_oracle_data_equals_one_that_finds_it(setup):
    """Regression: building the oracle set inside train_bc drew the build's GPT init from
    the global RNG, so the head started from another init than in a run that found the set."""
    root, _, oracle = setup
    builds = replace(_run(setup, "builds"), oracle=replace(oracle, out_dir=str(root / "oracle_built_here")))
    train_bc(builds)
    train_bc(replace(builds, run_dir=str(root / "finds")))
    a, b = _state(root / "builds" / "orderhead.safetensors"), _state(root / "finds" / "orderhead.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_lambda_and_l_ar_shape_the_update(setup):
    small = train_bc(_run(setup, "lam_tiny", top_n=1, lam=1e-6))["joint"]
    big = train_bc(_run(setup, "lam_huge", top_n=1, lam=1e6))["joint"]
    tiny, huge = _state(small["gpt_weights"]), _state(big["gpt_weights"])
    k = "layers.1.feed_forward.w2.weight"
    assert not torch.equal(tiny[k], huge[k])
    # lambda -> 0 is L_AR alone: the backbone keeps training on it, its held-out NLL drops
    for order in ("raster", "random"):
        assert small["heldout_bits_after"][order] < small["heldout_bits_before"][order]
        assert small["heldout_bits_after"][order] < big["heldout_bits_after"][order]


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_start_step_delays_tuning_and_plain_bc_is_unchanged(setup):
    """Before start_step the joint run is plain BC bit for bit (same head init, batches, dropout)."""
    root = setup[0]
    train_bc(_run(setup, "plain_ref"))
    train_bc(_run(setup, "late", top_n=1, start_step=2))
    a = torch.load(root / "plain_ref" / "checkpoints" / "step_00000002.pt", weights_only=False)
    b = torch.load(root / "late" / "checkpoints" / "step_00000002.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    base = _state(setup[1].gpt_weights)
    for k, v in b["joint"]["params"].items():
        assert torch.equal(v, base[k]), k  # untouched before start_step
    with pytest.raises(ValueError, match="start_step"):
        train_bc(_run(setup, "bad", top_n=1, start_step=4))


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_interrupted_joint_run_resumes_exactly(setup, monkeypatch):
    root = setup[0]
    straight = train_bc(_run(setup, "straight", top_n=1))
    real = JointTuner.ar_loss

    def crash_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(self, step)

    monkeypatch.setattr(JointTuner, "ar_loss", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_bc(_run(setup, "resumed", top_n=1))
    monkeypatch.setattr(JointTuner, "ar_loss", real)
    resumed = train_bc(_run(setup, "resumed", top_n=1))
    assert resumed["resumed_from"] == 2
    for name in ("gpt.safetensors", "orderhead.safetensors"):
        a, b = _state(root / "straight" / name), _state(root / "resumed" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    assert resumed["returns"] == straight["returns"]
    # a changed joint config cannot resume the run
    with pytest.raises(ValueError, match="cannot resume"):
        train_bc(replace(_run(setup, "resumed", top_n=1, lam=2.0), bc=replace(_run(setup, "x").bc, steps=6,
                                                                            joint=JointConfig(top_n=1, lam=2.0))))


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_ppo_uses_the_tuned_backbone(setup):
    from orderplan.train.ppo import PPOConfig
    from orderplan.train.ppo_run import PPOAgentSpec, PPORun, run_ppo

    root, backbone, _ = setup
    bc = train_bc(_run(setup, "for_ppo", top_n=1))
    run = PPORun(backbone=backbone, agent=PPOAgentSpec(init_from=bc["weights"]), batch_size=8,
                 ppo=PPOConfig(frames_per_batch=128, total_frames=128, minibatch_size=64, epochs=1),
                 eval=EvalSpec(num_images=8, batch_size=8), run_dir=str(root / "ppo"))
    out = run_ppo(run)
    tuned = str((root / "for_ppo" / "gpt.safetensors").resolve())
    assert out["bc_tuned_backbone"] == tuned and out["config"]["backbone"]["gpt_weights"] == tuned
    assert json.loads((root / "ppo" / "summary.json").read_text())["bc_tuned_backbone"] == tuned
