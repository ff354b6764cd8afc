"""Evaluation (mlnb.metrics, fairness, robustness, explain, report, gate, cards) on the real flights: metrics against scikit-learn, the paired comparison and DeLong, the gate
on a clearly worse and a clearly better candidate, bias by carrier and origin, robustness, explanations and the
model card of a demo-like model. No MLflow here (see test_registry_ops.py); models are trained directly."""
import json, math, time
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from sklearn import metrics as skm

from mlnb.metrics import calibration_table, compare, compute_metrics
from mlnb.fairness import bias_report, compare_bias
from mlnb.robustness import robustness_report
from mlnb.explain import explain, predict, shap_agreement
from mlnb.report import EvaluationReport, default_presets, evaluate
from mlnb.gate import gate
from mlnb.cards import model_card


@pytest.fixture(scope="module")
def flights():
    """Months 1-6 split by time like the train pipeline (train 1-4, valid 5, held-out 6) and three real models:
    `weak` (1% of the rows, 10 rounds), `coarse` (all rows, learning rate 0.3: overshoots) and `good` (half the
    rows, learning rate 0.05)."""
    from mlnb.core import Settings
    from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE
    from mlnb.schema import FeatureSpec
    from mlnb.train import train_booster, time_split
    df = build_training_set(Settings(), months=(1, 6))
    train, valid, test = time_split(df)
    spec = FeatureSpec.infer(train, FEATURES, target="delayed", categorical=CATEGORICAL, nullable=NULLABLE)
    def fit(fraction, rounds, **params):
        sub = train.sample(fraction=fraction, seed=0) if fraction < 1 else train
        b = train_booster(spec, sub, valid, params=params, num_boost_round=rounds, nthread=1, seed=0).booster
        return SimpleNamespace(booster=b, spec=spec)
    models = {"weak": fit(0.01, 10), "coarse": fit(1.0, 300, learning_rate=0.3), "good": fit(0.5, 600, learning_rate=0.05)}
    y = test["delayed"].cast(pl.Float64).to_numpy()
    return SimpleNamespace(test=test, y=y, spec=spec, models=models,
                           p={k: predict(m, test) for k, m in models.items()})


def test_metrics_agree_with_sklearn_on_real_predictions(flights):
    y, p = flights.y, flights.p["good"]
    m = compute_metrics(y, p, threshold=0.4)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    assert m["logloss"] == pytest.approx(skm.log_loss(y, p), abs=1e-9)
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    assert m["f1"] == pytest.approx(skm.f1_score(y, p >= 0.4), abs=1e-12)
    assert m["recall"] == pytest.approx(skm.recall_score(y, p >= 0.4), abs=1e-12)
    assert 0.65 < m["auc"] < 0.85 and m["n"] == len(y) > 20_000
    cal = calibration_table(y, p)
    assert cal["n"].sum() == len(y) and m["ece"] == pytest.approx(float((cal["share"] * cal["gap"].abs()).sum()), abs=1e-9)


def test_bootstrap_and_delong_agree_on_real_models(flights):
    y, p = flights.y, flights.p
    c = compare(y, p["coarse"], p["good"], ["auc", "logloss"], n_bootstrap=400, seed=1)
    b, d = c["auc"], c["auc_delong"]
    assert b.diff == pytest.approx(d.diff, abs=1e-12)
    assert b.se == pytest.approx(d.se, rel=0.3)            # two estimates of the same standard error
    assert b.ci_low < b.diff < b.ci_high and d.ci_low < d.diff < d.ci_high
    # the same seed gives the same resamples: the comparison is reproducible
    again = compare(y, p["coarse"], p["good"], ["auc"], n_bootstrap=400, seed=1, delong_auc=False)
    assert (again["auc"].ci_low, again["auc"].ci_high) == (b.ci_low, b.ci_high)


def test_comparing_a_model_with_itself_finds_no_difference(flights):
    "A test that can fail the other way: no 'significant' difference where there is none."
    y, p = flights.y, flights.p["coarse"]
    noise = np.random.default_rng(0).normal(0, 1e-9, len(p))     # tiny, order-preserving almost everywhere
    c = compare(y, p, np.clip(p + noise, 0, 1), ["auc", "logloss"], n_bootstrap=300)
    assert abs(c["auc"].diff) < 1e-4 and c["auc"].p_value > 0.2 and c["auc_delong"].p_value > 0.2
    g = gate(c, "auc", margin=0.0)
    assert not g.passed and g.reasons[0].startswith("auc")


def _gate(flights, champion, candidate, **kw):
    y, p, test = flights.y, flights.p, flights.test
    c = compare(y, p[champion], p[candidate], ["auc", "pr_auc", "logloss", "brier"], n_bootstrap=300)
    bias = compare_bias(test, y, p[champion], p[candidate], ["carrier", "origin"], n_bootstrap=300)
    rob = robustness_report(flights.models[candidate], test, n_rows=300)
    return gate(c, "auc", margin=0.002, bias=bias, robustness=rob, **kw), c


