"""`scripts/evaluate.py`: generation rollouts are reproducible from their seed, replayed orders give
the teacher-forced metrics they claim, and a tiny end-to-end run writes the results layout with a
noise floor measured at the policies' N and oracle agreement measured for every policy."""

import json
import math
from dataclasses import replace

import pytest
import torch

from orderplan.eval.rollouts import (POLICY_SEED_OFFSET, auc, generate_samples, replay_order,
                                       teacher_forced_metrics)
from orderplan.planner.policies import FixedOrderPolicy, make_policy
from orderplan.config.common import BackboneConfig, compose, to_typed
from orderplan.model.loading import build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.model.sampling import SamplingConfig
from orderplan.env.core import EnvConfig


@pytest.fixture(scope="module")
def tiny():
    bb = build_backbone(BackboneConfig(), device="cpu")
    codes, labels = load_token_data(BackboneConfig(), "heldout")
    return bb, codes[::50][:8], labels[::50][:8]


def test_generation_rollout_is_reproducible_from_its_seed(tiny):
    bb, _, labels = tiny
    env = EnvConfig(sampling=SamplingConfig(cfg_scale=2.0))

    def run(seed, policy="random"):
        return generate_samples(lambda core: make_policy(policy, core, seed=0) if policy == "random"
                                else make_policy(policy, core), bb, labels[:6], env, batch_size=4, seed=seed,
                                num_snapshots=3)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images) and torch.equal(a.blocks, b.blocks)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.images.shape == (6, 1, 32, 32) and a.images.abs().max() <= 1.0
    assert torch.equal(a.labels, labels[:6])
    # the snapshot at 100% is the finished sample (decoded in a smaller batch: float rounding differs)
    assert torch.allclose(a.snapshots[:, -1], a.images[:3], atol=1e-4)
    assert a.snapshot_masks.sum(-1).tolist() == [[4, 8, 12, 16]] * 3


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("policy", ["raster", "spiral", "random", "per_image"])
def test_decoding_a_planned_order_equals_stepping_the_env(tiny, policy, cfg_scale):
    """The fast path (one KV-cached `generate` pass per batch) draws the same sampler calls as the
    env path, so it gives the same samples; only its cost differs."""
    bb, _, labels = tiny
    env = EnvConfig(sampling=SamplingConfig(cfg_scale=cfg_scale))
    g = torch.Generator().manual_seed(3)
    per_image = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])

    def make(core):
        if policy == "per_image":
            return FixedOrderPolicy(per_image)
        if policy == "random":  # the env path replays the planned permutations, drawn from the same seed
            drawn = make_policy("random", core, seed=4)
            drawn.reseed(5 + POLICY_SEED_OFFSET)  # what generate_samples does to batch 0's policy
            orders = drawn.planned_orders(torch.arange(6))
            return FixedOrderPolicy(orders) if core.cfg.query == "full" else make_policy("random", core, seed=4)
        return make_policy(policy, core)

    fast = generate_samples(make, bb, labels[:6], env, batch_size=6, seed=5, num_snapshots=2)
    slow = generate_samples(make, bb, labels[:6], env, batch_size=6, seed=5, num_snapshots=2, rewards=True)
    assert fast.path == "decode" and slow.path == "env"
    assert torch.equal(fast.blocks, slow.blocks)
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.images, slow.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.snapshots, slow.snapshots, atol=1e-5, rtol=0)
    assert torch.equal(fast.snapshot_masks, slow.snapshot_masks)
    assert fast.entropy_return is None and bool(slow.entropy_return.isfinite().all())


@pytest.mark.parametrize("policy", ["spiral", "per_image"])
def test_position_noise_decoding_equals_stepping_the_env(tiny, policy):
    """sampling.noise=position: the fast path and the env path read the same per-position noise."""
    bb, _, labels = tiny
    env = EnvConfig(sampling=SamplingConfig(cfg_scale=2.0, noise="position"))
    per_image = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])

    def make(core):
        return FixedOrderPolicy(per_image) if policy == "per_image" else make_policy(policy, core)

    fast = generate_samples(make, bb, labels[:6], env, batch_size=6, seed=5, num_snapshots=0)
    slow = generate_samples(make, bb, labels[:6], env, batch_size=6, seed=5, num_snapshots=0, rewards=True)
    assert fast.path == "decode" and slow.path == "env"
    assert torch.equal(fast.tokens, slow.tokens)
    other = generate_samples(make, bb, labels[:6], env, batch_size=6, seed=6, num_snapshots=0)
    assert not torch.equal(fast.tokens, other.tokens)  # the keys follow the seed


