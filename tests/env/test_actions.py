"""The one random valid action (orderplan.env/actions.py) and its users: the documented draw rule (the oracle
data set's random behaviour is defined by it), validity, uniformity, finished rows, and that
`RandomPolicy`, `OrderPlanningEnv.rand_action` and the Gymnasium spaces all draw valid actions
through it with their seeding semantics."""

import numpy as np
import pytest
import torch

from orderplan.planner.policies import RandomPolicy
from orderplan.env.actions import random_valid_action
from orderplan.env.gym_api import OrderPlanningGymEnv, OrderPlanningVectorEnv
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import toy_core

MASK = torch.tensor([[True, False, True, True, False],
                     [False, False, False, False, True],
                     [True, True, True, True, True],
                     [False, False, False, False, False]])  # the last row is a finished episode


def test_plain_action_is_the_documented_rule():
    # written out as the oracle data set has always drawn it: changing draws or order changes that data
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(5):
        got = random_valid_action(MASK, g1)
        expect = torch.rand(4, 5, generator=g2).masked_fill(~MASK, -1.0).argmax(-1)
        assert torch.equal(got, expect)
    assert got.dtype == torch.long and got.shape == (4,)
    assert got[1] == 4 and got[3] == 0  # the only legal block; a finished row gets block 0


def test_router_action_valid_distinct_and_ordered():
    g = torch.Generator().manual_seed(0)
    seen_budgets = set()
    for _ in range(50):
        a = random_valid_action(MASK, g, budgets=[1, 2, 4])
        assert a.shape == (4, 5) and a.dtype == torch.long
        blocks = a[:, 1:]
        assert all(len(set(row.tolist())) == 4 for row in blocks)  # distinct blocks
        legal = MASK.gather(1, blocks)
        # legal blocks come first; after them the illegal ones by ascending id
        n_legal = MASK.sum(-1).clamp(max=4)
        for b in range(4):
            assert legal[b, : n_legal[b]].all() and not legal[b, n_legal[b]:].any()
            rest = blocks[b, n_legal[b]:].tolist()
            assert rest == sorted(rest)
        assert blocks[3].tolist() == [0, 1, 2, 3]
        assert blocks[1, 0] == 4
        seen_budgets |= set(a[:, 0].tolist())
    assert seen_budgets == {0, 1, 2}


def test_draws_are_uniform_over_legal_blocks():
    # 3 legal blocks of 5: each should be drawn about 1/3 of the time (3000 draws: sd ~ 0.009)
    g = torch.Generator().manual_seed(1)
    mask = MASK[:1].expand(3000, -1)
    counts = torch.bincount(random_valid_action(mask, g), minlength=5).double() / 3000
    assert counts[1] == 0 and counts[4] == 0
    torch.testing.assert_close(counts[[0, 2, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04, rtol=0)
    # router: the first block is uniform too, and the budget index uniform over the 3 budgets
    a = random_valid_action(mask, g, budgets=[1, 2, 4])
    first = torch.bincount(a[:, 1], minlength=5).double() / 3000
    torch.testing.assert_close(first[[0, 2, 3]], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04, rtol=0)
    bud = torch.bincount(a[:, 0], minlength=3).double() / 3000
    torch.testing.assert_close(bud, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04, rtol=0)


def test_bad_shapes():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        random_valid_action(MASK[0], g)
    with pytest.raises(ValueError, match="exceeds"):
        random_valid_action(MASK, g, budgets=[1, 8])


def test_users_draw_through_the_one_implementation():
    core = toy_core(3, seed=2, budget=[1, 2, 4])
    core.reset()
    core.step(torch.tensor([[2, 0, 1, 2, 3]] * 3))  # reveal blocks 0..3
    obs = core.observation()
    # RandomPolicy: its seed is the generator state of the draw
    expect = random_valid_action(obs["action_mask"], torch.Generator().manual_seed(4), [1, 2, 4])
    assert torch.equal(RandomPolicy(seed=4, budgets=[1, 2, 4]).act(obs), expect)
    # the TorchRL env draws from the core's generator
    env = OrderPlanningEnv(core)
    state = core.generator.get_state()
    a = env.rand_action()["action"]
    assert torch.equal(a, random_valid_action(~core.revealed, torch.Generator().set_state(state), [1, 2, 4]))
    core.step(a)  # valid: the core raises otherwise


@pytest.mark.parametrize("router", [False, True], ids=["plain", "router"])
def test_gym_spaces_sample_valid_and_seeded(router):
    fields = {"budget": [1, 2, 4]} if router else {}
    env = OrderPlanningVectorEnv(core=toy_core(3, **fields))
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.action_space.seed(5)
    a = [env.action_space.sample() for _ in range(3)]
    env.action_space.seed(5)
    b = [env.action_space.sample() for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seed, same samples
    assert not all(np.array_equal(a[0], x) for x in a[1:])
    valid = env.action_masks()
    for x in a:
        assert env.action_space.contains(x)
        blocks = x[:, 1:] if router else x[:, None]
        assert np.take_along_axis(valid, blocks[:, :1], 1).all()  # the first block is always legal
    single = OrderPlanningGymEnv(core=toy_core(1, **fields))
    single.reset(seed=0)
    for _ in range(single.core.N):
        x = single.action_space.sample()
        assert single.action_space.contains(x)
        _, _, done, _, _ = single.step(x)  # valid: the core raises otherwise
        if done:
            break
    assert done
