"""Corruption harness: for every kind of file the project writes and reads back, one byte inside a tensor
payload (or a JSON value) is flipped so that the file still parses (`tests/support/corrupt.py` proves it),
and the next run, the same command a user types, either refuses the file by name with the command that
rebuilds it, or rebuilds it with a message and ends with the result an intact file gives. No result is
ever computed from the damaged bytes.

| file kind                  | damaged                         | next run                    | expected                  |
|----------------------------|---------------------------------|-----------------------------|---------------------------|
| oracle shard               | shard_000_00000.pt              | bc.py                       | refused, names build_oracle |
| oracle shard               | shard_000_00000.pt              | build_oracle.py (same dir)  | rebuilt, same bytes       |
| oracle progress file       | progress_000.json               | build_oracle.py             | refused                   |
| oracle manifest            | manifest.json                   | bc.py                       | refused                   |
| extracted codes / labels / meta | {train_codes,train_labels}.npy, train_meta.json | train_backbone.py | refused, names extract_codes |
| training checkpoint        | the newest bc step_*.pt         | bc.py (same run_dir)        | skipped with a warning, resumed from the one before: same weights |
| final weights (OrderHead)  | orderhead.safetensors           | ppo.py agent.init_from=...  | refused                   |
| final weights (GPT)        | gpt.safetensors (train_backbone)| build_oracle.py on it       | refused                   |
| run summary                | bc summary.json                 | evaluate.py with that head  | refused                   |
| evaluate's policy cache    | policies/raster.pt              | evaluate.py (same run_dir)  | recomputed: same results  |
| compare_orders' scored rows| scores/raster__*.pt             | compare_orders.py (same dir)| recomputed: same table    |
| VQ / classifier weights    | vq.safetensors / classifier     | their loaders               | refused                   |

The generated-state set (states.pt) is covered in tests/train/test_generated_bc.py, power's feature
cache shares evaluate's loader (`orderplan.infra.checkpoint.load_cache`).

Slow: about a dozen script launches on the tiny default."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orderplan.infra.paths import PACKAGE_ROOT
from tests.support.corrupt import flip_payload_byte, still_parses
from tests.support.volatile import strip_volatile

REPO = Path(__file__).resolve().parents[1]
HAVE_DEFAULT = (PACKAGE_ROOT / "artifacts/tiny_mnist/gpt.safetensors").exists()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the embedded default")]

ORACLE = ["oracle.num_images=8", "oracle.batch_size=4", "oracle.chunk_images=4"]
BUILD_ORACLE = ["num_images=8", "batch_size=4", "chunk_images=4"]
SMALL_REPORT = ["eval.num_images=4", "eval.batch_size=4", "eval.baselines=[raster,random]"]
BC = ["bc.steps=24", "bc.ckpt_every=4", "bc.batch_size=16", "bc.log_every=2", "bc.replay_batch=8", *SMALL_REPORT]
EVALUATE = ["policies=[raster,bc]", "eval.num_samples=12", "eval.num_images=4", "eval.batch_size=6",
            "eval.gen_batch_size=6", "eval.seed_samples=6", "eval.sampler_seeds=[0,1]", "eval.fid_curve=[6,12]",
            "eval.agreement_images=4", "stats.bootstrap=3", "stats.kid_subsets=2", "plots.snapshot_samples=2",
            "plots.heatmap_images=2", "plots.column_rows=3"]
REFUSED = "does not match its checksum record"


def run(script: str, *args: str, ok: bool = True) -> str:
    """Run scripts/<script> (one thread, no wandb); returns stdout + stderr. `ok`: the expected outcome."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"{script} {' '.join(args)}: exit {proc.returncode}\n{out[-4000:]}"
    return out


