"""Own tables end to end (issue 14): failed runs leave an honest state (section 4) and targets as users have them
(section 2), each through the real `mlnb run` command on the small synthetic tables in tests/data/."""
from __future__ import annotations
import json, os, subprocess, sys
from pathlib import Path
import mlflow, pytest
from conftest import ROOT, make_settings

DATA = Path(__file__).parent/"data"
FAST = ["-p", "nthread=1", "-p", "num_boost_round=40", "-p", "checkpoint_every=0"]


def mlnb(settings, *args) -> subprocess.CompletedProcess:
    "The real `mlnb` command line in a subprocess, with `settings` in its environment."
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlnb.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n"):])


def ended(settings, operation="pipeline_run"):
    from mlnb.audit import read_audit
    return read_audit(settings, operation=operation, phase="end")


def train(settings, table: str, *extra: str, target: str = "churn"):
    return mlnb(settings, "run", "train", "-p", f"data_path={DATA/table}", "-p", f"target={target}", *FAST, *extra)


# --- 4. Failed runs leave an honest state -------------------------------------------------------------------------
def test_run_help_lists_the_pipeline_parameters(tmp_path):
    p = mlnb(make_settings(tmp_path), "run", "train", "--help")
    assert p.returncode == 0, p.stderr
    assert "usage: mlnb run train" in p.stdout
    assert "positive_class: str" in p.stdout and 'target: str = ""' in p.stdout and "num_boost_round: int = 500" in p.stdout
    assert "maximum boosting rounds" in p.stdout          # the help comment of the parameter
    q = mlnb(make_settings(tmp_path), "run", "evaluate", "-h")
    assert q.returncode == 0 and "margin: float = 0.0" in q.stdout


def test_train_failing_after_its_mlflow_run_opened_leaves_it_failed(tmp_path):
    s = make_settings(tmp_path)
    p = train(s, "churn_yesno.csv", "-p", "objective=binary:no-such-objective")
    assert p.returncode == 1 and "no-such-objective" in p.stderr, p.stderr[-2000:]
    (end,) = ended(s)
    assert end["outcome"] == "failure" and "no-such-objective" in end["error_detail"]["message"]
    status = json.loads(next((s.reports_dir/"train").glob("*/status.json")).read_text())
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    run = client.get_run(status["metrics"]["mlflow_run_id"])
    assert run.info.status == "FAILED" and "no-such-objective" in run.data.tags["mlnb.error"]


def test_failed_gate_exits_nonzero_with_failure_in_the_audit(tmp_path):
    s = make_settings(tmp_path)
    assert train(s, "churn_yesno.csv", "-p", "model_name=churn").returncode == 0
    assert train(s, "churn_yesno.csv", "-p", "model_name=churn").returncode == 0     # the same model again: no improvement
    p = mlnb(s, "run", "evaluate", "-p", "model_name=churn", "-p", f"data_path={DATA/'churn_yesno.csv'}",
             "-p", "n_bootstrap=200", "-p", "min_group_size=20")
    assert p.returncode == 1, (p.stdout[-2000:], p.stderr[-2000:])
    assert "GateFailed" in p.stderr and "gate failed for v2" in p.stderr and "auc" in p.stderr
    end = ended(s)[-1]
    assert end["outcome"] == "failure" and end["details"]["pipeline"] == "evaluate"
    assert "gate failed for v2" in end["error_detail"]["message"]
    gate = [r for r in ended(s, "gate")][-1]       # the decision itself is still recorded on the version
    assert gate["model_name"] == "churn"


# --- 2. Targets as users have them --------------------------------------------------------------------------------
def test_yes_no_target_trains_with_its_positive_class_stated_and_settable(tmp_path):
    s = make_settings(tmp_path)
    p = train(s, "churn_yesno.csv")
    assert p.returncode == 0, p.stderr[-3000:]
    m = last_json(p.stdout)["metrics"]
    assert m["model_name"] == "churn_yesno-churn"                  # derived from the table and target, and printed
    assert m["target"]["positive_class"] == "yes" and m["target"]["negative_class"] == "no"
    assert m["test_auc"] > 0.8, m
    from mlnb.registry import load_model
    b = load_model(s, "champion", name="churn_yesno-churn")
    assert b.spec.positive_class == "yes"
    q = train(s, "churn_yesno.csv", "-p", "positive_class=no", "-p", "model_name=churn-no")
    mq = last_json(q.stdout)["metrics"]
    assert mq["target"]["positive_class"] == "no" and mq["test_auc"] > 0.8
    r = train(s, "churn_yesno.csv", "-p", "positive_class=maybe")
    assert r.returncode == 1 and "positive_class 'maybe' is not a value" in r.stderr


