"""The batched MDP dynamics (`orderplan.env.core.OrderPlanningCore`, DESIGN.md section 5) against explicit,
cache-free references: rewards and their identities (telescoping, anytime, extrapolative vs
future_loss, likelihood == the backbone's teacher-forced loss), batched oracle == naive reference,
invalid actions, resets, seeding, generation mode and observations.

Every reference here is computed with `gpt.forward_sequence` / `gpt.forward_train` (no KV cache, no
query rows), so a wrong cache, query, reward or bookkeeping in the core shows up as a mismatch."""

import pytest
import torch

from orderplan.model.blocks import BlockGeometry
from orderplan.config.common import BackboneConfig
from orderplan.infra.paths import PACKAGE_ROOT
from orderplan.oracle.future_loss import naive_oracle_utilities
from orderplan.model.gpt import DecodeState
from orderplan.model.loading import Backbone, freeze
from orderplan.model.orders import block_order
from orderplan.model.sampling import SamplingConfig
from orderplan.env.actions import random_valid_action
from orderplan.env.core import EnvConfig, OrderPlanningCore, check_env_config
from tests.conftest import randomized_gpt, toy_core

ATOL = 1e-4  # float32, nats
RET_ATOL = 2e-3  # sums of ~64 per-token losses of ~5.5 nats


def random_action(core, gen: torch.Generator) -> torch.Tensor:
    """`orderplan.env.actions.random_valid_action` for the core's current state (plain or router)."""
    return random_valid_action(~core.revealed, gen, core.cfg.budget if core.router else None)


# ----------------------------------------------------------------------------------------------
# Helpers: references with no KV cache
# ----------------------------------------------------------------------------------------------


def prefix_of(core: OrderPlanningCore, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b's revealed tokens in reveal order and their raster positions (from `core.history`)."""
    blocks = core.history[b, : int(core.steps[b])]
    assert bool((blocks >= 0).all())
    pos = core.block_tokens[blocks].reshape(-1)
    return core.x[b, pos], pos


def batched_prefix(core: OrderPlanningCore) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] prefix tokens / positions right-padded with position -1 (naive_* reference format)."""
    P = max(int(core.steps.max()) * core.T, 1)
    tok = torch.zeros(core.B, P, dtype=torch.long)
    pos = torch.full((core.B, P), -1, dtype=torch.long)
    for b in range(core.B):
        t, p = prefix_of(core, b)
        tok[b, : len(t)], pos[b, : len(p)] = t, p
    return tok, pos


@torch.no_grad()
def naive_logits(gpt, cond: int, tok: torch.Tensor, pos: torch.Tensor, js: torch.Tensor) -> torch.Tensor:
    """Logits [J, V] of p(. at j | class cond, prefix (tok, pos)) for each j in js, by explicit
    causal forwards whose last input carries ta(j)."""
    J, n = js.numel(), tok.numel()
    targets = torch.cat([pos[None].expand(J, n), js[:, None]], 1)
    logits, _ = gpt.forward_sequence(torch.full((J,), int(cond)), tok[None].expand(J, n), pos[None].expand(J, n),
                                     targets)
    return logits[:, -1].float()


def naive_nll(gpt, cond, tok, pos, x_row, js) -> torch.Tensor:
    """l_j(S) = -log p(x_j | x_S) for j in js: [J]."""
    if js.numel() == 0:
        return torch.zeros(0)
    logp = naive_logits(gpt, cond, tok, pos, js).log_softmax(-1)
    return -logp[torch.arange(js.numel()), x_row[js]]


def naive_rest(core: OrderPlanningCore, b: int) -> float:
    """L_rest(S) of row b's current state, by explicit forwards."""
    tok, pos = prefix_of(core, b)
    js = torch.nonzero(core.unseen[b]).flatten()
    return float(naive_nll(core.gpt, core.label[b], tok, pos, core.x[b], js).sum())


def naive_rest_empty(gpt, cond: int, x_row: torch.Tensor) -> float:
    """L_rest(empty) = -sum_j log p(x_j | class token only)."""
    empty = torch.zeros(0, dtype=torch.long)
    return float(naive_nll(gpt, cond, empty, empty, x_row, torch.arange(x_row.numel())).sum())


