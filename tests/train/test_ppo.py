"""PPO (src/orderplan/train/ppo.py) and the router action distribution (src/orderplan/planner/distributions.py).

RouterDistribution: exact log-probabilities (enumeration of every action sums to 1 and matches a
brute-force Plackett-Luce product), sampling frequencies, mode, entropy, finite gradients, valid
actions through the env. PPO: finite losses in plain and router modes, short runs, learning a
problem with a known answer on a tiny synthetic env, and exact checkpoint resume."""

import itertools
import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Binary, Categorical, Composite, MultiCategorical, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from orderplan.planner.distributions import MaskedCategorical, RouterDistribution
from orderplan.planner.orderhead import OrderHead, OrderHeadConfig, load_orderhead, orderhead_config_for
from orderplan.train.ppo import PPOConfig, discounted_episode_returns, make_actor_critic, make_loss, train_ppo
from orderplan.env.torchrl_env import OrderPlanningEnv
from tests.conftest import toy_core

BUDGETS = [1, 2, 4]


def small_head(core, router: bool = False, seed: int = 0) -> OrderHead:
    torch.manual_seed(seed)
    budgets = BUDGETS if router else None
    return OrderHead(orderhead_config_for(core.D, core.geom, d_model=32, n_heads=4, budgets=budgets))


def toy_env(batch_size: int = 4, router: bool = False, **fields) -> OrderPlanningEnv:
    if router:
        fields["budget"] = BUDGETS
    return OrderPlanningEnv(toy_core(batch_size=batch_size, **fields))


# -- RouterDistribution ---------------------------------------------------------------------------


def brute_log_prob(budget_logits, block_logits, mask, budgets, action) -> float:
    """log p(action) of one row by the definition: budget softmax, then sequential softmaxes."""
    lp = torch.log_softmax(budget_logits.double(), -1)[action[0]].item()
    avail = mask.clone()
    k = min(budgets[action[0]], int(mask.sum()))
    for a in action[1:1 + k]:
        p = torch.softmax(block_logits.double().masked_fill(~avail, float("-inf")), -1)
        lp += math.log(p[a].item())
        avail[a] = False
    return lp


def all_actions(mask: torch.Tensor, budgets: list[int], K: int) -> list[list[int]]:
    """Every distinct router action of one row (placeholders: block 0)."""
    free = torch.nonzero(mask).flatten().tolist()
    out = []
    for b, kb in enumerate(budgets):
        k = min(kb, len(free))
        for perm in itertools.permutations(free, k):
            out.append([b, *perm] + [0] * (K - k))
    return out


def router_case():
    g = torch.Generator().manual_seed(0)
    N, budgets = 5, [1, 2, 3]
    mask = torch.tensor([[True] * 5,
                         [False, True, False, True, False],  # 2 left: budgets 2 and 3 clip to 2
                         [False, False, True, False, False]])  # 1 left
    block_logits = torch.randn(3, N, generator=g) * 1.5
    block_logits = block_logits.masked_fill(~mask, float("-inf"))  # as OrderHead.plan writes them
    budget_logits = torch.randn(3, len(budgets), generator=g)
    return budget_logits, block_logits, mask, budgets


def test_router_log_prob_is_exact_by_enumeration():
    budget_logits, block_logits, mask, budgets = router_case()
    dist = RouterDistribution(budget_logits, block_logits, mask, budgets)
    K = max(budgets)
    for row in range(mask.shape[0]):
        actions = torch.tensor(all_actions(mask[row], budgets, K))  # [M, 1 + K]
        # log_prob of every action of this row, batched over [M] with the row's parameters
        row_dist = RouterDistribution(budget_logits[row].expand(len(actions), -1),
                                      block_logits[row].expand(len(actions), -1),
                                      mask[row].expand(len(actions), -1), budgets)
        lp = row_dist.log_prob(actions)
        assert torch.isfinite(lp).all()
        assert lp.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
        for a, v in zip(actions.tolist(), lp.tolist()):
            assert v == pytest.approx(brute_log_prob(budget_logits[row], block_logits[row], mask[row], budgets, a),
                                      abs=1e-5)
    # leading sample dims broadcast against the batch
    acts = dist.sample((7,))
    assert acts.shape == (7, 3, 1 + K)
    assert dist.log_prob(acts).shape == (7, 3)


