"""Data contracts on the real flights data: findings, speed, and the validate pipeline as a gate in front of training."""
import json, time
from pathlib import Path
import mlflow, numpy as np, polars as pl, pytest
from conftest import make_settings
from mlnb.core import Settings
from mlnb.audit import read_audit
from mlnb.examples.flights import build_training_set, training_contract, FEATURES, TARGET
from mlnb.pipeline import run_pipeline, list_runs, PipelineError
from mlnb.contracts import DataContract, ContractError, ContractViolation, validate
from mlnb.schema import DataCheckError
from mlnb.params import validate_params, InvalidParameters, check_memory, InsufficientMemory

COLUMNS = ["sched_dep_ts", *FEATURES, TARGET]


@pytest.fixture(scope="module")
def clean():
    "Real training rows (10% of January-February): the time column, every feature and the target."
    return build_training_set(Settings(), months=(1, 2), sample=0.1).select(COLUMNS)


@pytest.fixture(scope="module")
def contract(clean):
    return training_contract(clean, source="test: months 1-2")


def _every_fifth_null(col):
    return lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) % 5 == 0).then(None).otherwise(pl.col(col)).alias(col))


def _strings_in(col):
    return lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) % 10 == 3).then(pl.lit("far"))
                                        .otherwise(pl.col(col).cast(pl.String)).alias(col))


def _swap(a, b):
    return lambda df: df.rename({a: "__a", b: a}).rename({"__a": b}).select(df.columns)


# the corruptions: (damage, check that must report it, words the message must contain)
CORRUPTIONS = {
    "dropped_column": (lambda df: df.drop("distance"), "missing_column", "column 'distance' is missing"),
    "column_20pct_null": (_every_fifth_null("temp"), "too_many_missing", "column 'temp' is 20.0% missing"),
    "strings_in_numeric": (_strings_in("distance"), "wrong_values", "are not numbers, e.g. 'far'"),
    "shuffled_type": (_swap("carrier", "distance"), "wrong_type",
                      "column 'carrier' has type Float64; the contract expects a string"),
    "empty_frame": (lambda df: df.head(0), "empty", "has no rows"),
}


def test_contract_describes_the_training_data(clean, contract, tmp_path):
    c = contract
    assert c.target == TARGET and c.task == "binary" and set(c.features) == set(FEATURES)
    assert abs(c.class_balance["1"] - clean[TARGET].mean()) < 1e-6 and abs(sum(c.class_balance.values()) - 1) < 1e-6
    d = c["distance"]
    assert (d.kind, d.nullable, d.min, d.max) == ("num", False, clean["distance"].min(), clean["distance"].max())
    assert d.quantiles["q50"] == pytest.approx(clean["distance"].quantile(0.5, "nearest"))
    assert c["temp"].nullable and c["plane_age"].max_null_fraction == 0.25          # declared, not just observed
    assert c["carrier"].categories["UA"] == pytest.approx((clean["carrier"] == "UA").mean(), abs=1e-6)
    assert c["sched_dep_ts"].role == "other" and c["sched_dep_ts"].kind == "datetime"
    # the hash is a content hash: the same data gives the same contract hash, any edit a new one
    again = training_contract(clean)
    assert again.sha256 == c.sha256 and again.created_at >= c.created_at
    assert c.edit("distance", max=9999.0).sha256 != c.sha256
    p = c.save(tmp_path/"contract.json")
    assert DataContract.load(p) == c and json.loads(p.read_text())["sha256"] == c.sha256
    p.write_text(p.read_text().replace('"outlier_sd": 3.0', '"outlier_sd": 4.0'))
    with pytest.raises(ContractError, match="edited by hand"):
        DataContract.load(p)
    assert DataContract.load(p, verify=False).outlier_sd == 4.0
    # the data passes its own contract
    assert validate(clean, c).findings == []


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_gets_its_clear_error(clean, contract, name):
    damage, check, words = CORRUPTIONS[name]
    bad = damage(clean)
    for frame in (bad, bad.to_pandas()):              # polars and pandas alike
        report = validate(frame, contract, what="damaged")
        assert not report.ok
        assert check in {f.check for f in report.errors}, report
        assert any(words in f.message for f in report.errors), report
        with pytest.raises(ContractViolation, match=words) as e:
            report.raise_for_errors()
        assert isinstance(e.value, DataCheckError)


def test_null_where_forbidden_and_warnings(clean, contract):
    r = validate(clean.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise(pl.col("dep_hour")).alias("dep_hour")),
                 contract)
    assert [(f.check, f.column, f.observed) for f in r.errors] == [("null_forbidden", "dep_hour", 1)]
    shifted = clean.with_columns(distance=pl.col("distance") * 10, carrier=pl.lit("ZZ"), delayed=pl.lit(0, pl.Int8))
    w = {(f.check, f.column) for f in validate(shifted, contract).warnings}
    assert {("out_of_range", "distance"), ("outliers", "distance"), ("unseen_categories", "carrier"),
            ("minority_class", TARGET)} <= w


def test_score_mode_and_one_record(clean, contract):
    batch = clean.drop(TARGET, "sched_dep_ts").with_columns(request_id=pl.int_range(pl.len()))
    assert validate(batch, contract, mode="score").ok
    assert {f.check for f in validate(batch, contract).errors} == {"missing_column", "extra_column"}
    check = contract.validator()
    records = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
               for r in clean.select(contract.features).head(500).to_dicts()]
    assert all(f.severity == "warning" for r in records for f in check(r))
    assert [f.check for f in check({**records[0], "distance": "far"})] == ["wrong_values"]
    # its speed is measured by `mlnb bench features` (validate_one_record_p50_ms), not asserted here