def orders_for(core: OrderPlanningCore, name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return block_order(name, core.geom, batch=core.B, generator=g)


def core_with_block(block: int, batch_size: int = 2, **env_fields) -> OrderPlanningCore:
    """Like `toy_core`, with another block size on the 8x8 grid."""
    gpt = randomized_gpt()
    bb = Backbone(cfg=BackboneConfig(), gpt=gpt, geometry=BlockGeometry(8, 8, block), vq=None)
    g = torch.Generator().manual_seed(123)
    codes = torch.randint(0, gpt.cfg.vocab_size, (20, gpt.cfg.num_tokens), generator=g)
    return OrderPlanningCore(bb, codes, torch.arange(20) % gpt.cfg.num_classes, EnvConfig(**env_fields),
                             batch_size, seed=0)


def snapshot(core: OrderPlanningCore) -> dict:
    """Every tensor the core holds (DecodeStates and RNG states included), cloned."""
    snap = {}
    for name, value in vars(core).items():
        if isinstance(value, torch.Tensor):
            snap[name] = value.clone()
        elif isinstance(value, DecodeState):
            for i, (k, v) in enumerate(zip(value.k, value.v)):
                snap[f"{name}.k{i}"], snap[f"{name}.v{i}"] = k.clone(), v.clone()
            for f in ("length", "pending_tok", "pending_pos", "has_pending", "cond"):
                snap[f"{name}.{f}"] = getattr(value, f).clone()
        elif isinstance(value, torch.Generator):
            snap[f"{name}.rng"] = value.get_state()
    return snap


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), f"{key} changed"


def play(core: OrderPlanningCore, pick, max_steps: int | None = None, reset: bool = True):
    """Reset (unless `reset=False`), then step with `pick(core, t)` until every row is done.
    Returns rewards [steps, B] and the per-step `done` [steps, B] (plain actions: rows finish together)."""
    if reset:
        core.reset()
    rewards, dones = [], []
    t = 0
    while not bool(core.done.all()) and (max_steps is None or t < max_steps):
        r, d = core.step(pick(core, t))
        rewards.append(r)
        dones.append(d.clone())
        t += 1
    return torch.stack(rewards), torch.stack(dones)


# ----------------------------------------------------------------------------------------------
# future_loss telescopes: undiscounted return == L_rest(empty) for every order
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["raster", "reverse", "random"])
def test_future_loss_telescopes(order):
    core = toy_core(3, seed=1, reward="future_loss")
    core.reset()
    rest_empty = core.token_loss.sum(-1).clone()
    naive = torch.tensor([naive_rest_empty(core.gpt, core.label[b], core.x[b]) for b in range(core.B)])
    torch.testing.assert_close(rest_empty, naive, atol=RET_ATOL, rtol=0)

    orders = orders_for(core, order, seed=5)
    rewards, dones = play(core, lambda c, t: orders[:, t], reset=False)
    assert rewards.shape == (core.N, core.B) and bool(dones[-1].all()) and not bool(dones[:-1].any())
    torch.testing.assert_close(rewards.sum(0), naive, atol=RET_ATOL, rtol=0)
    assert rewards.std() > 0.1  # non-trivial per-step rewards
    assert torch.equal(core.history, orders)


