"""Checkpoint I/O: atomic writes, safetensors, weights_only loading, key checks, resume manager."""

from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import orderplan.infra.checkpoint as ck
from orderplan.infra.checkpoint import (
    CheckpointManager,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    extract_model_state,
    load_safetensors,
    load_state_dict_checked,
    load_torch_checkpoint,
    rng_state,
    save_safetensors,
    set_rng_state,
)


def _files(d):
    """The files of d, checksum records (orderplan.infra.integrity) left out."""
    return sorted(f for f in os.listdir(d) if not f.endswith(".sha256"))


# ---------------------------------------------------------------------------- atomic writes
def test_atomic_torch_save_roundtrip_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "dir" / "ckpt.pt"  # parents are created
    atomic_torch_save({"w": torch.arange(5), "step": 3}, path)
    assert _files(path.parent) == ["ckpt.pt"]
    got = load_torch_checkpoint(path)
    assert got["step"] == 3 and torch.equal(got["w"], torch.arange(5))


def test_crash_mid_torch_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"v": torch.tensor([1.0])}, path)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # something partial really hits the disk
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck.torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"v": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert _files(tmp_path) == ["ckpt.pt"]  # temp file removed
    assert load_torch_checkpoint(path)["v"].item() == 1.0


def test_crash_before_rename_keeps_previous_bytes(tmp_path, monkeypatch):
    path = tmp_path / "blob.bin"
    atomic_write_bytes(path, b"old")

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_bytes(path, b"new contents")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and _files(tmp_path) == ["blob.bin"]