@pytest.mark.parametrize("noise", ["stream", "position"])
@pytest.mark.parametrize("policy", ["raster", "random", pytest.param("confident_first", marks=pytest.mark.slow)])
def test_a_set_generated_in_chunks_is_the_set_generated_at_once(tiny, policy, noise):
    """first_index continues a set: samples 4..7 generated as their own chunk equal samples 4..7 of the
    whole set (sampler streams, position-noise keys and the random policy's draws all follow the
    batch seed), which is what lets scripts/power.py grow N chunk by chunk."""
    bb, _, labels = tiny
    env = EnvConfig(sampling=SamplingConfig(cfg_scale=2.0, noise=noise))
    lab = labels[torch.arange(8) % len(labels)]

    def gen(lo, hi):
        return generate_samples(lambda core: make_policy(policy, core, **({"seed": 0} if policy == "random" else {})),
                                bb, lab[lo:hi], env, batch_size=2, seed=11, num_snapshots=0, first_index=lo)

    whole, first, second = gen(0, 8), gen(0, 4), gen(4, 8)
    assert torch.equal(whole.tokens, torch.cat([first.tokens, second.tokens]))
    assert torch.equal(whole.blocks, torch.cat([first.blocks, second.blocks]))
    assert not torch.equal(first.tokens, second.tokens)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        gen(3, 8)


def test_fixed_orders_policy_plays_the_given_orders(tiny):
    bb, codes, labels = tiny
    g = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])
    out = generate_samples(lambda core: FixedOrderPolicy(orders), bb, labels[:5], EnvConfig(), batch_size=5, seed=0,
                           num_snapshots=0)
    assert torch.equal(out.blocks, orders[torch.arange(5) % 3])  # sample i follows orders[i mod M]
    with pytest.raises(ValueError, match="permutation"):
        FixedOrderPolicy(torch.zeros(2, 16, dtype=torch.long))


def test_replayed_metrics_are_consistent(tiny):
    bb, codes, labels = tiny
    g = torch.Generator().manual_seed(1)
    blocks = torch.stack([torch.arange(16)] + [torch.randperm(16, generator=g) for _ in range(3)])
    env = EnvConfig(split="heldout")
    fl = replay_order(bb, codes, labels, env, blocks, batch_size=3)
    L = codes.shape[1]
    # future_loss telescopes: the rewards add up to L_rest(empty), and nothing is left at the end
    assert torch.allclose(fl.rewards.sum(1), fl.remaining[:, 0] * L, rtol=1e-5)
    assert torch.allclose(fl.remaining[:, -1], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(fl.rewards, -(fl.remaining[:, 1:] - fl.remaining[:, :-1]) * L, rtol=1e-4, atol=1e-4)
    # the order NLL is the backbone's own teacher-forced NLL of the image in that order
    lik = replay_order(bb, codes, labels, replace(env, reward="likelihood"), blocks, batch_size=3)
    order = bb.geometry.token_order(blocks)  # [4, L] token positions in generation order
    logits = bb.gpt.forward_train(codes[:4], labels[:4], order=order)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), codes[:4].gather(1, order).flatten(),
                                            reduction="none")
    assert torch.allclose(-lik.rewards.sum(1), nll.view(4, -1).sum(1).double(), rtol=1e-4)

    tf = teacher_forced_metrics(blocks, bb, codes, labels, env, ["future_loss", "anytime"], 0.9, 3)
    disc = (fl.rewards * 0.9 ** torch.arange(16, dtype=torch.float64)).sum(1).mean()
    assert tf["returns"]["future_loss"] == pytest.approx(float(disc), rel=1e-6)
    assert tf["auc_remaining_loss"] == pytest.approx(float(auc(fl.remaining).mean()), rel=1e-6)
    assert len(tf["remaining_curve"]) == 17
    assert tf["order_nll_bits"] > 0
    # anytime: -sum_t L_rest(S_t+1) / L per block
    want = -(fl.remaining[:, 1:] * 0.9 ** torch.arange(16, dtype=torch.float64)).sum(1).mean()
    assert tf["returns"]["anytime"] == pytest.approx(float(want), rel=1e-4)