def test_future_loss_telescopes_with_router():
    """Budget router: each decision reveals k in {1, 2, 4} blocks and costs lambda; rows finish at
    different decisions and are reset on their own (partial reset) while the others go on."""
    lam = 0.25
    core = toy_core(3, seed=2, reward="future_loss", budget=[1, 2, 4], decision_cost=lam)
    core.reset()
    first = {b: (naive_rest_empty(core.gpt, core.label[b], core.x[b]), float(core.token_loss[b].sum()))
             for b in range(core.B)}
    ret, decisions, finished = torch.zeros(core.B), torch.zeros(core.B), torch.zeros(core.B, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    while not bool(finished.all()):
        r, done = core.step(random_action(core, gen))
        live = ~finished
        ret += torch.where(live, r, 0.0)
        decisions += live.float()
        finished |= done
        if bool(done.any()) and not bool(finished.all()):
            core.reset(done)  # only the finished rows restart
    for b in range(core.B):
        naive, rest_empty = first[b]
        assert abs(rest_empty - naive) < RET_ATOL
        assert abs(float(ret[b] + lam * decisions[b]) - naive) < RET_ATOL, (b, float(ret[b]), naive)
    assert bool((decisions < core.N).any())  # some decision revealed more than one block


@pytest.mark.parametrize("ragged", ["router", "partial_reset"])
def test_token_loss_is_naive_loss_on_ragged_batches(ragged):
    """The state invariant behind every reward: after each step, `token_loss[b, j]` == l_j(S_b) by
    explicit forwards for every unseen j, also when rows have different numbers of unseen tokens
    (router decisions of different sizes, or rows restarted at different times), and the
    future_loss reward of each step is L_rest(S_t) - L_rest(S_t+1) of that row."""
    fields = dict(budget=[1, 2, 4]) if ragged == "router" else {}
    core = toy_core(3, seed=16, **fields)
    core.reset()
    gen = torch.Generator().manual_seed(7)
    if ragged == "partial_reset":
        for _ in range(3):
            core.step(random_action(core, gen))
        core.reset(torch.tensor([True, False, False]))
    rest = torch.tensor([naive_rest(core, b) for b in range(core.B)])
    for _ in range(4):
        r, _ = core.step(random_action(core, gen))
        assert len(set(core.steps.tolist())) > 1  # ragged
        for b in range(core.B):
            tok, pos = prefix_of(core, b)
            js = torch.nonzero(core.unseen[b]).flatten()
            ref = naive_nll(core.gpt, core.label[b], tok, pos, core.x[b], js)
            torch.testing.assert_close(core.token_loss[b, js], ref, atol=ATOL, rtol=0, msg=lambda m: f"row {b}: {m}")
        new_rest = torch.tensor([naive_rest(core, b) for b in range(core.B)])
        torch.testing.assert_close(r, rest - new_rest, atol=ATOL * 10, rtol=0)
        rest = new_rest


# ----------------------------------------------------------------------------------------------
# likelihood: a raster rollout reproduces the backbone's teacher-forced loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 2], ids=["token_raster", "block_raster"])
def test_likelihood_raster_equals_forward_train(block):
    core = core_with_block(block, batch_size=2, reward="likelihood")
    raster = block_order("raster", core.geom, batch=core.B)
    rewards, _ = play(core, lambda c, t: raster[:, t])
    x, label = core.x, core.label  # the images actually drawn
    order = core.geom.token_order(raster)  # block=1: plain raster token order
    if block == 1:
        assert torch.equal(order, torch.arange(core.L).expand(core.B, -1))
        logits = core.gpt.forward_train(x, label)  # order=None: raster
    else:
        logits = core.gpt.forward_train(x, label, order)
    nll = -logits.log_softmax(-1).gather(-1, x.gather(1, order)[..., None])[..., 0]  # [B, L], gen order
    per_block = nll.view(core.B, core.N, core.T).sum(-1)  # the raster block order is the step order
    torch.testing.assert_close(rewards.T, -per_block, atol=ATOL * 10, rtol=0)
    torch.testing.assert_close(rewards.sum(0), -nll.sum(-1), atol=RET_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# anytime and extrapolative rewards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", [False, True], ids=["plain", "router"])
def test_anytime_reward(router):
    """r_t = -k_t * L_rest(S_t+1) / L with L_rest computed by explicit forwards, so the return is
    -(1/L) sum over revealed blocks of the loss left after their decision."""
    fields = dict(budget=[1, 2, 4]) if router else {}
    core = toy_core(2, seed=3, reward="anytime", **fields)
    core.reset()
    gen = torch.Generator().manual_seed(1)
    ret, expect = torch.zeros(core.B), torch.zeros(core.B)
    while not bool(core.done.any()):
        before = core.steps.clone()
        r, _ = core.step(random_action(core, gen))
        k = core.steps - before
        rest = torch.tensor([naive_rest(core, b) for b in range(core.B)])
        torch.testing.assert_close(r, -k * rest / core.L, atol=ATOL, rtol=0)
        ret += r
        expect += -k * rest / core.L
    torch.testing.assert_close(ret, expect, atol=ATOL * 10, rtol=0)
    assert bool((ret < -1.0).all())


@pytest.mark.parametrize("router", [False, True], ids=["plain", "router"])
def test_extrapolative_uniform_differs_by_revealed_block_loss(router):
    """With uniform weights, r_fl - r_x = sum_{j in A_t} l_j(S_t):
    r_fl = sum_{R_t} l_j(S_t) - sum_{R_t+1} l_j(S_t+1)
         = sum_{A_t} l_j(S_t) + sum_{R_t+1} [l_j(S_t) - l_j(S_t+1)] = sum_{A_t} l_j(S_t) + r_x,
    since R_t = A_t + R_t+1. l_j(S_t) is the *marginal* loss of each revealed token given S_t only
    (not the in-block autoregressive likelihood), computed here by explicit forwards."""
    fields = dict(budget=[1, 2, 4]) if router else {}
    fl = toy_core(2, seed=4, reward="future_loss", **fields)
    ex = toy_core(2, seed=4, reward="extrapolative", weight="uniform", **fields)
    fl.reset(), ex.reset()
    assert torch.equal(fl.x, ex.x)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    gaps = []
    while not bool(fl.done.any()):
        a1, a2 = random_action(fl, g1), random_action(ex, g2)
        assert torch.equal(a1, a2)
        revealed_before = fl.revealed.clone()
        prefixes = [prefix_of(fl, b) for b in range(fl.B)]  # S_t
        r_fl, _ = fl.step(a1)
        r_x, _ = ex.step(a2)
        new = fl.revealed & ~revealed_before  # A_t
        for b in range(fl.B):
            tok, pos = prefixes[b]
            js = torch.nonzero(new[b, fl.token_block]).flatten()
            l_own = float(naive_nll(fl.gpt, fl.label[b], tok, pos, fl.x[b], js).sum())
            assert abs(float(r_fl[b] - r_x[b]) - l_own) < ATOL * 10, (b, float(r_fl[b] - r_x[b]), l_own)
        gaps.append(r_fl - r_x)
    assert torch.stack(gaps).abs().min() > 1.0  # the identity is not vacuous


@pytest.mark.parametrize("reward,weight", [("future_loss", "uniform"), ("extrapolative", "uniform"),
                                           ("extrapolative", "neighbours"), ("extrapolative", "distance")])
def test_step_reward_equals_naive_utility(reward, weight):
    """The reward of any action equals the naive (cache-free) utility of that block, for every
    weight kind of the extrapolative reward."""
    core = toy_core(3, seed=5, reward=reward, weight=weight)
    gen = torch.Generator().manual_seed(2)
    core.reset()
    for _ in range(4):
        core.step(random_action(core, gen))
    tok, pos = batched_prefix(core)
    naive = naive_oracle_utilities(core.gpt, core.label, tok, pos, core.x, core.geom, kind=reward, weight=weight)
    a = random_action(core, gen)
    r, _ = core.step(a)
    torch.testing.assert_close(r, naive[torch.arange(core.B), a], atol=ATOL * 10, rtol=0)


# ----------------------------------------------------------------------------------------------
# Oracle utilities: batched == naive; greedy oracle policy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,weight", [("future_loss", "uniform"), ("extrapolative", "uniform"),
                                         ("extrapolative", "neighbours"), ("extrapolative", "distance")])