def test_router_log_prob_ignores_placeholders_and_rejects_invalid_actions():
    budget_logits, block_logits, mask, budgets = router_case()
    dist = RouterDistribution(budget_logits, block_logits, mask, budgets)
    a = torch.tensor([[0, 2, 0, 0], [1, 3, 1, 0], [2, 2, 4, 4]])  # k_eff = 1, 2, 1
    b = a.clone()
    b[0, 2:] = torch.tensor([3, 1])  # placeholders past k_eff
    b[2, 2:] = torch.tensor([0, 1])
    assert torch.equal(dist.log_prob(a), dist.log_prob(b))
    bad = torch.tensor([[1, 2, 2, 0],  # the same block twice within k_eff
                        [0, 0, 1, 0],  # a revealed block
                        [-1, 2, 0, 0]])  # budget index out of range
    assert torch.isneginf(dist.log_prob(bad)).all()


def test_router_sampling_matches_probabilities():
    torch.manual_seed(0)
    budget_logits, block_logits, mask, budgets = router_case()
    row, M = 0, 40_000
    dist = RouterDistribution(budget_logits[row].expand(M, -1), block_logits[row].expand(M, -1),
                              mask[row].expand(M, -1), budgets)
    samples = dist.sample()
    k = dist.k_eff(samples[:, 0])
    # the first k_eff blocks are distinct and unrevealed
    for s, kk in zip(samples[:200].tolist(), k[:200].tolist()):
        blocks = s[1:1 + kk]
        assert len(set(blocks)) == kk and all(mask[row, x] for x in blocks)
    keys = [tuple(s[:1 + kk]) for s, kk in zip(samples.tolist(), k.tolist())]
    counts = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    for a in all_actions(mask[row], budgets, max(budgets)):
        kk = min(budgets[a[0]], int(mask[row].sum()))
        p = math.exp(brute_log_prob(budget_logits[row], block_logits[row], mask[row], budgets, a))
        freq = counts.get(tuple(a[:1 + kk]), 0) / M
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / M) + 1e-3


def test_router_mode_entropy_and_gradients():
    budget_logits, block_logits, mask, budgets = router_case()
    bl = budget_logits.clone().requires_grad_(True)
    raw = torch.randn(3, 5, requires_grad=True)
    logits = raw.masked_fill(~mask, float("-inf"))
    dist = RouterDistribution(bl, logits, mask, budgets)
    mode = dist.mode
    assert torch.equal(mode[:, 0], budget_logits.argmax(-1))
    for r in range(3):
        k = int(mask[r].sum())
        top = torch.argsort(logits[r].detach(), descending=True, stable=True)[:k]
        assert torch.equal(mode[r, 1:1 + k], top[: min(k, 3)])
    h = dist.entropy()
    pb = torch.softmax(budget_logits, -1)
    pf = torch.softmax(logits.detach(), -1)
    want = -(pb * pb.log()).sum(-1) - torch.where(pf > 0, pf * pf.log(), 0.0).sum(-1)
    assert torch.allclose(h.detach(), want, atol=1e-5)
    (dist.log_prob(dist.sample()).sum() + h.sum()).backward()
    assert torch.isfinite(bl.grad).all() and torch.isfinite(raw.grad).all()
    assert (raw.grad[~mask] == 0).all()
    # a finished row (nothing left) stays finite too
    done = RouterDistribution(budget_logits[:1], torch.full((1, 5), float("-inf")),
                              torch.zeros(1, 5, dtype=torch.bool), budgets)
    assert torch.isfinite(done.entropy()).all() and torch.isfinite(done.log_prob(done.sample())).all()


# -- actor / critic on the toy env ----------------------------------------------------------------


@pytest.mark.parametrize("router", [False, True])
def test_actor_critic_actions_are_valid_through_the_env(router):
    env = toy_env(batch_size=4, router=router)
    model = small_head(env.core, router)
    actor, critic = make_actor_critic(model, router=router)
    assert set(actor.parameters()) == set(critic.parameters()) == set(model.parameters())
    torch.manual_seed(0)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        # rows finish at different times in router mode: the env resets them (invalid actions raise)
        data = env.rollout(20, actor, break_when_any_done=False)
        value = critic(data.clone())["state_value"]
    assert value.shape == (4, 20, 1)
    action, lp = data["action"], data["action_log_prob"]
    assert torch.isfinite(lp).all()
    assert action.shape == ((4, 20, 1 + max(BUDGETS)) if router else (4, 20))
    if router:
        dist = RouterDistribution(data["budget_logits"], data["logits"], data["action_mask"], BUDGETS)
        assert data["next", "done"].any()  # some row finished and was reset mid-rollout
    else:
        dist = MaskedCategorical(logits=data["logits"], mask=data["action_mask"])
    assert torch.allclose(dist.log_prob(action), lp, atol=1e-5)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        td = actor(env.reset())
    greedy = td["logits"].argmax(-1)
    assert torch.equal(td["action"][:, 1] if router else td["action"], greedy)


