"""`OrderPlanningEnv`: the MDP as a natively batched TorchRL environment (batch_size=[B], one device
for the env and the backbone). The dynamics live in `orderplan.env.core.OrderPlanningCore`.

Observation keys: hidden [B, L, D] (or [B, N, D] with env.hidden=block), block_mask [B, N] bool,
action_mask [B, N] bool, label [B], step [B], image_index [B]; generation mode adds tokens [B, L]
and image [B, C, H, W]; env.beliefs adds entropy [B, L] (H_j(S), nats) and query_hidden [B, N, D]
(block means of the unseen tokens' query rows). Action: `action` [B] (a block index, masked to unrevealed blocks), or with
the budget router [B, 1 + K] (budget index, then K ordered blocks). Reward [B, 1] in nats.
With the router in semi-MDP mode (env.gamma set, see orderplan.env.core) the step output also carries
`decision_blocks` [B, 1] long: k, the blocks revealed by the decision that led to this observation
(0 after a reset), so the discount from this decision to the next is gamma^k. It is an observation
key, so after `step_mdp` the root holds the *previous* decision's k: read the transition's k at
("next", "decision_blocks") (e.g. `GAE.set_keys(steps_to_next_obs=("next", "decision_blocks"))`).
A reset tensordict may carry `reset_image_index` [B] to choose the images (evaluation on fixed
images); it is a separate key from the `image_index` observation, so the usual
`td["_reset"] = td["done"]; env.reset(td)` loop draws new images. `rand_action` draws from
`orderplan.env.actions.random_valid_action`, the one random valid action."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, MultiCategorical, Unbounded
from torchrl.envs import EnvBase

from orderplan.env.actions import random_valid_action
from orderplan.env.core import OrderPlanningCore


class OrderPlanningEnv(EnvBase):
    """Batched TorchRL env over a frozen backbone. Partial resets use the `_reset` key."""

    batch_locked = True

    def __init__(self, core: OrderPlanningCore):
        super().__init__(batch_size=torch.Size([core.B]), device=core.device)
        self.core = core
        self._make_specs()

    # -- specs ------------------------------------------------------------------------------------

    def _make_specs(self) -> None:
        c = self.core
        B, N, L, D, dev = c.B, c.N, c.L, c.D, c.device
        hidden_shape = (B, L, D) if c.cfg.hidden == "token" else (B, N, D)
        obs = {
            "hidden": Unbounded(shape=hidden_shape, dtype=c.dtype, device=dev),
            "block_mask": Binary(n=N, shape=(B, N), dtype=torch.bool, device=dev),
            "action_mask": Binary(n=N, shape=(B, N), dtype=torch.bool, device=dev),
            "label": Categorical(n=c.gpt.cfg.num_classes, shape=(B,), dtype=torch.long, device=dev),
            "step": Bounded(low=0, high=N, shape=(B,), dtype=torch.long, device=dev),
            "image_index": Categorical(n=c.num_images, shape=(B,), dtype=torch.long, device=dev),
        }
        if c.cfg.beliefs:
            obs["entropy"] = Bounded(low=0.0, high=float("inf"), shape=(B, L), dtype=torch.float32, device=dev)
            obs["query_hidden"] = Unbounded(shape=(B, N, D), dtype=c.dtype, device=dev)
        if c.smdp:
            obs["decision_blocks"] = Bounded(low=0, high=c.K, shape=(B, 1), dtype=torch.long, device=dev)
        if c.cfg.mode == "generate":
            obs["tokens"] = Bounded(low=-1, high=c.gpt.cfg.vocab_size - 1, shape=(B, L), dtype=torch.long, device=dev)
            obs["image"] = Bounded(low=-1.0, high=1.0, shape=(B, *c.image_shape()), dtype=torch.float32, device=dev)
        self.observation_spec = Composite(obs, shape=(B,), device=dev)
        if c.router:
            nvec = [len(c.budgets)] + [N] * c.K
            self.action_spec = MultiCategorical(nvec=nvec, shape=(B, 1 + c.K), dtype=torch.long, device=dev)
        else:
            self.action_spec = Categorical(n=N, shape=(B,), dtype=torch.long, device=dev,
                                           mask=torch.ones(B, N, dtype=torch.bool, device=dev))
        self.reward_spec = Unbounded(shape=(B, 1), dtype=torch.float32, device=dev)
        self.done_spec = Composite(
            done=Categorical(n=2, shape=(B, 1), dtype=torch.bool, device=dev),
            terminated=Categorical(n=2, shape=(B, 1), dtype=torch.bool, device=dev),
            truncated=Categorical(n=2, shape=(B, 1), dtype=torch.bool, device=dev),
            shape=(B,), device=dev,
        )

    def _update_mask(self) -> None:
        if not self.core.router:
            self.action_spec.update_mask(~self.core.revealed)

    def _output(self, obs: dict[str, torch.Tensor], done: torch.Tensor) -> TensorDict:
        d = done[:, None]
        if self.core.smdp:
            obs = {**obs, "decision_blocks": self.core.decision_blocks[:, None].clone()}
        return TensorDict({**obs, "done": d.clone(), "terminated": d.clone(),
                           "truncated": torch.zeros_like(d)}, batch_size=self.batch_size, device=self.device)

    # -- EnvBase API ------------------------------------------------------------------------------

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        rows, image_index = None, None
        if tensordict is not None:
            if "_reset" in tensordict.keys():
                rows = tensordict.get("_reset").reshape(self.core.B)
            if "reset_image_index" in tensordict.keys():
                image_index = tensordict.get("reset_image_index")
        self.core.reset(rows, image_index)
        self._update_mask()
        return self._output(self.core.observation(), self.core.done)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        reward, done = self.core.step(tensordict.get("action"))
        self._update_mask()
        out = self._output(self.core.observation(), done)
        out.set("reward", reward[:, None])
        return out

    def _set_seed(self, seed: int | None) -> None:
        self.core.seed(seed)

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """A uniformly random *valid* action (unrevealed, distinct blocks; a random budget)."""
        c = self.core
        action = random_valid_action(~c.revealed, c.generator, c.cfg.budget if c.router else None)
        if tensordict is None:
            tensordict = TensorDict({}, batch_size=self.batch_size, device=self.device)
        tensordict.set("action", action)
        return tensordict

    # -- conveniences -----------------------------------------------------------------------------

    def oracle_utilities(self, kind: str = "future_loss", weight: str | None = None,
                         candidates: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] oracle utilities of every block from the current state (see OrderPlanningCore)."""
        return self.core.oracle_utilities(kind, weight, candidates)

