"""The console log of a run (src/orderplan/infra/run_utils.py `tee_console`, `console_log`): printed lines and
warnings reach run_dir/<job>.log as they are printed, progress-bar redraws do not, reruns append
under a header each, a kill -9 keeps what was printed, and the real entry points write their log."""

import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from orderplan.infra.run_utils import console_log, progress, tee_console

REPO = Path(__file__).resolve().parents[2]


def test_lines_and_warnings_are_logged_progress_bars_are_not(tmp_path, capsys):
    log = tmp_path / "run" / "job.log"
    # pytest records warnings instead of printing them: print this one as a plain run would
    with warnings.catch_warnings(), tee_console(log, "job"):
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        print("first line")
        bar = progress(range(4), desc="steps", mininterval=0)
        for i in bar:
            if i == 1:
                warnings.warn("a warning while the bar is shown")
            if i == 2:
                bar.write("written through the bar")
        print("no newline at the end", end="")
    text = log.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("==== ") and " job started: python " in lines[0]
    assert lines[1] == "first line"
    assert lines[2].endswith("UserWarning: a warning while the bar is shown")
    assert lines[3].strip() == 'warnings.warn("a warning while the bar is shown")'  # the warning's source line
    assert lines[4:6] == ["written through the bar", "no newline at the end"]
    assert " job finished (" in lines[6] and len(lines) == 7
    assert "steps" not in text and "\r" not in text and "it/s" not in text  # no progress bar
    out = capsys.readouterr()
    assert "first line" in out.out and "steps" in out.err  # the console still sees everything


def test_reruns_append_and_failures_keep_the_traceback(tmp_path):
    log = tmp_path / "job.log"
    with tee_console(log, "job"):
        print("run one")
    with pytest.raises(RuntimeError):
        with tee_console(log, "job"):
            print("run two")
            raise RuntimeError("boom")
    text = log.read_text()
    assert text.count(" job started: ") == 2
    assert text.index("run one") < text.index("run two")
    assert "job failed after" in text and "RuntimeError: boom" in text


def test_nothing_printed_leaves_no_file_and_streams_are_restored(tmp_path):
    before = sys.stdout, sys.stderr
    with tee_console(tmp_path / "quiet" / "job.log"):
        pass
    assert not (tmp_path / "quiet").exists()  # a run refused at its validation writes nothing
    assert (sys.stdout, sys.stderr) == before


def test_nested_logs_chain(tmp_path):
    with tee_console(tmp_path / "outer.log", "outer"):
        with tee_console(tmp_path / "inner.log", "inner"):
            print("inside both")
        print("outer only")
    assert "inside both" in (tmp_path / "inner.log").read_text()
    assert "outer only" not in (tmp_path / "inner.log").read_text()
    assert "inside both" in (tmp_path / "outer.log").read_text()


def test_decorator_writes_run_dir_job_log(tmp_path):
    @dataclass
    class Run:
        run_dir: str

    @console_log("demo")
    def run_demo(run: Run) -> int:
        """docs"""
        print(f"working in {run.run_dir}")
        return 7

    assert run_demo(Run(str(tmp_path / "r"))) == 7 and run_demo.__doc__ == "docs"
    assert f"working in {tmp_path / 'r'}" in (tmp_path / "r" / "demo.log").read_text()


def test_kill_9_keeps_what_was_printed(tmp_path):
    """Each line reaches the OS when it is printed: SIGKILL (no cleanup, no flush) loses nothing."""
    code = ("import os, signal, sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from orderplan.infra.run_utils import tee_console\n"
            f"with tee_console({str(tmp_path / 'k.log')!r}, 'killed'):\n"
            "    print('step 1 done')\n"
            "    print('step 2 done')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL
    lines = (tmp_path / "k.log").read_text().splitlines()
    assert lines[1:] == ["step 1 done", "step 2 done"]  # no footer: the run never ended


def test_train_classifier_writes_its_console_log(tmp_path):
    """A real entry point, tiny settings: its printed lines land in run_dir/train_classifier.log."""
    from orderplan.eval.classifier_training import ClassifierRun, train_classifier

    run = ClassifierRun(run_dir=str(tmp_path / "clf"), epochs=1, max_train_images=20, progress=False)
    train_classifier(run)
    text = (tmp_path / "clf" / "train_classifier.log").read_text()
    assert "train_classifier started" in text and "[train_classifier] params=" in text
    assert "[train_classifier] held-out accuracy=" in text and "train_classifier finished" in text


@pytest.mark.slow  # a subprocess through Hydra (~10 s on 2 cores)
def test_script_through_hydra_writes_a_non_empty_log(tmp_path):
    """Regression: Hydra's job logging left an empty bc.log in every run dir; the script's log now
    holds what it printed, and a refused config leaves no file at all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "clf"
    args = [sys.executable, str(REPO / "scripts" / "train_classifier.py"), f"run_dir={run_dir}"]
    proc = subprocess.run([*args, "epochs=1", "max_train_images=20", "progress=false"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[train_classifier] held-out accuracy=" in (run_dir / "train_classifier.log").read_text()
    refused = tmp_path / "refused"
    proc = subprocess.run([*args[:2], f"run_dir={refused}", "epochs=0"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "epochs must be an integer >= 1, got 0" in proc.stderr
    assert not refused.exists() or not any(refused.iterdir())