@pytest.mark.parametrize("router", [False, True])
def test_ppo_loss_is_finite(router):
    env = toy_env(batch_size=4, router=router)
    model = small_head(env.core, router)
    cfg = PPOConfig()
    actor, critic = make_actor_critic(model, router=router)
    loss_module, gae = make_loss(actor, critic, cfg)
    torch.manual_seed(0)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        data = env.rollout(8, actor, break_when_any_done=False)
        data["next", "reward"] = data["next", "reward"] / 25.0
        data = gae(data)
    assert torch.isfinite(data["advantage"]).all()
    loss = loss_module(data.reshape(-1))
    total = loss["loss_objective"] + loss["loss_critic"] + loss["loss_entropy"]
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # on-policy data: ratio 1, nothing clipped
    assert float(loss["clip_fraction"]) == 0.0 and abs(float(loss["kl_approx"])) < 1e-5


class RecordingLogger:
    def __init__(self):
        self.records = []

    def log(self, metrics, step):
        self.records.append((step, dict(metrics)))


@pytest.mark.parametrize("router", [False, True])
def test_train_ppo_runs_and_writes_checkpoints(router, tmp_path):
    env = toy_env(batch_size=4, router=router)
    model = small_head(env.core, router)
    cfg = PPOConfig(frames_per_batch=32, total_frames=64, minibatch_size=16, epochs=2, eval_every=1, ckpt_every=1)
    logger = RecordingLogger()
    calls = []

    def eval_fn(m, it):
        calls.append(it)
        return {"score": float(it)}

    with pytest.warns(UserWarning, match="never collected"):  # 8 decisions per iteration < N = 16
        out = train_ppo(env, model, cfg, tmp_path, logger=logger, eval_fn=eval_fn)
    assert out["iterations"] == 2 and out["frames"] == 64 and out["finished"]
    assert calls == [1, 2] and out["eval"] == {"eval/score": 2.0}
    assert [s for s, _ in logger.records] == [32, 64]
    m = out["metrics"]
    for key in ("train/approx_kl", "train/clip_fraction", "train/entropy", "train/explained_variance",
                "train/loss_objective", "train/loss_critic", "time/fps"):
        assert key in m and math.isfinite(m[key]), key
    if router:
        assert 1 <= m["train/mean_budget"] <= 4
    assert (tmp_path / "checkpoints" / "step_00000002.pt").is_file()
    loaded = load_orderhead(out["orderhead"])
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    # a second call finds the finished run and does nothing more
    with pytest.warns(UserWarning, match="never collected"):
        again = train_ppo(env, model, cfg, tmp_path)
    assert again["iterations"] == 2 and again["frames"] == 64


def test_config_validation():
    env = toy_env(batch_size=4)
    model = small_head(env.core)
    with pytest.raises(ValueError, match="multiple of the env's batch size"):
        train_ppo(env, model, PPOConfig(frames_per_batch=30, total_frames=60, minibatch_size=10), "unused")
    with pytest.raises(ValueError, match="minibatch_size"):
        train_ppo(env, model, PPOConfig(frames_per_batch=32, total_frames=64, minibatch_size=12), "unused")
    with pytest.raises(ValueError, match="router"):
        train_ppo(toy_env(batch_size=4, router=True), model, PPOConfig(frames_per_batch=32, total_frames=64,
                                                                         minibatch_size=16), "unused")


