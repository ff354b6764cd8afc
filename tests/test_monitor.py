"""mlnb.monitor and mlnb.explain (SHAP) beyond the notebooks' inline examples: agreement with `shap`, the real
prediction log, the real flights data, and speed on a million rows."""
import json, time
from pathlib import Path
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
import xgboost as xgb

from mlnb.core import Settings
from mlnb.explain import shap_values, global_importance
from mlnb.monitor import (DriftReport, drift_report, drift_from_predictions, save_latest_report, load_latest_report,
                          psi, ks_test)
from mlnb.schema import FeatureSpec


def _synth(rng, n, shift=0.0, new_cat=0.0):
    carrier = rng.choice(["AA", "B6", "DL", "UA"], n, p=[0.2, 0.2, 0.25, 0.35]).astype(object)
    carrier[rng.random(n) < new_cat] = "ZZ"
    temp = rng.normal(55, 15, n)
    temp[rng.random(n) < 0.02] = np.nan
    return pl.DataFrame({"carrier": carrier.astype(str), "distance": rng.gamma(4, 300, n) + shift * 600,
                         "temp": temp, "dep_hour": rng.integers(5, 23, n).astype(np.float64)})


def test_pred_contribs_equal_shap_tree_explainer():
    "XGBoost's native TreeSHAP (what mlnb uses) gives the same values as shap.TreeExplainer."
    shap = pytest.importorskip("shap")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] * X[:, 2] + rng.normal(scale=0.5, size=3000) > 0).astype(np.float32)
    names = [f"f{i}" for i in range(5)]
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 4, "nthread": 1, "seed": 0},
                        xgb.DMatrix(X, y, feature_names=names), 40)
    Xs = X[:300]
    ours = shap_values(booster, Xs, names, ["q"] * 5)
    explainer = shap.TreeExplainer(booster)
    theirs = np.asarray(explainer.shap_values(Xs))
    assert theirs.shape == ours[:, :-1].shape
    np.testing.assert_allclose(ours[:, :-1], theirs, atol=1e-5)
    np.testing.assert_allclose(ours[:, -1], np.broadcast_to(explainer.expected_value, (300,)), atol=1e-5)


def test_global_importance_ranks_the_informative_feature_first():
    rng = np.random.default_rng(1)
    df = _synth(rng, 4000)
    y = (df["distance"].to_numpy() > 1200).astype(np.float32)
    spec = FeatureSpec.infer(df, ["carrier", "distance", "temp", "dep_hour"], categorical=["carrier"])
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
                        xgb.DMatrix(spec.encode_frame(df), y, feature_names=spec.names,
                                    feature_types=spec.feature_types, enable_categorical=True), 20)
    bundle = type("B", (), {"booster": booster, "spec": spec, "reference": df})()
    imp = global_importance(bundle, max_rows=1000)
    assert imp.columns == ["feature", "mean_abs_shap"]
    assert imp["feature"][0] == "distance"
    assert imp["mean_abs_shap"].is_sorted(descending=True)


def _write_log(settings, spec, frame, ts0, version="1", preds=None):
    from mlnb.predlog import PredictionLog
    recs = [dict(request_id=f"r{i}", ts=ts0 + timedelta(seconds=i), model_name="m", model_version=version,
                 arm="champion", entity=None, latency_ms=1.0,
                 prediction=float(preds[i]) if preds is not None else 0.5, features=row)
            for i, row in enumerate(frame.select(spec.names).iter_rows(named=True))]
    with PredictionLog(settings, spec, start=False) as log:
        log.append(recs)