def test_gate_rejects_clearly_worse_and_accepts_clearly_better_candidate(flights):
    worse, cw = _gate(flights, "coarse", "weak")
    assert not worse.passed
    assert cw["auc"].diff < -0.02 and cw["auc"].ci_high < 0
    assert any(r.startswith("auc did not improve") for r in worse.reasons)
    assert any(r.startswith("logloss") and "regression beyond tolerance" in r for r in worse.reasons)
    assert all(not c.passed for c in worse.checks if c.message in worse.reasons)
    better, cb = _gate(flights, "coarse", "good")
    assert better.passed, better.reasons
    assert cb["auc"].ci_low > 0.002 and cb["auc"].p_improvement(0.002) < 0.05
    assert better.reasons[0].startswith("auc improved") and len(better.reasons) == len(better.checks)
    assert {c.name for c in better.checks} >= {"primary:auc", "no_regression:logloss", "bias:carrier:equal_opportunity_diff",
                                               "bias:origin:demographic_parity_diff", "robustness"}
    json.dumps(better.to_dict()); json.dumps(worse.to_dict())


def test_gate_rejects_a_better_model_that_is_less_fair(flights):
    "The weak model flags almost nobody, so its group gaps are tiny; the good one is far better but its gaps grow."
    g, c = _gate(flights, "weak", "good")
    assert c["auc"].diff > 0.03 and not g.passed
    failed = [x for x in g.checks if not x.passed]
    assert failed and all(x.name.startswith("bias:") for x in failed)
    assert all("bias worsened beyond tolerance" in r for r in g.reasons)
    # within a (much) larger tolerance it would pass: the decision is the tolerance's, not an accident
    assert _gate(flights, "weak", "good", bias_tolerance=1.0)[0].passed


def test_bias_table_by_carrier_and_origin(flights):
    y, p, test = flights.y, flights.p["good"], flights.test
    b = bias_report(test, y, p, ["carrier", "origin"], threshold=0.5, min_group_size=100)
    t = b.table
    assert set(t["column"]) == {"carrier", "origin"}
    assert set(t.filter(pl.col("column") == "origin")["group"]) == {"EWR", "JFK", "LGA"}
    carriers = t.filter(pl.col("column") == "carrier")
    assert carriers["n"].sum() == len(y) and carriers.height == test["carrier"].n_unique()
    small = carriers.filter(pl.col("small"))
    assert small.height >= 1 and (small["n"] < 100).any()                        # tiny carriers: marked, kept
    # per-group numbers against a direct computation for one carrier
    ua = (test["carrier"] == "UA").to_numpy()
    row = carriers.filter(pl.col("group") == "UA").row(0, named=True)
    assert row["auc"] == pytest.approx(skm.roc_auc_score(y[ua], p[ua]), abs=1e-9)
    assert row["tpr"] == pytest.approx(skm.recall_score(y[ua], p[ua] >= 0.5), abs=1e-12)
    assert row["predicted_positive_rate"] == pytest.approx((p[ua] >= 0.5).mean(), abs=1e-12)
    judged = carriers.filter(~pl.col("small"))
    s = b.summary.filter(pl.col("column") == "carrier").row(0, named=True)
    assert s["equal_opportunity_diff"] == pytest.approx(judged["tpr"].max() - judged["tpr"].min(), abs=1e-12)
    assert s["demographic_parity_diff"] == pytest.approx(judged["predicted_positive_rate"].max()
                                                         - judged["predicted_positive_rate"].min(), abs=1e-12)
    assert s["small_groups"] == small.height


def test_robustness_of_a_real_model(flights):
    r = robustness_report(flights.models["good"], flights.test, n_rows=500)
    assert r.passed, r.failures
    names = set(r.checks["check"])
    assert {"all features missing", "unseen categories", "extreme values (1e9)", "shuffled column order",
            "values 10x beyond the training range", "extra column ignored"} <= names
    assert {f"missing {c}" for c in flights.spec.names} <= names
    assert set(r.sensitivity["feature"]) <= set(flights.spec.names) and r.sensitivity["mean_abs_change"].is_sorted(descending=True)


def test_explanations_sum_to_the_prediction_and_match_shap(flights):
    m = flights.models["good"]
    x = explain(m, flights.test, max_rows=1000, top_k=3)
    assert x["importance"]["mean_abs_shap"].is_sorted(descending=True) and len(x["dependence"]) == 3
    e = x["example"]
    assert e["base_value"] + e["contributions"]["contribution"].sum() == pytest.approx(e["margin"], abs=1e-4)
    X = m.spec.encode_frame(flights.test.head(200))
    assert shap_agreement(m.booster, X, m.spec.names, m.spec.feature_types) < 1e-5


