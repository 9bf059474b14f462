"""Limited joint tuning (seed Stage 5): the top GPT blocks trained together with the OrderHead on
L = L_AR + lambda * L_OH (see `orderplan.train.bc` for the objective and what is recomputed).

`JointTuner` holds the tuned float32 copy of the GPT (the env keeps the original backbone), its
AdamW over the unfrozen parameters, and the L_AR / L_OH-feature computations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orderplan.train.features import state_features
from orderplan.config.common import BackboneConfig, BackboneTrainConfig
from orderplan.infra.paths import resolve_path
from orderplan.model.loading import build_backbone
from orderplan.data.tokens import load_token_data
from orderplan.train.backbone import ar_batch, ar_loss, heldout_nll
from orderplan.infra.validation import check_int, check_positive, check_probability, check_range


@dataclass
class JointConfig:
    """Limited joint tuning (seed Stage 5): L = L_AR + lam * L_OH on the top `top_n` GPT blocks (the `bc.joint`
    section of orderplan.train.bc.BCConfig). Off while top_n = 0; needs env.beliefs=false. The oracle labels stay
    those of the original backbone; a tuning run writes run_dir/gpt.safetensors."""

    top_n: int = 0  # top transformer blocks of the GPT trained with the OrderHead; 0 = frozen backbone (off)
    tune_output: bool = True  # with top_n > 0: also tune the GPT's final norm and output projection
    # lambda: weight of L_OH (the BC cross-entropy, nats/state) next to L_AR (nats/token) in the backbone's loss;
    # the head itself gets the gradient of L_OH only
    lam: float = 1.0
    lr: float = 1e-5  # AdamW lr of the tuned backbone parameters (the head keeps bc.lr)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # norm clip of the backbone gradient (the head's is clipped by bc.grad_clip)
    ar_batch_size: int = 32  # train images per L_AR batch (the Stage-1 loss, orderplan.train.backbone.ar_loss)
    ar_random_ratio: float = 1.0  # share of L_AR images in random block orders (else raster), as in Stage 1
    class_dropout: float = 0.1  # L_AR labels dropped to the null class (keeps CFG working), as in Stage 1
    start_step: int = 0  # the head trains alone on the frozen features before this step


def check_joint_config(cfg: JointConfig, n_layer: int, steps: int) -> None:
    """Raise ValueError naming the bc.joint key and its range (`n_layer`: the GPT's layers;
    `steps`: bc.steps)."""
    check_int("bc.joint.top_n", cfg.top_n, 0, n_layer, note=" (the GPT's layers)")
    if cfg.top_n and not 0 <= cfg.start_step < steps:
        raise ValueError(f"bc.joint.start_step must lie in [0, bc.steps={steps}), got {cfg.start_step}")
    check_int("bc.joint.start_step", cfg.start_step, 0)
    check_range("bc.joint.lam", cfg.lam, 0.0)
    check_positive("bc.joint.lr", cfg.lr)
    check_range("bc.joint.weight_decay", cfg.weight_decay, 0.0)
    check_positive("bc.joint.grad_clip", cfg.grad_clip)
    check_int("bc.joint.ar_batch_size", cfg.ar_batch_size, 1)
    check_probability("bc.joint.ar_random_ratio", cfg.ar_random_ratio)
    check_probability("bc.joint.class_dropout", cfg.class_dropout)



class JointTuner:
    """The tuned copy of the GPT (float32, eval mode; the env keeps the original backbone), its
    AdamW over the unfrozen parameters, and the L_AR / L_OH-feature computations."""

    def __init__(self, run, device: torch.device, codes: torch.Tensor, labels: torch.Tensor):
        self.cfg = jc = run.bc.joint
        self.base = resolve_path(run.backbone.gpt_weights, what="GPT weights")
        bb = build_backbone(run.backbone, device=device, with_vq=False, dtype=torch.float32)
        self.gpt, self.geom = bb.gpt, bb.geometry  # frozen, eval
        n = self.gpt.cfg.n_layer
        check_joint_config(jc, n, run.bc.steps)
        self.blocks = list(range(n - jc.top_n, n))
        prefixes = tuple(f"layers.{i}." for i in self.blocks) + (("norm.", "output.") if jc.tune_output else ())
        self.names = [k for k, _ in self.gpt.named_parameters() if k.startswith(prefixes)]
        named = dict(self.gpt.named_parameters())
        self.params = [named[k].requires_grad_(True) for k in self.names]
        self.opt = torch.optim.AdamW(self.params, lr=jc.lr, weight_decay=jc.weight_decay)
        self.codes, self.labels = codes.cpu(), labels.cpu()  # the train split (the env's image pool)
        self.device, self.seed = device, run.seed

    def features(self, image_index: torch.Tensor, label: torch.Tensor, prefix: torch.Tensor,
                 length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`state_features` of stored states on the tuned GPT (graph through the tuned blocks only)."""
        return state_features(self.gpt, self.geom, self.codes[image_index].to(self.device), label.to(self.device),
                              prefix.to(self.device), length.to(self.device))

    def ar_loss(self, step: int) -> torch.Tensor:
        """L_AR of `step`: a train batch drawn from (seed, step) only (exact resume), as in Stage 1."""
        jc = self.cfg
        x, y, orders = ar_batch(self.codes, self.labels, self.geom, jc.ar_batch_size, step, self.seed,
                                jc.ar_random_ratio, jc.class_dropout, self.gpt.cfg.null_class)
        return ar_loss(self.gpt, x.to(self.device), y.to(self.device), orders.to(self.device), True)

    def heldout_bits(self, backbone: BackboneConfig) -> dict[str, float]:
        """The backbone's held-out bits/token (raster and random block order; Stage-1 eval seed)."""
        codes, labels = load_token_data(backbone, "heldout")
        return heldout_nll(self.gpt, codes, labels, self.geom, BackboneTrainConfig().eval_seed, self.device)

    def state_dict(self) -> dict:
        return {"params": {k: p.detach().cpu().clone() for k, p in zip(self.names, self.params)},
                "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in zip(self.names, self.params):
                p.copy_(state["params"][k])
        self.opt.load_state_dict(state["optimizer"])