def test_boolean_target(tmp_path):
    p = train(make_settings(tmp_path), "churn_bool.csv", target="churned")
    assert p.returncode == 0, p.stderr[-3000:]
    assert last_json(p.stdout)["metrics"]["target"]["positive_class"] == "true"


def test_null_targets_are_dropped_and_counted_or_refused_above_the_limit(tmp_path):
    s = make_settings(tmp_path)
    p = train(s, "churn_nulltarget.csv")
    assert p.returncode == 0, p.stderr[-3000:]
    assert last_json(p.stdout)["metrics"]["target"]["dropped_nulls"] == 24
    q = train(s, "churn_mostlynull.csv")
    assert q.returncode == 1 and "null in 300 of 600 rows" in q.stderr and "MLNB_MAX_NULL_FRACTION" in q.stderr
    assert "Label contains NaN" not in q.stderr


def test_single_class_is_refused_before_training(tmp_path):
    s = make_settings(tmp_path)
    p = train(s, "churn_oneclass.csv")
    assert p.returncode == 1 and "single class ('no')" in p.stderr and "add rows of the other class" in p.stderr
    assert mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri).search_registered_models() == []
    assert "mlflow_run_id" not in json.loads(next((s.reports_dir/"train").glob("*/status.json")).read_text())["metrics"]


def test_one_class_test_window_is_na_and_never_champion(tmp_path):
    s = make_settings(tmp_path)
    p = train(s, "churn_lateoneclass.csv", "-p", "model_name=late")
    assert p.returncode == 0, p.stderr[-3000:]
    m = last_json(p.stdout)["metrics"]
    assert m["test_auc"] == "n/a" and "one class" in m["test_undefined"]["auc"]
    assert isinstance(m["test_logloss"], float)                    # the defined metrics are still there
    from mlnb.registry import ModelRegistry
    assert ModelRegistry(s, "late").current_version("champion") is None


# --- 1. One project, several models -------------------------------------------------------------------------------
def test_two_tables_are_two_models_and_a_name_keeps_its_target(tmp_path):
    s = make_settings(tmp_path)
    a = train(s, "churn_yesno.csv")
    b = train(s, "shop_sales.csv", "-p", "task=regression", target="amount")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    assert last_json(b.stdout)["metrics"]["model_name"] == "shop_sales-amount"      # derived, shown in the run summary
    from mlnb.registry import ModelRegistry
    assert ModelRegistry(s, "churn_yesno-churn").aliases() == {"champion": "1"}
    assert ModelRegistry(s, "shop_sales-amount").aliases() == {"champion": "1"}
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    assert {"churn_yesno-churn", "shop_sales-amount"} <= {e.name for e in client.search_experiments()}   # one experiment per model
    run = client.get_run(last_json(b.stdout)["metrics"]["mlflow_run_id"])
    assert run.data.params["target"] == "amount" and run.data.params["task"] == "regression"
    assert "months" not in run.data.params and "cancelled" not in run.data.params          # no demo parameters
    c = train(s, "shop_sales.csv", "-p", "task=regression", "-p", "model_name=churn_yesno-churn", target="amount")
    assert c.returncode == 1 and "versions of one name must share target and task" in c.stderr
    assert "-p model_name=" in c.stderr and "mlflow_run_id" not in c.stdout
    assert ModelRegistry(s, "churn_yesno-churn").latest_version() == "1"


def test_schema_change_is_refused_by_the_gate_and_by_forced_promotion_unless_declared(tmp_path):
    s = make_settings(tmp_path)
    assert train(s, "churn_yesno.csv", "-p", "model_name=c").returncode == 0
    assert train(s, "churn_extra.csv", "-p", "model_name=c").returncode == 0           # v2 has a new column `region`
    ev = mlnb(s, "run", "evaluate", "-p", "model_name=c", "-p", f"data_path={DATA/'churn_extra.csv'}", "-p", "n_bootstrap=100")
    assert ev.returncode == 1 and "input schema differs" in ev.stderr and "feature(s) added: region" in ev.stderr
    pr = mlnb(s, "models", "--name", "c", "promote", "--version", "2", "--force")
    assert pr.returncode == 1 and "input schema differs from champion v1" in pr.stderr and "--allow-schema-change" in pr.stderr
    ok = mlnb(s, "models", "--name", "c", "promote", "--version", "2", "--force", "--allow-schema-change", "--reason", "new column")
    assert ok.returncode == 0, ok.stderr
    end = ended(s, "promote")[-1]
    assert end["outcome"] == "success" and end["details"]["schema_changes"] == ["feature(s) added: region"]
    assert end["details"]["schema_change_allowed"] is True