def test_oracle_utilities_equal_naive_mid_episode(kind, weight):
    """Ragged mid-episode prefixes (router decisions of 1, 2 or 4 blocks)."""
    core = toy_core(3, seed=6, budget=[1, 2, 4])
    core.reset()
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        core.step(random_action(core, gen))
    assert not bool(core.done.any()) and int(core.steps.min()) > 0
    before = snapshot(core)
    got = core.oracle_utilities(kind, weight)
    assert_same_snapshot(before, snapshot(core))
    tok, pos = batched_prefix(core)
    ref = naive_oracle_utilities(core.gpt, core.label, tok, pos, core.x, core.geom, kind=kind, weight=weight)
    assert torch.equal(torch.isinf(got), core.revealed) and torch.equal(torch.isinf(ref), core.revealed)
    torch.testing.assert_close(got, ref, atol=ATOL * 10, rtol=0)
    assert got[~core.revealed].std() > 0.01


@pytest.mark.parametrize("reward,weight", [("future_loss", "uniform"), ("extrapolative", "neighbours")])
@pytest.mark.parametrize("at", [0, 5], ids=["first_step", "mid_episode"])
def test_greedy_oracle_reward_is_max_utility(reward, weight, at):
    core = toy_core(3, seed=7, reward=reward, weight=weight)
    core.reset()
    gen = torch.Generator().manual_seed(3)
    for _ in range(at):
        core.step(random_action(core, gen))
    util = core.oracle_utilities(reward, weight)
    r, _ = core.step(util.argmax(-1))
    torch.testing.assert_close(r, util.max(-1).values, atol=ATOL * 10, rtol=0)


def test_oracle_rejects_generation_mode():
    core = toy_core(2, mode="generate", reward="entropy")
    core.reset()
    with pytest.raises(ValueError, match="teacher_forced"):
        core.oracle_utilities()


# ----------------------------------------------------------------------------------------------
# Invalid actions: ValueError naming the rows, nothing changes
# ----------------------------------------------------------------------------------------------


def _plain_case(name: str, core: OrderPlanningCore, a: torch.Tensor):
    a = a.clone()
    if name == "revealed":
        a[1] = core.history[1, 0]
        return a, r"rows \[1\].*already revealed"
    if name == "out_of_range":
        a[2] = core.N
        return a, r"rows \[2\].*out of range"
    if name == "negative":
        a[0], a[2] = -1, -3
        return a, r"rows \[0, 2\].*out of range"
    if name == "shape_2d":
        return a[:, None].expand(-1, 2).contiguous(), "shape"
    if name == "shape_short":
        return a[:-1], "shape"
    if name == "float":
        return a.float(), "dtype"
    if name == "bool":
        return torch.ones(core.B, dtype=torch.bool), "dtype"
    if name == "not_a_tensor":
        return a.tolist(), "torch.Tensor"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["revealed", "out_of_range", "negative", "shape_2d", "shape_short", "float",
                                  "bool", "not_a_tensor"])
def test_invalid_plain_action_raises_and_changes_nothing(name):
    core, twin = toy_core(3, seed=8), toy_core(3, seed=8)
    gen, gen2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    core.reset(), twin.reset()
    for _ in range(2):
        core.step(random_action(core, gen)), twin.step(random_action(twin, gen2))
    good = random_action(core, gen)
    assert torch.equal(good, random_action(twin, gen2))
    bad, match = _plain_case(name, core, good)
    before = snapshot(core)
    with pytest.raises(ValueError, match=match):
        core.step(bad)
    assert_same_snapshot(before, snapshot(core))
    # the failed call left no trace: the next valid step matches a core that never saw it
    r1, _ = core.step(good)
    r2, _ = twin.step(good)
    assert torch.equal(r1, r2)
    assert_same_snapshot(snapshot(core), snapshot(twin))


