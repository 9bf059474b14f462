"""The oracle data set (src/orderplan/train/oracle_data.py): collected records are valid states whose stored
utilities are the core's oracle at the replayed state; replay reproduces stepped observations;
the sharded build resumes after a crash with no lost or duplicated state, refuses a mismatched
directory, splits images across ranks exactly once, and runs under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import orderplan.train.oracle_data as od
from orderplan.train.oracle_data import (
    BuildOracleRun,
    OracleDataset,
    build_shards,
    collect_states,
    oracle_identity,
    replay_states,
    write_manifest,
)
from tests.support.keyblock_toy import make_toy_core
from orderplan.config.common import compose, to_typed
from tests.conftest import toy_core

REPO = Path(__file__).resolve().parents[2]


def _identity(**kw) -> dict:
    args = dict(kind="future_loss", behaviour="random", split="train", backbone="toy", data="toy:0", num_blocks=16,
                states_per_image=None, seed=0)
    args.update(kw)
    return oracle_identity(**args)


def _sorted(ds: OracleDataset) -> dict[str, torch.Tensor]:
    key = ds.image_index * 100 + ds.length
    order = key.argsort()
    assert key.unique().numel() == key.numel()  # one record per (image, step)
    return {"image_index": ds.image_index[order], "prefix": ds.prefix[order], "length": ds.length[order],
            "utilities": ds.utilities[order]}


# ----------------------------------------------------------------------------------------------
# Collecting and replaying
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: make_toy_core(batch_size=4, num_images=12),
                                  lambda: toy_core(batch_size=3, n_images=8)], ids=["toy", "gpt"])
def test_records_are_valid_and_hold_the_oracle_of_the_replayed_state(make):
    core = make()
    images = torch.tensor([5, 0, 7, 3, 6])  # not a multiple of B: the last batch is padded
    rec = collect_states(core, "random", images, kind="future_loss", states_per_image=3,
                         generator=torch.Generator().manual_seed(0))
    S, N = len(rec["image_index"]), core.N
    assert S == 3 * len(images) and sorted(rec["image_index"].tolist()) == sorted(images.tolist() * 3)
    for b in range(S):
        n, p = int(rec["length"][b]), rec["prefix"][b]
        assert 0 <= n < N and bool((p[n:] == -1).all()) and len(set(p[:n].tolist())) == n
        assert bool(((p[:n] >= 0) & (p[:n] < N)).all())
        assert torch.equal(torch.isinf(rec["utilities"][b]), torch.zeros(N, dtype=torch.bool).index_fill_(0, p[:n], True))
    for i0 in range(0, S, core.B):  # the stored utilities are the oracle at the replayed state
        sl = slice(i0, i0 + core.B)
        n = len(rec["image_index"][sl])
        replay_states(core, rec["image_index"][sl], rec["prefix"][sl], rec["length"][sl])
        util = core.oracle_utilities("future_loss")[:n]
        # float32 sums of ~64 losses computed in batches of another shape: ~1e-4 nats of noise
        torch.testing.assert_close(util, rec["utilities"][sl], atol=1e-3, rtol=0)


def test_replay_reproduces_the_directly_stepped_observation():
    core = toy_core(batch_size=3, n_images=8)
    images = torch.tensor([4, 1, 6])
    core.reset(image_index=images)
    g = torch.Generator().manual_seed(2)
    snaps = [core.observation()]
    while not bool(core.done.all()):
        core.step(torch.rand(3, core.N, generator=g).masked_fill(core.revealed, -1).argmax(-1))
        snaps.append(core.observation())
    history = core.history.clone()
    length = torch.tensor([0, 5, 16])  # different lengths in one batch, empty and full included
    prefix = torch.where(torch.arange(core.N) < length[:, None], history, -1)
    got = replay_states(core, images, prefix, length)
    for b, n in enumerate(length.tolist()):
        want = snaps[n]
        for k in ("block_mask", "action_mask", "label", "step", "image_index"):
            assert torch.equal(got[k][b], want[k][b]), k
        torch.testing.assert_close(got["hidden"][b], want["hidden"][b], atol=1e-5, rtol=1e-5)
    # fewer rows than the batch
    two = replay_states(core, images[1:], prefix[1:], length[1:])
    assert two["hidden"].shape[0] == 2 and torch.equal(two["step"], length[1:])


def test_oracle_and_callable_behaviours():
    core = make_toy_core(batch_size=4, num_images=8)
    rec = collect_states(core, "oracle", torch.arange(4))
    assert len(rec["length"]) == 4 * core.N
    # records come batch by step: the next state's newest block is the argmax of this state's utilities
    for t in range(core.N - 1):
        now, nxt = slice(4 * t, 4 * t + 4), slice(4 * t + 4, 4 * t + 8)
        assert torch.equal(rec["prefix"][nxt][:, t], rec["utilities"][now].argmax(-1))
    key = make_toy_core(batch_size=4, num_images=8).gpt.key_block[torch.arange(4) % 4]
    assert torch.equal(rec["prefix"][-4:, 0], key)  # the oracle reveals the key block first

    def raster(obs):
        return obs["action_mask"].float().argmax(-1)

    rec = collect_states(core, raster, torch.arange(4))
    full = rec["prefix"][rec["length"] == core.N - 1]
    assert torch.equal(full[:, : core.N - 1], torch.arange(core.N - 1).expand(4, -1))


def test_misuse_is_refused():
    core = make_toy_core(batch_size=2, num_images=4, budget=[1, 2])
    with pytest.raises(ValueError, match="budget"):
        collect_states(core, "random", torch.arange(2))
    core = make_toy_core(batch_size=2, num_images=4)
    with pytest.raises(ValueError, match="behaviour"):
        collect_states(core, "greedy", torch.arange(2))
    with pytest.raises(ValueError, match="states_per_image"):
        collect_states(core, "random", torch.arange(2), states_per_image=0)


# ----------------------------------------------------------------------------------------------
# The sharded, resumable build
# ----------------------------------------------------------------------------------------------


def _build(out: Path, images=torch.arange(10), **kw) -> OracleDataset:
    core = make_toy_core(batch_size=2, num_images=12)
    ident = _identity(states_per_image=kw.get("states_per_image"))
    build_shards(core, out, images, ident, chunk_images=3, show_progress=False, **kw)
    write_manifest(out, images, ident)
    return OracleDataset(out)


@pytest.mark.parametrize("crash", ["after_shard", "while_collecting"])
def test_interrupted_build_resumes_without_lost_or_duplicated_states(tmp_path, monkeypatch, crash):
    straight = _build(tmp_path / "straight", states_per_image=5)
    assert straight.manifest["counts"] == {"images": 10, "states": 50, "shards": 4}

    out, calls = tmp_path / "resumed", {"n": 0}
    k = 2  # crash after 2 complete chunks
    real_progress, real_collect = od._write_progress, od.collect_states

    def flaky_progress(path, prog):  # dies between writing shard k + 1 and recording it
        if calls["n"] == k:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        real_progress(path, prog)

    def flaky_collect(*a, **kw):  # dies in the middle of chunk k + 1
        if calls["n"] == k:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        return real_collect(*a, **kw)

    monkeypatch.setattr(od, "_write_progress" if crash == "after_shard" else "collect_states",
                        flaky_progress if crash == "after_shard" else flaky_collect)
    with pytest.raises(KeyboardInterrupt):
        _build(out, states_per_image=5)
    monkeypatch.undo()
    prog = json.loads((out / "progress_000.json").read_text())
    assert len(prog["chunks"]) == k and not (out / "manifest.json").exists()
    if crash == "after_shard":
        assert (out / "shard_000_00002.pt").exists()  # the orphan, not in progress
    with pytest.raises(FileNotFoundError, match="unfinished"):
        OracleDataset(out)
    resumed = _build(out, states_per_image=5)
    assert resumed.manifest["counts"] == straight.manifest["counts"]
    a, b = _sorted(resumed), _sorted(straight)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in out.glob("shard_*.pt")) == sorted(resumed.manifest["shards"])
    again = _build(out, states_per_image=5)  # a finished build is a no-op
    assert len(again) == 50


def test_a_mismatched_directory_is_refused(tmp_path):
    out = tmp_path / "oracle"
    _build(out, states_per_image=2)
    core = make_toy_core(batch_size=2, num_images=12)
    for change in ({"kind": "extrapolative", "weight": "uniform"}, {"backbone": "tiny_mnist"}, {"data": "other"}):
        with pytest.raises(ValueError, match="different setup") as e:
            build_shards(core, out, torch.arange(10), _identity(states_per_image=2, **change), show_progress=False)
        assert next(iter(change)) in str(e.value)


def test_ranks_cover_every_image_exactly_once_even_when_the_world_changes(tmp_path):
    out = tmp_path / "ranks"
    images = torch.arange(0, 22, 2)  # 11 images
    core = make_toy_core(batch_size=2, num_images=24)
    ident = _identity(states_per_image=1)
    kw = dict(states_per_image=1, chunk_images=2, show_progress=False)
    build_shards(core, out, images, ident, rank=1, world=2, **kw)  # rank 1 of 2 finishes, rank 0 dies
    with pytest.raises(RuntimeError, match="never"):
        write_manifest(out, images, ident)
    build_shards(core, out, images, ident, rank=0, world=1, **kw)  # resumed by a single process
    m = write_manifest(out, images, ident)
    assert m["counts"]["images"] == 11 and m["counts"]["states"] == 11
    ds = OracleDataset(out)
    assert sorted(ds.image_index.tolist()) == images.tolist()
    assert {p.name[:9] for p in out.glob("shard_*.pt")} == {"shard_000", "shard_001"}


def test_config_schema_rejects_unknown_keys():
    run = to_typed(compose("build_oracle", ["num_images=8", "split=heldout"]), BuildOracleRun)
    assert run.num_images == 8 and run.env.split == "heldout" and run.out_dir == "runs/oracle/tiny_mnist"
    with pytest.raises(Exception, match="num_image"):
        to_typed(compose("build_oracle", ["+num_image=8"]), BuildOracleRun)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_torchrun_two_processes_cover_every_image_once(toy_codes, tmp_path):
    from orderplan.model.loading import save_gpt
    from tests.conftest import randomized_gpt

    weights = tmp_path / "gpt.safetensors"
    save_gpt(randomized_gpt(), weights)  # a random 2-layer tiny GPT: no trained artifacts needed
    out = tmp_path / "oracle"
    args = [f"out_dir={out}", "num_images=7", "batch_size=2", "chunk_images=2", "states_per_image=2",
            "backbone.data.kind=codes", f"backbone.data.codes_dir={toy_codes}", "backbone.vq_weights=null",
            f"backbone.gpt_weights={weights}", "+backbone.gpt.overrides.n_layer=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "scripts" / "build_oracle.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["counts"] == {"images": 7, "states": 14, "shards": 4}
    ds = OracleDataset(out)
    images = sorted(set(ds.image_index.tolist()))
    assert len(images) == 7 and sorted(ds.image_index.tolist()) == sorted(images * 2)
    per_rank = {r: {i for c in json.loads((out / f"progress_{r:03d}.json").read_text())["chunks"] for i in c["images"]}
                for r in (0, 1)}
    assert len(per_rank[0]) == 4 and len(per_rank[1]) == 3 and not per_rank[0] & per_rank[1]
    assert ds.manifest["kind"] == "future_loss" and ds.manifest["data"].startswith("codes:")
