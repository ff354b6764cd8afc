"""A/B experiments: the statistics by simulation (A/A with peeking, power at the designed size, SRM, CUPED's
variance reduction), a cross-check against GrowthBook's gbstats 0.8.0 run in its own virtualenv on the same inputs,
bad input, and the whole loop on a real `mlnb serve` process: design, start, traffic with entities, delayed
feedback over HTTP, `mlnb ab status` as a subprocess, stop with ship (through the registry's gate) and with
rollback, every step audited.

Monte-Carlo tolerances: a rate estimated from E independent simulated experiments has standard error
sqrt(r (1 - r) / E); the assertions allow 3 standard errors (a false alarm about 1 run in 700 for each check,
and the seeds are fixed, so a run is reproducible)."""
from __future__ import annotations
import json, math, os, subprocess, sys, time
from collections import Counter

import httpx
import numpy as np
import polars as pl
import pytest

from conftest import ROOT
from test_rollout import ServerProc, build_two_version_home, clean, wait_until

from mlnb.abtest import (Experiment, ExperimentError, analyze, compare_metric, srm_check, sample_size, ab_cli)
from mlnb.bench_abtest import (aa_simulation, power_simulation, reference_case, mlnb_case, reference_python,
                               run_reference, reference_differences, synthetic_requests)


def mc_se(rate: float, n: int) -> float: return math.sqrt(rate * (1 - rate) / n)


# ---------------------------------------------------------------------------------------------------------------
# statistics by simulation
def test_aa_peeking_sequential_stays_at_alpha_naive_does_not():
    E, alpha = 2000, 0.05
    r = aa_simulation(experiments=E, peeks=20, batch=100, alpha=alpha, seed=11)
    tol = 3 * mc_se(alpha, E)                                  # 0.0146
    assert r["fpr_sequential"] <= alpha + tol, r               # always valid under peeking after every batch
    assert r["fpr_naive_peeking"] > alpha + tol, r             # the same looks with a fixed-horizon test: inflated
    assert r["fpr_naive_peeking"] > 2 * alpha, r               # (theory for 20 looks: about 0.25)
    assert abs(r["fpr_fixed_final_look"] - alpha) <= tol, r    # one look at the end is exact


def test_power_at_the_designed_sample_size():
    E = 2000
    r = power_simulation(experiments=E, sigma=2.0, mde=0.25, alpha=0.05, power=0.8, seed=12)
    assert r["n_per_arm"] == sample_size(2.0, 0.25, 0.05, 0.8)["n_control"]
    assert abs(r["observed_power"] - 0.8) <= 3 * mc_se(0.8, E), r       # 0.027


def test_always_valid_power_at_its_designed_sample_size():
    from mlnb.abtest import sequential_sample_size
    E, mde = 1000, 0.1
    n = sequential_sample_size(1.0, mde, 0.05, 0.8)["n_control"]
    assert n > sample_size(1.0, mde, 0.05, 0.8)["n_control"]
    once = aa_simulation(experiments=E, peeks=1, batch=n, alpha=0.05, seed=14, effect=mde)
    assert abs(once["fpr_sequential"] - 0.8) <= 3 * mc_se(0.8, E), once     # one look at the designed size: the power
    peeking = aa_simulation(experiments=E, peeks=20, batch=math.ceil(n / 20), alpha=0.05, seed=15, effect=mde)
    assert peeking["fpr_sequential"] >= 0.8 - 3 * mc_se(0.8, E), peeking  # looking earlier can only add power


def test_sequential_test_detects_a_real_effect():
    r = aa_simulation(experiments=500, peeks=20, batch=100, alpha=0.05, seed=13, effect=0.2)
    assert r["fpr_sequential"] > 0.9, r                        # here "fpr" is the rejection rate: power under peeking
    assert r["cs_miscoverage_any_look"] <= 0.05 + 3 * mc_se(0.05, 500), r   # and the interval still covers the truth


