"""Model changes under traffic: real `mlnb serve` processes (two workers), a real registry, continuous load.

Promote, roll back and switch routing ten times without one failed request; a bad version is refused while the
old one keeps serving; kill -9 in the middle of load loses nothing that was flushed and corrupts nothing."""
from __future__ import annotations
import math, os, signal, subprocess, sys, threading, time
from collections import Counter
from pathlib import Path

import httpx
import polars as pl
import pytest

from conftest import ROOT, ServerProcess, make_settings
from mlnb.prometheus import metric_value

TOKEN = "rollout-token"


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with test_routing.py
def clean(row: dict, spec) -> dict:
    return {n: (None if isinstance(v := row.get(n), float) and math.isnan(v) else v) for n in spec.names}


def client_for(s):
    from mlnb.registry import ModelRegistry
    return ModelRegistry(s).client


def aliases(s) -> dict:
    from mlnb.registry import ModelRegistry
    return ModelRegistry(s).aliases()


def promote(s) -> None:
    "challenger -> champion (old champion -> previous); forced: these tests have no release gate."
    from mlnb.registry import ModelRegistry
    ModelRegistry(s).promote(force=True, reason="rollout test")


def rollback(s) -> None:
    "previous -> champion."
    from mlnb.registry import ModelRegistry
    ModelRegistry(s).rollback(reason="rollout test")


def set_alias(s, alias: str, version: str) -> None:
    "Move `alias` (the challenger through mlnb.registry.set_challenger, as the evaluate pipeline does)."
    if alias == "challenger":
        from mlnb.registry import ModelRegistry
        ModelRegistry(s).set_challenger(version, reason="rollout test"); return
    client_for(s).set_registered_model_alias(s.model_name, alias, str(version))


def build_two_version_home(tmp: Path, reference: pl.DataFrame, spec):
    "A fresh home: v1 champion, v2 challenger (small real boosters trained on a real reference sample)."
    import mlflow, xgboost as xgb
    from mlnb.registry import mlflow_setup, register_model
    from mlnb.train import make_dmatrix
    s = make_settings(tmp, admin_token=TOKEN)
    mlflow_setup(s)
    d = make_dmatrix(spec, reference, nthread=1)
    for depth, rounds in ((3, 20), (4, 30)):
        b = xgb.train({"objective": "binary:logistic", "max_depth": depth, "nthread": 1, "seed": depth}, d, rounds)
        with mlflow.start_run():
            register_model(b, spec, reference, settings=s, reference_rows=1000)
    set_alias(s, "challenger", "2")
    assert aliases(s) == {"champion": "1", "challenger": "2"}
    return s


