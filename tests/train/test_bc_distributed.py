"""BC under torchrun: W processes take strided shares of one global minibatch and DDP
averages the head's gradients, weighted so that the averaged gradient is the one-process gradient of
the whole minibatch. So 2 gloo processes end where 1 process ends (up to float summation order),
both ranks hold the same weights, only rank 0 writes, and 1 process under the launcher is a plain run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orderplan.eval.report import EvalSpec
from orderplan.planner.orderhead import OrderHead, load_orderhead, orderhead_config_for
from orderplan.train.bc import BCData, BCRun, _sharded_step, bc_loss, check_bc_world, train_bc
from orderplan.model.blocks import BlockGeometry
from orderplan.infra.checkpoint import load_safetensors
from orderplan.infra.distributed import DistContext, gather_rows
from tests.support.dist_bc import bc_rank, gather_rows_rank, state_digest
from tests.support.dist_launch import launch
from orderplan.infra.paths import PACKAGE_ROOT

REPO = Path(__file__).resolve().parents[2]
# 2 processes vs 1: the same arithmetic with the minibatch gradient summed in two halves (and the
# features replayed in other batches). The final policies' log-probabilities (nats) agree to 5e-7 in
# the measured run, 6 AdamW steps; the bound leaves 20x for other float summation orders.
POLICY_ATOL = 1e-5


def test_gather_rows_one_process_checks_the_partition():
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    x = torch.randn(5, 2)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(gather_rows(x[perm], perm, 5, ctx), x)
    with pytest.raises(ValueError, match="cover"):
        gather_rows(x[:4], torch.tensor([0, 1, 1, 2]), 5, ctx)


def test_gather_rows_two_processes_uneven_shares():
    assert launch(gather_rows_rank, 2, 7) == [[True, 3], [True, 4]]


def test_shard_weighting_reproduces_the_minibatch_gradient():
    """The invariant the sharded step rests on: rank r's `_sharded_step` on its rows r::W of the
    global minibatch leaves gradients whose mean over the W ranks (what DDP reduces) is the gradient
    of the whole minibatch's mean loss, with uneven shares (7 rows = 4 + 3)."""
    geom = BlockGeometry(4, 4, 2)
    torch.manual_seed(0)
    model = OrderHead(orderhead_config_for(8, geom, d_model=16, n_heads=2, num_classes=3))
    S, N, B, W = 20, geom.num_blocks, 7, 2
    mask = torch.rand(S, N) < 0.3
    data = BCData(torch.randn(S, N, 8), mask, torch.randn(S, N).masked_fill(mask, float("-inf")),
                  torch.randint(0, 3, (S,)), torch.arange(S), torch.zeros(S, N, dtype=torch.long),
                  torch.zeros(S, dtype=torch.long))
    run = BCRun()
    run = replace(run, bc=replace(run.bc, batch_size=B, grad_clip=1e9))  # no clipping: compare raw gradients
    idx = torch.randint(S, (B,), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights and the gradients

    def grads():
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    loss, _ = bc_loss(model, data.hidden[idx], data.mask[idx], data.util[idx], R=1, label=data.labels[idx])
    model.zero_grad(set_to_none=True)
    loss.backward()
    whole = grads()
    parts, shares = [], []
    for r in range(W):
        ctx = DistContext(rank=r, world=W, local_rank=r, device=torch.device("cpu"))
        out = _sharded_step(run, idx, 1, data, model, opt, torch.device("cpu"), ctx)
        parts.append(grads())
        shares.append(float(out.loss))
    assert abs(sum(shares) - float(loss.detach())) < 1e-5  # the shares of the loss add up to the minibatch mean
    for g, *gs in zip(whole, *parts):
        if g is None:  # unused by the loss (value head): unused on every rank, left None as in one process
            assert all(x is None for x in gs)
        else:
            torch.testing.assert_close(sum(gs) / W, g, atol=1e-6, rtol=1e-5)


def test_world_limits_are_refused():
    run = BCRun()
    check_bc_world(replace(run, bc=replace(run.bc, batch_size=2)), 2)
    with pytest.raises(ValueError, match="bc.batch_size"):
        check_bc_world(replace(run, bc=replace(run.bc, batch_size=1)), 2)
    with pytest.raises(ValueError, match="bc.joint.top_n"):
        check_bc_world(replace(run, bc=replace(run.bc, joint=replace(run.bc.joint, top_n=1))), 2)


# ----------------------------------------------------------------------------------------------
# End to end on the embedded default (tiny budgets)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BC run of the embedded default: 4 oracle images x 4 states (built once here), a 7-state
    minibatch (uneven shares 4 + 3 over 2 ranks), R in [0, 1] (the reasoning core unused at R = 0),
    one DAgger round (collected on rank 0, broadcast), checkpoints. Dropout 0: each rank draws its own
    dropout masks, so only without dropout does W not change the arithmetic."""
    root = tmp_path_factory.mktemp("bc_dist")
    base = BCRun()
    backbone = replace(base.backbone, gpt_weights=str(PACKAGE_ROOT / base.backbone.gpt_weights),
                       vq_weights=str(PACKAGE_ROOT / base.backbone.vq_weights))
    run = replace(base, backbone=backbone, run_dir=str(root / "one"),
                  oracle=replace(base.oracle, out_dir=str(root / "oracle"), num_images=4, states_per_image=4),
                  agent=replace(base.agent, d_model=32, dropout=0.0), env=replace(base.env, beliefs=False),
                  bc=replace(base.bc, steps=6, batch_size=7, log_every=2, ckpt_every=3, R_schedule=[0, 1],
                             replay_batch=4, dagger_rounds=1, dagger_images=1),
                  eval=EvalSpec(num_images=4, batch_size=4, baselines=["raster"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks: float reductions split by thread count differ in the last bit
    try:
        plain = train_bc(run)
    finally:
        torch.set_num_threads(threads)
    return root, run, plain


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_safetensors(Path(run_dir) / "orderhead.safetensors")[0]


def _files(run_dir) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*") if p.is_file()}


@pytest.mark.slow  # 1 + 2 processes of BC on the embedded default (~60 s on 2 cores)
@pytest.mark.skipif(not (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists(), reason="needs the embedded default")
def test_two_processes_reproduce_one(tiny):
    root, run, plain = tiny
    two_dir = root / "two"
    r0, r1 = launch(bc_rank, 2, replace(run, run_dir=str(two_dir)))
    # DDP: the same averaged gradient and optimizer on both ranks -> bit-identical heads, the saved one
    saved, one = _weights(two_dir), _weights(run.run_dir)
    assert r0["weights_sha256"] == r1["weights_sha256"] == state_digest(saved)
    # the learned policy is the one-process policy: log-probabilities over the unrevealed blocks agree
    a, b = load_orderhead(Path(run.run_dir) / "orderhead.safetensors"), load_orderhead(two_dir / "orderhead.safetensors")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, a.cfg.num_blocks, a.cfg.hidden_dim, generator=g)
    m, label = torch.rand(32, a.cfg.num_blocks, generator=g) < 0.4, torch.randint(0, a.cfg.num_classes, (32,), generator=g)
    with torch.no_grad():
        for R in (0, 1):
            la, lb = (torch.log_softmax(x.plan(h, m, R=R, label=label).logits, -1)[~m] for x in (a, b))
            assert float((la - lb).abs().max()) < POLICY_ATOL, R
    # raw weights: AdamW turns the float-noise gradient of directions the loss is invariant to (the
    # score's output bias, attention key biases: softmax shifts) into steps of up to ~lr each
    bound = 2 * run.bc.lr * run.bc.steps
    assert max(float((saved[k] - one[k]).abs().max()) for k in one) < bound
    two = r0["result"]
    assert two["world_size"] == 2 and two["train_states"] == plain["train_states"]
    assert [h["step"] for h in two["history"]] == [h["step"] for h in plain["history"]]
    for x, y in zip(two["history"], plain["history"]):  # the loss joined from the ranks' shares
        assert abs(x["loss"] - y["loss"]) < 1e-5 and x["train_agreement"] == y["train_agreement"]
    # only rank 0 writes: rank 1 touched nothing but its console log, and the run_dir holds what a
    # one-process run writes plus that log
    assert r1["result"] == {"rank": 1, "world": 2} and r1["writes"] == []
    assert _files(two_dir) == _files(run.run_dir) | {"bc.rank1.log"}


@pytest.mark.slow  # a BC run in a spawned process (~30 s on 2 cores)
@pytest.mark.skipif(not (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists(), reason="needs the embedded default")
def test_one_process_under_the_launcher_is_a_plain_run(tiny):
    root, run, plain = tiny
    (res,) = launch(bc_rank, 1, replace(run, run_dir=str(root / "launched")))
    one, launched = _weights(run.run_dir), _weights(root / "launched")
    assert all(torch.equal(one[k], launched[k]) for k in one)
    got = res["result"]
    assert got["history"] == plain["history"] and got["returns"] == plain["returns"] and "world_size" not in got


@pytest.mark.slow  # torchrun x 2: the oracle set built in-process, then BC (~60 s on 2 cores)
@pytest.mark.skipif(not (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists(), reason="needs the embedded default")
def test_torchrun_bc_from_scratch_builds_its_oracle_set_and_trains(tmp_path):
    """`torchrun --nproc_per_node 2 ... bc` with no oracle set: BC starts the process group, the
    in-process oracle build uses it and leaves it running (one owner), and BC then trains and
    gathers across both ranks. Before, the oracle build ended BC's group and BC failed in
    `gather_rows` with "Default process group has not been initialized"."""
    import os
    import subprocess
    import sys

    small = ["oracle.num_images=4", "oracle.batch_size=2", "oracle.chunk_images=2", "bc.steps=4", "bc.batch_size=16",
             "bc.log_every=2", "bc.ckpt_every=4", "bc.replay_batch=4", "eval.num_images=2", "eval.batch_size=2",
             "eval.baselines=[raster,random]", f"run_dir={tmp_path / 'bc'}", f"oracle.out_dir={tmp_path / 'oracle'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "orderplan",
           "bc", *small]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "oracle" / "manifest.json").exists()
    summary = json.loads((tmp_path / "bc" / "summary.json").read_text())
    assert summary["world_size"] == 2 and (tmp_path / "bc" / "orderhead.safetensors").exists()