def test_auc_of_a_straight_line_is_half():
    line = torch.linspace(1, 0, 17, dtype=torch.float64)[None]
    assert float(auc(line)[0]) == pytest.approx(0.5)


def test_evaluate_config_matches_its_schema():
    from orderplan.eval.evaluate import EvaluateRun

    default = EvaluateRun()
    assert to_typed(compose("evaluate"), EvaluateRun) == default  # the preset adds no default of its own


def test_unknown_or_missing_policies_fail_before_any_work(tmp_path):
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation

    run = to_typed(compose("evaluate", [f"run_dir={tmp_path}", "policies=[raster,nope]"]), EvaluateRun)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        run_evaluation(run)
    run = to_typed(compose("evaluate", [f"run_dir={tmp_path}", "policies=[bc]",
                                        f"checkpoints.bc={tmp_path}/none.safetensors"]), EvaluateRun)
    with pytest.raises(FileNotFoundError, match="scripts/bc.py"):
        run_evaluation(run)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_tiny_evaluation_writes_results(tmp_path):
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation

    overrides = [f"run_dir={tmp_path}", "policies=[raster,random,oracle,confident_first]", "eval.num_samples=12",
                 "eval.num_images=4", "eval.batch_size=6", "eval.gen_batch_size=6", "eval.seed_samples=6",
                 "eval.sampler_seeds=[0,1]", "eval.fid_curve=[6,12]", "+eval.policy_samples.confident_first=6",
                 "stats.bootstrap=3", "stats.kid_subsets=2", "plots.snapshot_samples=2", "plots.heatmap_images=2",
                 "plots.column_rows=3", "eval.npz=true"]
    run_evaluation(to_typed(compose("evaluate", overrides), EvaluateRun))
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_samples"] == 12 and res["references"] == {"train": 4500, "heldout": 500}
    assert set(res["policies"]) == {"raster", "random", "oracle", "confident_first"}  # a belief policy generates live
    for name, row in res["policies"].items():
        for key in ("fid", "fid_heldout", "kid_mean", "kid_std", "class_acc", "order_nll_bits", "return", "precision",
                    "recall", "class_logprob", "dfid_vs_raster", "dfid_vs_random"):
            assert math.isfinite(row[key]), (name, key)
        lo, hi = row["fid_ci"]
        assert 0.0 <= lo < hi  # 3 resamples of 12 samples: a spread, not a point
        assert 0.0 <= row["class_acc"] <= 1.0 and 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
        assert row["class_logprob"] <= 0.0 and row["class_logprob_ci"][0] <= row["class_logprob"]
        # fid_seeds: the 2 disjoint chunks of the main set (confident_first: 6 samples, chunks of 3)
        assert len(row["fid_seeds"]) == 2 and row["fid_seeds_n"] == (3 if name == "confident_first" else 6)
        assert [p["n"] for p in row["fid_curve"]] == ([6] if name == "confident_first" else [6, 12])
    assert res["policies"]["raster"]["generation_path"] == "decode"  # a fixed order: one KV pass per batch
    assert res["policies"]["confident_first"]["generation_path"] == "env"
    # the paired dFID of a policy with itself is exactly 0 with a zero-width interval
    assert res["policies"]["raster"]["dfid_vs_raster"] == 0.0 and res["policies"]["raster"]["dfid_vs_raster_ci"] == [0.0, 0.0]
    assert res["policies"]["raster"]["logprob_vs_raster"] == 0.0 and res["policies"]["raster"]["logprob_vs_raster_ci"] == [0.0, 0.0]
    assert math.isfinite(res["policies"]["random"]["logprob_vs_raster"])
    # a policy with fewer samples is compared on the common prefix (same labels and sampler streams)
    assert res["policies"]["confident_first"]["num_samples"] == 6
    assert res["policies"]["confident_first"]["dfid_vs_raster_n"] == 6 and res["policies"]["random"]["dfid_vs_raster_n"] == 12
    assert res["verdict"] is None  # no learned planner in the list
    # every feature space: the primary's entry is the row's own numbers, and a policy's paired dFID
    # with itself is exactly 0 in every space
    fsp = res["feature_spaces"]
    assert fsp["names"] == ["classifier", "autoencoder", "pixel_pca", "random_relu"] and fsp["held_out"] == "autoencoder"
    for name, row in res["policies"].items():
        assert row["spaces"]["classifier"]["fid"] == row["fid"] and row["spaces"]["classifier"]["recall"] == row["recall"]
        assert row["spaces"]["classifier"]["dfid_vs_random_ci"] == row["dfid_vs_random_ci"]
        for s in fsp["names"]:
            assert math.isfinite(row["spaces"][s]["fid"]) and len(row["spaces"][s]["fid_seeds"]) == 2, (name, s)
    for s in fsp["names"]:
        assert res["policies"]["raster"]["spaces"][s]["dfid_vs_raster"] == 0.0
        assert res["policies"]["raster"]["spaces"][s]["dfid_vs_raster_ci"] == [0.0, 0.0]
    # the extra spaces differ from the primary: the FDs are not the classifier's
    assert res["policies"]["random"]["spaces"]["pixel_pca"]["fid"] != res["policies"]["random"]["fid"]
    # real vs real: the train-split reference against the 500 held-out images
    from orderplan.eval.feature_net import make_feature_extractor
    from orderplan.eval.fid import extract_features, frechet_distance
    from orderplan.data.datasets import images_to_model, load_embedded_mnist

    assert res["fid_noise_floor_n"] == 500 and res["fid_noise_floor_method"] == "second_real_set"
    ext = make_feature_extractor("classifier")
    floor = frechet_distance(extract_features(ext, images_to_model(load_embedded_mnist("train")[0])),
                             extract_features(ext, images_to_model(load_embedded_mnist("heldout")[0])))
    assert res["fid_noise_floor"] == pytest.approx(floor, rel=1e-6)
    # chunk s of the main set is sample set s of fid_seeds; the chunks are different draws
    from orderplan.eval.sample_metrics import frechet_from_features

    gen = torch.load(tmp_path / "policies" / "random.pt", weights_only=False)["generated"]["features"]
    ref = extract_features(ext, images_to_model(load_embedded_mnist("train")[0])).double()
    row = res["policies"]["random"]
    for s in range(2):
        assert row["fid_seeds"][s] == pytest.approx(frechet_from_features(ref, gen[6 * s:6 * (s + 1), :64]), rel=1e-6)
    assert not torch.equal(gen[:6], gen[6:]) and row["fid_seeds"][0] != row["fid_seeds"][1]
    # the stored features hold every space side by side; pixel PCA's FD is recomputed from a PCA
    # fitted here on the train split, independently of the run
    from orderplan.eval.feature_spaces import PixelPCA

    assert gen.shape[1] == sum(fsp["widths"]) and fsp["widths"] == [64, 32, 32, 64]
    train_images = images_to_model(load_embedded_mnist("train")[0])
    pca = PixelPCA(32).fit(train_images)
    at = sum(fsp["widths"][:2])
    assert row["spaces"]["pixel_pca"]["fid"] == pytest.approx(
        frechet_from_features(pca(train_images).double(), gen[:, at:at + 32]), rel=1e-6)
    # agreement is measured, not assumed: the oracle policy picks the oracle's argmax at every state
    # it visits; raster does not
    assert res["policies"]["oracle"]["oracle_agreement"] == 1.0
    assert res["policies"]["oracle"]["regret"] == pytest.approx(0.0, abs=1e-5)
    assert res["policies"]["raster"]["oracle_agreement"] < 0.5 and res["policies"]["raster"]["regret"] > 0.0
    # the oracle maximises the future-loss utility greedily: on average it beats raster's return
    assert res["policies"]["oracle"]["return"] > res["policies"]["raster"]["return"]
    md = (tmp_path / "results.md").read_text()
    assert "N = 12" in md and "| oracle |" in md and "dFID vs raster" in md
    assert "Fréchet distance in every feature space" in md and "autoencoder (held out)" in md
    for png in ("samples_raster", "progressive_oracle", "order_heatmaps", "remaining_loss", "samples_side_by_side",
                "fid_vs_n", "reveal_time_heatmaps"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000
    import numpy as np

    with np.load(tmp_path / "samples_random.npz") as data:
        assert data["arr_0"].shape == (12, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    # a rerun reuses every finished policy and writes the same table; another N recomputes that policy
    again = run_evaluation(to_typed(compose("evaluate", overrides), EvaluateRun))
    assert json.loads(json.dumps(again["policies"])) == res["policies"]
    more = run_evaluation(to_typed(compose("evaluate", [*overrides, "+eval.policy_samples.random=8",
                                                        "policies=[raster,random]"]), EvaluateRun))
    # generation only (no teacher-forced images): the same samples, so the same generation numbers
    gen_only = run_evaluation(to_typed(compose("evaluate", [*overrides, "eval.num_images=0", f"run_dir={tmp_path}/g",
                                                            "policies=[raster,oracle]"]), EvaluateRun))
    for name in ("raster", "oracle"):
        assert gen_only["policies"][name]["fid"] == res["policies"][name]["fid"] and "return" not in gen_only["policies"][name]
    def own(row: dict) -> dict:  # a policy's own numbers (its dFIDs depend on the other policies)
        paired = ("dfid_vs_", "logprob_vs_")
        out = {k: v for k, v in row.items() if not k.startswith(paired)}
        out["spaces"] = {s: {k: v for k, v in r.items() if not k.startswith(paired)} for s, r in row["spaces"].items()}
        return out

    assert more["policies"]["random"]["num_samples"] == 8 and own(more["policies"]["raster"]) == own(res["policies"]["raster"])
    assert more["policies"]["raster"]["dfid_vs_random_n"] == 8


def test_class_logits_from_stored_features_equal_a_pass_over_the_images(tiny):
    from orderplan.eval.feature_net import make_feature_extractor
    from orderplan.eval.fid import extract_features

    ext = make_feature_extractor("classifier").eval()
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(ext.logits_from_features(extract_features(ext, images)), ext.classify(images))


def test_the_verdict_reads_the_paired_intervals():
    from orderplan.eval.evaluate import PolicySpec, verdict

    specs = [PolicySpec("raster", None, source="fixed order"), PolicySpec("bc", None, source="runs/bc/orderhead.safetensors"),
             PolicySpec("ppo", None, source="runs/ppo/orderhead.safetensors")]
    pol = {"raster": {"fid": 5.0},
           "bc": {"fid": 4.0, "dfid_vs_raster": -1.0, "dfid_vs_raster_ci": [-1.5, -0.5], "dfid_vs_raster_n": 10},
           "ppo": {"fid": 4.5, "dfid_vs_raster": -0.5, "dfid_vs_raster_ci": [-1.0, 0.2], "dfid_vs_raster_n": 10}}
    v = verdict({"policies": pol}, specs)
    assert v["best_learned"] == "bc" and v["vs"]["raster"]["says"] == "below"
    pol["bc"]["dfid_vs_raster_ci"] = [-1.5, 0.1]
    assert verdict({"policies": pol}, specs)["vs"]["raster"]["says"] == "not separated from"
    pol["bc"].update(dfid_vs_raster=1.0, dfid_vs_raster_ci=[0.5, 1.5])
    assert verdict({"policies": pol}, specs)["vs"]["raster"]["says"] == "above"
    assert verdict({"policies": pol}, specs[:1]) is None


def test_a_planner_of_a_jointly_tuned_backbone_needs_that_backbone(tmp_path):
    from orderplan.eval.evaluate import _check_same_backbone

    ckpt = tmp_path / "bc" / "orderhead.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    _check_same_backbone("bc", ckpt, BackboneConfig())  # plain BC: nothing to check
    (ckpt.parent / "gpt.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="backbone.gpt_weights="):
        _check_same_backbone("bc", ckpt, BackboneConfig())
    _check_same_backbone("bc", ckpt, BackboneConfig(gpt_weights=str(ckpt.parent / "gpt.safetensors")))
    # a PPO run names the tuned backbone of the BC run it started from
    ppo = tmp_path / "ppo" / "orderhead.safetensors"
    ppo.parent.mkdir()
    ppo.write_bytes(b"")
    (ppo.parent / "summary.json").write_text(json.dumps({"bc_tuned_backbone": str(ckpt.parent / "gpt.safetensors")}))
    with pytest.raises(ValueError, match="jointly tuned"):
        _check_same_backbone("ppo", ppo, BackboneConfig())


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_parallel_schedules_in_the_generation_table(tmp_path):
    """Schedules `<order>@<S>[c]` generate in S forwards per image (counted), rows report forwards and
    samples/s, and fid_vs_steps.png is drawn; a token-by-token order reports its L forwards."""
    from orderplan.eval.evaluate import EvaluateRun, run_evaluation

    pols = ["raster", "confident_first", "raster@64", "random@16", "halton@8", "confident@4", "spread_confident@16c"]
    overrides = [f"run_dir={tmp_path}", f"policies=[{','.join(pols)}]", "eval.num_samples=8", "eval.num_images=0",
                 "eval.gen_batch_size=4", "eval.seed_samples=4", "eval.sampler_seeds=[0,1]", "eval.fid_curve=[8]",
                 "stats.bootstrap=3", "stats.kid_subsets=2", "plots.snapshot_samples=2", "plots.column_rows=2"]
    res = run_evaluation(to_typed(compose("evaluate", overrides), EvaluateRun))
    rows = res["policies"]
    for name in pols[2:]:
        assert rows[name]["generation_path"] == "parallel"
        assert rows[name]["forward_passes_per_image"] == int(name.split("@")[1].rstrip("c"))
        assert rows[name]["decisions_per_sample"] == rows[name]["forward_passes_per_image"]
        assert rows[name]["samples_per_s"] > 0 and math.isfinite(rows[name]["fid"])
    assert rows["raster"]["forward_passes_per_image"] == 64  # one advance per token
    # the env path counts its forwards: per block T = 4 advances and one query, plus the reset's query
    assert rows["confident_first"]["forward_passes_per_image"] == 1 + 16 * (4 + 1)
    assert (tmp_path / "fid_vs_steps.png").stat().st_size > 1000
    assert "forwards / image" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="schedule"):
        run_evaluation(to_typed(compose("evaluate", [*overrides, "policies=[raster@5x]"]), EvaluateRun))


@pytest.mark.parametrize("sched, policy", [("raster@64", "raster"), ("confident@64", "confident_first")])
def test_a_schedule_of_one_token_per_forward_is_the_token_by_token_policy(tiny, sched, policy):
    """raster@64 is the raster row's decode, bit for bit; confident@64 chooses each next block by
    mean entropy at the block boundary as the env's confident_first does: the same samples."""
    bb, _, labels = tiny
    env = EnvConfig(sampling=SamplingConfig(cfg_scale=2.0, noise="position"))
    a = generate_samples(lambda core: make_policy(sched, core), bb, labels[:6], env, batch_size=3, seed=5)
    b = generate_samples(lambda core: make_policy(policy, core), bb, labels[:6], env, batch_size=3, seed=5)
    assert a.path == "parallel" and torch.equal(a.tokens, b.tokens) and torch.equal(a.blocks, b.blocks)
    assert a.forwards.tolist() == [64.0] * 6


def test_eval_greedy_and_r_key_only_learned_rows(tmp_path):
    """A cached fixed-order row is reused when only eval.greedy or eval.R changes (they shape an
    OrderHead's row alone); a learned row is not."""
    from orderplan.config.common import compose, to_typed
    from orderplan.eval.evaluate import EvaluateRun, PolicySpec, policy_identity

    head = tmp_path / "orderhead.safetensors"
    head.write_bytes(b"weights")
    fixed, learned = PolicySpec("raster", None, source="fixed order"), PolicySpec("q", None, source=str(head))
    a = to_typed(compose("evaluate"), EvaluateRun)
    b = to_typed(compose("evaluate", ["eval.greedy=false", "eval.R=2"]), EvaluateRun)
    assert policy_identity(fixed, a) == policy_identity(fixed, b)
    assert policy_identity(learned, a) != policy_identity(learned, b)
