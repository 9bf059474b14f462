"""bf16, the dtype GPU users get (backbone.dtype=auto is bfloat16 on CUDA), checked on the CPU.

The same episodes (held-out images, random block orders) run on the committed tiny default backbone
in float32 and in bfloat16: rewards of every kind, per-token losses, oracle utilities and the
OrderHead's outputs must agree within the tolerances below, and PPO on a bf16 env must train with
float32 advantages and losses.

Tolerances (nats, |bf16 - float32|). Measured with `_Episodes` at B=16 on 16 held-out images x 2
random orders x 16 decisions (512 decisions; docs/scaling.md's bf16 section has the numbers), each
tolerance set at about twice the measured maximum; the tests run 4 images x 16 decisions.
  reward per decision   max measured (mean)       tolerance max (mean)   typical |r|
  future_loss           0.79 (0.17)               1.5 (0.35)             30
  extrapolative         0.78 (0.16)               1.5 (0.35)             24
  anytime               0.0095 (0.0019)           0.02 (0.004)           2.3
  likelihood            0.104 (0.027)             0.25 (0.06)            7.6
  entropy (H_rest drop) 0.43 (0.070)              0.8 (0.15)             17
  token loss l_j(S)     0.18 (0.0096)             0.35 (0.02)            per token
  oracle u(a|S)         1.26 (0.20)               2.5 (0.4)              34
Oracle argmax: the bf16 and float32 argmax agreed on 98.3% and 99.2% of 240 states (each with >= 2
candidates); every disagreement had a float32 top-2 gap <= 0.27 nats, so the bf16 choice lost at
most 0.27 nats of float32 utility. Tested: agreement >= 90% and that regret <= 0.6 nats.
OrderHead (float32 weights, random init, beliefs on): logits differ by <= 0.012 nats between the
bf16 and float32 orderplan.env' observations, total variation of the policies <= 0.002 (tolerances 0.05, 0.01).
"""

import math
from dataclasses import replace

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from orderplan.planner.orderhead import OrderHead, orderhead_config_for
from orderplan.train.ppo import PPOConfig, make_actor_critic, make_loss, train_ppo
from orderplan.config.common import BackboneConfig
from orderplan.model.loading import backbone_dtype, build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.env.core import EnvConfig, OrderPlanningCore
from orderplan.env.rewards import information_reward
from orderplan.env.torchrl_env import OrderPlanningEnv

BF16, F32 = torch.bfloat16, torch.float32
KINDS = ("future_loss", "extrapolative", "anytime", "likelihood")
# max and mean |bf16 - float32| of a decision's reward, nats (module doc: about 2x the measured ones)
REWARD_TOL = {"future_loss": (1.5, 0.35), "extrapolative": (1.5, 0.35), "anytime": (0.02, 0.004),
              "likelihood": (0.25, 0.06), "entropy": (0.8, 0.15)}
TOKEN_LOSS_TOL = (0.35, 0.02)
UTILITY_TOL = (2.5, 0.4)
ARGMAX_AGREEMENT = 0.9
REGRET_TOL = 0.6
B = 4
IMAGES = torch.tensor([0, 7, 21, 42])  # held-out images


@pytest.fixture(scope="module")
def stacks():
    """The tiny default backbone in both dtypes (built through backbone.dtype), and its held-out codes."""
    bcfg = BackboneConfig()
    bbs = {F32: build_backbone(bcfg, with_vq=False),
           BF16: build_backbone(replace(bcfg, dtype="bfloat16"), with_vq=False)}
    codes, labels = load_token_data(bcfg, "heldout")
    return bbs, codes, labels


def _orders() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randperm(16, generator=g) for _ in range(B)])  # [B, N]


