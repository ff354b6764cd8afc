"""Serving outgrows one process: `mlnb serve` replicas that share nothing but configuration.

- Prediction log on object storage: replicas write their part files to a real S3-protocol server (moto's standalone
  server) and monitoring reads them back from there with the same code (`predictions_store=s3://bucket/prefix`).
- Replicas behind a real load balancer (Debian's haproxy, config in docs/haproxy.cfg) with their routing, feedback
  and bandit state shared through the serving store on PostgreSQL (`serve_state=postgresql://...`): sticky A/B
  whichever replica answers, a shared bandit posterior, a promotion picked up by every replica, and a replica killed
  with SIGKILL under load costs no request (haproxy `retries` + `option redispatch` + `retry-on`, health checks on /health/ready)."""
from __future__ import annotations
import os, shutil, signal, subprocess, sys, threading, time
from collections import Counter
from pathlib import Path

import httpx
import polars as pl
import pytest

from conftest import ROOT, make_settings
from pg import free_port, pg_cluster

TOKEN = "scale-token"


def wait_until(cond, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.05)


class Replica:
    "One `mlnb serve` process on 127.0.0.1 (its own process group, so a kill takes its workers too)."
    def __init__(self, env: dict, log: Path, port: int | None = None):
        self.port, self.log_path = port or free_port(), log
        self.url, self.env, self.proc = f"http://127.0.0.1:{self.port}", env, None

    def start(self) -> "Replica":
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "serve", "--port", str(self.port)], env=self.env,
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        return self

    def wait_ready(self, timeout: float = 120) -> "Replica":
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"replica exited {self.proc.returncode}:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200: return self
            except httpx.TransportError: pass
            assert time.monotonic() < deadline, f"replica not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str: return self.log_path.read_text(errors="replace")[-4000:]
    def models(self) -> dict: return httpx.get(self.url + "/models", timeout=10).json()
    def admin(self, path: str, body=None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None: return
        try: os.killpg(self.proc.pid, sig)
        except ProcessLookupError: return
        try: self.proc.wait(30)
        except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait(10)


def start_replicas(n: int, env: dict, tmp: Path) -> list[Replica]:
    reps = [Replica(env, tmp/f"replica-{i}.log").start() for i in range(n)]
    try:
        for r in reps: r.wait_ready()
    except BaseException:
        for r in reps: r.stop(signal.SIGKILL)
        raise
    return reps


def build_home(tmp: Path):
    "A project home with v1 (champion) and v2 (challenger): small real boosters on a real sample of the demo data."
    import mlflow, xgboost as xgb
    from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET
    from mlnb.registry import ModelRegistry, mlflow_setup, register_model
    from mlnb.train import make_dmatrix
    from mlnb.schema import FeatureSpec
    s = make_settings(tmp, admin_token=TOKEN)
    frame = build_training_set(s, months=(1, 2), sample=0.02)
    spec = FeatureSpec.infer(frame, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
    mlflow_setup(s)
    d = make_dmatrix(spec, frame, nthread=1)
    for depth, rounds in ((3, 20), (4, 30)):
        b = xgb.train({"objective": "binary:logistic", "max_depth": depth, "nthread": 1, "seed": depth}, d, rounds)
        with mlflow.start_run():
            register_model(b, spec, frame, settings=s, reference_rows=1000)
    mlflow.set_tracking_uri(None); mlflow.set_registry_uri(None)
    ModelRegistry(s).set_challenger("2", reason="scale test")
    records = [{n: v for n, v in r.items() if n in spec.names} for r in frame.head(200).to_dicts()]
    return type("Home", (), {"settings": s, "spec": spec, "records": records, "tmp": tmp})


@pytest.fixture(scope="module")
def home(tmp_path_factory): return build_home(tmp_path_factory.mktemp("scale-serving"))


def replica_env(s, **extra) -> dict:
    return {**os.environ, **s.to_env(), "PYTHONUNBUFFERED": "1", "MLNB_SERVE_WORKERS": "1", "MLNB_SERVE_POLL_SECONDS": "0.2",
            "MLNB_LOG_FLUSH_SECONDS": "0.2", "MLNB_SERVE_ENGINE": "xgboost", **{k: str(v) for k, v in extra.items()}}


# -- the prediction log on object storage ------------------------------------------------------------------------

@pytest.fixture
def s3(tmp_path):
    "A real S3-protocol server (moto's standalone server) on a free port; fsspec configured for it in this process."
    import fsspec
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency: run `make setup`")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(url), timeout=30, what="moto server")
    old = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": url, "key": "testing", "secret": "testing"}
    try:
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("mlnb-logs")
        yield url
    finally:
        if old is None: fsspec.config.conf.pop("s3", None)
        else: fsspec.config.conf["s3"] = old
        proc.terminate(); proc.wait(10)


def _answers(url: str) -> bool:
    try: httpx.get(url, timeout=1); return True
    except httpx.HTTPError: return False


def test_replicas_log_to_object_storage_and_monitoring_reads_it(home, s3, tmp_path):
    "Two replicas write their prediction-log parts to the S3 server; the drift report is built from there."
    import fsspec
    from mlnb.monitor import drift_from_predictions
    from mlnb.predlog import part_files, read_predictions
    from mlnb.registry import load_model
    s = home.settings.replace(predictions_store="s3://mlnb-logs/predictions", serve_state=str(tmp_path/"serving.db"))
    env = replica_env(s, FSSPEC_S3_ENDPOINT_URL=s3, FSSPEC_S3_KEY="testing", FSSPEC_S3_SECRET="testing",
                      AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    reps = start_replicas(2, env, tmp_path)
    answered = []
    try:
        with httpx.Client(timeout=30) as c:
            for i in range(120):
                r = c.post(reps[i % 2].url + "/predict", json={**home.records[i % len(home.records)], "entity": f"e{i}"})
                assert r.status_code == 200, r.text
                answered.append(r.json()["request_id"])
        pids = {r.models()["pid"] for r in reps}
    finally:
        for r in reps: r.stop()                                  # SIGTERM: each replica flushes its log on the way out
    parts = part_files(s)
    assert parts and all(p.startswith("mlnb-logs/predictions/date=") for p in parts)
    assert {int(p.rsplit("/", 1)[1].split("-")[2]) for p in parts} == pids       # both replicas wrote parts
    log = read_predictions(s)
    assert sorted(log["request_id"].to_list()) == sorted(answered)              # every answer, exactly once
    assert not (s.home/"predictions").exists()                                   # nothing on local disk
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert len(fs.find("mlnb-logs/predictions")) == len(parts)
    # monitoring: the same drift code path, reading the log from the object store
    report = drift_from_predictions(s, load_model(s, "champion"))
    ctx = dict(report.context)
    assert report.n_current == 120 and list(ctx["logged_versions"]) == ["1"] and ctx["source"] == "prediction log"
    assert {f.feature for f in report.features} == set(home.spec.names)


# -- replicas behind haproxy -------------------------------------------------------------------------------------

HAPROXY_CFG = ROOT/"docs"/"haproxy.cfg"


def haproxy_config(port: int, replicas: list[Replica]) -> str:
    "docs/haproxy.cfg with this test's ports (the tested configuration, shipped as the template)."
    text = HAPROXY_CFG.read_text()
    servers = "\n".join(f"    server r{i} 127.0.0.1:{r.port} check" for i, r in enumerate(replicas))
    return text.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{port}").split("    server r0 ")[0] + servers + "\n"


@pytest.fixture
def balancer(tmp_path):
    "Start Debian's haproxy on a config for the given replicas; stopped at teardown."
    exe = shutil.which("haproxy")
    if exe is None: pytest.skip("haproxy is not installed (apt-get install haproxy; `make system-deps`)")
    procs = []
    def start(replicas: list[Replica]) -> str:
        port = free_port()
        cfg = tmp_path/f"haproxy-{port}.cfg"
        cfg.write_text(haproxy_config(port, replicas))
        check = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        procs.append(subprocess.Popen([exe, "-W", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path/f"haproxy-{port}.log", "w"), start_new_session=True))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready_through(url), timeout=30, what="haproxy with a healthy backend")
        return url
    yield start
    for p in procs:
        try: os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        p.wait(10)


def _ready_through(url: str) -> bool:
    try: return httpx.get(url + "/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError: return False


class Load:
    "Continuous /predict load from `threads` threads until stopped; every answer or transport failure is kept."
    def __init__(self, url: str, records: list[dict], threads: int = 4):
        self.url, self.records = url, records
        self.answers, self.failures = [], []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._ts = [threading.Thread(target=self._run, args=(k, threads), daemon=True) for k in range(threads)]

    def _run(self, k: int, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = k
            while not self._stop.is_set():
                try:
                    r = c.post("/predict", json={**self.records[i % len(self.records)], "entity": f"load-{i}"})
                    item = (r.status_code, r.json() if r.status_code == 200 else r.text[:200])
                except Exception as e:
                    with self._lock: self.failures.append(f"{type(e).__name__}: {e}")
                else:
                    with self._lock: self.answers.append(item)
                i += n

    def __enter__(self):
        for t in self._ts: t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._ts: t.join(30)


def test_replicas_behind_haproxy_share_routing_bandit_and_promotion(home, balancer, tmp_path):
    from mlnb.registry import ModelRegistry
    state = pg_cluster().createdb()                            # routing, feedback and bandit state in PostgreSQL
    s = home.settings.replace(serve_state=state)
    reps = start_replicas(2, replica_env(s), tmp_path)
    try:
        lb = balancer(reps)
        with httpx.Client(base_url=lb, timeout=30) as c:
            # the balancer spreads requests over both replicas
            assert {c.get("/models").json()["pid"] for _ in range(6)} == {r.models()["pid"] for r in reps}
            # sticky A/B: set on one replica, applied by both; every entity in one arm whichever replica answers
            g = reps[0].admin("/admin/routing", {"strategy": "ab"}).json()["generation"]
            wait_until(lambda: all(r.models()["generation"] == g for r in reps), what="both replicas on the A/B routing")
            entities = [f"user-{i}" for i in range(100)]
            through = [c.post("/predict", json={**home.records[i], "entity": e}).json()["arm"] for i, e in enumerate(entities)]
            for r in reps:
                direct = [httpx.post(r.url + "/predict", json={**home.records[i], "entity": e}).json()["arm"]
                          for i, e in enumerate(entities)]
                assert direct == through
            assert set(through) == {"champion", "challenger"}
            # a shared bandit posterior: predictions through the balancer, rewards through the balancer
            g = reps[1].admin("/admin/routing", {"strategy": "bandit"}).json()["generation"]
            wait_until(lambda: all(r.models()["generation"] == g for r in reps), what="both replicas in bandit mode")
            for i in range(120):
                x = c.post("/predict", json=home.records[i % len(home.records)]).json()
                assert c.post("/feedback", json={"request_id": x["request_id"],
                                                 "reward": float(x["arm"] == "challenger")}).status_code == 200
            def learned(r: Replica) -> bool:
                arms = Counter(httpx.post(r.url + "/predict", json=home.records[0]).json()["arm"] for _ in range(50))
                return arms["challenger"] >= 40
            for r in reps: wait_until(lambda: learned(r), timeout=20, what=f"replica {r.port} learns the rewards")
            import sqlalchemy as sa
            with sa.create_engine(state).connect() as db:           # the posterior both replicas read lives there
                assert db.execute(sa.text("SELECT sum(n) FROM bandit")).scalar() == 120
            assert reps[0].admin("/admin/routing", {"strategy": "single"}).status_code == 200
            # a promotion reaches every replica; time from the alias move to the last replica serving it
            wait_until(lambda: all(r.models()["routing"]["strategy"] == "single" for r in reps), what="single routing")
            t0 = time.monotonic()
            ModelRegistry(s).promote(force=True, reason="scale test")
            seen = {}
            while len(seen) < len(reps):
                for r in reps:
                    if r.port not in seen and httpx.get(r.url + "/health/ready").json().get("model_version") == "2":
                        seen[r.port] = time.monotonic() - t0
                assert time.monotonic() - t0 < 30, f"promotion not picked up by every replica: {seen}"
                time.sleep(0.01)
            print(f"\npromote-to-served across {len(reps)} replicas: " +
                  ", ".join(f"{v * 1000:.0f} ms" for v in seen.values()) + " (poll 0.2 s)")
            ModelRegistry(s).rollback(reason="scale test"); ModelRegistry(s).set_challenger("2", reason="scale test")
        # one replica killed under load through the balancer: no request lost
        with Load(lb, home.records) as load:
            wait_until(lambda: len(load.answers) > 100, what="load through the balancer")
            reps[1].stop(signal.SIGKILL)
            n = len(load.answers)
            wait_until(lambda: len(load.answers) > n + 300, timeout=60, what="load after the kill")
        assert load.failures == [], load.failures[:3]
        bad = [a for a in load.answers if a[0] != 200]
        assert bad == [], bad[:3]
        assert reps[0].proc.poll() is None and reps[1].proc.poll() is not None
    finally:
        for r in reps: r.stop(signal.SIGKILL)