def test_sigkill_mid_write_keeps_the_old_file_and_the_next_write_removes_the_temp(tmp_path):
    """A writer killed with SIGKILL halfway through its bytes (no except clause runs) leaves the
    previous file intact plus its temp file; the next write of that path removes the temp of the
    dead process, and leaves alone temps whose writer is still alive."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "summary.json"
    atomic_write_json(path, {"v": 1})
    child = (f"import os, signal, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
             "from orderplan.infra.checkpoint import atomic_write\n"
             "def half(f):\n"
             "    f.write(b'{\"v\": 2, \"pad'); f.flush(); os.fsync(f.fileno()); os.kill(os.getpid(), signal.SIGKILL)\n"
             f"atomic_write({str(path)!r}, half)\n")
    proc = subprocess.run([sys.executable, "-c", child], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".summary.json.")]
    assert len(temps) == 1 and temps[0].read_bytes() == b'{"v": 2, "pad'  # half a file, never renamed
    assert json.loads(path.read_text()) == {"v": 1}
    alive = tmp_path / f".summary.json.{os.getppid()}.0123abcd.tmp"  # a writer that is still running
    alive.write_bytes(b"in progress")
    atomic_write_json(path, {"v": 3})
    assert _files(tmp_path) == [alive.name, "summary.json"] and json.loads(path.read_text()) == {"v": 3}


def test_atomic_write_json(tmp_path):
    path = tmp_path / "a" / "meta.json"
    atomic_write_json(path, {"b": [1, 2], "a": "x"})
    assert json.loads(path.read_text()) == {"a": "x", "b": [1, 2]}
    with pytest.raises(TypeError):  # not serialisable: fails before touching the file
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": "x", "b": [1, 2]}
    assert _files(path.parent) == ["meta.json"]


# ---------------------------------------------------------------------------- safetensors
def test_safetensors_roundtrip_with_metadata_and_tied_weights(tmp_path):
    emb = torch.randn(4, 3)
    sd = {"tok_emb.weight": emb, "head.weight": emb, "scale": torch.tensor([2.0], dtype=torch.float64)}
    meta = {"config": {"dim": 3, "vocab": 4}, "step": 7, "name": "tiny"}
    path = tmp_path / "m.safetensors"
    save_safetensors(sd, path, meta)
    assert _files(tmp_path) == ["m.safetensors"]
    got, got_meta = load_safetensors(path)
    assert got_meta == meta
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype


def test_safetensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_safetensors(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_safetensors(bad)
    with pytest.raises(TypeError, match="metadata"):
        save_safetensors({"a": torch.zeros(1)}, tmp_path / "x.safetensors", {"k": object()})


# ---------------------------------------------------------------------------- torch checkpoints
def test_pickled_namespace_is_refused_with_fix(tmp_path):
    path = tmp_path / "c2i_B_256.pt"
    # LlamaGen's training checkpoint layout
    torch.save({"model": {"w": torch.zeros(2)}, "steps": 10, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ValueError) as exc:
        load_torch_checkpoint(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "weights_only" in msg and "argparse.Namespace" in msg
    assert "torch.save({'model': ckpt['model']}" in msg  # says how to fix it
    # the fix works
    torch.save({"model": torch.load(path, weights_only=False)["model"]}, path)
    assert torch.equal(extract_model_state(load_torch_checkpoint(path))["w"], torch.zeros(2))


def test_load_torch_checkpoint_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_torch_checkpoint(tmp_path / "absent.pt")
    path = tmp_path / "trunc.pt"
    atomic_torch_save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.pt"):
        load_torch_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="trunc.pt"):
        load_torch_checkpoint(path)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_torch_checkpoint(tmp_path / "list.pt")


def test_extract_model_state():
    t = torch.zeros(1)
    assert list(extract_model_state({"model": {"a": t}, "optimizer": {}, "steps": 1})) == ["a"]
    assert list(extract_model_state({"module": {"module.a": t}})) == ["a"]
    assert list(extract_model_state({"state_dict": {"_orig_mod.a.b": t}})) == ["a.b"]
    assert list(extract_model_state({"module._orig_mod.x": t, "y": t})) == ["x", "y"]
    # 'model' wins over the others, and a prefix in the middle of a name is kept
    assert list(extract_model_state({"model": {"blocks.module.w": t}, "state_dict": {"z": t}})) == [
        "blocks.module.w"
    ]
    with pytest.raises(ValueError, match="'a'"):
        extract_model_state({"module.a": t, "a": t})


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.ta_pos_table = nn.Parameter(torch.zeros(5, 4))


def _tiny_sd():
    return {k: torch.randn_like(v) for k, v in _Tiny().state_dict().items()}


def test_load_state_dict_checked_reports_everything_by_name():
    m = _Tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sd = _tiny_sd()
    del sd["head.bias"]
    del sd["ta_pos_table"]
    sd["extra.weight"] = torch.zeros(1)
    sd["proj.weight"] = torch.zeros(4, 5)
    with pytest.raises(ValueError) as exc:
        load_state_dict_checked(m, sd, allowed_missing={"ta_pos_table"}, context="c2i_B_256.pt")
    msg = str(exc.value)
    assert msg.startswith("c2i_B_256.pt: ")
    assert "missing keys (1)" in msg and "head.bias" in msg
    assert "ta_pos_table" not in msg  # allowed
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "proj.weight: expected (4, 3), got (4, 5)" in msg
    # nothing was loaded
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_state_dict_checked_allows_missing_and_converts_dtype():
    m = _Tiny()
    sd = {k: v.double() for k, v in _tiny_sd().items() if k != "ta_pos_table"}
    missing = load_state_dict_checked(m, sd, allowed_missing={"ta_pos_table", "not_a_key"})
    assert missing == ["ta_pos_table"]
    assert m.proj.weight.dtype == torch.float32
    assert torch.equal(m.proj.weight, sd["proj.weight"].float())
    assert torch.equal(m.ta_pos_table, torch.zeros(5, 4))  # kept its zero init
    assert load_state_dict_checked(m, _tiny_sd()) == []


def test_load_state_dict_checked_truncates_long_lists():
    m = nn.Sequential(*[nn.Linear(1, 1) for _ in range(30)])
    with pytest.raises(ValueError) as exc:
        load_state_dict_checked(m, {})
    msg = str(exc.value)
    assert "missing keys (60)" in msg and "... and 40 more" in msg
    assert len(msg.splitlines()) < 30


# ---------------------------------------------------------------------------- manager
def _state(step):
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "rng": rng_state()}


def test_manager_keeps_last_k_and_points_to_newest(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpts", keep_last=3)
    assert mgr.latest() is None and mgr.load_latest() is None
    for step in range(1, 6):
        mgr.save(step * 100, _state(step * 100))
    kept = ["step_00000300.pt", "step_00000400.pt", "step_00000500.pt"]
    assert _files(mgr.ckpt_dir) == ["last.json", *kept]
    # pruned checkpoints take their checksum records with them
    assert sorted(os.listdir(mgr.ckpt_dir)) == sorted(f"{f}{s}" for f in ["last.json", *kept] for s in ("", ".sha256"))
    assert json.loads((mgr.ckpt_dir / "last.json").read_text())["file"] == "step_00000500.pt"
    assert mgr.latest() == mgr.ckpt_dir / "step_00000500.pt"
    state = mgr.load_latest()
    assert state["step"] == 500 and torch.equal(state["model"]["w"], torch.full((3,), 500.0))


def test_manager_follows_pointer_not_newest_file(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(step, _state(step))
    atomic_write_json(tmp_path / "last.json", {"file": "step_00000002.pt", "step": 2}, checksum=True)
    assert mgr.latest() == tmp_path / "step_00000002.pt"
    assert mgr.load_latest()["step"] == 2


def test_manager_falls_back_when_pointed_file_is_corrupt_or_missing(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        mgr.save(step, _state(step))
    newest = tmp_path / "step_00000003.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # truncated
    with pytest.warns(UserWarning, match="step_00000003.pt"):
        assert mgr.latest() == tmp_path / "step_00000002.pt"
    with pytest.warns(UserWarning):
        assert mgr.load_latest()["step"] == 2
    newest.unlink()
    with pytest.warns(UserWarning, match="missing or corrupt"):
        assert mgr.latest() == tmp_path / "step_00000002.pt"
    (tmp_path / "last.json").write_text("{garbage")
    with pytest.warns(UserWarning, match="pointer"):
        assert mgr.latest() == tmp_path / "step_00000002.pt"


def test_manager_never_prunes_the_checkpoint_it_just_wrote(tmp_path):
    # A run rewound to an earlier step saves a lower step number than files already on disk.
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 5):
        mgr.save(step, _state(step))
    assert mgr.latest() == tmp_path / "step_00000005.pt"
    assert mgr.load_latest()["step"] == 5


def test_manager_crash_during_save_keeps_pointer(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, _state(1))

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(ck.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, _state(2))
    monkeypatch.undo()
    assert _files(tmp_path) == ["last.json", "step_00000001.pt"]
    assert mgr.load_latest()["step"] == 1


def test_manager_refuses_state_that_needs_pickle(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=r"state\['metrics'\]\['loss'\].*numpy"):
        mgr.save(1, {"metrics": {"loss": np.float64(0.5)}})
    with pytest.raises(TypeError, match="Namespace"):
        mgr.save(1, {"args": argparse.Namespace(a=1)})
    assert _files(tmp_path) == []
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


# ---------------------------------------------------------------------------- RNG
def _draw():
    return random.random(), float(np.random.rand()), np.random.randn(), torch.rand(4), torch.randn(2)


def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    atomic_torch_save({"rng": rng_state()}, path)
    expected = _draw()
    _draw()  # move every generator on
    set_rng_state(load_torch_checkpoint(path)["rng"])  # weights_only=True load
    got = _draw()
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3]) and torch.equal(got[4], expected[4])


# ---------------------------------------------------------------------------- non-finite weights
def test_non_finite_weights_are_refused_by_name(tmp_path):
    from orderplan.infra.artifacts import NonFiniteWeightsError

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"][1, 2] = float("nan")
    state["1.bias"][0] = float("inf")
    before = model[0].weight.detach().clone()
    with pytest.raises(NonFiniteWeightsError, match=r"m\.safetensors.*0\.weight \(1 of 12 values\).*1\.bias"):
        load_state_dict_checked(model, state, context="m.safetensors")
    assert torch.equal(model[0].weight, before)  # nothing was loaded
    state["0.weight"][1, 2] = 0.0
    state["1.bias"][0] = 0.0
    load_state_dict_checked(model, state)  # finite again: loads


def test_nan_gpt_orderhead_and_vq_files_are_refused(tmp_path):
    from orderplan.planner.orderhead import OrderHead, load_orderhead, orderhead_config_for, save_orderhead
    from orderplan.model.blocks import BlockGeometry
    from orderplan.model.loading import load_gpt, save_gpt
    from orderplan.model.vq import VQModel, load_vq_safetensors, save_vq_safetensors, vq_preset
    from tests.conftest import randomized_gpt

    gpt = randomized_gpt()
    with torch.no_grad():
        gpt.layers[1].attention.wqkv.weight[0, 0] = float("nan")
    save_gpt(gpt, tmp_path / "gpt.safetensors")
    with pytest.raises(ValueError, match=r"gpt\.safetensors.*nan / inf.*layers\.1\.attention\.wqkv\.weight"):
        load_gpt(tmp_path / "gpt.safetensors")

    head = OrderHead(orderhead_config_for(128, BlockGeometry(8, 8, 2), num_classes=10))
    name = next(n for n, p in head.named_parameters() if p.dim() == 2)
    with torch.no_grad():
        head.get_parameter(name)[0, 0] = float("-inf")
    save_orderhead(head, tmp_path / "head.safetensors")
    with pytest.raises(ValueError, match=rf"head\.safetensors.*{name.replace('.', '[.]')}"):
        load_orderhead(tmp_path / "head.safetensors")

    cfg = vq_preset("tiny_mnist")
    vq = VQModel(cfg)
    with torch.no_grad():
        vq.quantize.embedding.weight[3, 0] = float("nan")
    save_vq_safetensors(vq, cfg, tmp_path / "vq.safetensors")
    with pytest.raises(ValueError, match=r"vq\.safetensors.*quantize\.embedding\.weight"):
        load_vq_safetensors(tmp_path / "vq.safetensors")


def test_manager_refuses_a_resume_checkpoint_with_nan_weights(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    mgr.save(1, {"model": {"w": torch.ones(2)}, "step": 1})
    mgr.save(2, {"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 2})
    with pytest.raises(ValueError, match=r"step_00000002\.pt.*\bw \(1 of 2 values\).*Delete step_00000002\.pt"):
        mgr.load_latest()


@pytest.mark.slow  # end-to-end (>5 s on 2 cores)
def test_safetensors_files_are_the_same_bytes_in_every_process(tmp_path):
    # safetensors writes its metadata map in hash order, which differs between processes; the file
    # (and its checksum) must depend on the content only
    import subprocess
    import sys

    code = ("import sys, torch; from orderplan.infra.checkpoint import save_safetensors\n"
            "save_safetensors({'w': torch.arange(6.0), 'b': torch.ones(2)}, sys.argv[1],"
            " {k: i for i, k in enumerate('abcdefghij')})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    state, meta = load_safetensors(paths[0])
    assert meta == {k: i for i, k in enumerate("abcdefghij")} and torch.equal(state["w"], torch.arange(6.0))
