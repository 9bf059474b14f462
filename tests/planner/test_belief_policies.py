"""The ground-truth-free policies (confident_first, uncertain_first, spread_confident, confident_sampled,
expected_oracle) pick what a naive
computation says they should, never read the ground truth of unrevealed blocks, count their
backbone forwards, and run through the registry, the TorchRL env and generation mode."""

import math

import pytest
import torch
from scipy.stats import chi2

from orderplan.planner.orderhead import OrderHead, orderhead_config_for
from orderplan.planner.policies import BELIEF_POLICIES, RandomPolicy, make_policy, run_episodes
from orderplan.oracle.expected import naive_expected_utilities
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import revealed_prefix, toy_core

IMAGES = torch.tensor([0, 5, 7])


def _walk(core, steps: int, seed: int = 1) -> None:
    walk = RandomPolicy(seed=seed)
    for _ in range(steps):
        core.step(walk.act(core.observation()))


@torch.no_grad()
def naive_block_entropy(core) -> torch.Tensor:
    """[B, N] mean predictive entropy of each unrevealed block's tokens (nan on revealed blocks), one
    explicit uncached forward per (row, token)."""
    out = torch.full((core.B, core.N), float("nan"))
    tok, pos = revealed_prefix(core)
    for b in range(core.B):
        n = int((pos[b] >= 0).sum())
        for a in range(core.N):
            if core.revealed[b, a]:
                continue
            ents = []
            for j in core.block_tokens[a].tolist():
                targets = torch.cat([pos[b, :n], torch.tensor([j])])
                logits, _ = core.gpt.forward_sequence(core.label[b:b + 1], tok[b:b + 1, :n], pos[b:b + 1, :n],
                                                      targets[None])
                logp = logits[0, -1].float().log_softmax(-1)
                ents.append(float(-(logp.exp() * logp).sum()))
            out[b, a] = sum(ents) / len(ents)
    return out


@pytest.mark.parametrize("steps", [0, 6])
def test_confident_and_uncertain_first_pick_the_naive_extremes(steps):
    core = toy_core(2)
    core.reset(None, IMAGES[:2])
    _walk(core, steps)
    naive = naive_block_entropy(core)
    obs = core.observation()
    conf = make_policy("confident_first", core).act(obs)
    unc = make_policy("uncertain_first", core).act(obs)
    for b in range(2):
        e = naive[b]
        assert e[int(conf[b])] <= e[~e.isnan()].min() + 1e-4
        assert e[int(unc[b])] >= e[~e.isnan()].max() - 1e-4
        assert float(e[~e.isnan()].max() - e[~e.isnan()].min()) > 1e-3  # a wrong pick would show
    assert not bool(core.revealed.gather(1, conf[:, None]).any())


def test_expected_oracle_picks_the_argmax_of_a_naive_reference():
    core = toy_core(2, belief_samples=3)
    core.reset(None, IMAGES[:2])
    _walk(core, 10)
    policy = make_policy("expected_oracle", core)
    core.belief_generator.manual_seed(5)
    out = core.expected_utilities()
    core.belief_generator.manual_seed(5)  # the policy draws the same completions
    action = policy.act(core.observation())
    tok, pos = revealed_prefix(core)
    naive, _ = naive_expected_utilities(core.gpt, core.label, tok, pos, core.geom, out.candidates, out.samples)
    chosen = naive.gather(1, action[:, None])[:, 0]
    assert bool((chosen >= naive.max(-1).values - 1e-3).all())
    torch.testing.assert_close(out.util, naive, atol=1e-3, rtol=1e-4)
    # its cost: one query plus K completions of each of the C unrevealed blocks
    C = (~core.revealed).sum(-1)
    assert policy.forwards == int((1 + 3 * C).sum()) and policy.decisions == 2