@pytest.mark.parametrize("router", [False, True])
def test_resume_reproduces_an_uninterrupted_run(router, tmp_path):
    """'Exact' = after an interruption and a restart (fresh process state: new env, new model
    init), the final weights, optimiser state, iteration and frame counts equal those of a run
    that was never interrupted, bit for bit (CPU)."""
    # B = 2 rows x 16 decisions: every iteration holds one whole episode per row
    cfg = PPOConfig(frames_per_batch=32, total_frames=128, minibatch_size=16, epochs=2, ckpt_every=1,
                    eval_every=0, seed=3)

    def run(run_dir, init_seed, **changes):
        env = toy_env(batch_size=2, router=router, seed=init_seed)  # the env's own seed does not matter
        model = small_head(env.core, router, seed=init_seed)
        out = train_ppo(env, model, PPOConfig(**{**cfg.__dict__, **changes}), run_dir)
        return model, out

    ref_model, ref = run(tmp_path / "a", 0)
    part_model, part = run(tmp_path / "b", 0, stop_at=2)
    assert part["iterations"] == 2 and part["frames"] == 64 and not part["finished"]
    assert not all(torch.equal(a, b) for a, b in zip(part_model.state_dict().values(),
                                                     ref_model.state_dict().values()))
    res_model, res = run(tmp_path / "b", 7)  # a different init: everything comes from the checkpoint
    assert res["iterations"] == ref["iterations"] == 4 and res["frames"] == ref["frames"] == 128
    for (k, a), b in zip(ref_model.state_dict().items(), res_model.state_dict().values()):
        assert torch.equal(a, b), k
    sa = torch.load(ref["checkpoint"], weights_only=True)
    sb = torch.load(res["checkpoint"], weights_only=True)
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])
    train_metrics = {k: v for k, v in ref["metrics"].items() if k.startswith("train/")}
    assert train_metrics == {k: v for k, v in res["metrics"].items() if k.startswith("train/")}
    assert train_metrics["train/episodes"] >= 2  # whole episodes: mean_return is logged


# -- learning a problem with a known answer -------------------------------------------------------


class MarkedBlockEnv(EnvBase):
    """N = 4 blocks; one block per episode (random) carries a marker vector in `hidden` [B, N, D].
    Reward 1 when the first block of the episode's first decision is the marked one, 0 otherwise;
    router mode also charges `cost` per decision. Best plain return: 1 (random: 1/4); best router
    return: 1 - cost with budget 4 (one decision)."""

    batch_locked = True

    def __init__(self, B: int = 16, router: bool = False, cost: float = 0.25, seed: int = 0):
        super().__init__(batch_size=torch.Size([B]))
        self.N, self.D, self.router, self.cost = 4, 8, router, cost
        self.budgets = torch.tensor(BUDGETS)
        self.gen = torch.Generator().manual_seed(seed)
        self.marker = torch.randn(self.D, generator=torch.Generator().manual_seed(99))
        self.revealed = torch.zeros(B, self.N, dtype=torch.bool)
        self.target = torch.zeros(B, dtype=torch.long)
        self.decisions = torch.zeros(B, dtype=torch.long)
        N, D = self.N, self.D
        self.observation_spec = Composite(
            hidden=Unbounded(shape=(B, N, D)), block_mask=Binary(n=N, shape=(B, N), dtype=torch.bool),
            action_mask=Binary(n=N, shape=(B, N), dtype=torch.bool), shape=(B,))
        self.action_spec = (MultiCategorical(nvec=[3, N, N, N, N], shape=(B, 5), dtype=torch.long) if router
                            else Categorical(n=N, shape=(B,), dtype=torch.long))
        self.reward_spec = Unbounded(shape=(B, 1))
        self.done_spec = Composite(
            done=Categorical(n=2, shape=(B, 1), dtype=torch.bool),
            terminated=Categorical(n=2, shape=(B, 1), dtype=torch.bool),
            truncated=Categorical(n=2, shape=(B, 1), dtype=torch.bool), shape=(B,))

    def _obs(self):
        hidden = torch.zeros(*self.batch_size, self.N, self.D)
        hidden[torch.arange(self.batch_size[0]), self.target] = self.marker
        done = self.revealed.all(-1, keepdim=True)
        return TensorDict({"hidden": hidden, "block_mask": self.revealed.clone(), "action_mask": ~self.revealed,
                           "done": done, "terminated": done.clone(), "truncated": torch.zeros_like(done)},
                          batch_size=self.batch_size)

    def _reset(self, td=None, **kwargs):
        rows = torch.ones(self.batch_size[0], dtype=torch.bool)
        if td is not None and "_reset" in td.keys():
            rows = td["_reset"].reshape(-1)
        self.revealed[rows] = False
        self.decisions[rows] = 0
        self.target = torch.where(rows, torch.randint(self.N, self.batch_size, generator=self.gen), self.target)
        return self._obs()

    def _step(self, td):
        a = td["action"]
        rows = torch.arange(self.batch_size[0])
        if self.router:
            k = torch.minimum(self.budgets[a[:, 0]], (~self.revealed).sum(-1))
            blocks = a[:, 1:]
        else:
            k, blocks = torch.ones_like(a), a[:, None]
        first = blocks[:, 0]
        reward = ((self.decisions == 0) & (first == self.target)).float()
        for i in range(blocks.shape[1]):
            use = i < k
            assert not (self.revealed[rows, blocks[:, i]] & use).any(), "invalid action"
            self.revealed[rows[use], blocks[use, i]] = True
        if self.router:
            reward = reward - self.cost
        self.decisions += 1
        out = self._obs()
        out["reward"] = reward[:, None]
        return out

    def _set_seed(self, seed):
        self.gen.manual_seed(int(seed))