def test_drift_from_the_real_prediction_log(tmp_path):
    settings = Settings(home=tmp_path/"home")
    rng = np.random.default_rng(2)
    ref = _synth(rng, 5000)
    spec = FeatureSpec.infer(ref, ["carrier", "distance", "temp", "dep_hour"], categorical=["carrier"])
    ref = ref.with_columns(prediction=pl.Series(rng.beta(2, 8, 5000)))
    day1, day2 = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 2, tzinfo=timezone.utc)
    _write_log(settings, spec, _synth(rng, 2000), day1, "1", rng.beta(2, 8, 2000))            # like the reference
    _write_log(settings, spec, _synth(rng, 2000, shift=1, new_cat=0.1), day2, "2", rng.beta(4, 4, 2000))

    rep = drift_from_predictions(settings, ref, spec, since=day2)
    assert rep.n_current == 2000 and dict(rep.context)["logged_versions"] == ("2",)
    assert rep["distance"].status == "drift" and rep["carrier"].status == "drift"
    assert rep["carrier"].new_categories == ("ZZ",)
    assert rep["dep_hour"].status == "ok" and rep["temp"].status == "ok"
    assert rep.prediction is not None and rep.prediction.status == "drift"

    calm = drift_from_predictions(settings, ref, spec, until=day2)
    assert calm.summary["status"] == "ok" and calm.n_current == 2000
    assert drift_from_predictions(settings, ref, spec, model_version="1").summary["status"] == "ok"
    with pytest.raises(ValueError, match="no predictions logged"):
        drift_from_predictions(settings, ref, spec, since=day2 + timedelta(days=5))

    p = save_latest_report(settings, rep)
    assert p.exists() and (p.parent/"drift-latest.html").exists()
    assert load_latest_report(settings) == rep == DriftReport.load(p)


def test_drift_between_the_flights_halves_of_2013():
    "Real data: January-June vs July-December. The season shows in the weather; the airline mix barely moves."
    from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL
    settings = Settings()
    h1 = build_training_set(settings, months=(1, 6)).select(FEATURES)
    h2 = build_training_set(settings, months=(7, 12)).select(FEATURES)
    rep = drift_report(h1, h2, features=FEATURES, categorical=CATEGORICAL, settings=settings)
    assert {"temp", "dewp"} <= set(rep.summary["drifting"])
    assert rep["carrier"].status == rep["origin"].status == rep["dep_hour"].status == "ok"
    same = drift_report(h1.sample(fraction=0.5, seed=1), h1.sample(fraction=0.5, seed=2), features=FEATURES,
                        categorical=CATEGORICAL, settings=settings)
    assert same.summary["status"] == "ok", same.to_frame().filter(pl.col("status") != "ok")


def test_drift_report_on_a_million_rows():
    "1M reference rows x 1M current rows x 20 columns (15 numeric, 5 categorical) + prediction, in seconds."
    rng = np.random.default_rng(3)
    n = 1_000_000

    def frame(shift):
        cols = {f"num{i}": rng.normal(shift * (i % 3), 1 + i / 10, n) for i in range(15)}
        cols.update({f"cat{i}": rng.choice(np.array([f"c{k}" for k in range(5 + 10 * i)]), n) for i in range(5)})
        cols["prediction"] = rng.beta(2, 8 - shift, n)
        return pl.DataFrame(cols)

    ref, cur = frame(0), frame(1)
    rep = drift_report(ref, cur, settings=Settings())
    assert len(rep.features) == 20 and rep.prediction is not None
    assert rep["num1"].status == "drift" and rep["num0"].status == "ok" and rep["cat3"].status == "ok"
    assert rep["num1"].test_sampled and rep["num1"].n_current == n


def test_ks_subsample_is_reproducible_and_recorded():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=400_000), rng.normal(size=300_000)
    r1, r2 = ks_test(a, b, max_rows=50_000, seed=7), ks_test(a, b, max_rows=50_000, seed=7)
    assert r1 == r2 and r1.sampled and (r1.n_reference, r1.n_current) == (50_000, 50_000)
    full = ks_test(a, b, max_rows=None)
    assert not full.sampled and full.n_reference == 400_000
    assert abs(full.statistic - r1.statistic) < 0.02
    assert psi(pl.Series([1.0, None] * 10), pl.Series([1.0] * 20)) > 1     # nulls are a bin of their own


# --- issue 14, section 5: drift that is right (each example a test) -------------------------------------------------

@pytest.mark.parametrize("ref,cur", [([5.0] * 2000, [6.0] * 2000), ([0.0] * 2000, [100.0] * 2000),
                                     ([0.0, 1.0] * 1000, [0.0, 5.0] * 1000), ([5.0] * 300, [6.0] * 300)])