def test_expected_oracle_skips_padding_rows():
    """A batch whose last row is padding (`set_real_rows`): the real rows get what a core of only those
    rows gives (same completions, same utilities, same choice), the padding row a legal block at no cost."""
    full, real = toy_core(3, belief_samples=2), toy_core(2, belief_samples=2)
    full.reset(None, IMAGES)
    real.reset(None, IMAGES[:2])
    walk = RandomPolicy(seed=1)
    for _ in range(4):  # the same walk on both: rows 0-1 of `full` are `real`'s rows
        a = walk.act(full.observation())
        full.step(a)
        real.step(a[:2])
    padded, alone = make_policy("expected_oracle", full), make_policy("expected_oracle", real)
    padded.set_real_rows(2)
    full.belief_generator.manual_seed(3)
    real.belief_generator.manual_seed(3)
    out_full = full.expected_utilities(rows=2)
    out_real = real.expected_utilities()
    torch.testing.assert_close(out_full.util[:2], out_real.util, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_full.samples[:2], out_real.samples) and bool(out_full.util[2].isinf().all())
    assert int(out_full.forwards[2]) == 0 and bool((out_full.forwards[:2] > 0).all())
    full.belief_generator.manual_seed(3)
    real.belief_generator.manual_seed(3)
    act_full, act_real = padded.act(full.observation()), alone.act(real.observation())
    assert torch.equal(act_full[:2], act_real)
    assert int(act_full[2]) == int(torch.nonzero(~full.revealed[2])[0])  # the lowest unrevealed block
    assert padded.forwards == alone.forwards  # the padding row cost nothing
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="rows must be"):
            full.expected_utilities(rows=bad)
    padded.set_real_rows(None)  # every row real again
    full.belief_generator.manual_seed(3)
    assert bool((full.expected_utilities().forwards > 0).all())


def test_belief_policies_never_read_hidden_ground_truth():
    """Scrambling the tokens of the unrevealed blocks changes no decision of a belief policy (the
    ground-truth oracle's changes)."""
    a, b = toy_core(2), toy_core(2)
    for c in (a, b):
        c.reset(None, IMAGES[:2])
        _walk(c, 5)
    g = torch.Generator().manual_seed(9)
    unseen = b.unseen
    b.x = torch.where(unseen, torch.randint(0, b.gpt.cfg.vocab_size, b.x.shape, generator=g), b.x)
    for name in BELIEF_POLICIES:
        a.belief_generator.manual_seed(1)
        b.belief_generator.manual_seed(1)
        assert torch.equal(make_policy(name, a).act(a.observation()), make_policy(name, b).act(b.observation())), name
    assert not torch.equal(a.oracle_utilities(), b.oracle_utilities())


@pytest.mark.parametrize("name", BELIEF_POLICIES)
@pytest.mark.parametrize("fields", [{}, {"budget": [1, 2, 4]}, {"mode": "generate", "reward": "entropy"}],
                         ids=["plain", "router", "generate"])
def test_belief_policies_play_full_episodes(name, fields):
    core = toy_core(2, belief_samples=2, **fields)
    policy = make_policy(name, core)
    out = run_episodes(policy, core, IMAGES[:2], gamma=0.9)
    assert bool(core.done.all())
    assert sorted(core.history[0].tolist()) == list(range(core.N))  # every block once
    fwd = policy.forwards_per_decision()
    assert fwd == 1.0 if name != "expected_oracle" else fwd > 1.0
    assert out["decisions"].min() >= 1


def test_belief_policy_through_the_torchrl_env():
    env = OrderPlanningEnv(toy_core(3))
    policy = make_policy("confident_first", env.core)
    td = env.rollout(env.core.N, policy, break_when_any_done=False)
    assert bool(td["next", "done"][:, -1].all())


