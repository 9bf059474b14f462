"""train_ppo under torchrun (src/orderplan/train/ppo.py, ppo_dist.py), in real gloo processes on the CPU.

* 2 ranks: identical weights on both, finite losses, global frame counts, only rank 0 writes;
* WORLD_SIZE=1 under the launcher is a plain run, bit for bit;
* one update of 2 ranks x B rows equals one update of 1 rank x 2B rows on the same rows (one
  minibatch per epoch, so the minibatches are the same frames; up to float summation order);
* a 2-rank run stopped and resumed equals the uninterrupted 2-rank run bit for bit, and a
  2-rank checkpoint refuses a resume in one process.

Only the first 2-process test (plain actions) is in the default set; its router variant, the
equivalence and the resume test are slow (`pytest -m slow tests/agents/test_ppo_dist.py`): most of
their time is the spawned interpreters importing torch and TorchRL.
"""

import math

import pytest
import torch

from orderplan.train.ppo import PPOConfig, train_ppo
from orderplan.train.ppo_dist import global_means, rank_seed, rank_stream, single_process, standardize
from orderplan.infra.distributed import DistContext
from tests.support.dist_launch import launch
from tests.support.dist_ppo import collect_batch, learn_rank, resume_rank, small_head, toy_env, train_rank, weights

# B = 2 rows per rank x 2 ranks x 16 decisions (N = 16 blocks): one whole episode per row and iteration
CFG = dict(frames_per_batch=64, total_frames=128, minibatch_size=32, epochs=2, eval_every=0, ckpt_every=1, seed=3)


def assert_same_weights(a, b) -> None:
    a, b = (weights(x) if isinstance(x, str) else x for x in (a, b))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_helpers_in_one_process_change_nothing():
    """W = 1 keeps the plain run's seeds and TorchRL's advantage normalisation; ranks of a larger
    world get distinct env seeds."""
    from torchrl._utils import _standardize

    one = single_process(torch.device("cpu"))
    assert rank_seed(5, one) == 5 and rank_stream(one, "ppo", "train") == ("ppo", "train")
    world = [DistContext(rank=r, world=2, local_rank=r, device=torch.device("cpu")) for r in range(2)]
    seeds = {rank_seed(5, c) for c in world}
    assert len(seeds) == 2 and 5 not in seeds
    assert rank_stream(world[1], "ppo", "train") == ("ppo", "train", "rank", 1)
    adv = torch.randn(37, 1) * 3 + 1
    torch.testing.assert_close(standardize(adv, one), _standardize(adv), rtol=1e-5, atol=1e-6)
    assert global_means({"a": (6.0, 3), "b": (1.0, 0)}, one) == {"a": 2.0}  # no count: left out


# ~15 s on 2 idle cores (most of it the two spawned interpreters importing torch and TorchRL)
@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
@pytest.mark.parametrize("router", [False, True])
def test_two_ranks_keep_identical_weights_and_only_rank_0_writes(router, tmp_path):
    dirs = [str(tmp_path / "rank0"), str(tmp_path / "rank1")]  # one per rank: a write by rank 1 would show
    r0, r1 = launch(train_rank, 2, dirs, str(tmp_path / "out"), CFG, 2, router)
    assert r0["world"] == r1["world"] == 2
    assert_same_weights(r0["weights"], r1["weights"])
    init = small_head(toy_env(2, router).core, router).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in weights(r0["weights"]).items())  # it did train
    for r in (r0, r1):
        res = r["result"]
        assert res["iterations"] == 2 and res["frames"] == 128 and res["finished"]  # global frames
        for key in ("train/loss_objective", "train/loss_critic", "train/entropy", "train/approx_kl",
                    "train/explained_variance", "train/mean_return"):
            assert math.isfinite(res["metrics"][key]), key
        assert res["metrics"]["train/episodes"] >= 4  # 2 rows on each of 2 ranks: a whole episode each
        if router:
            assert 1 <= res["metrics"]["train/mean_budget"] <= 4
    train = [{k: v for k, v in r["result"]["metrics"].items() if k.startswith("train/")} for r in (r0, r1)]
    assert train[0] == train[1]  # global metrics: the same on every rank
    assert "orderhead.safetensors" in r0["files"] and "checkpoints/step_00000002.pt" in r0["files"]
    assert r1["files"] == []
    state = torch.load(tmp_path / "rank0" / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])  # own streams


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_world_size_1_under_the_launcher_is_a_plain_run(tmp_path):
    (launched,) = launch(train_rank, 1, [str(tmp_path / "launched")], str(tmp_path / "out"), CFG, 4)
    assert launched["world"] == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched rank: float reductions split by thread count differ in the last bit
    try:
        env = toy_env(4)
        model = small_head(env.core)
        plain = train_ppo(env, model, PPOConfig(**CFG), tmp_path / "plain")
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(launched["weights"], model.state_dict())
    train = [{k: v for k, v in m.items() if k.startswith("train/")}
             for m in (plain["metrics"], launched["result"]["metrics"])]
    assert train[0] == train[1]


@pytest.mark.slow  # 2 spawned processes, each importing torch and TorchRL: > 20 s on 2 shared cores
def test_two_ranks_update_as_one_big_batch(tmp_path):
    """Same 4 rows, one minibatch of all 64 frames, 2 epochs, auto reward scale, advantage
    normalisation: 2 ranks x 2 rows vs 1 process x 4 rows."""
    cfg = dict(CFG, minibatch_size=64, reward_scale=None, normalize_advantage=True)
    path = str(tmp_path / "batch.pt")
    collect_batch(path, 4, cfg)
    one = learn_rank(path, str(tmp_path), cfg, 4)
    r0, r1 = launch(learn_rank, 2, path, str(tmp_path), cfg, 2)
    assert_same_weights(r0["weights"], r1["weights"])
    init = small_head(toy_env(4).core).state_dict()
    one_w, two_w = weights(one["weights"]), weights(r0["weights"])
    for k, v in one_w.items():
        step = (v - init[k]).abs().max()
        torch.testing.assert_close(two_w[k], v, rtol=0, atol=1e-6 + 1e-3 * float(step), msg=k)
    assert any(not torch.equal(init[k], v) for k, v in one_w.items())
    for key, v in one["metrics"].items():
        if key.startswith("train/"):
            assert r0["metrics"][key] == pytest.approx(v, rel=1e-4, abs=1e-6), key


@pytest.mark.slow  # 2 spawned processes, each importing torch and TorchRL: > 20 s on 2 shared cores
def test_resume_under_two_ranks_is_exact(tmp_path):
    ranks = launch(resume_rank, 2, str(tmp_path), str(tmp_path / "out"), CFG | {"total_frames": 192}, 2, 1)
    for r in ranks:
        assert r["part"]["result"]["iterations"] == 1 and not r["part"]["result"]["finished"]
        assert r["resumed"]["result"]["iterations"] == 3 and r["resumed"]["result"]["frames"] == 192
        assert_same_weights(r["ref"]["weights"], r["resumed"]["weights"])
    assert_same_weights(ranks[0]["resumed"]["weights"], ranks[1]["resumed"]["weights"])
    env = toy_env(2)  # the 2-rank checkpoint in one process: another world size, refused by name
    with pytest.raises(ValueError, match=r"world_size: saved 2 vs now 1"):
        train_ppo(env, small_head(env.core), PPOConfig(**CFG | {"total_frames": 256}), tmp_path / "part")
