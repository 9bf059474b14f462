"""Behaviour cloning learns a problem with a known answer: on the key-block toy (one block, fixed per
class, determines every other token) the cloned OrderHead reveals the key block first. Its features
match a naive replay, and the oracle data it trains on is exactly the set it asks for (a stored set
of another identity is refused, a larger one is read down to the requested images)."""

from dataclasses import replace

import pytest
import torch

from orderplan.train.bc import BCRun, bc_loss, load_or_build_oracle, r_at, targets_from_utilities
from orderplan.train.features import episode_features
from orderplan.train.oracle_data import OracleConfig, OracleDataset, collect_states, select_images
from orderplan.infra.checkpoint import load_safetensors, save_safetensors
from orderplan.config.common import BackboneConfig, DataSpec, GPTSpec
from orderplan.model.loading import save_gpt
from tests.conftest import randomized_gpt, write_toy_codes
from orderplan.planner.orderhead import OrderHead, orderhead_config_for
from orderplan.planner.policies import OrderHeadPolicy
from tests.support.keyblock_toy import make_toy_core


def test_bc_learns_the_key_block_first():
    torch.manual_seed(0)
    core = make_toy_core(batch_size=8, num_images=48, seed=0)
    rec = collect_states(core, "random", torch.arange(32), "future_loss", generator=torch.Generator().manual_seed(0))
    hidden, mask = episode_features(core, rec["image_index"], rec["prefix"], rec["length"])
    labels = core.labels.cpu()[rec["image_index"]]
    cfg = orderhead_config_for(core.D, core.geom, d_model=64, n_heads=4, num_classes=core.gpt.cfg.num_classes)
    model = OrderHead(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(150):
        idx = torch.randint(len(labels), (64,), generator=g)
        loss, _ = bc_loss(model, hidden[idx], mask[idx], rec["utilities"][idx], R=r_at(step, 150, [0, 1]),
                          label=labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    # held-out toy images: the first decision must be the key block of the image's class
    core.reset(image_index=torch.arange(32, 40))
    first = OrderHeadPolicy(model.eval(), greedy=True).act(core.observation())
    key = core.gpt.key_block[core.label]
    assert torch.equal(first.cpu(), key.cpu())


def test_episode_features_match_direct_observations():
    core = make_toy_core(batch_size=4, num_images=8, seed=1)
    rec = collect_states(core, "random", torch.arange(6), "future_loss", generator=torch.Generator().manual_seed(2))
    hidden, mask = episode_features(core, rec["image_index"], rec["prefix"], rec["length"])
    from orderplan.train.features import replay_states

    for s in (0, 5, 17, len(rec["length"]) - 1):
        obs = replay_states(core, rec["image_index"][s:s + 1], rec["prefix"][s:s + 1], rec["length"][s:s + 1])
        h = obs["hidden"]
        if h.shape[1] != core.N:
            h = h[:, core.block_tokens].mean(2)
        torch.testing.assert_close(hidden[s], h[0].float())
        assert torch.equal(mask[s], obs["block_mask"][0].cpu())


def _stepped(core, image: int, prefix: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive reference: reset every row on `image`, step the prefix's blocks one at a time, read
    row 0's pooled hidden state [N, D] and block mask [N]."""
    core.reset(image_index=torch.full((core.B,), image))
    for t in range(length):
        core.step(torch.full((core.B,), int(prefix[t])))
    obs = core.observation()
    h = obs["hidden"][:1].float()
    if h.shape[1] != core.N:
        h = core.geom.pool_blocks(h)
    return h[0], obs["block_mask"][0]


def test_episode_features_of_subsampled_episodes_match_a_naive_replay():
    """Regression: with states_per_image < N an image's longest stored prefix is shorter
    than the episode and differs between the images replayed together; the old replay stepped the
    -1 padding of the shorter ones and raised "block already revealed"
    (`python scripts/bc.py oracle.states_per_image=4`)."""
    core = make_toy_core(batch_size=4, num_images=12, seed=0)
    rec = collect_states(core, "random", torch.arange(7), "future_loss", states_per_image=4,
                         generator=torch.Generator().manual_seed(3))
    longest = torch.stack([rec["length"][rec["image_index"] == i].max() for i in range(7)])
    assert longest.unique().numel() > 1 and bool((longest < core.N - 1).any())  # the failing case is present
    # the same records twice (e.g. one image collected twice by a deterministic behaviour): both copies are read
    ii, pp, ll = (torch.cat([rec[k], rec[k][:5]]) for k in ("image_index", "prefix", "length"))
    hidden, mask = episode_features(core, ii, pp, ll)
    assert len(hidden) == len(rec["length"]) + 5
    for s in range(len(ll)):
        h, m = _stepped(core, int(ii[s]), pp[s], int(ll[s]))
        torch.testing.assert_close(hidden[s], h, atol=1e-6, rtol=1e-6)
        assert torch.equal(mask[s], m) and int(m.sum()) == int(ll[s])


def test_soft_targets_put_no_mass_on_revealed_blocks():
    util = torch.tensor([[1.0, float("-inf"), 3.0], [0.0, 0.0, float("-inf")]])
    soft = targets_from_utilities(util, "soft", 1.0)
    assert soft[0, 1] == 0 and soft[1, 2] == 0
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))
    assert targets_from_utilities(util, "argmax", 1.0).argmax(-1).tolist() == [2, 0]


# ----------------------------------------------------------------------------------------------
# The oracle set a BC run trains on (regressions: a stored set was reused when only its
# kind matched, and a larger one was trained on in full)
# ----------------------------------------------------------------------------------------------

N_TRAIN = 24  # train images of the toy codes


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A BC run whose oracle set (6 of the 24 train images, 2 random states each) is built once
    (one episode at a time: the oracle runs only at the 2 recorded steps)."""
    root = tmp_path_factory.mktemp("oracle_identity")
    codes = write_toy_codes(root / "codes", n_train=N_TRAIN, n_heldout=4)
    weights = root / "gpt.safetensors"
    save_gpt(randomized_gpt(seed=3), weights)
    backbone = BackboneConfig(name="toy", gpt=GPTSpec("tiny", {"n_layer": 2}), gpt_weights=str(weights),
                              vq_weights=None, data=DataSpec("codes", str(codes)))
    oracle = OracleConfig(out_dir=str(root / "oracle"), num_images=6, states_per_image=2, batch_size=1,
                          chunk_images=4)
    run = BCRun(backbone=backbone, oracle=oracle)
    ds = load_or_build_oracle(run, N_TRAIN)
    assert torch.equal(ds.images, select_images(N_TRAIN, 6, 0)) and len(ds) == 12
    return root, run


def _other_weights(root, run: BCRun) -> BCRun:
    """The run on a copy of its GPT weights with one value changed (another sha256)."""
    state, meta = load_safetensors(run.backbone.gpt_weights)
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 0.5
    path = root / "gpt_changed.safetensors"
    save_safetensors(state, path, meta)
    return replace(run, backbone=replace(run.backbone, gpt_weights=str(path)))


@pytest.mark.parametrize("field", ["behaviour", "seed", "states_per_image", "gpt_weights_sha256"])
def test_a_stored_set_of_another_identity_is_refused(stored, field):
    root, run = stored
    other = {"behaviour": lambda: replace(run, oracle=replace(run.oracle, behaviour="oracle")),
             "seed": lambda: replace(run, seed=1),
             "states_per_image": lambda: replace(run, oracle=replace(run.oracle, states_per_image=3)),
             "gpt_weights_sha256": lambda: _other_weights(root, run)}[field]()
    with pytest.raises(ValueError, match="different setup") as e:
        load_or_build_oracle(other, N_TRAIN)
    assert f"{field}: saved " in str(e.value) and "oracle.out_dir" in str(e.value)
    assert str(e.value).count(": saved ") == 1  # only the field that differs is named


def test_a_larger_stored_set_gives_exactly_the_requested_images(stored):
    root, run = stored
    full = OracleDataset(run.oracle.out_dir)
    ds = load_or_build_oracle(replace(run, oracle=replace(run.oracle, num_images=3)), N_TRAIN)
    want = select_images(N_TRAIN, 3, run.seed)
    assert set(want.tolist()) < set(full.images.tolist())  # nested: the 3 are among the (at least) 6 stored
    assert torch.equal(ds.images, want) and len(ds) == 3 * 2
    keep = torch.isin(full.image_index, want)  # the stored records of those images, untouched
    for k in ("image_index", "prefix", "length", "utilities"):
        assert torch.equal(getattr(ds, k), getattr(full, k)[keep]), k


def test_a_smaller_stored_set_is_extended_to_the_requested_images(stored):
    root, run = stored
    ds = load_or_build_oracle(replace(run, oracle=replace(run.oracle, num_images=8)), N_TRAIN)
    assert torch.equal(ds.images, select_images(N_TRAIN, 8, run.seed)) and len(ds) == 8 * 2


def _dagger_run(stored, name: str) -> BCRun:
    """A short DAgger run (one round at step 4) of the `stored` set, with a large lr so the learner
    that collects the round clearly differs from the one two steps later."""
    from orderplan.eval.report import EvalSpec

    root, run = stored
    bc = replace(run.bc, steps=8, batch_size=8, lr=0.05, replay_batch=4, log_every=2, ckpt_every=2, R_schedule=[0, 1],
                 dagger_rounds=1, dagger_images=2)
    return replace(run, run_dir=str(root / name), bc=bc, eval=EvalSpec(num_images=4, batch_size=4, baselines=["raster"]))


@pytest.mark.slow  # three end-to-end BC runs (>5 s on 2 cores)
def test_an_interrupted_dagger_run_resumes_exactly(stored, monkeypatch):
    """Regression: a resume collected the DAgger rounds already done again, with the resumed
    learner instead of the one that visited their states, so the resumed run diverged. Checkpoints now
    keep the rounds' records and a resume replays them."""
    from orderplan.train import bc as bc_mod

    root = stored[0]
    straight = bc_mod.train_bc(_dagger_run(stored, "dagger_straight"))
    real_step, real_restore = bc_mod._train_step, bc_mod._restore

    def crash_at_7(run, step, *args):
        if step == 7:  # after the round (step 4) and the step-6 checkpoint
            raise KeyboardInterrupt("simulated interruption")
        return real_step(run, step, *args)

    def interrupt(name: str) -> None:
        monkeypatch.setattr(bc_mod, "_train_step", crash_at_7)
        with pytest.raises(KeyboardInterrupt):
            bc_mod.train_bc(_dagger_run(stored, name))
        monkeypatch.setattr(bc_mod, "_train_step", real_step)

    interrupt("dagger_resumed")
    resumed = bc_mod.train_bc(_dagger_run(stored, "dagger_resumed"))
    assert resumed["resumed_from"] == 6 and resumed["train_states"] == straight["train_states"]
    a = load_safetensors(root / "dagger_straight" / "orderhead.safetensors")[0]
    b = load_safetensors(root / "dagger_resumed" / "orderhead.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == straight["history"] and resumed["returns"] == straight["returns"]

    # the test can see the defect: collecting the round again on resume (what a checkpoint without
    # the records still gets) ends elsewhere
    interrupt("dagger_recollected")
    monkeypatch.setattr(bc_mod, "_restore", lambda *a: (*real_restore(*a)[:3], None))
    bc_mod.train_bc(_dagger_run(stored, "dagger_recollected"))
    c = load_safetensors(root / "dagger_recollected" / "orderhead.safetensors")[0]
    assert any(not torch.equal(a[k], c[k]) for k in a)