def test_orderhead_reads_belief_features():
    core = toy_core(2, beliefs=True)
    core.reset(None, IMAGES[:2])
    _walk(core, 3)
    torch.manual_seed(0)
    model = OrderHead(orderhead_config_for(core.D, core.geom, d_model=32, n_heads=4, beliefs=True)).eval()
    assert model.input_keys == ["hidden", "block_mask", "entropy", "query_hidden"]
    obs = core.observation()
    out = model(obs)
    # the belief inputs reach the logits of unrevealed blocks
    changed = model(obs | {"entropy": obs["entropy"] * 2})
    assert not torch.allclose(out.logits[~core.revealed], changed.logits[~core.revealed])
    with pytest.raises(ValueError, match="lacks"):
        model({k: v for k, v in obs.items() if k != "entropy"})
    # a belief planner refuses an env without belief features; a plain one ignores them
    with pytest.raises(ValueError, match="env.beliefs=true"):
        make_policy("orderhead", toy_core(2, beliefs=False), model=model)
    plain = OrderHead(orderhead_config_for(core.D, core.geom, d_model=32, n_heads=4)).eval()
    assert make_policy("orderhead", core, model=plain).act(obs).shape == (2,)
    with pytest.raises(ValueError, match="without belief features"):
        plain.plan(obs["hidden"], obs["block_mask"], entropy=obs["entropy"], query_hidden=obs["query_hidden"])


# -- spread_confident -----------------------------------------------------------------------------


def naive_farthest(core, b: int) -> set[int]:
    """The unrevealed blocks of row b at maximal distance (block centres, block-grid units) from the
    nearest revealed block, by python loops over the blocks' (row, col); every unrevealed block when
    nothing is revealed."""
    bw = core.geom.blocks_w
    rc = [(n // bw, n % bw) for n in range(core.N)]  # row-major block ids
    revealed = [n for n in range(core.N) if core.revealed[b, n]]
    d = {}
    for j in range(core.N):
        if core.revealed[b, j]:
            continue
        d[j] = min((math.hypot(rc[j][0] - rc[r][0], rc[j][1] - rc[r][1]) for r in revealed), default=math.inf)
    top = max(d.values())
    return {j for j, v in d.items() if v >= top - 1e-6}


def test_spread_confident_starts_as_confident_first():
    core = toy_core(3)
    core.reset(None, IMAGES)
    obs = core.observation()
    assert torch.equal(make_policy("spread_confident", core).act(obs), make_policy("confident_first", core).act(obs))


def test_spread_confident_picks_the_most_confident_of_the_farthest_blocks():
    """Every decision of a full episode: the chosen block is at maximal distance from the revealed set
    and has the lowest entropy among those blocks; the episode reveals every block once."""
    core = toy_core(2)
    core.reset(None, IMAGES[:2])
    policy = make_policy("spread_confident", core)
    conf = make_policy("confident_first", core)
    differs = 0
    for step in range(core.N):
        obs = core.observation()
        action = policy.act(obs)
        ent = core.block_entropy()
        for b in range(2):
            far = naive_farthest(core, b)
            a = int(action[b])
            assert a in far, (step, b, a, far)
            assert float(ent[b, a]) <= min(float(ent[b, j]) for j in far) + 1e-6
            if len(far) > 1:  # several candidates: the most confident, ties to the lowest id
                best = min(far, key=lambda j: (float(ent[b, j]), j))
                assert a == best
        differs += int((action != conf.act(obs)).sum())
        core.step(action)
    assert differs > 0  # the distance rule changed some choice: confident_first would fail this test
    assert bool(core.done.all())
    for b in range(2):
        assert sorted(core.history[b].tolist()) == list(range(core.N))
    assert policy.forwards_per_decision() == 1.0


def test_spread_confident_router_first_block_follows_the_rule():
    core = toy_core(2, budget=[1, 2, 4])
    core.reset(None, IMAGES[:2])
    walk = RandomPolicy(seed=1, budgets=core.cfg.budget)
    for _ in range(2):
        core.step(walk.act(core.observation()))
    policy = make_policy("spread_confident", core, budget=2)
    action = policy.act(core.observation())
    assert action.shape == (2, 5) and bool((action[:, 0] == 1).all())  # budget index of 2
    for b in range(2):
        assert int(action[b, 1]) in naive_farthest(core, b)
        blocks = action[b, 1:].tolist()
        assert len(set(blocks)) == 4 and not bool(core.revealed[b, blocks].any())


# -- confident_sampled ----------------------------------------------------------------------------


def test_confident_sampled_log_probs_are_the_softmax_of_negative_entropy():
    core = toy_core(2)
    core.reset(None, IMAGES[:2])
    _walk(core, 5)
    tau = 0.05
    policy = make_policy("confident_sampled", core, tau=tau)
    lp = policy.log_probs(core.observation())
    ent = core.block_entropy()
    assert bool(lp[core.revealed].isneginf().all()) and bool(lp[~core.revealed].isfinite().all())
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2))
    for b in range(2):  # naive softmax over the unrevealed blocks
        free = [j for j in range(core.N) if not core.revealed[b, j]]
        z = sum(math.exp(-float(ent[b, j]) / tau) for j in free)
        for j in free:
            assert abs(float(lp[b, j]) - (-float(ent[b, j]) / tau - math.log(z))) < 1e-4
    # a finished row: -inf everywhere, no nan
    run_episodes(policy, core, IMAGES[:2])
    done = policy.log_probs(core.observation())
    assert bool(done.isneginf().all())


