"""The toy problem with a known answer (tests/support/keyblock_toy.py): exact utilities at the empty state and
after the key block, full episodes through the real core, telescoping, generation, and the generic
(non-GPT) candidate path of orderplan.oracle.future_loss against the GPT's batched kernel."""

import math

import pytest
import torch

from tests.support.keyblock_toy import KeyBlockModel, ToyConfig, make_toy_core, toy_data
from orderplan.oracle.future_loss import _candidate_chunk_nll, _unseen_targets, generic_candidate_chunk_nll
from tests.conftest import toy_core


def _random_actions(core, g: torch.Generator) -> torch.Tensor:
    return torch.rand(core.B, core.N, generator=g).masked_fill(core.revealed, -1.0).argmax(-1)


def test_key_block_dominates_at_empty_state_and_nothing_is_left_after_it():
    core = make_toy_core(batch_size=4, num_images=8)
    cfg, T, L = core.gpt.cfg, core.T, core.L
    core.reset(image_index=torch.arange(4))
    key = core.gpt.key_block[core.label]
    assert len(set(key.tolist())) == 4  # classes have different key blocks
    for kind in ("future_loss", "extrapolative"):
        u = core.oracle_utilities(kind)
        assert torch.equal(u.argmax(-1), key)
        others = u.masked_fill(torch.nn.functional.one_hot(key, core.N).bool(), float("-inf")).max(-1).values
        assert bool((u.max(-1).values - others > 100.0).all())  # a wide margin (~125 nats)
    logv, hit = math.log(cfg.vocab_size), -math.log1p(-cfg.eps)
    u = core.oracle_utilities("future_loss")
    torch.testing.assert_close(u.max(-1).values, torch.full((4,), T * logv + (L - T) * (logv - hit)))
    torch.testing.assert_close(others := u.sort(-1).values[:, :-1], torch.full_like(others, T * logv))
    core.step(key)
    after = core.oracle_utilities("future_loss")
    live = ~core.revealed
    assert bool((after[live].abs() < 1e-2).all()) and bool(torch.isinf(after[~live]).all())
    torch.testing.assert_close(after[live], torch.full_like(after[live], T * hit))


@pytest.mark.parametrize("reward", ["future_loss", "extrapolative", "anytime", "likelihood"])
def test_core_runs_full_episodes_and_future_loss_telescopes(reward):
    core = make_toy_core(batch_size=5, num_images=10, reward=reward)
    g = torch.Generator().manual_seed(0)
    core.reset(image_index=torch.arange(5))
    l_rest_empty = core.token_loss.sum(-1).clone()
    torch.testing.assert_close(l_rest_empty, torch.full((5,), core.L * math.log(core.gpt.cfg.vocab_size)))
    ret = torch.zeros(5)
    for t in range(core.N):
        assert not bool(core.done.any())
        r, done = core.step(_random_actions(core, g))
        ret += r
    assert bool(done.all())
    assert torch.equal(core.history.sort(-1).values, torch.arange(core.N).expand(5, -1))
    obs = core.observation()
    assert bool((obs["hidden"].abs().sum(-1) > 0).all())  # every token got a hidden state
    if reward == "future_loss":
        torch.testing.assert_close(ret, l_rest_empty, atol=1e-3, rtol=0)


def test_key_first_is_the_best_discounted_order():
    core = make_toy_core(batch_size=4, num_images=4)
    gamma = 0.9

    def discounted(first_key: bool) -> torch.Tensor:
        core.reset(image_index=torch.arange(4))
        g, ret = torch.Generator().manual_seed(1), torch.zeros(4)
        for t in range(core.N):
            a = _random_actions(core, g)
            if t == 0:
                key = core.gpt.key_block[core.label]
                a = key if first_key else torch.where(a == key, (key + 1) % core.N, a)
            r, _ = core.step(a)
            ret += gamma**t * r
        return ret

    assert bool((discounted(True) > discounted(False) + 10).all())  # key second costs (1 - gamma) * 125


def test_data_is_what_the_model_predicts():
    model = KeyBlockModel(ToyConfig(eps=1e-6, seed=3))
    codes, labels = toy_data(model, 12, seed=5)
    key = codes.gather(1, model.key_tokens[labels])
    assert torch.equal(model.complete(labels, key), codes)
    state = model.init_state(labels)
    pos = model.key_tokens[labels]
    model.append(state, codes.gather(1, pos), pos)
    logits, _ = model.query(state, torch.arange(model.cfg.num_tokens).expand(12, -1))
    assert torch.equal(logits.argmax(-1), codes)


def test_generation_mode_on_the_toy_completes_the_image_from_the_key():
    core = make_toy_core(batch_size=3, num_images=6, toy=ToyConfig(eps=1e-7), mode="generate", reward="entropy")
    core.reset(image_index=torch.arange(3))
    key = core.gpt.key_block[core.label]
    r, _ = core.step(key)
    assert bool((r > 100).all())  # revealing the key removes the entropy of every other token
    g = torch.Generator().manual_seed(0)
    while not bool(core.done.all()):
        core.step(_random_actions(core, g))
    keytok = core.x.gather(1, core.gpt.key_tokens[core.label])
    assert torch.equal(core.gpt.complete(core.label, keytok), core.x)


def test_generic_candidate_path_equals_the_gpt_batched_kernel():
    core = toy_core(batch_size=3, n_images=6)
    core.reset(image_index=torch.tensor([0, 1, 2]))
    core.step(torch.tensor([3, 0, 15]))
    core.step(torch.tensor([5, 7, 1]), active=torch.tensor([True, False, True]))  # rows of different lengths
    unseen = core.unseen
    targets = _unseen_targets(unseen)
    blocks = torch.tensor([[0, 1, 2, 9], [1, 2, 3, 4], [6, 8, 10, 12]])
    ref = _candidate_chunk_nll(core.gpt, core.state, core.x, targets, blocks, core.geom)
    got = generic_candidate_chunk_nll(core.gpt, core.state, core.x, targets, blocks, core.geom)
    valid = (targets >= 0)[:, None, :].expand_as(ref)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=1e-4)