def test_srm_threshold_and_effect_size_floor():
    w = {"control": 50, "treatment": 50}
    big = srm_check({"control": 26_000, "treatment": 24_000}, w)          # 52/48 with 50k units
    assert big["flagged"] and big["status"] == "mismatch" and "sample ratio mismatch" in big["reason"]
    tiny = srm_check({"control": 5_010_000, "treatment": 4_990_000}, w)    # 50.1/49.9 with 10M units
    assert tiny["p"] < 0.001                                   # "significant" by chi-square alone...
    assert not tiny["flagged"] and tiny["status"] == "warn"    # ...but under the deviation floor
    assert srm_check({"control": 7, "treatment": 30}, w)["status"] == "n/a"   # fewer than 8 units in an arm
    assert srm_check({"a": 8000, "b": 1000, "c": 1000}, {"a": 80, "b": 10, "c": 10})["status"] == "ok"


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_cuped_reduces_variance_by_one_minus_rho_squared(rho):
    rng = np.random.default_rng(int(rho * 100))
    n = 40_000
    codes = rng.integers(0, 2, n)
    x = rng.normal(size=n)
    y = 0.05 * codes + rho * x + math.sqrt(1 - rho ** 2) * rng.normal(size=n)    # corr(x, y) = rho
    r = compare_metric(y, codes, 2, 0, 1, 0.05, 5000, covariate=x)
    # the variance of the estimate falls by rho^2; sampling error of the estimated reduction is < 0.01 at this n
    assert abs(r["cuped"]["variance_reduction"] - rho ** 2) < 0.02, (rho, r["cuped"])
    assert r["cuped"]["ci"][0] < 0.05 < r["cuped"]["ci"][1]


# ---------------------------------------------------------------------------------------------------------------
# the reference: GrowthBook's gbstats 0.8.0 in its own virtualenv (make refs)
needs_reference = pytest.mark.skipif(reference_python(ROOT) is None,
                                     reason="gbstats reference virtualenv missing: run `make refs` (.refs/gbstats)")