class _Episodes:
    """One episode per (dtype, reward kind) on the same images and orders, computed once per module:
    rewards [B, N], entropy rewards [B, N] (H_rest(S_t) - H_rest(S_t+1) from the step's own query),
    token losses [B, N, L] before each step, observations, and (future_loss) oracle utilities [B, N, N]."""

    def __init__(self, stacks):
        self.bbs, self.codes, self.labels = stacks
        self.cache: dict = {}

    def __call__(self, dtype: torch.dtype, kind: str) -> dict:
        if (dtype, kind) not in self.cache:
            self.cache[dtype, kind] = self._run(dtype, kind)
        return self.cache[dtype, kind]

    @torch.no_grad()
    def _run(self, dtype: torch.dtype, kind: str) -> dict:
        core = OrderPlanningCore(self.bbs[dtype], self.codes, self.labels, EnvConfig(reward=kind, beliefs=True), B)
        assert core.dtype == dtype
        core.reset(image_index=IMAGES)
        orders, one = _orders(), torch.ones(B, dtype=torch.long)
        out = {"reward": [], "entropy": [], "token_loss": [], "obs": [], "util": []}
        for t in range(core.N):
            if kind == "future_loss":
                out["obs"].append(core.observation())
                if t < core.N - 1:  # the last state has one candidate: its argmax cannot disagree
                    out["util"].append(core.oracle_utilities())
            unseen, ent = core.unseen, core.token_entropy
            out["token_loss"].append(core.token_loss.clone())
            reward, _ = core.step(orders[:, t])
            out["reward"].append(reward)
            out["entropy"].append(information_reward("entropy", orders[:, t:t + 1], one, unseen, ent, core.unseen,
                                                     core.token_entropy, torch.zeros(B)))
        return {k: (torch.stack(v, 1) if v and isinstance(v[0], torch.Tensor) else v) for k, v in out.items()}


@pytest.fixture(scope="module")
def episodes(stacks):
    return _Episodes(stacks)


def _close(a: torch.Tensor, b: torch.Tensor, tol: tuple[float, float], what: str) -> torch.Tensor:
    assert a.dtype == b.dtype == F32, (what, a.dtype, b.dtype)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), what
    d = (a - b).abs()
    assert d.max() <= tol[0] and d.mean() <= tol[1], (what, float(d.max()), float(d.mean()))
    return d


# -- the env ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS + ("entropy",))
def test_rewards_in_bf16_match_float32(episodes, kind):
    src = "future_loss" if kind == "entropy" else kind  # the entropy reward: from the future_loss episodes' queries
    key = "entropy" if kind == "entropy" else "reward"
    d = _close(episodes(BF16, src)[key], episodes(F32, src)[key], REWARD_TOL[kind], kind)
    assert d.max() > 0, "the bf16 episode computed exactly the float32 numbers: it did not run in bf16"


def test_token_losses_in_bf16_match_float32(episodes):
    _close(episodes(BF16, "future_loss")["token_loss"], episodes(F32, "future_loss")["token_loss"],
           TOKEN_LOSS_TOL, "token_loss")
    obs = episodes(BF16, "future_loss")["obs"][3]
    assert obs["hidden"].dtype == BF16 and obs["query_hidden"].dtype == BF16 and obs["entropy"].dtype == F32


def test_oracle_utilities_in_bf16_match_float32(episodes):
    u16, u32 = episodes(BF16, "future_loss")["util"], episodes(F32, "future_loss")["util"]  # [B, N - 1, N]
    assert u16.dtype == u32.dtype == F32
    live = torch.isfinite(u32)
    assert torch.equal(live, torch.isfinite(u16))  # -inf exactly on revealed blocks, in both
    _close(u16[live], u32[live], UTILITY_TOL, "oracle utilities")
    agree = (u16.argmax(-1) == u32.argmax(-1)).float().mean()
    assert agree >= ARGMAX_AGREEMENT, float(agree)
    regret = u32.max(-1).values - u32.gather(-1, u16.argmax(-1, keepdim=True))[..., 0]  # float32 nats lost
    assert regret.max() <= REGRET_TOL, float(regret.max())


def test_generation_mode_in_bf16_pays_finite_float32_rewards(stacks):
    bbs, codes, labels = stacks
    cfg = EnvConfig(mode="generate", reward="entropy", beliefs=False)
    core = OrderPlanningCore(bbs[BF16], codes, labels, replace(cfg, sampling=replace(cfg.sampling, cfg_scale=2.0)), 2)
    core.reset()
    rewards = [core.step(torch.tensor([t, 15 - t]))[0] for t in range(4)]
    assert all(r.dtype == F32 and torch.isfinite(r).all() for r in rewards)


# -- the planner ------------------------------------------------------------------------------------


