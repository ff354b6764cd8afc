"""Tuning outgrows one machine: one Optuna study in RDB storage on a real PostgreSQL cluster, worked by separate
`mlnb tune worker` processes. One worker is killed with SIGKILL in the middle of a trial; a replacement worker joins,
the study finishes its budget, and continuing the study (the same command) fails the dead trial and runs its
parameters again: no trial is lost and none runs twice. Configuration only: `--storage postgresql+psycopg2://...`."""
from __future__ import annotations
import json, os, re, signal, subprocess, sys, time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, make_settings
from pg import pg

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _cmd(storage: str, n_trials: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "mlnb.cli", "tune", "run", "--storage", storage, "--study", "shared", "--months", "1-4",
            "--sample", "0.05", "--n-trials", str(n_trials), "--workers", str(workers), "--num-boost-round", "60",
            "--early-stopping-rounds", "20", "--nthread", "1", "--pruner", "none", "--no-mlflow"]


def _pid_alive(pid: int) -> bool:
    try: os.kill(pid, 0); return True
    except ProcessLookupError: return False


def test_workers_on_postgresql_survive_kill_9(pg, tmp_path):
    s = make_settings(tmp_path)
    env = {**os.environ, **s.to_env(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # `mlnb tune run --workers 3` prepares the study folder and starts three `mlnb tune worker` processes
    run = subprocess.Popen(_cmd(pg, 6, 3), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    study_dir = s.home/"optuna"/"shared"
    victim, deadline = None, time.monotonic() + 150
    while victim is None and run.poll() is None:
        assert time.monotonic() < deadline, "no worker started a trial"
        try: study = optuna.load_study(study_name="shared", storage=pg)
        except KeyError: time.sleep(0.1); continue
        trials = study.get_trials(deepcopy=False)
        if len([t for t in trials if t.state in FINISHED]) < 2: time.sleep(0.05); continue
        running = [t for t in trials if t.state == TrialState.RUNNING and "worker" in t.user_attrs
                   and _pid_alive(t.user_attrs["worker"]["pid"])]
        if running:
            victim = running[0]
            os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)         # mid-trial
            # a replacement worker joins the same study from the same study folder
            rep_log = open(study_dir/"worker-3.log", "w")
            replacement = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "tune", "worker", str(study_dir),
                                            "--index", "3"], cwd=ROOT, env=env, stdout=rep_log, stderr=subprocess.STDOUT)
        else: time.sleep(0.02)
    assert victim is not None, f"the study finished before a worker could be killed: {run.communicate()}"
    out, err = run.communicate(timeout=240)
    assert replacement.wait(240) == 0, (study_dir/"worker-3.log").read_text()
    rep_log.close()
    assert run.returncode == 1 and "failed (exit -9)" in err, (out, err)     # the run names the dead worker
    study = optuna.load_study(study_name="shared", storage=pg)
    assert study.trials[victim.number].state == TrialState.RUNNING             # orphaned, until the study continues
    assert 6 <= len(study.get_trials(states=FINISHED)) <= 6 + 3, [t.state for t in study.trials]
    first_pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    # three separate worker processes ran trials (the replacement too, unless the survivors met the budget first)
    assert len(first_pids - {replacement.pid}) == 3 and os.getpid() not in first_pids

    pattern = r"\] trial (\d+) (?:complete|pruned|fail)"
    first_logs = [f.read_text() for f in study_dir.glob("worker-*.log")]

    # continuing the study (the same command, a larger budget, one worker): the dead trial is failed and its
    # parameters run again
    done = {t.number: t.value for t in study.get_trials(states=FINISHED)}
    p = subprocess.run(_cmd(pg, len(done) + 2, 1), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["study_name"] == "shared" and summary["storage"].startswith("postgresql")
    study = optuna.load_study(study_name="shared", storage=pg)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0, states          # nothing left behind
    assert [t.number for t in study.trials if t.state == TrialState.FAIL] == [victim.number]  # only the killed one
    assert {t.number: t.value for t in study.trials if t.number in done} == done          # finished trials kept
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == victim.params
    assert len(study.get_trials(states=FINISHED)) >= len(done) + 2
    # none ran twice: every trial number was started by exactly one worker, as the worker logs show
    logs = first_logs + [p.stdout]                        # one worker continues in the `mlnb tune run` process
    logged = Counter(int(m) for text in logs for m in re.findall(pattern, text))
    assert logged and max(logged.values()) == 1, logged
    # (the victim may have printed its result just before the kill, without the storage hearing of it)
    assert set(logged) - {victim.number} == {t.number for t in study.trials if t.state in FINISHED}
    assert len({tuple(sorted(t.params.items())) for t in study.get_trials(states=FINISHED)}) == len(logged) - (victim.number in logged)