def test_a_constant_or_low_cardinality_number_that_shifts_is_drift(ref, cur):
    "PSI was 0 and the status ok although KS gave p = 0 (the open-ended top bin); now both see the shift."
    from mlnb.monitor import compare_column
    assert ks_test(ref, cur).p_value < 1e-10
    assert psi(ref, cur) > 1
    fd = compare_column(pl.Series(ref), pl.Series(cur), name="k")
    assert fd.status == "drift" and fd.psi > 1


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_a_few_rows_from_the_reference_distribution_are_insufficient_data(n):
    rng = np.random.default_rng(n)
    ref = _synth(rng, 5000)
    rep = drift_report(ref, _synth(rng, n), settings=Settings())
    assert rep.status == "insufficient data" and rep.summary["n_drifting"] == 0
    assert {f.status for f in rep.features} == {"insufficient data"}
    assert all("at least 30" in f.reason for f in rep.features)


def test_drift_after_one_served_request_is_insufficient_data(tmp_path):
    "`mlnb drift` after one served request said drift; the prediction log path now says insufficient data."
    settings = Settings(home=tmp_path/"home")
    rng = np.random.default_rng(8)
    ref = _synth(rng, 5000)
    spec = FeatureSpec.infer(ref, ["carrier", "distance", "temp", "dep_hour"], categorical=["carrier"])
    _write_log(settings, spec, _synth(rng, 1), datetime(2026, 1, 1, tzinfo=timezone.utc))
    rep = drift_from_predictions(settings, ref, spec, model_name="m")
    assert rep.n_current == 1 and rep.status == "insufficient data"


EVIDENTLY = Path(__file__).resolve().parents[1]/".refs"/"evidently"/"bin"/"python"
_EV_SCRIPT = r"""
import json, sys, pandas as pd
from evidently import Report, Dataset, DataDefinition
from evidently.presets import DataDriftPreset
ref, cur = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2])
dd = DataDefinition(numerical_columns=sys.argv[3].split(","), categorical_columns=sys.argv[4].split(","))
res = Report([DataDriftPreset()]).run(Dataset.from_pandas(cur, data_definition=dd), Dataset.from_pandas(ref, data_definition=dd)).dict()
print(json.dumps({m["config"]["column"]: [m["config"]["method"], m["value"]] for m in res["metrics"]
                  if m["config"].get("type", "").endswith("ValueDrift")}))
"""
_METHODS = {"K-S p_value": "ks", "Wasserstein distance (normed)": "wasserstein", "chi-square p_value": "chi2",
            "Z-test p_value": "z", "Jensen-Shannon distance": "jensenshannon"}


@pytest.mark.parametrize("n", [800, 5000])
def test_the_test_choice_and_distances_match_evidently(tmp_path, n):
    "Evidently 0.7.23 (its own venv, `make .refs/evidently/.installed`) on the same frames: same test per column, "
    "same Wasserstein / Jensen-Shannon distances and KS / z p-values (chi-square: homogeneity vs goodness of fit)."
    if not EVIDENTLY.exists(): pytest.fail(f"{EVIDENTLY} is missing: run `make .refs/evidently/.installed`")
    import subprocess
    rng = np.random.default_rng(n)
    def frame(shift):
        return pl.DataFrame({"num": rng.normal(shift, 1, n), "few": rng.integers(0, 4, n).astype(float) + (shift > 0),
                             "cat": rng.choice(["a", "b", "c", "d"], n, p=[0.4, 0.3, 0.2, 0.1] if not shift else [0.3] * 3 + [0.1]),
                             "two": rng.choice(["y", "n"], n, p=[0.5 + shift / 4, 0.5 - shift / 4])})
    ref, cur = frame(0.0), frame(0.2)
    ref.write_csv(tmp_path/"r.csv"); cur.write_csv(tmp_path/"c.csv")
    p = subprocess.run([str(EVIDENTLY), "-c", _EV_SCRIPT, str(tmp_path/"r.csv"), str(tmp_path/"c.csv"), "num,few", "cat,two"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    ours = drift_report(ref, cur, settings=Settings(), categorical=["cat", "two"])
    for col, (method, value) in theirs.items():
        f = ours[col]
        assert f.test == _METHODS[method], (col, f.test, method)
        got = f.p_value if f.test in ("ks", "z") else f.statistic
        if f.test != "chi2": assert abs(got - value) < 1e-6, (col, f.test, got, value)