def test_model_card_of_a_demo_like_model(flights, tmp_path):
    y, p, test = flights.y, flights.p, flights.test
    cand = flights.models["good"]
    rep = evaluate(cand, test, default_presets("binary", ["carrier", "origin"], n_bootstrap=100),
                      model_info={"name": "flight-delay", "version": "2"}, data_info={"source": "months 6-6"})
    c = compare(y, p["coarse"], p["good"], ["auc", "logloss", "brier"], n_bootstrap=100)
    bias = compare_bias(test, y, p["coarse"], p["good"], ["carrier", "origin"], n_bootstrap=100)
    g = gate(c, "auc", bias=bias, robustness=rep["robustness"]["report"])
    card = model_card({"name": "flight-delay", "version": "2", "champion_version": "1"}, rep, c, g,
                         lineage={"run_id": "r1", "git_commit": "abc123", "data_sha256": "f" * 64,
                                  "params": {"months": "1-6", "max_depth": "6"}, "framework_versions": {"xgboost": "3"}},
                         bias_comparisons=bias, spec=cand.spec)
    md_path, html_path = card.save(tmp_path)
    md, html = md_path.read_text(), html_path.read_text()
    for h in ["Summary", "Intended use", "Data", "Features", "Metrics", "Comparison with the champion", "Bias",
              "Robustness", "Explanations", "Gate decision", "Lineage", "Limitations"]:
        assert f"\n## {h}\n" in md and f"<h2>{h}</h2>" in html, h
    for h in ["By carrier", "By origin", "Calibration (ECE", "Business cost", "Change against the champion",
              "One prediction explained", "Global importance"]:
        assert f"### {h}" in md, h
    assert "| UA |" in md and "| LGA |" in md and "abc123" in md and "95% bootstrap intervals" in md
    assert "<script" not in html and "http" not in html.split("<body>")[1]      # self-contained
    # no project text in the toolkit: the card carries the text it is given
    assert "nycflights" not in md and "New York" not in md
    own = model_card({"name": "flight-delay", "version": "2"}, rep, intended_use="Scores delays.", limitations=["Only 2013."])
    assert "Scores delays." in own.to_markdown() and "- Only 2013." in own.to_markdown()
    # the report round-trips through a file: the same report, and the same HTML
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["results"]["bias"]["report"]["summary"][0]["column"] == "carrier"
    back = EvaluationReport.load(rep.save_json(tmp_path/"report.json"))
    assert back.to_dict() == rep.to_dict() and back.to_html() == rep.to_html()
    assert back["bias"]["report"].value("carrier", "equal_opportunity_diff") == rep["bias"]["report"].value("carrier", "equal_opportunity_diff")
    with pytest.raises(Exception, match="cannot assign"): back.created_at = "now"


def test_evaluation_on_50k_rows(flights):
    """A paired comparison and the bias change on ~50k rows (the held-out month repeated): the point values are the
    metrics and bias gaps of each model computed directly, and more rows give tighter intervals than the month alone."""
    test = pl.concat([flights.test, flights.test.head(50_000 - flights.test.height)])
    y = test["delayed"].cast(pl.Float64).to_numpy()
    pa, pb = predict(flights.models["coarse"], test), predict(flights.models["good"], test)
    c = compare(y, pa, pb, ["auc", "pr_auc", "logloss", "brier", "ece"], n_bootstrap=1000)
    ma, mb = compute_metrics(y, pa), compute_metrics(y, pb)
    for k in ("auc", "pr_auc", "logloss", "brier", "ece"):
        assert c[k].diff == pytest.approx(mb[k] - ma[k], abs=1e-12), k
        assert c[k].ci_low <= c[k].diff <= c[k].ci_high, k
        assert len(c[k].draws) == 1000, k
    assert c["auc"].diff > 0 and c["auc"].ci_low > 0 and c["logloss"].improvement > 0      # good beats coarse
    small = compare(flights.y, flights.p["coarse"], flights.p["good"], ["auc"], n_bootstrap=1000)
    assert c["auc"].ci_high - c["auc"].ci_low < small["auc"].ci_high - small["auc"].ci_low
    bias = compare_bias(test, y, pa, pb, ["carrier", "origin"], n_bootstrap=1000)
    rep_b = bias_report(test, y, pb, ["carrier", "origin"])
    for col in ("carrier", "origin"):
        for m in ("demographic_parity_diff", "equal_opportunity_diff"):
            b = bias[f"{col}:{m}"]
            assert b.candidate == pytest.approx(rep_b.value(col, m), abs=1e-12)
            assert b.ci_low <= b.diff <= b.ci_high and 0 <= b.p_worse(0) <= 1


def test_gate_and_card_compute_the_same_bias_gaps(flights):
    "compare_bias (feeds the gate) and bias_report (feeds the model card) agree on every gap: one group_stats."
    y, test = flights.y, flights.test
    pa, pb = flights.p["coarse"], flights.p["good"]
    cols = ["carrier", "origin"]
    comp = compare_bias(test, y, pa, pb, cols, threshold=0.5, min_group_size=100, n_bootstrap=50)
    for which, p in (("champion", pa), ("candidate", pb)):
        rep = bias_report(test, y, p, cols, threshold=0.5, min_group_size=100)
        for col in cols:
            for metric in ("demographic_parity_diff", "equal_opportunity_diff"):
                assert getattr(comp[f"{col}:{metric}"], which) == pytest.approx(rep.value(col, metric), abs=1e-9), \
                    (which, col, metric)
