"""Tracking and registry outgrow one machine: a real `mlflow server` on a real PostgreSQL cluster with proxied
artifacts. The unchanged train pipeline registers through it, the release gate is recorded in it, promote and
rollback move its aliases, and a real `mlnb serve` process follows the alias. Configuration only:
`tracking_uri=http://host:port`, `artifact_root=mlflow-artifacts:/mlnb`."""
from __future__ import annotations
import os, signal, subprocess, sys, time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import polars as pl
import pytest

from conftest import ROOT, make_settings
from pg import free_port, pg_cluster


@pytest.fixture(scope="module")
def mlflow_on_pg(tmp_path_factory):
    "`mlflow server --backend-store-uri postgresql://... --artifacts-destination DIR --serve-artifacts` on 127.0.0.1."
    from mlnb.cli import wait_ready
    tmp = tmp_path_factory.mktemp("mlflow-pg")
    db = pg_cluster().createdb("mlflow")
    port = free_port()
    log = open(tmp/"server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", db, "--artifacts-destination", str(tmp/"artifacts"),
                             "--serve-artifacts", "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/health", timeout=240, proc=proc)
    except Exception:
        proc.kill(); raise AssertionError((tmp/"server.log").read_text()[-3000:])
    yield type("Server", (), {"url": url, "db": db, "dir": tmp, "proc": proc})
    os.killpg(proc.pid, signal.SIGTERM)
    try: proc.wait(5)
    except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
    log.close()


def _ready(url: str) -> dict | None:
    try:
        r = httpx.get(url + "/health/ready", timeout=2)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError: return None


def _served_version(url: str, want: str, timeout: float = 60) -> float:
    "Seconds until the server at `url` reports `want` as its champion version."
    t0 = time.monotonic()
    while (r := _ready(url)) is None or str(r.get("model_version")) != want:
        assert time.monotonic() - t0 < timeout, f"server still serves {r} after {timeout} s, expected v{want}"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_pipeline_gate_promote_rollback_and_serving_through_mlflow_on_postgresql(mlflow_on_pg, tmp_path):
    from mlnb.explain import predict
    from mlnb.gate import gate
    from mlnb.metrics import compare
    from mlnb.pipeline import run_pipeline
    from mlnb.registry import ModelRegistry, load_model, mlflow_setup, register_model, GATE_TAG
    s = make_settings(tmp_path, tracking_uri=mlflow_on_pg.url, artifact_root="mlflow-artifacts:/mlnb",
                      serve_poll_seconds=0.2)
    try:
        # v1 by the real train pipeline (deliberately weak: 3 stumps), v2 (a better model) registered in process
        weak = run_pipeline("train", {"sample": 0.03, "num_boost_round": 3, "max_depth": 1, "nthread": 1,
                                      "checkpoint_every": 0}, s)
        reg = ModelRegistry(s)
        assert weak.metrics["model_version"] == 1 and reg.aliases() == {"champion": "1"}
        from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET
        from mlnb.train import time_split, train_booster
        from mlnb.schema import FeatureSpec
        train, valid, _ = time_split(build_training_set(s, months=(1, 4), sample=0.05))
        spec = FeatureSpec.infer(train, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
        better = train_booster(spec, train, valid, num_boost_round=80, nthread=1, seed=0)
        mlflow_setup(s)
        with mlflow.start_run(run_name="train-better"):
            assert str(register_model(better.booster, spec, train, s).version) == "2"
        # the state is in PostgreSQL and the files in the server's artifact destination, nothing in the local home
        import sqlalchemy as sa
        with sa.create_engine(mlflow_on_pg.db).connect() as c:
            assert c.execute(sa.text("SELECT count(*) FROM model_versions")).scalar() == 2
            assert c.execute(sa.text("SELECT count(*) FROM runs WHERE status = 'FINISHED'")).scalar() >= 2
        assert len(list((mlflow_on_pg.dir/"artifacts").rglob("model.ubj"))) == 2
        assert not list((tmp_path/"home").glob("artifacts/**/model.ubj"))
        # the release gate on a held-out month neither model trained on, recorded in the server
        champ, cand = load_model(s, "1"), load_model(s, "2")
        test = build_training_set(s, months=(7, 7), sample=0.2)
        y = test["delayed"].cast(pl.Float64).to_numpy()
        pa, pb = predict(champ, test), predict(cand, test)
        g = gate(compare(y, pa, pb, ["auc", "logloss"], n_bootstrap=200), "auc", margin=0.002)
        assert g.passed, g.reasons
        reg.record_gate("2", g, champion_version="1")
        reg.set_challenger("2")
        assert mlflow.MlflowClient(mlflow_on_pg.url).get_model_version(s.model_name, "2").tags[GATE_TAG] == "passed"

        # a real server follows the champion alias stored in PostgreSQL
        port = free_port()
        env = {**os.environ, **s.to_env(), "PYTHONUNBUFFERED": "1", "MLNB_SERVE_WORKERS": "1"}
        out = open(tmp_path/"serve.log", "wb")
        srv = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while _ready(url) is None:
                assert srv.poll() is None and time.monotonic() < deadline, (tmp_path/"serve.log").read_text()[-3000:]
                time.sleep(0.2)
            assert str(_ready(url)["model_version"]) == "1"
            p = reg.promote(reason="scale test")
            assert p.changed and p.after == {"champion": "2", "previous": "1"}
            t_promote = _served_version(url, "2")
            row = {k: v for k, v in test.head(1).to_dicts()[0].items() if k in cand.spec.names}
            ans = httpx.post(url + "/predict", json=row, timeout=10).json()
            assert ans["model_version"] == "2"
            assert ans["prediction"] == pytest.approx(float(pb[0]), abs=1e-5)
            r = reg.rollback(reason="scale test")
            assert r.after == {"champion": "1"}
            t_rollback = _served_version(url, "1")
            print(f"\nMLflow on PostgreSQL: promote-to-served {t_promote * 1000:.0f} ms, rollback-to-served "
                  f"{t_rollback * 1000:.0f} ms (poll 0.2 s)")
        finally:
            os.killpg(srv.pid, signal.SIGTERM)
            try: srv.wait(30)
            except subprocess.TimeoutExpired: os.killpg(srv.pid, signal.SIGKILL); srv.wait(10)
            out.close()
        # a fresh client of the server sees the final state
        fresh = mlflow.MlflowClient(mlflow_on_pg.url)
        assert {k: str(v) for k, v in fresh.get_registered_model(s.model_name).aliases.items()} == {"champion": "1"}
    finally:
        mlflow.set_tracking_uri(None); mlflow.set_registry_uri(None)