def test_orderhead_reads_bf16_observations_in_float32(episodes):
    torch.manual_seed(0)
    head = OrderHead(orderhead_config_for(128, episodes.bbs[F32].geometry, num_classes=10, beliefs=True)).eval()
    assert all(p.dtype == F32 for p in head.parameters())
    with torch.no_grad():
        for t, (o16, o32) in enumerate(zip(episodes(BF16, "future_loss")["obs"], episodes(F32, "future_loss")["obs"])):
            out16, out32 = head(o16), head(o32)
            assert out16.logits.dtype == out16.value.dtype == F32
            live = o16["action_mask"]
            assert torch.isfinite(out16.logits[live]).all() and torch.isfinite(out16.value).all()
            # the planner's only contact with bf16 is the cast of its inputs to float32
            cast = {k: (v.float() if v.is_floating_point() else v) for k, v in o16.items()}
            assert torch.equal(head(cast).logits, out16.logits)
            d = (out16.logits - out32.logits)[live].abs()
            assert d.max() <= 0.05, (t, float(d.max()))
            tv = 0.5 * (out16.logits.softmax(-1) - out32.logits.softmax(-1)).abs().sum(-1)
            assert tv.max() <= 0.01 and (out16.value - out32.value).abs().max() <= 0.01, (t, float(tv.max()))


# -- PPO --------------------------------------------------------------------------------------------


def _bf16_env(stacks, batch_size: int = B) -> OrderPlanningEnv:
    bbs, codes, labels = stacks
    return OrderPlanningEnv(OrderPlanningCore(bbs[BF16], codes, labels, EnvConfig(beliefs=False), batch_size, seed=0))


def _small_head(env: OrderPlanningEnv) -> OrderHead:
    torch.manual_seed(0)
    return OrderHead(orderhead_config_for(env.core.D, env.core.geom, d_model=32, n_heads=4))


def test_ppo_advantages_and_losses_are_float32_on_a_bf16_env(stacks):
    env = _bf16_env(stacks)
    model = _small_head(env)
    actor, critic = make_actor_critic(model)
    loss_module, gae = make_loss(actor, critic, PPOConfig())
    torch.manual_seed(0)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        data = env.rollout(env.core.N, actor, break_when_any_done=False)  # [B, N]: whole episodes
        data["next", "reward"] = data["next", "reward"] / 25.0
        data = gae(data)
    assert data["hidden"].dtype == BF16  # the rollout stores what the bf16 backbone gives
    for key in (("next", "reward"), "state_value", "advantage", "value_target", "action_log_prob"):
        assert data[key].dtype == F32 and torch.isfinite(data[key]).all(), key
    loss = loss_module(data.reshape(-1))
    terms = [loss[k] for k in ("loss_objective", "loss_critic", "loss_entropy")]
    assert all(x.dtype == F32 and torch.isfinite(x) for x in terms)
    sum(terms).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == F32 and torch.isfinite(g).all() for g in grads)


def test_train_ppo_on_a_bf16_env_stays_finite(stacks, tmp_path):
    env = _bf16_env(stacks)
    model = _small_head(env)
    cfg = PPOConfig(frames_per_batch=B * 16, total_frames=2 * B * 16, minibatch_size=32, epochs=2, eval_every=0)
    out = train_ppo(env, model, cfg, tmp_path)
    assert out["iterations"] == 2
    for k in ("train/loss_objective", "train/loss_critic", "train/entropy", "train/mean_discounted_return"):
        assert math.isfinite(out["metrics"][k]), k
    assert all(p.dtype == F32 and torch.isfinite(p).all() for p in model.parameters())


# -- choosing the dtype -----------------------------------------------------------------------------


def test_backbone_dtype_from_config():
    from orderplan.env.factory import make_core

    assert backbone_dtype(BackboneConfig(), "cpu") == F32  # auto: the CPU default is unchanged
    assert backbone_dtype(BackboneConfig(), "cuda") == BF16  # auto: what GPU users get
    assert backbone_dtype(BackboneConfig(dtype="bfloat16"), "cpu") == BF16
    assert backbone_dtype(BackboneConfig(dtype="float32"), "cuda") == F32
    with pytest.raises(ValueError, match=r"backbone\.dtype must be one of auto, float32, bfloat16"):
        backbone_dtype(BackboneConfig(dtype="float16"), "cpu")
    core = make_core("tiny_mnist", batch_size=1, split="heldout", **{"backbone.dtype": "bfloat16"})
    assert core.dtype == core.hidden_tok.dtype == BF16 and core.token_loss.dtype == F32
    assert make_core("tiny_mnist", batch_size=1, split="heldout").dtype == F32