def test_a_full_year_validates(contract):
    "All 336,776 flights (timed by `mlnb bench features`: validate_year_seconds)."
    year = build_training_set(Settings(), months=(1, 12)).select(COLUMNS)
    r = validate(year, contract, log=False)
    assert r.n_rows == 336_776 and r.ok     # later months drift (warnings) but break nothing


def test_hyperparameters_and_memory():
    validate_params({"learning_rate": 0.3, "max_depth": 8, "num_boost_round": 100, "early_stopping_rounds": 10,
                     "max_batch": 64, "objective": "binary:logistic"})
    with pytest.raises(InvalidParameters) as e:
        validate_params({"learning_rate": 0.0, "max_depth": -1, "num_boost_round": 1.5, "subsample": True})
    assert len(e.value.problems) == 4
    assert "learning_rate = 0.0 is outside its range (0, 1]" in str(e.value)
    with pytest.raises(InsufficientMemory, match="needs about 1.0 GB of memory but only 512.0 MB is available"):
        check_memory(2**30, available=2**29)


# -- the validate pipeline, a gate in front of training -----------------------------------------------------------

@pytest.fixture(scope="module")
def gated(tmp_path_factory, clean, contract):
    "A home whose champion was trained through the gate: clean data validated, then the train pipeline."
    tmp = tmp_path_factory.mktemp("gated")
    # the train pipeline's own basic check on a user table has one null limit for all columns; the contract
    # (which gives plane_age and pressure their own) is the stricter gate here
    s = make_settings(tmp, max_null_fraction=0.25)
    data, cpath = tmp/"clean.parquet", contract.save(tmp/"contract.json")
    clean.write_parquet(data)
    run = run_pipeline("validate", {"data_path": str(data), "contract_path": str(cpath), "target": TARGET,
                                    "time_column": "sched_dep_ts", "then_train": True, "num_boost_round": 20,
                                    "nthread": 1, "model_name": s.model_name}, s)
    return s, run, tmp


def _versions(s):
    c = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    return c, sorted(int(v.version) for v in c.search_model_versions(f"name='{s.model_name}'"))


def test_clean_data_passes_and_the_model_carries_its_contract(gated, contract):
    s, run, _ = gated
    assert run.outcome == "success" and run.metrics["validation"]["ok"] is True
    assert run.metrics["contract_sha256"] == contract.sha256 and run.metrics["model_version"] == 1
    c, versions = _versions(s)
    assert versions == [1]
    mv = c.get_model_version_by_alias(s.model_name, "champion")
    assert mv.tags["mlnb.contract_sha256"] == contract.sha256
    got = DataContract.load(c.download_artifacts(mv.run_id, "contract/data_contract.json", str(gated[2])))
    assert got == contract
    assert json.loads((run.out_dir/"validation.json").read_text())["ok"] is True
    assert [r["operation"] for r in read_audit(s, phase="end", outcome="success")].count("validate_data") == 1


BAD_PARAMS = {
    "learning_rate_out_of_range": ({"learning_rate": 5.0}, "learning_rate = 5.0 is outside its range (0, 1]"),
    "not_enough_memory": ({"min_memory_gb": 1e7}, "of memory but only"),
}


@pytest.mark.parametrize("name", [*CORRUPTIONS, *BAD_PARAMS])
def test_bad_data_or_parameters_stop_the_gate(gated, clean, name):
    "Each problem fails the pipeline with its clear message; no model is trained; audited; the champion untouched."
    s, _, tmp = gated
    params = {"contract_path": str(tmp/"contract.json"), "target": TARGET, "time_column": "sched_dep_ts",
              "then_train": True, "num_boost_round": 20, "nthread": 1, "model_name": s.model_name}
    if name in CORRUPTIONS:
        damage, check, words = CORRUPTIONS[name]
        path = tmp/f"{name}.parquet"
        damage(clean).write_parquet(path)
        params["data_path"] = str(path)
    else:
        extra, words = BAD_PARAMS[name]
        params.update(data_path=str(tmp/"clean.parquet"), **extra)
    audit_before = len(read_audit(s))
    with pytest.raises(PipelineError, match=r"pipeline validate failed") as e:
        run_pipeline("validate", params, s)
    assert words in str(e.value), str(e.value)
    run = e.value.run
    assert run.outcome == "failure" and words in run.error["message"] and run.notebook.exists()
    # audited: the pipeline run failed, and (for data problems) so did the validation, with every finding
    new = read_audit(s)[audit_before:]
    ends = {(r["operation"], r["outcome"]) for r in new if r["phase"] == "end"}
    assert ("pipeline_run", "failure") in ends
    if name in CORRUPTIONS:
        (v,) = [r for r in new if r["operation"] == "validate_data" and r["phase"] == "end"]
        assert v["outcome"] == "failure" and words in v["error_detail"]["message"]
        assert any(f["check"] == CORRUPTIONS[name][1] for f in v["details"]["findings"])
    # no model was trained, the champion is untouched
    assert len(list_runs(s, "train")) == 1
    c, versions = _versions(s)
    assert versions == [1] and str(c.get_model_version_by_alias(s.model_name, "champion").version) == "1"
