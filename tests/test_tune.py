"""Tuning with real processes: two workers on one study, a SIGKILLed study that continues, RDB storage, the pipeline."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import mlflow, optuna, polars as pl, pytest
from optuna.trial import TrialState
from conftest import ROOT, make_settings
from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET
from mlnb.train import time_split
from mlnb.tune import tune, open_storage, default_storage
from mlnb.schema import FeatureSpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def data():
    frame = build_training_set(make_settings(Path("/tmp")), months=(1, 4), sample=0.05)
    train, valid, _ = time_split(frame)
    spec = FeatureSpec.infer(train, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
    return spec, train, valid


def _trial_runs(client, parent_run_id):
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)


def test_two_worker_processes_share_one_study(data, tmp_path):
    spec, train, valid = data
    s = make_settings(tmp_path)
    r = tune(spec, train, valid, s, n_trials=8, workers=2, study_name="par", num_boost_round=60,
             early_stopping_rounds=10, nthread=1, quiet=True)
    study = r.load_study()
    finished = study.get_trials(states=FINISHED)
    assert 8 <= len(finished) <= 9, [t.state for t in study.trials]        # the budget, + at most one racing start
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert len(pids) == 2 and os.getpid() not in pids                       # two real worker processes
    assert all(Path(r.study_dir/f"worker-{i}.log").read_text() for i in (0, 1))
    assert r.best_value == study.best_value and r.best_params == study.best_params
    # MLflow: one nested run per trial, with its parameters, per-round history and state
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    runs = {int(x.data.tags["optuna.trial"]): x for x in _trial_runs(client, r.parent_run_id)}
    assert set(runs) == {t.number for t in study.trials}
    for t in study.trials:
        run = runs[t.number]
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        assert {k: float(v) for k, v in run.data.params.items()} == pytest.approx({k: float(v) for k, v in t.params.items()})
        hist = client.get_metric_history(run.info.run_id, "valid_auc")
        assert [m.step for m in hist] == sorted(t.intermediate_values) and \
               [m.value for m in hist] == pytest.approx([t.intermediate_values[k] for k in sorted(t.intermediate_values)])
    parent = client.get_run(r.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mlnb.study"] == "par"
    assert parent.data.metrics["study_best_valid_auc"] == pytest.approx(r.best_value)
    assert {f"study.best.{k}" for k in r.best_params} <= set(parent.data.tags)
    arts = {a.path for a in client.list_artifacts(r.parent_run_id, "study")}
    assert {"study/best_params.json", "study/trials.csv", "study/optimization_history.html",
            "study/param_importances.html"} <= arts


def _tune_cmd(extra=()):
    return [sys.executable, "-m", "mlnb.tune", "run", "--months", "1-4", "--sample", "0.05", "--n-trials", "10",
            "--num-boost-round", "80", "--nthread", "1", "--study", "killme", "--pruner", "none", *extra]


def test_sigkilled_study_continues_where_it_stopped(tmp_path):
    s = make_settings(tmp_path)
    env = {**os.environ, **s.to_env(), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(_tune_cmd(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    storage = default_storage(s)
    deadline, before = time.monotonic() + 120, None
    while time.monotonic() < deadline and p.poll() is None:
        try: study = optuna.load_study(study_name="killme", storage=open_storage(storage))
        except (KeyError, ValueError): time.sleep(0.05); continue
        trials = study.get_trials()
        if len([t for t in trials if t.state in FINISHED]) >= 3 and \
                any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):   # in training
            p.send_signal(signal.SIGKILL); before = trials; break
        time.sleep(0.01)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL and before is not None, "the study finished before it could be killed"
    study = optuna.load_study(study_name="killme", storage=open_storage(storage))
    done_before = {t.number: t.value for t in study.get_trials(states=FINISHED)}
    stale = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    assert 3 <= len(done_before) < 10 and stale
    # started again: same command, same study; finished trials are kept, the dead worker's trial failed and retried
    p = subprocess.run(_tune_cmd(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["study_name"] == "killme" and summary["new_trials"] >= 10 - len(done_before)
    study = optuna.load_study(study_name="killme", storage=open_storage(storage))
    assert len(study.get_trials(states=FINISHED)) == 10
    assert {t.number: t.value for t in study.trials if t.number in done_before} == done_before
    assert [t.state for t in study.trials if t.number in stale] == [TrialState.FAIL] * len(stale)
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") in stale]
    assert retried and retried[0].params == study.trials[stale[0]].params
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    stale_run = client.get_run(study.trials[stale[0]].user_attrs["mlflow_run_id"])
    assert stale_run.info.status == "FAILED" and stale_run.data.tags["optuna.state"] == "FAIL"
    # the study's MLflow parent run (left RUNNING by the kill) is the same run, finished now, holding every trial
    assert summary["parent_run_id"] == study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    assert len(_trial_runs(client, summary["parent_run_id"])) == len(study.trials)


def test_rdb_storage_hyperband_and_bad_space(data, tmp_path):
    spec, train, valid = data
    s = make_settings(tmp_path)
    url = f"sqlite:///{tmp_path}/optuna.db"
    r = tune(spec, train, valid, s, n_trials=6, storage=url, pruner="hyperband", study_name="rdb",
             space='{"max_depth": [2, 8], "learning_rate": [0.05, 0.5, "log"]}', num_boost_round=60,
             early_stopping_rounds=None, nthread=1, track=False, quiet=True)
    assert r.parent_run_id is None and (tmp_path/"optuna.db").exists()
    study = optuna.load_study(study_name="rdb", storage=url)
    assert len(study.get_trials(states=FINISHED)) == 6 and set(study.best_params) == {"max_depth", "learning_rate"}
    with pytest.raises(ValueError, match="other space"):
        tune(spec, train, valid, s, n_trials=7, storage=url, study_name="rdb", space={"max_depth": [2, 9]}, track=False)
    p = subprocess.run([sys.executable, "-m", "mlnb.tune", "run", "--space", '{"max_depth": [8, 3]}'], cwd=ROOT,
                       env={**os.environ, **s.to_env()}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "max_depth: low (8) must be below high (3)" in p.stderr


def test_pipeline_tunes_cross_validates_and_registers(tmp_path):
    from mlnb.pipeline import run_pipeline
    s = make_settings(tmp_path)
    run = run_pipeline("train", {"sample": 0.05, "num_boost_round": 80, "nthread": 1, "n_trials": 4, "tune_rounds": 40,
                                 "cv_folds": 2, "search_space": '{"max_depth": [2, 6], "learning_rate": [0.05, 0.3]}'}, s)
    m = run.metrics
    assert run.outcome == "success" and m["study_name"] == f"train-{run.run_id}"
    for k in ("tune_best_value", "test_auc", "untuned_test_auc", "cv_mean_valid_auc", "ensemble_test_auc"):
        assert 0.55 < m[k] < 0.95, (k, m[k])
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    r = client.get_run(m["mlflow_run_id"])
    trial_runs = _trial_runs(client, r.info.run_id)                     # trials nested under the pipeline's run
    assert len(trial_runs) == sum(m["tune_trials"].values()) >= 4
    study = optuna.load_study(study_name=m["study_name"], storage=open_storage(default_storage(s)))
    # the logged parameters are those of the registered model: the study's best, or the given ones when those
    # scored better on the validation months
    chosen = study.best_params if m["selected_params"] == "tuned" else {"max_depth": 6, "learning_rate": 0.1}
    assert m["selected_params"] in ("tuned", "untuned")
    assert int(r.data.params["max_depth"]) == chosen["max_depth"]
    assert float(r.data.params["learning_rate"]) == pytest.approx(chosen["learning_rate"])
    arts = {a.path for a in client.list_artifacts(r.info.run_id)} | {a.path for a in client.list_artifacts(r.info.run_id, "study")} \
        | {a.path for a in client.list_artifacts(r.info.run_id, "cv_ensemble")}
    assert {"learning_curve.html", "study/optimization_history.html", "cv_ensemble/fold-0.ubj", "cv_ensemble/fold-1.ubj"} <= arts
    assert len(client.get_metric_history(r.info.run_id, "cv_valid_auc")) == 2
    html = run.html.read_text()
    assert "Optimization History Plot" in html and "Learning curve" in html and "2-fold CV mean" in html
    assert not (s.home/"checkpoints"/run.run_id).exists()                 # checkpoints removed once registered