def test_confident_sampled_at_tiny_tau_is_confident_first():
    core = toy_core(3)
    core.reset(None, IMAGES)
    _walk(core, 4)
    ent = core.block_entropy()
    free = ent[~ent.isnan()].view(3, -1).sort(-1).values
    assert float((free[:, 1] - free[:, 0]).min()) > 1e-3  # a clear best block in every row
    obs = core.observation()
    conf = make_policy("confident_first", core).act(obs)
    sampled = make_policy("confident_sampled", core, tau=1e-5)
    for _ in range(20):
        assert torch.equal(sampled.act(obs), conf)


def test_confident_sampled_draws_from_its_log_probs():
    """Chi-square test of 4000 draws on one state against exp(log_probs): accepted at level 1e-3
    (the test is seeded, so it is deterministic), while the uniform law is rejected."""
    core = toy_core(1)
    core.reset(None, IMAGES[:1])
    _walk(core, 3)
    ent = core.block_entropy()[0]
    tau = float(ent[~ent.isnan()].std())  # a temperature where the law is neither uniform nor one block
    policy = make_policy("confident_sampled", core, tau=tau, seed=11)
    obs = core.observation()
    p = policy.log_probs(obs)[0].exp()
    free = ~core.revealed[0]
    assert float(p.max()) < 0.5 and float(p[free].min()) > 0.01
    n = 4000
    counts = torch.zeros(core.N)
    for _ in range(n):
        counts[int(policy.act(obs)[0])] += 1
    assert float(counts[~free].sum()) == 0
    df = int(free.sum()) - 1
    crit = float(chi2.ppf(1 - 1e-3, df))
    stat = float(((counts[free] - n * p[free]) ** 2 / (n * p[free])).sum())
    assert stat < crit, (stat, crit)
    uniform = n / int(free.sum())
    assert float(((counts[free] - uniform) ** 2 / uniform).sum()) > crit  # the test can tell laws apart
    assert float((counts / n - p).abs().max()) < 0.03


def test_confident_sampled_seed_and_reseed():
    core = toy_core(2)
    core.reset(None, IMAGES[:2])
    _walk(core, 2)
    obs = core.observation()

    def draws(policy, k=8):
        return torch.stack([policy.act(obs) for _ in range(k)])

    a = make_policy("confident_sampled", core, tau=1.0, seed=3)
    b = make_policy("confident_sampled", core, tau=1.0, seed=3)
    first = draws(a)
    assert torch.equal(first, draws(b))  # same seed, same actions
    assert not torch.equal(first, draws(a))  # the stream goes on
    a.reseed(3)
    assert torch.equal(first, draws(a))  # reseed restarts it
    assert not torch.equal(first, draws(make_policy("confident_sampled", core, tau=1.0, seed=4)))


@pytest.mark.parametrize("tau", [0.0, -0.1, float("nan"), float("inf")])
def test_confident_sampled_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        make_policy("confident_sampled", toy_core(1), tau=tau)
