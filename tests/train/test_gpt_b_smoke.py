"""The GPT-B smoke chain end to end (`scripts/smoke_gpt_b.py`, src/orderplan/train/smoke.py): synthetic codes
-> build_oracle -> bc -> ppo -> evaluate, the real scripts at GPT-B geometry on random weights, with
what each stage leaves on disk checked. A few minutes on 2 cores: slow set."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from orderplan.planner.orderhead import load_orderhead
from orderplan.train.oracle_data import OracleDataset
from orderplan.train.smoke import STAGES, SmokeConfig, stage_commands
from orderplan.infra.checkpoint import load_safetensors
from orderplan.config.common import compose, to_typed
from orderplan.model.loading import random_weights_tag
from orderplan.env.factory import EnvRun

REPO = Path(__file__).resolve().parents[2]
N_BLOCKS, GRID, VOCAB, WIDTH = 16, 16, 16384, 768  # GPT-B geometry: 4x4 blocks of the 16x16 VQ-16 grid


def _finite_weights(path: Path) -> None:
    state, _ = load_safetensors(path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    assert not bad, f"{path}: non-finite {bad}"


def test_stage_commands_share_one_root_and_backbone(tmp_path):
    """Every stage writes under the root, and every stage after the codes runs the same backbone."""
    cmds = stage_commands(SmokeConfig(root=str(tmp_path), n_layer=3, seed=5))
    assert list(cmds) == list(STAGES)
    for name, argv in cmds.items():
        assert argv[:3] == ["-m", "orderplan", name]  # the installed package's job, from any directory
        outs = [a for a in argv if a.split("=")[0] in ("out_dir", "run_dir")]
        assert len(outs) == 1 and outs[0].split("=", 1)[1].startswith(str(tmp_path.resolve())), (name, outs)
        if name != "extract_codes":
            for want in ("backbone=llamagen_b_random", "+backbone.gpt.overrides.n_layer=3",
                         "backbone.random_weights=5", f"backbone.data.codes_dir={tmp_path.resolve() / 'codes'}"):
                assert want in argv, (name, want)


@pytest.mark.slow  # about 4-6 min on 2 shared cores
def test_gpt_b_smoke_chain(tmp_path):
    root = tmp_path / "smoke"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke_gpt_b.py"), "--root", str(root)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check_smoke_outputs(root)


def check_smoke_outputs(root: Path) -> None:
    """What every stage of a finished chain under `root` must have left."""
    summary = json.loads((root / "smoke_summary.json").read_text())
    assert set(summary["stages"]) == set(STAGES) and all(s["seconds"] > 0 for s in summary["stages"].values())
    cfg = SmokeConfig(**summary["config"])

    # codes: extract_codes' format, GPT-B grid and vocab
    for split in ("train", "heldout"):
        meta = json.loads((root / "codes" / f"{split}_meta.json").read_text())
        codes = np.load(root / "codes" / f"{split}_codes.npy")
        assert meta["source"] == "synthetic" and meta["vocab_size"] == VOCAB and list(codes.shape[1:]) == [GRID, GRID]
        assert codes.dtype == np.uint16 and int(codes.max()) < VOCAB

    # the oracle set: 16 blocks, -inf exactly on revealed blocks, finite utilities elsewhere, the random tag
    backbone = to_typed(compose("make_env", ["backbone=llamagen_b_random",
                                             f"+backbone.gpt.overrides.n_layer={cfg.n_layer}",
                                             f"backbone.random_weights={cfg.seed}"]), EnvRun).backbone
    ds = OracleDataset(root / "oracle")
    assert ds.manifest["identity"]["num_blocks"] == N_BLOCKS
    assert ds.manifest["identity"]["gpt_random_weights"] == random_weights_tag(backbone)
    assert len(ds) == cfg.oracle_images * cfg.states_per_image and ds.utilities.shape == (len(ds), N_BLOCKS)
    revealed = torch.zeros(len(ds), N_BLOCKS, dtype=torch.bool)
    for i in range(len(ds)):
        revealed[i, ds.prefix[i, :ds.length[i]]] = True
    assert bool(torch.isfinite(ds.utilities[~revealed]).all()) and bool((ds.utilities[revealed] == -math.inf).all())
    # non-degenerate weights: LlamaGen's zero output layer would give every block the same utility
    spread = [float(u[torch.isfinite(u)].std()) for u in ds.utilities if int(torch.isfinite(u).sum()) > 1]
    assert spread and min(spread) > 1e-3, spread

    # BC and PPO: finite weights made for this backbone, finite held-out returns
    for stage in ("bc", "ppo"):
        path = root / stage / "orderhead.safetensors"
        _finite_weights(path)
        head = load_orderhead(path, backbone=backbone)
        assert (head.cfg.hidden_dim, head.cfg.num_blocks) == (WIDTH, N_BLOCKS)
        assert head.cfg.backbone_weights == random_weights_tag(backbone)
        rep = json.loads((root / stage / "summary.json").read_text())
        assert set(rep["returns"]) == {"raster", "random", "learned"}
        assert all(math.isfinite(v) for v in rep["returns"].values()) and math.isfinite(rep["regret"])
        with pytest.raises(ValueError, match="random weights"):  # another seed: the planner is refused
            load_orderhead(path, backbone=replace(backbone, random_weights=cfg.seed + 1))

    # evaluate: teacher-forced rows of every policy, finite; no generation
    res = json.loads((root / "evaluate" / "results.json").read_text())
    assert res["num_samples"] == 0 and res["num_images_teacher_forced"] == cfg.eval_images
    assert set(res["policies"]) == {"raster", "random", "oracle", "bc", "ppo"}
    for name, row in res["policies"].items():
        for key in ("return", "order_nll_bits", "auc_remaining_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["decisions_per_episode"] == N_BLOCKS
    # the remaining-loss curves: N + 1 points, from L_rest(empty) / L (the same images: the same value for
    # every order; near ln(vocab) nats/token for small random weights) down to 0 once all is revealed
    curves = res["remaining_curves"]
    assert all(len(c) == N_BLOCKS + 1 and c[-1] == 0.0 for c in curves.values())
    start = [c[0] for c in curves.values()]
    assert max(start) - min(start) < 1e-4 and abs(start[0] - math.log(VOCAB)) < 0.5
    assert (root / "evaluate" / "results.md").is_file() and (root / "evaluate" / "remaining_loss.png").is_file()