def _router_case(name: str, core: OrderPlanningCore, a: torch.Tensor):
    a = a.clone()
    if name == "duplicate":
        a[1, 0] = 2  # budget 4
        a[1, 2] = a[1, 1]
        return a, r"rows \[1\].*twice"
    if name == "budget_high":
        a[0, 0] = len(core.budgets)
        return a, r"rows \[0\].*budget index"
    if name == "budget_negative":
        a[0, 0], a[2, 0] = -1, -1
        return a, r"rows \[0, 2\].*budget index"
    if name == "revealed":
        a[2, 0] = 1  # budget 2: the second choice is a revealed block
        a[2, 2] = core.history[2, 0]
        return a, r"rows \[2\].*already revealed"
    if name == "out_of_range":
        a[1, 0] = 2
        a[1, 4] = core.N
        return a, r"rows \[1\].*out of range"
    if name == "shape":
        return a[:, :2], "shape"
    if name == "float":
        return a.double(), "dtype"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["duplicate", "budget_high", "budget_negative", "revealed", "out_of_range",
                                  "shape", "float"])
def test_invalid_router_action_raises_and_changes_nothing(name):
    core = toy_core(3, seed=9, budget=[1, 2, 4])
    gen = torch.Generator().manual_seed(0)
    core.reset()
    core.step(random_action(core, gen))
    bad, match = _router_case(name, core, random_action(core, gen))
    before = snapshot(core)
    with pytest.raises(ValueError, match=match):
        core.step(bad)
    assert_same_snapshot(before, snapshot(core))


def test_router_ignores_entries_past_the_budget():
    core = toy_core(2, seed=10, budget=[1, 2, 4])
    core.reset()
    a = torch.tensor([[0, 5, -7, 99, 5], [1, 3, 4, 4, -1]])  # k = 1 and k = 2: the rest is ignored
    core.step(a)
    assert core.steps.tolist() == [1, 2]
    assert core.history[0, 0] == 5 and core.history[1, :2].tolist() == [3, 4]
    # a budget larger than the blocks left is clipped to them
    gen = torch.Generator().manual_seed(0)
    while int(core.steps.max()) < core.N - 2:
        a = random_action(core, gen)
        a[:, 0] = 0
        core.step(a)
    left = (~core.revealed).sum(-1)
    a = random_action(core, gen)
    a[:, 0] = 2  # budget 4 > blocks left
    a[:, 1:] = torch.where(torch.arange(core.K) < left[:, None], a[:, 1:], -1)
    _, done = core.step(a)
    assert bool(done.all()) and core.steps.tolist() == [core.N, core.N]


def test_finished_or_never_reset_episode_raises_until_reset():
    core = toy_core(2, seed=11)
    with pytest.raises(ValueError, match=r"rows \[0, 1\].*reset"):
        core.step(torch.tensor([0, 1]))  # never reset
    raster = block_order("raster", core.geom, batch=2)
    play(core, lambda c, t: raster[:, t])
    assert bool(core.done.all())
    before = snapshot(core)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"rows \[0, 1\].*finished"):
            core.step(torch.tensor([0, 1]))
    assert_same_snapshot(before, snapshot(core))
    core.reset(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"rows \[1\].*finished"):
        core.step(torch.tensor([0, 1]))
    core.reset()
    r, done = core.step(torch.tensor([0, 1]))
    assert r.shape == (2,) and not bool(done.any())


def test_partial_reset_only_touches_those_rows():
    core = toy_core(3, seed=12)
    core.reset()
    gen = torch.Generator().manual_seed(5)
    first = {b: float(core.token_loss[b].sum()) for b in range(core.B)}
    ret = torch.zeros(core.B)
    for _ in range(3):
        r, _ = core.step(random_action(core, gen))
        ret += r
    keep = 1
    before = snapshot(core)
    rows = torch.tensor([True, False, True])
    core.reset(rows, image_index=torch.tensor([7, 0, 9]))
    after = snapshot(core)
    for key, value in before.items():
        if key.endswith(".rng") or value.dim() == 0 or value.shape[0] != core.B:
            continue
        assert torch.equal(value[keep], after[key][keep]), f"{key} changed on a row not reset"
    assert core.image_index[[0, 2]].tolist() == [7, 9] and core.image_index[keep] == before["image_index"][keep]
    assert torch.equal(core.x[[0, 2]], core.codes[[7, 9]])
    assert core.steps.tolist() == [0, 3, 0]
    assert not bool(core.revealed[[0, 2]].any()) and not bool(core.hidden_tok[[0, 2]].any())
    assert core.state.length[[0, 2]].tolist() == [0, 0] and core.state.pending_pos[[0, 2]].tolist() == [-1, -1]
    for b in (0, 2):
        assert abs(float(core.token_loss[b].sum()) - naive_rest_empty(core.gpt, core.label[b], core.x[b])) < RET_ATOL
    # the kept row's episode goes on correctly (its cache survived): it still telescopes
    while not bool(core.done[keep]):
        r, _ = core.step(random_action(core, gen))
        ret += r
    assert abs(float(ret[keep]) - first[keep]) < RET_ATOL