@needs_reference
@pytest.mark.parametrize("seed,n", [(0, 20_000), (1, 3_000)])
def test_matches_gbstats_on_the_same_inputs(seed, n):
    y, x, arm, inp = reference_case(n, seed)
    ref = run_reference(inp, reference_python(ROOT))
    ours = mlnb_case(y, x, arm)
    d = reference_differences(ours, ref)
    # same formulas in float64: agreement to rounding (sums vs arrays), far below any decision-relevant scale
    assert max(d[k] for k in d if k.endswith("_interval")) < 1e-9, d
    assert max(d[k] for k in d if k.endswith("_p")) < 1e-9, d
    assert d["cuped_theta"] < 1e-9 and d["srm_p"] < 1e-9, d
    # and the analysis path itself (compare_metric, used by analyze) gives the reference's CUPED and fixed intervals
    r = compare_metric(y, arm, 2, 0, 1, 0.05, 5000, covariate=x)
    assert np.allclose(r["cuped"]["ci"], ref["cuped"]["ci"], rtol=0, atol=1e-9)
    assert np.allclose(r["ci"], ref["fixed_absolute"]["ci"], rtol=0, atol=1e-9)
    plain = compare_metric(y, arm, 2, 0, 1, 0.05, 5000)
    assert np.allclose(plain["sequential"]["ci"], ref["sequential"]["ci"], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# bad input
def test_bad_definitions_say_what_to_change(capsys, scratch_settings):
    for argv, msg in ((["design", "x", "--arms", "champion", "--sigma", "1"], "at least two arms"),
                      (["design", "x", "--arms", "a", "b", "--weights", "50", "40", "--sigma", "1"], "sum to 100"),
                      (["design", "x", "--arms", "a", "b", "--metric", "auc", "--sigma", "1"], "metric must be one of"),
                      (["design", "x", "--arms", "a", "a=a", "--sigma", "1"], "at least two arms"),
                      (["start", "never-designed"], "no experiment 'never-designed'")):
        assert ab_cli(argv, scratch_settings) == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (argv, err)
    with pytest.raises(ExperimentError, match="weight of arm 'b' must be a number > 0"):
        Experiment.from_dict({"id": "x", "arms": ["a", "b"], "weights": {"a": 100, "b": 0}})


def test_an_arm_with_no_labels_is_na_with_the_reason():
    req = synthetic_requests(4000, seed=5)
    req = req.with_columns(label=pl.when(pl.col("arm") == "champion").then(pl.col("label")).otherwise(None), reward=None)
    a = analyze(req, Experiment.from_dict({"id": "x", "arms": ["champion", "challenger"], "metric": "logloss"}))
    ll = a.metrics["challenger"]["logloss"]
    assert ll["status"] == "n/a" and "treatment arm has 0 unit(s)" in ll["reason"]
    assert a.quality["challenger"]["status"] == "n/a" and a.quality["champion"]["status"] == "ok"
    assert a.metrics["challenger"]["reward"]["status"] == "n/a"
    assert a.decision["decision"] == "keep running" and "n/a" in a.decision["reason"]
    json.dumps(a.to_dict())                                    # JSON-ready (no NaN, no numpy types)


def test_cuped_with_each_units_pre_experiment_metric():
    rng = np.random.default_rng(8)
    req = synthetic_requests(20_000, seed=8)
    u = rng.normal(size=req.height)                                         # a unit's lasting propensity
    req = req.with_columns(reward=pl.Series(1.0 + u + rng.normal(0, 0.5, req.height)))
    pre = pl.DataFrame({"unit": req["unit"], "pre_reward": u + rng.normal(0, 0.5, req.height),
                        "pre_logloss": None, "pre_accuracy": None}).sample(fraction=0.7, seed=1)   # 30% without history
    a = analyze(req, Experiment.from_dict({"id": "x", "arms": ["champion", "challenger"], "metric": "reward"}), pre=pre)
    r = a.metrics["challenger"]["reward"]
    assert a.covariate.startswith("pre-experiment")
    assert abs(r["cuped"]["units_with_covariate"] - 0.7) < 0.02
    # rho = 0.8 where the covariate exists: the variance falls by about 0.7 * 0.64 = 0.45
    assert 0.35 < r["cuped"]["variance_reduction"] < 0.55, r["cuped"]
    assert r["cuped"]["ci"][0] < 0 < r["cuped"]["ci"][1]                  # no effect: the interval covers 0
    assert "cuped" not in a.metrics["challenger"]["logloss"]              # no pre-period log-loss: no adjustment


def test_decisions_in_words():
    exp = Experiment.from_dict({"id": "x", "arms": ["champion", "challenger"], "metric": "reward"})
    better = synthetic_requests(20_000, seed=9, lift=0.2)
    a = analyze(better, exp)
    assert a.decision["decision"] == "ship" and a.decision["winner"] == "challenger", a.decision
    assert "challenger is significantly better: reward" in a.decision["reason"] and "always-valid 95% CI" in a.decision["reason"]
    a = analyze(synthetic_requests(20_000, seed=9, lift=-0.2), exp)
    assert a.decision["decision"] == "rollback" and "significantly worse" in a.decision["reason"], a.decision
    slow = better.with_columns(latency_ms=pl.when(pl.col("arm") == "challenger").then(pl.col("latency_ms") * 2).otherwise(pl.col("latency_ms")))
    a = analyze(slow, exp)
    assert a.decision["decision"] == "rollback" and "guardrail latency_p99 failed for challenger" in a.decision["reason"], a.decision
    rng = np.random.default_rng(10)                       # 1.5% of the challenger's requests answered by the fallback
    moved = better.with_columns(arm=pl.when((pl.col("arm") == "challenger") & pl.Series(rng.random(better.height) < 0.015))
                                .then(pl.lit("champion")).otherwise(pl.col("arm")))
    a = analyze(moved, exp)
    assert a.guardrails["challenger"]["error_rate"]["status"] == "fail"
    assert a.decision["decision"] == "rollback" and "guardrail error_rate failed" in a.decision["reason"], a.decision
    early = Experiment.from_dict({**exp.to_dict(), "min_duration_hours": 24})
    a = analyze(better, early, started_at=time.time() - 3600)
    assert a.decision["decision"] == "keep running" and "minimum duration 24 h" in a.decision["reason"], a.decision
    assert analyze(better.head(3), exp).decision["reason"].startswith("too little traffic")


def test_units_seen_in_two_arms_are_excluded_and_reported():
    req = synthetic_requests(2000, seed=6)
    dup = req.head(50).with_columns(arm=pl.when(pl.col("arm") == "champion").then(pl.lit("challenger")).otherwise(pl.lit("champion")),
                                    request_id=pl.col("request_id") + "-b", ts=pl.col("ts") + 10_000)
    a = analyze(pl.concat([req, dup]), Experiment.from_dict({"id": "x", "arms": ["champion", "challenger"]}))
    assert a.health["multiple_exposures"] == 50
    assert sum(c["units"] for c in a.arms.values()) == 1950
    assert any("more than one arm" in i for i in a.health["issues"])
    assert a.decision["decision"] == "rollback" and "broken" in a.decision["reason"]     # 2.5% of units > 1%


# ---------------------------------------------------------------------------------------------------------------
# the whole loop on a real server
def mlnb(settings, *args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlnb.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def served(trained_home, tmp_path_factory):
    "A home with v1 champion and v2 challenger, and a real `mlnb serve` process on it."
    import socket
    b = trained_home.bundle
    tmp = tmp_path_factory.mktemp("abtest")
    home = build_two_version_home(tmp, b.reference, b.spec)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    server = ServerProc(home, port, tmp/"server.log").start()
    records = [clean(r, b.spec) for r in b.reference.head(600).to_dicts()]
    labels = b.reference.head(600)[b.spec.target].to_list()
    try: yield home, server, records, labels
    finally: server.stop(); server.kill_group()


def send(server, records, entities) -> list[dict]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        out = []
        for i, e in enumerate(entities):
            r = c.post("/predict", json={**records[i % len(records)], "entity": e})
            assert r.status_code == 200, r.text
            out.append({**r.json(), "entity": e, "i": i % len(records)})
        return out


def logged(settings, n: int) -> None:
    from mlnb.predlog import read_predictions
    wait_until(lambda: read_predictions(settings).height >= n, timeout=30, what=f"{n} predictions in the log")


def test_experiment_end_to_end_on_a_real_server(served, capsys):
    from mlnb.audit import read_audit
    from mlnb.registry import ModelRegistry
    from mlnb.feedback import ServingStore, state_path
    home, server, records, labels = served
    registry = ModelRegistry(home)
    aliases = lambda _settings: registry.aliases()

    # design (in process: the CLI function itself) and start
    assert ab_cli(["design", "e2e", "--arms", "champion", "challenger", "--metric", "logloss", "--mde", "0.05",
                   "--units-per-day", "2000"], home) == 0
    design = json.loads(capsys.readouterr().out)
    assert design["version"] == 1 and design["design"]["sigma"] > 0 and design["design"]["arms"]["challenger"]["n_control"] > 0
    assert ab_cli(["start", "e2e"], home) == 0
    started = json.loads(capsys.readouterr().out)
    assert started["resolved"] == {"champion": "1", "challenger": "2"}
    wait_until(lambda: server.models()["generation"] == started["generation"], timeout=15, what="the server applies the A/B routing")
    assert server.models()["routing"]["strategy"] == "ab"

    # traffic: 250 entities, two requests each (sticky), then delayed feedback for most requests + one unknown id
    entities = [f"customer-{i}" for i in range(250)]
    answers = send(server, records, entities) + send(server, records[250:], entities)
    first = {}
    for a in answers: first.setdefault(a["entity"], a["arm"])
    assert all(first[a["entity"]] == a["arm"] for a in answers)                 # sticky per entity
    assert {(a["arm"], a["model_version"]) for a in answers} == {("champion", "1"), ("challenger", "2")}
    logged(home, 500)
    labeled = [a for k, a in enumerate(answers) if k % 5 != 0]                  # 80% of the requests get a label
    fb = [{"request_id": a["request_id"], "label": float(labels[a["i"]])} for a in labeled]
    fb.append({"request_id": "no-such-request", "label": 1.0})
    r = httpx.post(server.url + "/feedback", json={"feedback": fb}, timeout=30)
    assert r.status_code == 200, r.text

    # mlnb ab status as a real process
    p = mlnb(home, "ab", "status", "e2e", "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    units = Counter(first.values())
    assert {a: c["units"] for a, c in st["arms"].items()} == dict(units)
    assert {a: c["requests"] for a, c in st["arms"].items()} == dict(Counter(a["arm"] for a in answers))
    lab_units = Counter(first[a["entity"]] for a in labeled)
    assert {a: c["labeled_units"] for a, c in st["arms"].items()} == {a: len({x["entity"] for x in labeled if x["arm"] == a}) for a in units}
    assert sum(lab_units.values()) > 0
    assert st["health"]["feedback_unmatched"] == 1 and st["health"]["multiple_exposures"] == 0
    assert st["health"]["srm"]["status"] in ("ok", "warn")
    ll = st["metrics"]["challenger"]["logloss"]
    assert ll["status"] == "ok" and ll["n"] == [st["arms"]["champion"]["labeled_units"], st["arms"]["challenger"]["labeled_units"]]
    assert "cuped" in ll and st["covariate"] == "control model score (CUPAC)"
    assert st["quality"]["champion"]["auc"]["status"] == "ok" and 0 < st["quality"]["challenger"]["auc"]["auc"] < 1
    assert st["decision"]["decision"] in ("ship", "rollback", "keep running") and st["decision"]["reason"]
    text = mlnb(home, "ab", "status", "e2e")
    assert text.returncode == 0 and "experiment e2e" in text.stdout and "challenger logloss" in text.stdout

    # the papermill pipeline renders the same analysis for a person
    from mlnb.pipeline import run_pipeline, read_records
    run = run_pipeline("abtest", {"experiment": "e2e"}, home)
    rec = read_records(run.notebook)
    assert rec["arms"] == st["arms"] and rec["decision"]["decision"] in ("ship", "rollback", "keep running")
    assert json.loads((run.out_dir/"analysis.json").read_text())["arms"] == st["arms"]

    # stop with ship: the gate is the registry's; without a passed gate the promotion is refused and nothing moves
    p = mlnb(home, "ab", "stop", "e2e", "--decision", "ship", "--arm", "challenger")
    assert p.returncode == 2 and "refusing to promote" in p.stderr, (p.returncode, p.stderr)
    assert aliases(home) == {"champion": "1", "challenger": "2"}
    assert ServingStore(state_path(home)).get_routing()[1]["strategy"] == "ab"          # still running
    registry.record_gate("2", {"passed": True, "reasons": ["test gate"]}, champion_version="1")
    p = mlnb(home, "ab", "stop", "e2e", "--decision", "ship", "--arm", "challenger", "--reason", "e2e ship")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["decision"] == "ship" and out["promoted"]["changed"]
    assert aliases(home) == {"champion": "2", "previous": "1"}
    assert ServingStore(state_path(home)).get_routing()[1] == {"strategy": "single"}
    wait_until(lambda: server.models()["routing"]["strategy"] == "single" and server.models()["arms"]["champion"]["version"] == "2",
               timeout=30, what="the server serves the shipped version alone")
    assert {a["model_version"] for a in send(server, records, entities[:20])} == {"2"}

    # a second experiment (the new champion against v1 by number), stopped with rollback: single routing back,
    # the registry untouched
    assert ab_cli(["design", "e2e-rb", "--arms", "champion", "old=1", "--weights", "80", "20", "--sigma", "0.5",
                   "--units-per-day", "1000"], home) == 0
    capsys.readouterr()
    assert ab_cli(["start", "e2e-rb"], home) == 0
    g = json.loads(capsys.readouterr().out)["generation"]
    wait_until(lambda: server.models()["generation"] == g, timeout=15, what="the second experiment's routing")
    rb = send(server, records, entities[:60])                 # units seen before: their history is a CUPED covariate
    assert {a["arm"] for a in rb} == {"champion", "old"}
    from mlnb.abtest import ExperimentStore, pre_period_units, analyze_experiment
    pre = pre_period_units(home, ExperimentStore.for_settings(home).get("e2e-rb"))
    assert set(pre["unit"]) == set(entities) and pre["pre_logloss"].null_count() < pre.height
    logged(home, 580)
    assert analyze_experiment(home, "e2e-rb", covariate="pre").covariate.startswith("pre-experiment")
    assert ab_cli(["stop", "e2e-rb", "--decision", "rollback", "--reason", "e2e rollback"], home) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] == "rollback" and out["promoted"] is None
    assert aliases(home) == {"champion": "2", "previous": "1"}
    assert ServingStore(state_path(home)).get_routing()[1] == {"strategy": "single"}
    wait_until(lambda: server.models()["routing"]["strategy"] == "single" and set(server.models()["arms"]) == {"champion"},
               timeout=30, what="single routing restored")
    assert ab_cli(["stop", "e2e-rb", "--decision", "rollback"], home) == 2                 # not running any more
    assert "is stopped, not running" in capsys.readouterr().err

    # every operation audited before and after; the refused ship is recorded as a failure
    ends = [(r["operation"], r["outcome"]) for r in read_audit(home, phase="end") if r["operation"].startswith("ab_")]
    starts = [r["operation"] for r in read_audit(home, phase="start") if r["operation"].startswith("ab_")]
    assert Counter(o for o, _ in ends) == Counter(starts)
    for op in ("ab_design", "ab_start", "ab_status", "ab_stop"):
        assert (op, "success") in ends, op
    assert ("ab_stop", "failure") in ends
    stop = [r for r in read_audit(home, operation="ab_stop", phase="end", outcome="success")]
    assert [r["details"]["decision"] for r in stop] == ["ship", "rollback"]
    assert stop[0]["details"]["promoted"]["after"]["champion"] == "2"
    promo = read_audit(home, operation="promote", phase="end", outcome="success")
    assert promo and "A/B experiment e2e" in promo[-1]["details"]["reason"]
    rows = {r["id"]: r for r in json.loads(mlnb(home, "ab", "list").stdout)}
    assert rows["e2e"]["decision"] == "ship" and rows["e2e-rb"]["decision"] == "rollback"


def test_unknown_version_is_refused_at_start(served, capsys):
    home = served[0]
    assert ab_cli(["design", "bad-arm", "--arms", "champion", "new=99", "--sigma", "0.5"], home) == 0
    capsys.readouterr()
    assert ab_cli(["start", "bad-arm"], home) == 2
    assert "unknown model version or alias '99'" in capsys.readouterr().err
