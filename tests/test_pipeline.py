"""The train pipeline through papermill on the real `mlnb` kernel, into a real SQLite MLflow store."""
import json, subprocess, sys
from pathlib import Path
import mlflow, pytest
from conftest import ROOT, make_settings
from mlnb.audit import read_audit, AUDIT_FIELDS
from mlnb.pipeline import run_pipeline, list_runs, PipelineError


def test_train_pipeline_registers_champion(trained_home):
    s, run = trained_home.settings, trained_home.run
    assert run.outcome == "success"
    # the kernel is this venv's interpreter, not some other Python on the machine
    assert Path(run.metrics["kernel_python"]).resolve().parent == Path(sys.executable).resolve().parent
    # report folder: executed notebook, HTML, params, metrics
    for f in ("train.ipynb", "train.html", "params.json", "metrics.json", "status.json"):
        assert (run.out_dir/f).exists(), f
    metrics = json.loads((run.out_dir/"metrics.json").read_text())
    assert 0.6 < metrics["test_auc"] < 0.9, metrics   # a real signal on real data, not a constant
    assert json.loads((run.out_dir/"params.json").read_text())["sample"] == 0.05
    # MLflow: run with params/metrics, the executed notebook attached, version registered with champion alias
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    r = client.get_run(metrics["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["sample"] == "0.05" and abs(r.data.metrics["test_auc"] - metrics["test_auc"]) < 1e-9
    assert {"report/train.ipynb", "report/train.html"} <= {a.path for a in client.list_artifacts(r.info.run_id, "report")}
    mv = client.get_model_version_by_alias(s.model_name, "champion")
    assert str(mv.version) == str(metrics["model_version"]) and mv.run_id == r.info.run_id
    # audited: the pipeline run and the registration, each with a start and a success record
    ops = [(a["operation"], a["outcome"]) for a in read_audit(s)]
    assert ("pipeline_run", "success") in ops and ("register", "success") in ops
    assert all(set(a) == set(AUDIT_FIELDS) for a in read_audit(s))


def test_second_run_does_not_steal_champion(tmp_path):
    s = make_settings(tmp_path)
    params = {"sample": 0.03, "num_boost_round": 20, "nthread": 1}
    first = run_pipeline("train", params, s)
    second = run_pipeline("train", params, s)
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    assert second.metrics["model_version"] == first.metrics["model_version"] + 1
    assert str(client.get_model_version_by_alias(s.model_name, "champion").version) == str(first.metrics["model_version"])


def test_failing_pipeline_keeps_notebook_audits_and_exits_nonzero(tmp_path):
    s = make_settings(tmp_path)
    env = {**__import__("os").environ, **s.to_env()}
    # months=13 is not a month of 2013: the data step finds no rows and the basic checks stop the run
    p = subprocess.run([sys.executable, "-m", "mlnb.cli", "run", "train", "-p", "months=13", "-p", "nthread=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "pipeline train failed" in p.stderr and "executed notebook" in p.stderr
    (run,) = list_runs(s, "train")
    assert run["outcome"] == "failure" and Path(run["notebook"]).exists()
    end = read_audit(s, operation="pipeline_run", phase="end")[-1]
    assert end["outcome"] == "failure" and end["error_detail"]["type"] and end["error_detail"]["message"]
    # no model was registered
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    assert client.search_registered_models() == []


def test_unknown_parameter_is_rejected_before_running(tmp_path):
    s = make_settings(tmp_path)
    with pytest.raises(ValueError, match="unknown parameter"):
        run_pipeline("train", {"smaple": 0.1}, s)
    assert list_runs(s) == []


def test_own_table_regression(tmp_path):
    "A user's own CSV with a numeric target trains through the same pipeline."
    import numpy as np, polars as pl
    rng = np.random.default_rng(0)
    n = 3000
    df = pl.DataFrame({"when": pl.datetime_range(pl.datetime(2024, 1, 1), pl.datetime(2024, 1, 1) + pl.duration(hours=n - 1),
                                                 "1h", eager=True),
                       "x": rng.normal(size=n), "shop": rng.choice(["a", "b", "c"], n)})
    df = df.with_columns(sales=2 * pl.col("x") + (pl.col("shop") == "a").cast(pl.Float64) + rng.normal(size=n) * 0.1)
    df.write_csv(tmp_path/"sales.csv")
    s = make_settings(tmp_path, model_name="sales")
    run = run_pipeline("train", {"data_path": str(tmp_path/"sales.csv"), "target": "sales", "time_column": "when",
                                 "task": "regression", "nthread": 1, "num_boost_round": 200, "model_name": "sales"}, s)
    assert run.metrics["test_r2"] > 0.9, run.metrics
    from mlnb.registry import load_model
    b = load_model(s, "champion", name="sales")
    assert b.spec.task == "regression" and b.spec["shop"].kind == "cat"


def test_out_of_range_hyperparameter_refuses_to_start(tmp_path):
    s = make_settings(tmp_path)
    with pytest.raises(PipelineError, match="learning_rate"):
        run_pipeline("train", {"learning_rate": 5.0, "nthread": 1}, s)
    (run,) = list_runs(s, "train")
    assert run["outcome"] == "failure" and "InvalidParameters" in run["error"]["type"]
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    assert client.search_registered_models() == []