def test_step_on_active_rows_only():
    """`step(action, active)`: inactive rows keep their whole state (cache included) and get reward 0,
    whatever their action entry and even when their episode is finished; the active rows' rewards
    are those of a naive reference."""
    core = toy_core(3, seed=17, reward="future_loss", decision_cost=0.5)
    core.reset()
    gen = torch.Generator().manual_seed(8)
    for _ in range(2):
        core.step(random_action(core, gen))
    active = torch.tensor([True, False, True])
    a = random_action(core, gen)
    a[1] = core.history[1, 0]  # invalid, but row 1 is inactive: not checked
    rest = [naive_rest(core, b) for b in range(core.B)]
    before = snapshot(core)
    r, done = core.step(a, active=active)
    after = snapshot(core)
    assert r[1] == 0 and not bool(done.any())
    for key, value in before.items():
        if key.endswith(".rng") or value.dim() == 0 or value.shape[0] != core.B:
            continue
        old, new = value[1], after[key][1]
        if key.startswith("state.") and old.dim() == 3:  # KV [Hkv, L + 1, Dh]: the last slot is scratch
            old, new = old[:, :-1], new[:, :-1]
        torch.testing.assert_close(new, old, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    for b in (0, 2):
        assert abs(float(r[b]) - (rest[b] - naive_rest(core, b) - 0.5)) < ATOL * 10
    assert core.steps.tolist() == [3, 2, 3]
    a2 = random_action(core, gen)
    a2[1] = a[1]
    with pytest.raises(ValueError, match=r"rows \[1\].*already revealed"):
        core.step(a2)  # active by default: row 1's entry is checked now
    # finished rows may sit out while the others play
    while not bool(core.done[0]):
        core.step(random_action(core, gen), active=torch.tensor([True, False, True]))
    core.reset(torch.tensor([True, False, False]))
    while int(core.steps[1]) < core.N:
        core.step(random_action(core, gen), active=torch.tensor([False, True, False]))
    assert bool(core.done[1:].all()) and int(core.steps[0]) == 0
    r, done = core.step(random_action(core, gen), active=torch.tensor([True, False, False]))
    assert r[1:].tolist() == [0.0, 0.0] and done.tolist() == [False, True, True]


def test_reset_rejects_bad_image_index():
    core = toy_core(2, n_images=20)
    with pytest.raises(ValueError, match=r"rows \[1\]: image_index"):
        core.reset(image_index=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="image_index"):
        core.reset(image_index=torch.tensor([0, 1, 2]))
    assert bool(core.needs_reset.all())  # nothing was reset
    core.reset(image_index=torch.tensor([4, 5]))
    core.reset(torch.tensor([True, False]), image_index=torch.tensor([3, -1]))  # row 1 not reset: ignored
    assert core.image_index.tolist() == [3, 5]


# ----------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------


def _episode(core: OrderPlanningCore):
    core.reset()
    obs, rewards = [core.observation()], []
    while not bool(core.done.all()):
        r, _ = core.step(random_action(core, core.generator))
        rewards.append(r)
        obs.append(core.observation())
    return obs, torch.stack(rewards)


@pytest.mark.parametrize("fields", [dict(reward="future_loss"), dict(mode="generate", reward="entropy",
                                                                     sampling=SamplingConfig(cfg_scale=2.0))],
                         ids=["teacher_forced", "generate_cfg"])
def test_same_seed_same_episode(fields):
    runs = [_episode(toy_core(3, seed=s, **fields)) for s in (21, 21, 22)]
    (o1, r1), (o2, r2), (o3, r3) = runs
    assert torch.equal(r1, r2)
    for a, b in zip(o1, o2):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(r1, r3)  # another seed gives another episode
    # re-seeding an existing core replays the episode
    core = toy_core(3, seed=0, **fields)
    core.seed(21)
    o4, r4 = _episode(core)
    assert torch.equal(r1, r4) and torch.equal(o1[-1]["hidden"], o4[-1]["hidden"])


# ----------------------------------------------------------------------------------------------
# Generation mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale,guided", [(1.0, False), (3.0, False), (3.0, True)],
                         ids=["no_cfg", "cfg_conditional_beliefs", "cfg_guided_beliefs"])
