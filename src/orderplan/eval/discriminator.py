"""A pixel discriminator: a small CNN that tells real images (the train split) from generated ones.

Two users:
- the reward-alignment study (orderplan.eval.alignment, reward (c)) trains one once, on pooled samples
  of every order, and scores held-out samples;
- the quality planner (orderplan.train.quality, `reward.kind=discriminator`) trains one alongside the
  policy, as AdaNAT (Ni et al., ECCV 2024) does: every iteration it scores the new samples, then takes
  a few steps on the train split against a replay buffer of recent samples, so a policy that found
  what fools it is soon caught.

The reward of a sample x is the discriminator's log-odds of real, log D(x) - log(1 - D(x)) (nats; the
logit margin of its two classes, generated 0 and real 1). The network is the digit classifier's layout
(orderplan.eval.feature_net.DigitClassifier) with two classes and its own seed: it is not the FID
classifier and never reads its weights. Images are [n, 1, S, S] in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from orderplan.config.common import BackboneConfig
from orderplan.data.tokens import load_token_data
from orderplan.eval.feature_net import ClassifierConfig, DigitClassifier
from orderplan.infra.run_utils import progress
from orderplan.infra.validation import check_int, check_range

__all__ = ["DiscriminatorSpec", "PixelDiscriminator", "check_discriminator_spec", "vq_reconstructions",
           "codec_signature"]


@dataclass
class DiscriminatorSpec:
    """A pixel CNN (DigitClassifier layout, two classes: generated 0, real 1) and how it is trained."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    steps: int = 400  # Adam steps (the alignment study: in all; the quality planner: before iteration 1)
    batch_size: int = 64  # half real, half generated
    lr: float = 1e-3
    seed: int = 3  # its init and its minibatch draws


def check_discriminator_spec(spec: DiscriminatorSpec, key: str = "discriminator") -> None:
    """ValueError naming the first bad field."""
    if not spec.channels or any(not isinstance(c, int) or c < 1 for c in spec.channels):
        raise ValueError(f"{key}.channels must be a non-empty list of positive ints, got {spec.channels}")
    check_int(f"{key}.steps", spec.steps, 1)
    check_int(f"{key}.batch_size", spec.batch_size, 2)
    check_range(f"{key}.lr", spec.lr, 0.0, lo_open=True)


class PixelDiscriminator:
    """The discriminator of the module doc, with its optimiser and minibatch stream (all in
    `state_dict`, so a training job resumes it exactly)."""

    def __init__(self, spec: DiscriminatorSpec):
        check_discriminator_spec(spec)
        self.spec = spec
        with torch.random.fork_rng(devices=[]):  # its init depends on its seed only and shifts no other stream
            torch.manual_seed(spec.seed)
            self.model = DigitClassifier(ClassifierConfig(channels=list(spec.channels), num_features=32,
                                                          num_classes=2, dropout=0.0)).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr)
        self.generator = torch.Generator().manual_seed(spec.seed)

    def update(self, real: torch.Tensor, fake: torch.Tensor, steps: int, bar: bool = False) -> float:
        """`steps` Adam steps on balanced minibatches of real [M, 1, S, S] vs fake [N, 1, S, S];
        returns the mean cross-entropy (nats) over the steps."""
        if real.dim() != 4 or fake.dim() != 4 or real.shape[1:] != fake.shape[1:]:
            raise ValueError(f"real and fake must be images [n, C, H, W] of one shape, got {tuple(real.shape)} "
                             f"and {tuple(fake.shape)}")
        half = self.spec.batch_size // 2
        y = torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(half, dtype=torch.long)])
        self.model.train()
        total = 0.0
        for _ in progress(range(steps), desc="discriminator", disable=not bar):
            x = torch.cat([real[torch.randint(len(real), (half,), generator=self.generator)],
                           fake[torch.randint(len(fake), (half,), generator=self.generator)]])
            loss = F.cross_entropy(self.model(x.float()), y)
            if not torch.isfinite(loss):
                raise FloatingPointError("the discriminator's loss is not finite; lower its lr")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item()
        self.model.eval()
        return total / max(steps, 1)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """[n, 2] float64 logits (generated, real) of images [n, 1, S, S]."""
        self.model.eval()
        return torch.cat([self.model(x.float()) for x in images.split(batch)]).double()

    def log_odds(self, images: torch.Tensor) -> torch.Tensor:
        """log D(x) - log(1 - D(x)) [n] float64, nats: > 0 where the discriminator calls x real."""
        z = self.logits(images)
        return z[:, 1] - z[:, 0]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.generator.set_state(state["generator"])


@torch.no_grad()
def vq_reconstructions(bb, backbone: BackboneConfig, split: str, batch: int = 500) -> torch.Tensor:
    """A split's token grids decoded by the backbone's VQ (bb: orderplan.model.loading's backbone):
    images [N, C, H, W] in [-1, 1] (CPU), what a perfect token generator would produce. A discriminator
    trained against them judges the tokens, not the codec: raw digits and their own reconstructions
    are told apart with 98% held-out accuracy on the embedded default (docs/results.md)."""
    if bb.vq is None:
        raise ValueError("a discriminator against VQ reconstructions needs the backbone's VQ decoder; this backbone "
                         "has none (use real=images)")
    codes, _ = load_token_data(backbone, split)
    cfg = bb.gpt.cfg
    return torch.cat([bb.vq.decode_codes(c.view(-1, cfg.grid_h, cfg.grid_w).to(bb.device)).float().cpu()
                      for c in codes.split(batch)])


def codec_signature(real: torch.Tensor, recon: torch.Tensor, spec: DiscriminatorSpec) -> dict[str, float]:
    """How well a discriminator with `spec` tells real images [N, C, H, W] from their own VQ
    reconstructions [N, C, H, W] (row i of both is one image): trained on the first half, scored on the
    second. Returns the held-out balanced accuracy and the mean log-odds (nats) of each side; an accuracy
    near 1 means a discriminator against raw images can win on the codec alone."""
    if real.shape != recon.shape or len(real) < 4:
        raise ValueError(f"real and recon must be paired images of one shape (>= 4), got {tuple(real.shape)} and "
                         f"{tuple(recon.shape)}")
    h = len(real) // 2
    disc = PixelDiscriminator(spec)
    disc.update(real[:h], recon[:h], spec.steps, bar=True)
    lo_r, lo_f = disc.log_odds(real[h:]), disc.log_odds(recon[h:])
    accuracy = (float((lo_r > 0).double().mean()) + float((lo_f < 0).double().mean())) / 2
    return {"heldout_accuracy": accuracy, "log_odds_real": float(lo_r.mean()),
            "log_odds_reconstruction": float(lo_f.mean()), "num_heldout": len(real) - h}