def damage(path: Path) -> None:
    flip_payload_byte(path)
    still_parses(path)  # only the checksum can tell


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Intact outputs to copy and damage: a BC run with its oracle set, an evaluate run on its head,
    toy codes and a small GPT trained on them, and a compare_orders table."""
    from tests.conftest import write_toy_codes

    root = tmp_path_factory.mktemp("world")
    run("bc.py", f"run_dir={root / 'bc'}", f"oracle.out_dir={root / 'oracle'}", *ORACLE, *BC)
    run("evaluate.py", f"run_dir={root / 'eval'}", f"checkpoints.bc={root / 'bc' / 'orderhead.safetensors'}",
        *EVALUATE)
    codes = write_toy_codes(root / "codes")
    run("train_backbone.py", *_backbone(root / "gpt", codes))
    run("compare_orders.py", *_compare(root / "compare"))
    return root


def _toy_backbone(codes: Path) -> list[str]:
    return ["backbone.data.kind=codes", f"backbone.data.codes_dir={codes}", "backbone.vq_weights=null",
            "+backbone.gpt.overrides.n_layer=2"]


def _backbone(run_dir: Path, codes: Path) -> list[str]:
    return [f"run_dir={run_dir}", "train.max_steps=8", "train.batch_size=8", "train.log_every=2",
            "train.eval_every=1000", "train.ckpt_every=4", "train.warmup_steps=2", *_toy_backbone(codes)]


def _compare(run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", "seeds=[0]", "observations=[block]", "router_seeds=[]", "R_values=[]",
            "ppo=false", 'bc_overrides=["bc.steps=8","oracle.num_images=8","eval.num_images=4",'
            '"eval.baselines=[random]"]', "eval.num_images=4", "eval.batch_size=4", "eval.agreement_images=2",
            "eval.ablation_agreement_images=0", "eval.baselines=[raster,random]", "eval.bootstrap=50"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_damaged_oracle_shard_is_refused_by_bc_and_rebuilt_by_build_oracle(world, tmp_path):
    oracle = _copy(world / "oracle", tmp_path / "oracle")
    shard = oracle / "shard_000_00000.pt"
    intact = shard.read_bytes()
    damage(shard)
    out = run("bc.py", f"run_dir={tmp_path / 'bc'}", f"oracle.out_dir={oracle}", *ORACLE, *BC, ok=False)
    assert f"{shard}: sha256" in out and REFUSED in out and "scripts/build_oracle.py" in out
    assert not (tmp_path / "bc" / "orderhead.safetensors").exists()
    out = run("build_oracle.py", f"out_dir={oracle}", *BUILD_ORACLE)
    assert "rebuilding shard_000_00000.pt" in out
    assert shard.read_bytes() == intact  # the same images and seed give the same records
    run("bc.py", f"run_dir={tmp_path / 'bc'}", f"oracle.out_dir={oracle}", *ORACLE, *BC)  # and it trains again


@pytest.mark.parametrize("name,script", [("progress_000.json", "build_oracle.py"), ("manifest.json", "bc.py")])
def test_a_damaged_oracle_progress_file_or_manifest_is_refused(world, tmp_path, name, script):
    oracle = _copy(world / "oracle", tmp_path / "oracle")
    damage(oracle / name)
    args = ([f"out_dir={oracle}", *BUILD_ORACLE] if script == "build_oracle.py"
            else [f"run_dir={tmp_path / 'bc'}", f"oracle.out_dir={oracle}", *ORACLE, *BC])
    out = run(script, *args, ok=False)
    assert f"{oracle / name}: sha256" in out and REFUSED in out


@pytest.mark.parametrize("name", ["train_codes.npy", "train_labels.npy", "train_meta.json"])
def test_damaged_codes_are_refused_by_the_next_training(world, tmp_path, name):
    codes = _copy(world / "codes", tmp_path / "codes")
    damage(codes / name)
    out = run("train_backbone.py", *_backbone(tmp_path / "gpt", codes), ok=False)
    assert f"{codes / name}: sha256" in out and REFUSED in out and "extract_codes.py" in out


def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(world, tmp_path):
    bc = _copy(world / "bc", tmp_path / "bc")
    newest = sorted((bc / "checkpoints").glob("step_*.pt"))[-1]
    damage(newest)
    out = run("bc.py", f"run_dir={bc}", f"oracle.out_dir={world / 'oracle'}", *ORACLE, *BC)
    assert f"skipping a checkpoint that fails its checksum: {newest}" in out
    assert (bc / "orderhead.safetensors").read_bytes() == (world / "bc" / "orderhead.safetensors").read_bytes()


def test_damaged_final_weights_are_refused_by_the_next_job(world, tmp_path):
    bc = _copy(world / "bc", tmp_path / "bc")
    head = bc / "orderhead.safetensors"
    damage(head)
    out = run("ppo.py", f"run_dir={tmp_path / 'ppo'}", f"agent.init_from={head}", "batch_size=8",
              "ppo.frames_per_batch=128", "ppo.total_frames=128", *SMALL_REPORT, ok=False)
    assert f"{head}: sha256" in out and REFUSED in out
    gpt = _copy(world / "gpt", tmp_path / "gpt") / "gpt.safetensors"
    damage(gpt)
    out = run("build_oracle.py", f"out_dir={tmp_path / 'oracle'}", "num_images=2", f"backbone.gpt_weights={gpt}",
              *_toy_backbone(world / "codes"), ok=False)
    assert f"{gpt}: sha256" in out and REFUSED in out


def test_a_damaged_run_summary_is_refused(world, tmp_path):
    bc = _copy(world / "bc", tmp_path / "bc")
    damage(bc / "summary.json")
    out = run("evaluate.py", f"run_dir={tmp_path / 'eval'}", f"checkpoints.bc={bc / 'orderhead.safetensors'}",
              *EVALUATE, ok=False)
    assert f"{bc / 'summary.json'}: sha256" in out and REFUSED in out


def _numbers(path: Path) -> object:
    return strip_volatile(json.loads(path.read_text()))


def test_a_damaged_evaluate_cache_is_recomputed_to_the_same_results(world, tmp_path):
    ev = _copy(world / "eval", tmp_path / "eval")
    cache = ev / "policies" / "raster.pt"
    damage(cache)
    out = run("evaluate.py", f"run_dir={ev}", f"checkpoints.bc={world / 'bc' / 'orderhead.safetensors'}", *EVALUATE)
    assert f"{cache.name} is a cache: recomputing it" in out
    assert _numbers(ev / "results.json")["policies"]["raster"] == _numbers(world / "eval" / "results.json")["policies"]["raster"]


def test_a_damaged_compare_row_is_rescored_to_the_same_table(world, tmp_path):
    cmp = _copy(world / "compare", tmp_path / "compare")
    row = next((cmp / "scores").glob("raster__*.pt"))
    damage(row)
    out = run("compare_orders.py", *_compare(cmp))
    assert f"{row.name} is a cache: recomputing it" in out and "[compare] scoring raster" in out
    assert "[compare] random: scored before" in out  # the intact rows are reused
    assert _numbers(cmp / "results.json")["rows"] == _numbers(world / "compare" / "results.json")["rows"]


def test_damaged_vq_and_classifier_weights_are_refused(tmp_path):
    import torch

    from orderplan.eval.feature_net import DigitClassifier, load_classifier, save_classifier
    from orderplan.infra.integrity import IntegrityError
    from orderplan.model.vq import VQModel, load_vq_safetensors, save_vq_safetensors
    from tests.model.test_vq import SMALL_RGB

    torch.manual_seed(0)
    path = tmp_path / "vq.safetensors"
    save_vq_safetensors(VQModel(SMALL_RGB), SMALL_RGB, path)
    load_vq_safetensors(path)
    damage(path)
    with pytest.raises(IntegrityError, match="vq.safetensors: sha256"):
        load_vq_safetensors(path)
    clf = save_classifier(DigitClassifier(), tmp_path / "classifier.safetensors")
    load_classifier(clf)
    damage(clf)
    with pytest.raises(IntegrityError, match="classifier.safetensors: sha256"):
        load_classifier(clf)
