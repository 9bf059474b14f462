"""env.parallel: a generation-mode decision samples all its tokens from the previous query and commits
them with the next query in one forward. With one token per decision it generates what the
token-by-token env and `generate` generate; a decision of any size is one forward; and the state it
leaves is the state of revealing the same tokens one block at a time."""

import pytest
import torch

from orderplan.config.common import BackboneConfig
from orderplan.env.actions import random_valid_action
from orderplan.env.core import EnvConfig, OrderPlanningCore, check_env_config
from orderplan.model.blocks import BlockGeometry
from orderplan.model.loading import Backbone
from orderplan.model.sampling import SamplingConfig, generate
from tests.conftest import randomized_gpt


def _core(block: int = 2, batch: int = 3, codes: torch.Tensor | None = None, **env) -> OrderPlanningCore:
    gpt = randomized_gpt(seed=11)
    bb = Backbone(cfg=BackboneConfig(), gpt=gpt, geometry=BlockGeometry(8, 8, block), vq=None)
    if codes is None:
        codes = torch.zeros(batch, 64, dtype=torch.long)
    labels = torch.tensor([1, 5, 9, 2, 3, 4])[: codes.shape[0]]
    return OrderPlanningCore(bb, codes, labels, EnvConfig(**env), batch, seed=4)


GEN = dict(mode="generate", reward="entropy")


def test_parallel_needs_generation_with_the_full_query():
    with pytest.raises(ValueError, match="env.parallel"):
        check_env_config(EnvConfig(parallel=True))
    with pytest.raises(ValueError, match="env.parallel"):
        check_env_config(EnvConfig(parallel=True, query="pending", beliefs=False, **GEN))
    check_env_config(EnvConfig(parallel=True, **GEN))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_one_token_per_decision_generates_what_token_by_token_decoding_does(cfg_scale):
    """Blocks of one token, raster order, position noise: the parallel env, the token-by-token env
    and `generate` give the same grids (the same conditionals, computed in other forwards)."""
    sc = SamplingConfig(noise="position", cfg_scale=cfg_scale)
    grids = []
    for parallel in (False, True):
        core = _core(block=1, sampling=sc, parallel=parallel, **GEN)
        core.reset(image_index=torch.arange(3))
        for b in range(64):
            core.step(torch.full((3,), b))
        assert bool(core.done.all())
        grids.append(core.x.clone())
        if parallel:
            assert torch.equal(core.forward_passes, torch.full((3,), 1 + 64))
            ref = generate(core.gpt, core.label, torch.arange(64).expand(3, -1), sc, keys=core.row_key)
    assert torch.equal(grids[0], grids[1])
    assert torch.equal(grids[1], ref)


def test_a_decision_is_one_forward_whatever_its_blocks():
    core = _core(budget=[1, 2, 4, 8], parallel=True, **GEN)
    calls = []
    core.gpt.layers[0].register_forward_hook(lambda *a: calls.append(1))
    core.reset(image_index=torch.arange(3))
    calls.clear()
    core.step(torch.tensor([[3, 0, 1, 2, 3, 4, 5, 6, 7]] * 3))  # budget index 3: 8 blocks on every row
    assert len(calls) == 1 and bool((core.steps == 8).all())
    core.step(torch.tensor([[0, 8, -1, -1, -1, -1, -1, -1, -1], [2, 8, 9, 10, 11, -1, -1, -1, -1],
                            [1, 12, 13, -1, -1, -1, -1, -1, -1]]))  # ragged: 1, 4 and 2 blocks
    assert len(calls) == 2 and core.steps.tolist() == [9, 12, 10]
    assert core.forward_passes.tolist() == [3, 3, 3]  # the reset's query, then one per decision


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_the_state_equals_revealing_the_same_tokens_block_by_block(cfg_scale):
    """Ragged router decisions in one forward leave the cache a teacher-forced core builds by
    appending the same tokens block by block: the same entropies and hidden states at every step."""
    core = _core(budget=[1, 2, 4], parallel=True, sampling=SamplingConfig(cfg_scale=cfg_scale), **GEN)
    core.reset(image_index=torch.arange(3))
    gen = torch.Generator().manual_seed(0)
    actions, ent, hid = [], [], []
    while not bool(core.done.all()):
        live = ~core.done
        a = random_valid_action(~core.revealed, gen, core.cfg.budget)
        core.step(a, active=live)
        actions.append((a, live))
        ent.append(core.token_entropy.clone())
        hid.append(core.hidden_tok.clone())
    assert len({tuple(r.tolist()) for r in core.history}) == 3  # different orders, different k per decision
    tf = _core(budget=[1, 2, 4], codes=core.x.clone(), mode="teacher_forced", reward="future_loss")
    tf.reset(image_index=torch.arange(3))
    for (a, live), e, h in zip(actions, ent, hid):
        tf.step(a, active=live)
        torch.testing.assert_close(tf.token_entropy, e, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tf.hidden_tok, h, atol=1e-4, rtol=1e-4)
    assert torch.equal(tf.history, core.history)


def test_proposals_are_the_revealed_tokens():
    core = _core(parallel=True, **GEN)
    core.reset(image_index=torch.arange(3))
    before = core.proposal.clone()
    core.step(torch.tensor([5, 0, 15]))
    for b, blk in enumerate([5, 0, 15]):
        pos = core.block_tokens[blk]
        assert torch.equal(core.x[b, pos], before[b, pos])


def test_coherence_is_what_the_tokens_tell_each_other():
    """The coherence of a first decision equals an explicit computation: sum_t log p(x_t | x_<t) of
    its tokens in cache order minus sum_t log p(x_t | nothing); a one-token decision has none."""
    core = _core(budget=[1, 2, 4], parallel=True, coherence=1.0, **GEN)
    core.reset(image_index=torch.arange(3))
    core.step(torch.tensor([[2, 0, 5, 10, 15]] * 3))
    pos = core.block_tokens[torch.tensor([0, 5, 10, 15])].flatten()  # [16] in cache order
    tok = core.x[:, pos]
    with torch.no_grad():
        seq, _ = core.gpt.forward_sequence(core.label, tok[:, :-1], pos[:-1].expand(3, -1), pos.expand(3, -1))
        joint = torch.log_softmax(seq, -1).gather(-1, tok[..., None])[..., 0].sum(-1)
        alone, _ = core.gpt.query(core.gpt.init_state(core.label), pos.expand(3, -1))
        marginal = torch.log_softmax(alone, -1).gather(-1, tok[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(core.coherence, joint - marginal, atol=1e-4, rtol=1e-4)
    assert bool((core.coherence != 0).all())
    one = _core(block=1, parallel=True, coherence=1.0, **GEN)
    one.reset(image_index=torch.arange(3))
    for b in (0, 9, 63):
        one.step(torch.full((3,), b))
        torch.testing.assert_close(one.coherence, torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="coherence"):
        check_env_config(EnvConfig(coherence=1.0, **GEN))
