"""Checksum records (src/orderplan/infra/integrity.py): what the writer records is what a reader checks,
a changed byte is refused by name, a kill between the file and its record never refuses a complete file,
and the shared loaders (checkpoints, caches, JSON) check before they parse."""

import hashlib
import json

import numpy as np
import pytest
import torch

import orderplan.infra.integrity as integrity
from orderplan.infra.checkpoint import atomic_torch_save, load_cache, load_safetensors, load_torch_checkpoint, save_safetensors
from orderplan.infra.integrity import (
    IntegrityError,
    MissingRecordError,
    atomic_write,
    atomic_write_json,
    read_json_checked,
    read_record,
    record_checksum,
    record_path,
    verify_file,
)


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_record_holds_the_digest_of_the_bytes_on_disk(tmp_path):
    arr = np.arange(300_000, dtype=np.int64)  # several write() calls from np.save
    path = atomic_write(tmp_path / "a.npy", lambda f: np.save(f, arr), checksum=True)
    rec = read_record(path)
    assert rec["sha256"] == [hashlib.sha256(path.read_bytes()).hexdigest()]
    assert rec["bytes"] == path.stat().st_size and rec["file"] == "a.npy"
    assert rec["produced_by"].startswith("python ")
    assert verify_file(path) is True
    np.testing.assert_array_equal(np.load(path), arr)  # streaming through the hasher changed nothing


def test_torch_save_through_the_hasher_is_loadable(tmp_path):
    obj = {"w": torch.randn(50, 7), "n": 3}
    path = atomic_torch_save(obj, tmp_path / "c.pt", checksum=True)
    assert read_record(path)["sha256"] == [hashlib.sha256(path.read_bytes()).hexdigest()]
    back = load_torch_checkpoint(path, required=True)
    assert torch.equal(back["w"], obj["w"]) and back["n"] == 3


def test_a_flipped_byte_is_refused_by_name_with_the_rebuild_command(tmp_path):
    path = atomic_torch_save({"w": torch.randn(100)}, tmp_path / "c.pt", checksum=True)
    _flip(path)
    with pytest.raises(IntegrityError, match=r"c\.pt: sha256 .* does not match .*To rebuild it: run X") as e:
        load_torch_checkpoint(path, rebuild="run X", required=True)
    assert "is not used" in str(e.value)
    # without a rebuild hint the message names the command that wrote the file
    with pytest.raises(IntegrityError, match=r"rerun `python "):
        verify_file(path)


def test_a_missing_record_is_refused_only_where_required(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(MissingRecordError, match=r"no checksum record .*orderplan\.infra\.integrity record"):
        read_json_checked(path)
    assert verify_file(path, required=False) is False
    assert read_json_checked(path, required=False) == {}
    record_checksum(path)  # the user vouches for it
    assert verify_file(path) is True


def test_weights_given_by_path_are_checked_when_they_carry_a_record(tmp_path):
    path = save_safetensors({"w": torch.arange(1000.0)}, tmp_path / "m.safetensors")
    assert record_path(path).is_file()
    state, _ = load_safetensors(path)
    assert torch.equal(state["w"], torch.arange(1000.0))
    _flip(path, offset=path.stat().st_size - 100)  # inside the tensor payload: safetensors itself accepts it
    with pytest.raises(IntegrityError, match="m.safetensors"):
        load_safetensors(path)
    record_path(path).unlink()  # a file from elsewhere (no record) loads as given
    assert load_safetensors(path)[0]["w"].shape == (1000,)


def test_rewrites_replace_the_record_and_a_stale_digest_is_no_longer_accepted(tmp_path):
    path = atomic_write_json(tmp_path / "p.json", {"v": 1}, checksum=True)
    first = read_record(path)["sha256"]
    atomic_write_json(path, {"v": 2}, checksum=True)
    assert read_record(path)["sha256"] != first and len(read_record(path)["sha256"]) == 1
    old = json.dumps({"v": 1}, indent=2, sort_keys=True) + "\n"
    path.write_text(old)  # the previous version put back
    with pytest.raises(IntegrityError):
        verify_file(path)


@pytest.mark.parametrize("kill_at", ["before_rename", "after_rename"])
def test_a_kill_between_file_and_record_leaves_an_accepted_version(tmp_path, monkeypatch, kill_at):
    path = atomic_write_json(tmp_path / "progress.json", {"chunks": 1}, checksum=True)
    real_replace, real_record = integrity._replace, integrity._write_record
    calls = {"record": 0}

    def replace(tmp, dest):
        if kill_at == "before_rename" and dest == path:
            tmp.unlink()
            raise KeyboardInterrupt  # the process dies with the new file not yet in place
        real_replace(tmp, dest)

    def write_record(p, record):
        calls["record"] += 1
        if kill_at == "after_rename" and calls["record"] == 2:
            raise KeyboardInterrupt  # dies after the rename, before the record drops the old digest
        real_record(p, record)

    monkeypatch.setattr(integrity, "_replace", replace)
    monkeypatch.setattr(integrity, "_write_record", write_record)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"chunks": 2}, checksum=True)
    monkeypatch.undo()
    expected = {"chunks": 1} if kill_at == "before_rename" else {"chunks": 2}
    assert read_json_checked(path) == expected  # a complete version, accepted
    assert len(read_record(path)["sha256"]) == 2  # both versions accepted until the next write
    atomic_write_json(path, {"chunks": 3}, checksum=True)
    assert read_json_checked(path) == {"chunks": 3} and len(read_record(path)["sha256"]) == 1


def test_a_damaged_record_is_refused(tmp_path):
    path = atomic_write_json(tmp_path / "p.json", {"v": 1}, checksum=True)
    record_path(path).write_text("{not json")
    with pytest.raises(IntegrityError, match="record itself is damaged"):
        verify_file(path)


def test_caches_are_recomputed_when_damaged_unrecorded_or_foreign(tmp_path, capsys):
    path = atomic_torch_save({"identity": "a", "x": torch.ones(200)}, tmp_path / "row.pt", checksum=True)
    assert torch.equal(load_cache(path, "a")["x"], torch.ones(200))
    assert load_cache(path, "b") is None and "another setup" in capsys.readouterr().out
    _flip(path)
    assert load_cache(path, "a", "[t]") is None
    assert "is a cache: recomputing it" in capsys.readouterr().out
    atomic_torch_save({"identity": "a", "x": torch.ones(200)}, path)
    record_path(path).unlink()  # a cache from before records existed
    assert load_cache(path, "a") is None and "no checksum record" in capsys.readouterr().out
    assert load_cache(tmp_path / "absent.pt", "a") is None


def test_the_command_line_verifies_and_records(tmp_path, capsys):
    good = atomic_write_json(tmp_path / "d" / "good.json", {"v": 1}, checksum=True)
    bad = atomic_write_json(tmp_path / "d" / "bad.json", {"v": 2}, checksum=True)
    assert integrity.main(["verify", str(tmp_path / "d")]) == 0
    bad.write_text('{"v": 3}')
    assert integrity.main(["verify", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "bad.json" in err and "good.json" not in err
    assert integrity.main(["record", str(bad)]) == 0 and verify_file(bad) and verify_file(good)