class ServerProc(ServerProcess):
    "`mlnb serve` (optionally several uvicorn workers) on the home of `settings`, polling fast, with admin helpers."
    def __init__(self, settings, port: int, log_path: Path, workers: int = 1, state: Path | None = None, **env):
        self.settings = settings
        super().__init__({**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", "MLNB_SERVE_WORKERS": str(workers),
                          "MLNB_SERVE_POLL_SECONDS": "0.2", "MLNB_LOG_FLUSH_SECONDS": "0.2",
                          **({"MLNB_SERVE_STATE": str(state)} if state else {}), **{k: str(v) for k, v in env.items()}},
                         port, log_path)

    def models(self) -> dict: return httpx.get(self.url + "/models", timeout=10).json()

    def admin(self, path: str, body=None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def wait_engine(self, timeout: float = 60) -> None:
        "Wait until every arm serves with the compiled engine (so timings and equality checks are stable)."
        deadline = time.monotonic() + timeout
        while any(a["engine"] != "compiled" for a in self.models()["arms"].values() if a["version"]):
            assert time.monotonic() < deadline, f"engine not compiled:\n{self.models()}\n{self.log()}"
            time.sleep(0.2)


class Load:
    "Continuous load from `threads` threads until stopped; every answer (or transport failure) is recorded."
    def __init__(self, url: str, records: list[dict], threads: int = 4):
        self.url, self.records, self.threads = url, records, threads
        self.answers: list[tuple[int, dict | str]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._ts = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self._lock = threading.Lock()

    def _run(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = k
            while not self._stop.is_set():
                rec = {**self.records[i % len(self.records)], "entity": f"user-{i}"}
                i += self.threads
                try:
                    r = c.post("/predict", json=rec)
                    item = (r.status_code, r.json() if r.status_code == 200 else r.text[:300])
                except Exception as e:      # a dropped connection is a failed request
                    with self._lock: self.failures.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                    continue
                with self._lock: self.answers.append(item)

    def __enter__(self):
        for t in self._ts: t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._ts: t.join(30)

    def __exit__(self, *exc): self.stop()

    def count(self) -> int: return len(self.answers)


def wait_until(cond, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(trained_home):
    b = trained_home.bundle
    return b.reference, b.spec, [clean(r, b.spec) for r in b.reference.head(300).to_dicts()]


@pytest.fixture(scope="module")
def home(base, tmp_path_factory):
    reference, spec, _ = base
    return build_two_version_home(tmp_path_factory.mktemp("rollout"), reference, spec)


def check_metrics_sum_over_workers(srv: ServerProc, records) -> None:
    "/metrics answers for the whole server (prometheus_client's multiprocess mode), whichever worker takes the scrape."
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(120): assert c.post("/predict", json=records[i]).status_code == 200
        assert c.post("/predict", json={"nope": 1}).status_code == 422
        texts = [c.get("/metrics").text for _ in range(6)]
    for text in texts:
        assert metric_value(text, "mlnb_requests_total", route="/predict", status="200") == 120, text
        assert metric_value(text, "mlnb_requests_total", route="/predict", status="422", model_version="", arm="") == 1
        assert metric_value(text, "mlnb_request_duration_seconds_count", model_version="1", arm="champion") == 120
        assert metric_value(text, "mlnb_ready") == 1 and "# TYPE mlnb_request_duration_seconds histogram" in text


def test_ten_changes_under_load_drop_nothing(home, base, free_port, tmp_path):
    "Promote, roll back and switch routing ten times under continuous load: zero failures, only v1/v2 answers."
    from mlnb.predlog import read_predictions
    _, _, records = base
    srv = ServerProc(home, free_port, tmp_path/"server.log", workers=2, state=tmp_path/"serving.db").start()
    both = {"champion": "champion", "challenger": "challenger"}
    def route(cfg):
        r = srv.admin("/admin/routing", cfg)
        assert r.status_code == 200, f"{cfg}: {r.status_code} {r.text}"
    def then_challenger(op):       # whatever promote/rollback do to 'challenger', the routing tests need it on v2
        def run(): op(home); set_alias(home, "challenger", "2")
        return run
    ops = [("promote", then_challenger(promote), {"2"}),
           ("rollback", then_challenger(rollback), {"1"}),
           ("canary 50%", lambda: route({"strategy": "canary", "percent": 50}), {"1", "2"}),
           ("blue-green to challenger", lambda: route({"strategy": "blue_green", "arms": both, "live": "challenger"}), {"2"}),
           ("blue-green back", lambda: route({"strategy": "blue_green", "arms": both, "live": "champion"}), {"1"}),
           ("promote under blue-green", then_challenger(promote), {"2"}),
           ("rollback under blue-green", then_challenger(rollback), {"1"}),
           ("ab 50/50", lambda: route({"strategy": "ab"}), {"1", "2"}),
           ("shadow", lambda: route({"strategy": "shadow"}), {"1"}),
           ("single", lambda: route({"strategy": "single"}), {"1"})]
    try:
        srv.wait_engine()
        check_metrics_sum_over_workers(srv, records)
        with Load(srv.url, records, threads=4) as load:
            def versions_now(n=20) -> set:
                k = load.count()
                wait_until(lambda: load.count() >= k + n, what=f"{n} more answers")
                return {a[1]["model_version"] for a in load.answers[k:] if a[0] == 200}
            wait_until(lambda: load.count() > 50, what="first answers")
            for name, op, expect in ops:
                op()
                # both workers converge on the change within a few polls (0.2 s)
                wait_until(lambda: versions_now() == expect, timeout=20, what=f"after {name}: versions {expect}")
            n_before_stop, t_stop = load.count(), time.monotonic()
            code = srv.stop(signal.SIGTERM)     # graceful shutdown under load
        assert code in (0, -signal.SIGTERM), srv.log()
        early = [f for t, f in load.failures if t < t_stop]
        assert early == [], f"{len(early)} requests failed during the rollout: {early[:3]}"
        bad = [a for a in load.answers if a[0] != 200]
        assert bad == [], f"{len(bad)} non-200 answers, e.g. {bad[:3]}"
        assert n_before_stop > 300, f"too little load: {n_before_stop}"
        assert {a[1]["model_version"] for a in load.answers} == {"1", "2"}
        assert {a[1]["arm"] for a in load.answers} == {"champion", "challenger"}
        # every answered request is in the log exactly once, including those answered while shutting down
        answered = {a[1]["request_id"] for a in load.answers}
        log = read_predictions(home).filter(pl.col("arm") != "shadow")
        mine = log.filter(pl.col("request_id").is_in(list(answered)))
        assert mine.height == len(answered), f"{len(answered) - mine.height} answered requests are not in the log"
    finally:
        srv.kill_group()


def test_bad_version_is_refused_and_old_keeps_serving(home, base, free_port, tmp_path):
    import mlflow
    from mlnb.audit import read_audit
    from mlnb.registry import register_model, mlflow_setup
    reference, spec, records = base
    srv = ServerProc(home, free_port, tmp_path/"server.log", state=tmp_path/"serving.db").start()
    try:
        # v3: registered properly, then its model file is damaged in the artifact store
        import xgboost as xgb
        from mlnb.train import make_dmatrix
        mlflow_setup(home)
        booster = xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1}, make_dmatrix(spec, reference, nthread=1), 5)
        with mlflow.start_run():
            v3 = str(register_model(booster, spec, reference, settings=home, reference_rows=200,
                                    set_champion_if_none=False).version)
        src = Path(client_for(home).get_model_version_download_uri(home.model_name, v3).removeprefix("file://"))
        (src/"model.ubj").write_bytes((src/"model.ubj").read_bytes()[:-20])
        with Load(srv.url, records, threads=2) as load:
            set_alias(home, "champion", v3)
            wait_until(lambda: v3 in srv.models()["refused"], what="the bad version refused")
            time.sleep(0.5)
        assert {a[1]["model_version"] for a in load.answers} == {"1"} and not load.failures
        info = srv.models()
        assert info["version"] == "1" and "IntegrityError" in info["refused"][v3], info
        fails = [r for r in read_audit(home, operation="serve_load", phase="end") if r["model_version"] == v3]
        assert fails and fails[-1]["outcome"] == "failure" and "IntegrityError" in fails[-1]["error_detail"]["type"]
    finally:
        set_alias(home, "champion", "1")
        srv.stop(); srv.kill_group()


def test_kill_9_under_load_then_restart(home, base, free_port, tmp_path):
    from mlnb.predlog import part_files, read_predictions
    _, _, records = base
    state = tmp_path/"serving.db"
    s = home
    srv = ServerProc(s, free_port, tmp_path/"server.log", state=state).start()
    before = set(read_predictions(s)["request_id"].to_list())
    with Load(srv.url, records, threads=3) as load:
        wait_until(lambda: load.count() > 300, what="300 answers")
        first = {a[1]["request_id"] for a in load.answers[:300]}
        # wait until those are flushed (every 0.2 s), then kill -9 in the middle of the load
        wait_until(lambda: first <= set(read_predictions(s)["request_id"].to_list()), what="a flush")
        k = load.count()
        wait_until(lambda: load.count() > k + 100, what="more load")
        srv.proc.send_signal(signal.SIGKILL); srv.proc.wait(10)
        time.sleep(0.3)
    files = part_files(s)
    for p in files: pl.read_parquet(p)                       # every part file is complete and readable
    log = read_predictions(s)
    ids = log.filter(~pl.col("request_id").is_in(list(before)))["request_id"]
    assert first <= set(ids.to_list())
    assert ids.n_unique() == ids.len()                       # nothing written twice
    answered = {a[1]["request_id"] for a in load.answers if a[0] == 200}
    # nothing logged that was not answered (but for the <= 3 requests in flight at the kill: logged, then killed)
    assert len(set(ids.to_list()) - answered) <= 3
    # restart: ready on the champion, and serving
    srv2 = ServerProc(s, free_port, tmp_path/"server2.log", state=state).start()
    try:
        assert httpx.get(srv2.url + "/health/ready").json()["model_version"] == aliases(s)["champion"]
        assert httpx.post(srv2.url + "/predict", json=records[0]).status_code == 200
        assert not list(Path(s.predictions_dir).glob("date=*/.part-*.tmp"))   # leftovers of the killed writer removed
    finally:
        srv2.stop(); srv2.kill_group()