def marked_head(router: bool) -> OrderHead:
    torch.manual_seed(0)
    return OrderHead(OrderHeadConfig(hidden_dim=8, grid_h=4, grid_w=4, block=2, d_model=32, n_heads=4,
                                     budgets=BUDGETS if router else None))


def mean_return(env: MarkedBlockEnv, model: OrderHead, router: bool, greedy: bool = False) -> float:
    """Mean episode return over 16 decisions of every row (the reward sum over the finished
    episodes: exact when every episode in the rollout is complete, nearly so otherwise)."""
    actor, _ = make_actor_critic(model, router=router)
    mode = ExplorationType.DETERMINISTIC if greedy else ExplorationType.RANDOM
    with torch.no_grad(), set_exploration_type(mode):
        data = env.rollout(16, actor, break_when_any_done=False)
    return float(data["next", "reward"].sum() / data["next", "done"].sum())


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
@pytest.mark.parametrize("router", [False, True])
def test_ppo_learns_to_pick_the_marked_block(router, tmp_path):
    env = MarkedBlockEnv(router=router)
    model = marked_head(router)
    torch.manual_seed(1)
    before = mean_return(env, model, router)
    cfg = PPOConfig(frames_per_batch=64, total_frames=64 * 40, minibatch_size=32, epochs=4, lr=2e-3,
                    entropy_coef=0.01, reward_scale=1.0, eval_every=0, ckpt_every=100)
    out = train_ppo(env, model, cfg, tmp_path)
    after = mean_return(env, model, router)
    best = 0.75 if router else 1.0  # router: the marked block first, all 4 blocks in one decision
    assert after > before + 0.4, (before, after)
    assert after > best - 0.1, (before, after, out["metrics"])
    assert mean_return(env, model, router, greedy=True) == pytest.approx(best)
    m = out["metrics"]
    if router:
        assert m["train/mean_budget"] > 3.5
    else:  # the only reward is at the first decision: discounting changes nothing
        assert m["train/mean_discounted_return"] == pytest.approx(m["train/mean_return"])


def test_target_kl_and_lr_annealing(tmp_path):
    env = MarkedBlockEnv()
    cfg = PPOConfig(frames_per_batch=64, total_frames=128, minibatch_size=32, epochs=4, lr=1e-3, anneal_lr=True,
                    target_kl=1e-12, eval_every=0)
    out = train_ppo(env, marked_head(False), cfg, tmp_path)
    assert out["metrics"]["train/epochs"] == 1.0  # any update exceeds a 1e-12 KL
    assert out["metrics"]["train/lr"] == pytest.approx(1e-3 * (1 - 1 / 2))