# --- 3. Column types and names ------------------------------------------------------------------------------------
def test_messy_table_nulls_booleans_dates_and_a_batch_file_with_an_empty_column(tmp_path):
    s = make_settings(tmp_path, model_name="messy")
    p = train(s, "messy.csv", "-p", "model_name=messy")
    assert p.returncode == 0, p.stderr[-3000:]
    m = last_json(p.stdout)["metrics"]
    assert m["excluded_columns"] == ["signup"] and m["test_auc"] > 0.8, m
    from mlnb.registry import load_model
    spec = load_model(s, "champion", name="messy").spec
    assert spec["tenure"].kind == "num" and spec["tenure"].nullable          # NA, N/A and empty are nulls, not categories
    assert spec["active"].kind == "num" and "signup" not in spec.names        # a boolean is 0/1; the date is excluded
    rows = ["tenure,monthly,plan,active"] + [f",{40 + i},basic,{'true' if i % 2 else 'false'}" for i in range(5)]
    (tmp_path/"batch.csv").write_text("\n".join(rows) + "\n")                 # tenure empty in every row
    b = mlnb(s, "predict", "--input", str(tmp_path/"batch.csv"), "--output", str(tmp_path/"out.csv"), "--quiet")
    assert b.returncode == 0, b.stderr
    assert json.loads(b.stdout.strip().splitlines()[-1])["rows"] == 5


def test_unservable_names_and_infinite_values_are_refused_at_training_naming_the_column(tmp_path):
    s = make_settings(tmp_path)
    p = train(s, "badnames.csv")
    assert p.returncode == 1 and "'tenure[months]' contains [ ]" in p.stderr and "'entity' is one of the prediction log" in p.stderr
    q = train(s, "with_inf.csv")
    assert q.returncode == 1 and "column 'monthly' has 12 infinite value(s)" in q.stderr
    assert mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri).search_registered_models() == []


def test_time_column_in_text_needs_and_takes_a_time_format(tmp_path):
    s = make_settings(tmp_path)
    args = ["-p", "time_column=month", "-p", "task=regression"]
    p = train(s, "monthly_text.csv", *args, target="y")
    assert p.returncode == 1 and "'Jan-2010'" in p.stderr and "-p time_format=" in p.stderr
    q = train(s, "monthly_text.csv", *args, "-p", "time_format=%b-%Y", target="y")
    assert q.returncode == 0, q.stderr[-3000:]
    assert last_json(q.stdout)["metrics"]["test_r2"] > 0.9


# --- 6. Honest artifacts ------------------------------------------------------------------------------------------
def test_validate_honours_the_null_limit_and_warns_of_leakage(tmp_path):
    strict = make_settings(tmp_path/"strict", max_null_fraction=0.05)
    p = mlnb(strict, "run", "validate", "-p", f"data_path={DATA/'messy.csv'}", "-p", "target=churn")
    assert p.returncode == 1 and "tenure" in p.stderr and "missing" in p.stderr, p.stderr[-2000:]
    q = mlnb(make_settings(tmp_path/"leaky"), "run", "validate", "-p", f"data_path={DATA/'churn_leaky.csv'}", "-p", "target=churn")
    assert q.returncode == 0, q.stderr[-2000:]
    (w,) = last_json(q.stdout)["metrics"]["leakage_warnings"]
    assert "'cancel_code' alone predicts the target with AUC 1.000" in w


def test_leaky_feature_is_warned_in_training_and_in_the_card(tmp_path):
    s = make_settings(tmp_path)
    p = train(s, "churn_leaky.csv", "-p", "model_name=leaky")
    assert p.returncode == 0, p.stderr[-2000:]
    assert any("cancel_code" in w for w in last_json(p.stdout)["metrics"]["leakage_warnings"])
    ev = mlnb(s, "run", "evaluate", "-p", "model_name=leaky", "-p", f"data_path={DATA/'churn_leaky.csv'}", "-p", "n_bootstrap=100")
    assert ev.returncode == 1 and "there is no champion" not in ev.stderr      # v1 is the champion: nothing to compare, a failed gate
    status = json.loads(next((s.reports_dir/"evaluate").glob("*/status.json")).read_text())
    card = Path(status["metrics"]["card_md"]).read_text()
    assert "Warning: possible leakage: feature 'cancel_code'" in card
    assert "window (months)" not in card and "Probabilities are calibrated" in card and "- **target**: churn" in card and "champion version None" not in card