def test_generation_mode_grid_and_entropy_reward(cfg_scale, guided):
    core = toy_core(3, seed=13, mode="generate", reward="entropy", sampling=SamplingConfig(cfg_scale=cfg_scale),
                    guided_beliefs=guided)
    core.reset()
    V = core.gpt.cfg.vocab_size
    # H_j(empty) == entropy of the explicit prediction from the class token alone: the conditional
    # model's by default (what teacher-forced planners see), the CFG-guided one with guided_beliefs
    empty = torch.zeros(0, dtype=torch.long)
    for b in range(core.B):
        logits = naive_logits(core.gpt, core.label[b], empty, empty, torch.arange(core.L))
        if guided:
            u = naive_logits(core.gpt, core.gpt.cfg.null_class, empty, empty, torch.arange(core.L))
            logits = u + cfg_scale * (logits - u)
        logp = logits.log_softmax(-1)
        torch.testing.assert_close(core.token_loss[b], -(logp.exp() * logp).sum(-1), atol=ATOL, rtol=0)
    h_empty = core.token_loss.sum(-1).clone()
    obs = core.observation()
    assert bool((obs["tokens"] == -1).all()) and obs["image"].shape == (core.B, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    ret = torch.zeros(core.B)
    while not bool(core.done.all()):
        r, _ = core.step(random_action(core, gen))
        ret += r
        tokens = core.observation()["tokens"]
        seen = ~core.unseen
        assert bool((tokens[~seen] == -1).all())
        assert bool(((tokens[seen] >= 0) & (tokens[seen] < V)).all())
    torch.testing.assert_close(ret, h_empty, atol=RET_ATOL, rtol=0)  # the entropy reward telescopes
    final = core.observation()["tokens"]
    assert bool(((final >= 0) & (final < V)).all())
    assert torch.equal(final, core.x)
    assert len(torch.unique(final)) > 10  # sampled, not a constant grid


def test_pending_query_keeps_hidden_states_and_samples():
    """env.query=pending (generation without rewards or beliefs) plays the same episode as the full
    query: same sampled grid, same hidden-state observation; only the rewards (nan) are missing."""
    runs = {}
    for query in ("full", "pending"):
        core = toy_core(3, seed=5, mode="generate", reward="entropy", sampling=SamplingConfig(cfg_scale=2.0),
                        query=query, beliefs=False)
        core.reset()
        gen, rewards, hidden = torch.Generator().manual_seed(1), [], []
        while not bool(core.done.all()):
            r, _ = core.step(random_action(core, gen))
            rewards.append(r)
            hidden.append(core.observation()["hidden"])
        runs[query] = (core.x.clone(), torch.stack(hidden), torch.stack(rewards))
    assert torch.equal(runs["full"][0], runs["pending"][0])
    torch.testing.assert_close(runs["full"][1], runs["pending"][1], atol=1e-5, rtol=0)
    assert bool(runs["full"][2].isfinite().all()) and bool(runs["pending"][2].isnan().all())
    with pytest.raises(ValueError, match="env.query=pending"):
        toy_core(2, seed=0, query="pending")  # teacher-forced: rewards need the query
    with pytest.raises(ValueError, match="env.query=pending"):
        toy_core(2, seed=0, mode="generate", reward="entropy", query="pending", beliefs=True)


def _random_vq_backbone() -> Backbone:
    from orderplan.model.vq import VQModel, vq_preset

    torch.manual_seed(0)
    vq = freeze(VQModel(vq_preset("tiny_mnist")))
    return Backbone(cfg=BackboneConfig(), gpt=randomized_gpt(), geometry=BlockGeometry(8, 8, 2), vq=vq)


def _check_generated_images(core: OrderPlanningCore, C: int, H: int, W: int) -> None:
    core.reset()
    obs = core.observation()
    assert obs["image"].shape == (core.B, C, H, W) and not bool(obs["image"].any())
    gen = torch.Generator().manual_seed(0)
    while not bool(core.done.all()):
        core.step(random_action(core, gen))
    obs = core.observation()
    V = core.gpt.cfg.vocab_size
    assert bool(((obs["tokens"] >= 0) & (obs["tokens"] < V)).all())
    img = obs["image"]
    assert img.shape == (core.B, C, H, W) and img.dtype == torch.float32
    assert bool((img.abs() <= 1).all()) and img.std() > 0
    grid = core.x.view(core.B, core.gpt.cfg.grid_h, core.gpt.cfg.grid_w)
    torch.testing.assert_close(img, core.bb.vq.decode_codes(grid).float())


def test_generation_mode_images_with_random_vq():
    """The image observation through a (random-weight) tiny_mnist VQ: [B, 1, 32, 32]."""
    bb = _random_vq_backbone()
    codes = torch.randint(0, 256, (10, 64), generator=torch.Generator().manual_seed(0))
    core = OrderPlanningCore(bb, codes, torch.arange(10), EnvConfig(mode="generate", reward="entropy"), 2, seed=0)
    _check_generated_images(core, 1, 32, 32)


@pytest.mark.skipif(not ((PACKAGE_ROOT / "artifacts/tiny_mnist/vq.safetensors").exists()
                         and (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists()),
                    reason="artifacts/tiny_mnist/{vq,gpt}.safetensors not built")
def test_generation_mode_images_tiny_mnist():
    from orderplan.env.factory import make_core

    core = make_core("tiny_mnist", batch_size=2, seed=0, mode="generate", reward="entropy")
    _check_generated_images(core, 1, 32, 32)


# ----------------------------------------------------------------------------------------------
# Observations
# ----------------------------------------------------------------------------------------------


def test_observation_hidden_and_masks():
    core = toy_core(2, seed=14)
    core.reset()
    gen = torch.Generator().manual_seed(1)
    obs = core.observation()
    assert obs["hidden"].shape == (core.B, core.L, core.D) and not bool(obs["hidden"].any())
    assert not bool(obs["block_mask"].any()) and bool(obs["action_mask"].all())
    for t in range(core.N):
        core.step(random_action(core, gen))
        obs = core.observation()
        assert torch.equal(obs["block_mask"], core.revealed) and torch.equal(obs["action_mask"], ~obs["block_mask"])
        assert obs["block_mask"].sum().item() == core.B * (t + 1) and obs["step"].tolist() == [t + 1] * core.B
        nonzero = (obs["hidden"] != 0).any(-1)  # [B, L]
        assert torch.equal(nonzero, ~core.unseen), t
        if t in (0, 6):
            # values: the last-layer (final-norm) hidden state of each revealed token's input in an
            # explicit forward over the prefix; each input carries ta(next revealed position), the
            # pending (last) token none
            for b in range(core.B):
                tok, pos = prefix_of(core, b)
                targets = torch.cat([pos, torch.tensor([-1])])[None]
                _, h = core.gpt.forward_sequence(core.label[b:b + 1], tok[None], pos[None], targets)
                torch.testing.assert_close(obs["hidden"][b, pos], h[0, 1:], atol=ATOL, rtol=0)
    # observations are fresh tensors, safe to store
    obs["hidden"].zero_(), obs["block_mask"].zero_()
    assert bool(core.hidden_tok.any()) and bool(core.revealed.all())


def test_block_hidden_is_block_mean():
    tok_core, blk_core = toy_core(2, seed=15), toy_core(2, seed=15, hidden="block")
    tok_core.reset(), blk_core.reset()
    gen1, gen2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(5):
        tok_core.step(random_action(tok_core, gen1)), blk_core.step(random_action(blk_core, gen2))
    h_tok, h_blk = tok_core.observation()["hidden"], blk_core.observation()["hidden"]
    B, D = 2, blk_core.D
    assert h_blk.shape == (B, blk_core.N, D) == (B, 16, D)
    # naive reference, independent of block_tokens: cut the raster 8x8 grid into 2x2 tiles by
    # reshaping (token (2r + i) * 8 + 2c + j belongs to block 4r + c) and average each tile
    expect = h_tok.view(B, 4, 2, 4, 2, D).mean(dim=(2, 4)).reshape(B, 16, D)
    torch.testing.assert_close(h_blk, expect)
    assert torch.equal((h_blk != 0).any(-1), blk_core.revealed)
    # e.g. block 3 (block-grid (0, 3)) pools tokens 6, 7, 14, 15 of the 8x8 grid
    assert blk_core.geom.block_tokens[3].tolist() == [6, 7, 14, 15]
    torch.testing.assert_close(h_blk[:, 3], h_tok[:, [6, 7, 14, 15]].mean(1))


def test_pool_blocks_hand_computed():
    # 4x4 token grid of 2x2 blocks: block 0 = tokens 0, 1, 4, 5; block 1 = 2, 3, 6, 7;
    # block 2 = 8, 9, 12, 13; block 3 = 10, 11, 14, 15 (raster order of tokens and blocks)
    geom = BlockGeometry(4, 4, 2)
    hidden = torch.zeros(1, 16, 2)
    hidden[0, :, 0] = torch.arange(16.0)  # channel 0: the token index
    hidden[0, 5, 1] = 1.0  # channel 1: one token of block 0
    pooled = geom.pool_blocks(hidden)
    assert pooled.shape == (1, 4, 2)
    # (0 + 1 + 4 + 5) / 4 = 2.5, (2 + 3 + 6 + 7) / 4 = 4.5, (8 + 9 + 12 + 13) / 4 = 10.5, (10 + 11 + 14 + 15) / 4 = 12.5
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pooled[0, :, 1].tolist() == [0.25, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="L=16"):
        geom.pool_blocks(torch.zeros(1, 8, 2))


def test_env_config_validation():
    for bad in (dict(mode="generate", reward="future_loss"), dict(reward="entropy"), dict(hidden="pixel"),
                dict(budget=[]), dict(budget=[0, 1]), dict(reward="nope"), dict(split="test")):
        with pytest.raises(ValueError):
            check_env_config(EnvConfig(**bad))