def test_discounted_episode_returns():
    reward = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    done = torch.tensor([[False, True, False, False, True], [False, False, False, False, False]])
    step = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    got = discounted_episode_returns(reward, step, done, 0.5)
    assert torch.allclose(got, torch.tensor([1 + 0.5 * 2, 4 + 0.5 * 8 + 0.25 * 16]))
    # the project's one discounting rule, episode by episode
    from orderplan.env.rewards import discounted_return
    want = [discounted_return(reward[:1, a:b], 0.5, step[:1, a:b]) for a, b in ((0, 2), (2, 5))]
    assert torch.allclose(got.double(), torch.cat(want))


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_ppo_improves_on_the_key_block_toy(tmp_path):
    """On the key-block toy (one block per class determines the image) PPO from a random planner
    raises the discounted future-loss return: it learns to reveal the class's key block early."""
    from orderplan.planner.orderhead import OrderHead, orderhead_config_for
    from orderplan.planner.policies import OrderHeadPolicy, run_episodes
    from tests.support.keyblock_toy import make_toy_core
    from orderplan.env.torchrl_env import OrderPlanningEnv

    torch.manual_seed(0)
    core = make_toy_core(batch_size=8, num_images=32, seed=0)
    model = OrderHead(orderhead_config_for(core.D, core.geom, d_model=64, n_heads=4, R=0,
                                           num_classes=core.gpt.cfg.num_classes))
    images = torch.arange(8)

    def score() -> float:
        return float(run_episodes(OrderHeadPolicy(model.eval(), greedy=False, seed=1), core, images,
                                  gamma=0.5)["discounted_return"].mean())

    before = score()
    cfg = PPOConfig(frames_per_batch=128, total_frames=128 * 40, minibatch_size=64, epochs=4, lr=1e-3,
                    gamma=0.5, entropy_coef=0.0, eval_every=0, ckpt_every=100)
    train_ppo(OrderPlanningEnv(core), model, cfg, tmp_path / "run")
    after = score()
    assert after > before + 10.0, (before, after)  # oracle (key block first) ~133, random ~44


# -- semi-MDP router (env.gamma): GAE with gamma^k per decision -----------------------------------


def naive_gae(reward, value, next_value, done, terminated, gamma_t, lmbda):
    """A_t = delta_t + gamma_t lambda (1 - done_t) A_t+1, delta_t = r_t + gamma_t (1 - term_t) V(s_t+1)
    - V(s_t), by a Python loop over [B, T] tensors."""
    B, T = reward.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        nxt = 0.0
        for t in reversed(range(T)):
            g = float(gamma_t[b, t])
            delta = float(reward[b, t]) + g * (1 - float(terminated[b, t])) * float(next_value[b, t]) - float(value[b, t])
            nxt = delta + g * lmbda * (1 - float(done[b, t])) * nxt
            adv[b, t] = nxt
    return adv


def test_smdp_gae_matches_naive_per_step_discount():
    from orderplan.train.ppo import make_gae

    g = torch.Generator().manual_seed(0)
    B, T = 3, 9
    reward, value, next_value = (torch.randn(B, T, generator=g) for _ in range(3))
    k = torch.tensor(BUDGETS)[torch.randint(3, (B, T), generator=g)]
    done = torch.zeros(B, T, dtype=torch.bool)
    done[0, 3] = done[1, 6] = done[2, 8] = True  # episode ends inside the rollout (the next value is 0-weighted)
    truncated = torch.zeros(B, T, dtype=torch.bool)
    truncated[1, 8] = True  # a cut episode: done, not terminated (bootstrapped from V, the lambda chain stops)
    terminated = done.clone()
    done = done | truncated
    cfg = PPOConfig(gamma=0.9, gae_lambda=0.8)
    td = TensorDict({"state_value": value[..., None],
                     "next": {"state_value": next_value[..., None], "reward": reward[..., None],
                              "done": done[..., None], "terminated": terminated[..., None],
                              "decision_blocks": k[..., None]}}, batch_size=[B, T])
    out = make_gae(None, cfg, smdp=True)(td.clone())
    ref = naive_gae(reward, value, next_value, done, terminated, 0.9 ** k.double(), 0.8)
    torch.testing.assert_close(out["advantage"][..., 0].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["value_target"][..., 0].double(), ref + value.double(), atol=1e-5, rtol=1e-5)
    # without smdp the same data is discounted by gamma per decision
    plain = make_gae(None, cfg)(td.clone())
    ref_plain = naive_gae(reward, value, next_value, done, terminated, torch.full((B, T), 0.9), 0.8)
    torch.testing.assert_close(plain["advantage"][..., 0].double(), ref_plain, atol=1e-5, rtol=1e-5)
    assert (ref - ref_plain).abs().max() > 0.1


def test_ppo_smdp_router_on_the_key_block_toy(tmp_path):
    """The router in semi-MDP mode (env.gamma = ppo.gamma) trains on the key-block toy with finite
    losses; a different env.gamma fails clearly."""
    from orderplan.planner.orderhead import orderhead_config_for
    from tests.support.keyblock_toy import make_toy_core

    torch.manual_seed(0)
    core = make_toy_core(batch_size=4, num_images=16, seed=0, budget=BUDGETS, decision_cost=0.5, gamma=0.5)
    model = OrderHead(orderhead_config_for(core.D, core.geom, d_model=32, n_heads=4, R=0, budgets=BUDGETS,
                                           num_classes=core.gpt.cfg.num_classes))
    cfg = PPOConfig(frames_per_batch=4 * core.N, total_frames=2 * 4 * core.N, minibatch_size=core.N, epochs=2,
                    gamma=0.5, eval_every=0, ckpt_every=100)
    out = train_ppo(OrderPlanningEnv(core), model, cfg, tmp_path / "run")
    m = out["metrics"]
    for key in ("train/loss_objective", "train/loss_critic", "train/entropy", "train/mean_discounted_return",
                "train/mean_budget"):
        assert key in m and math.isfinite(m[key]), key
    assert m["train/mean_decisions"] < core.N  # some decisions revealed several blocks
    with pytest.raises(ValueError, match="env.gamma"):
        train_ppo(OrderPlanningEnv(core), model, PPOConfig(**{**cfg.__dict__, "gamma": 0.9}), tmp_path / "other")


def test_router_runs_discount_per_block():
    """scripts/ppo.py: router runs get env.gamma = ppo.gamma; a conflicting env.gamma fails."""
    from orderplan.train.ppo_run import PPORun, smdp_gamma

    run = PPORun()
    assert smdp_gamma(run) is None  # plain: unchanged
    run.agent.router = True
    assert smdp_gamma(run) == run.ppo.gamma
    run.env.gamma = run.ppo.gamma
    assert smdp_gamma(run) == run.ppo.gamma
    run.env.gamma = 0.5
    with pytest.raises(ValueError, match="env.gamma"):
        smdp_gamma(run)


def test_smdp_env_gamma_is_the_one_check_of_the_two_gammas():
    """ppo.gamma is the source of truth: env.gamma None takes it, an equal one passes, another fails
    naming both keys (the same function serves scripts/ppo.py and train_ppo)."""
    from orderplan.train.ppo import smdp_env_gamma

    assert smdp_env_gamma(None, 0.9) == 0.9 and smdp_env_gamma(0.9, 0.9) == 0.9
    with pytest.raises(ValueError, match=r"env.gamma=0.5 .* ppo.gamma=0.9"):
        smdp_env_gamma(0.5, 0.9)


# -- the router summary of scripts/ppo.py ---------------------------------------------------------


def test_router_summary_counts_the_budgets_chosen_not_blocks_per_decision():
    """Regression: mean_budget was N / decisions, which counts an episode's last decision at
    its clipped size. Budgets [1, 3] on N = 16 blocks and a policy that always asks 3: five decisions
    reveal 3 blocks, the sixth is clipped to the 1 block left, so N / decisions = 16 / 6 while every
    chosen budget is 3."""
    from orderplan.eval.report import policy_returns
    from orderplan.planner.policies import FixedOrderPolicy
    from orderplan.train.ppo_run import budget_summary, chosen_budgets

    core = toy_core(batch_size=2, budget=[1, 3])
    policy = FixedOrderPolicy("raster", core.geom, [1, 3], budget=3)
    images = torch.arange(3)  # two chunks of 2 rows, the second padded: its padding row is not counted
    chosen = chosen_budgets(core, policy, images)
    assert chosen.tolist() == [3] * (3 * 6)
    decisions = policy_returns(policy, core, images, gamma=0.9)["decisions"]  # what the report says
    assert decisions == 6.0 and core.N / decisions == pytest.approx(16 / 6)
    assert budget_summary(chosen, [1, 3]) == {"mean_budget": 3.0, "budget_histogram": {"1": 0, "3": 18}}


def test_resume_refuses_a_different_batch_size(tmp_path):
    env = toy_env(batch_size=2)
    cfg = PPOConfig(frames_per_batch=32, total_frames=64, minibatch_size=16, epochs=1, eval_every=0, stop_at=1)
    train_ppo(env, small_head(env.core), cfg, tmp_path)
    with pytest.raises(ValueError, match=r"frames_per_batch: saved 32 vs now 64"):
        train_ppo(env, small_head(env.core), PPOConfig(frames_per_batch=64, total_frames=128, minibatch_size=16),
                  tmp_path)
