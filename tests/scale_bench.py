"""Measured figures for the README's "How it scales" table (not a test: run by hand, prints one JSON line each).

    .venv/bin/python tests/scale_bench.py tune [SAMPLE]   # trials/min, 3 `mlnb tune worker` processes: PostgreSQL vs journal file
    .venv/bin/python tests/scale_bench.py serve   # req/s through haproxy, 2 replicas vs 1 (wrk), promote-to-served

Uses the same throwaway servers as the tests (tests/pg.py, docs/haproxy.cfg); the PostgreSQL cluster here keeps
fsync on, as a real one would."""
from __future__ import annotations
import json, os, re, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def bench_tune(n_trials: int = 15, sample: float = 0.05) -> dict:
    import optuna
    from optuna.trial import TrialState
    from conftest import make_settings
    from pg import PgCluster
    from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET
    from mlnb.train import time_split
    from mlnb.tune import open_storage, tune
    from mlnb.schema import FeatureSpec
    tmp = Path(tempfile.mkdtemp(prefix="mlnb-bench-tune-"))
    s = make_settings(tmp)
    train, valid, _ = time_split(build_training_set(s, months=(1, 4), sample=sample))
    spec = FeatureSpec.infer(train, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
    cluster = PgCluster(fsync=os.environ.get("PG_FSYNC", "on") != "off")   # PG_FSYNC=off: the tests' setting
    out = {"workers": 3, "n_trials": n_trials, "num_boost_round": 100, "rows": train.height}
    try:
        for name, storage in (("postgresql", cluster.createdb()), ("journal", f"journal:{tmp/'journal.log'}")):
            r = tune(spec, train, valid, s, n_trials=n_trials, workers=3, storage=storage, study_name=f"bench-{name}",
                     pruner="none", num_boost_round=100, early_stopping_rounds=20, nthread=1, track=False, quiet=True)
            study = optuna.load_study(study_name=f"bench-{name}", storage=open_storage(storage))
            done = study.get_trials(states=(TrialState.COMPLETE,))
            # busy span: first trial start to last trial end (worker start-up excluded), and the whole call
            span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            out[name] = {"trials": len(done), "seconds": round(r.seconds, 1),
                         "trials_per_min": round(60 * len(done) / span, 1),
                         "trials_per_min_incl_startup": round(60 * len(done) / r.seconds, 1)}
    finally:
        cluster.stop(); shutil.rmtree(tmp, ignore_errors=True)
    return out


def _wrk(url: str, body: str, seconds: int = 10, connections: int = 16) -> float:
    lua = Path(tempfile.mktemp(suffix=".lua"))
    lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = ' + json.dumps(body) + "\n")
    p = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(lua), url + "/predict"],
                       capture_output=True, text=True)
    lua.unlink()
    m = re.search(r"Requests/sec:\s+([\d.]+)", p.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", p.stdout)
    assert m and not errors, p.stdout
    return float(m.group(1))


def bench_serve() -> dict:
    import httpx
    from pg import free_port
    import test_scale_serving as T
    tmp = Path(tempfile.mkdtemp(prefix="mlnb-bench-serve-"))
    h = T.build_home(tmp)
    from pg import PgCluster
    cluster = PgCluster(fsync=True)
    s = h.settings.replace(serve_state=cluster.createdb())          # replicas share their state in PostgreSQL
    env = {**T.replica_env(s), "MLNB_SERVE_ENGINE": "auto", "MLNB_LOG_FLUSH_SECONDS": "2.0"}
    reps = T.start_replicas(2, env, tmp)
    procs, out = [], {"wrk": "-t2 -c16 -d10s POST /predict (1 record)", "cores": os.cpu_count(), "state": "postgresql"}
    body = json.dumps({**h.records[0], "entity": "bench"})
    try:
        for r in reps:           # compiled engine where possible, as in production
            deadline = time.monotonic() + 60
            while any(a["engine"] != "compiled" for a in r.models()["arms"].values() if a["version"]) and time.monotonic() < deadline:
                time.sleep(0.2)
        out["engine"] = reps[0].models()["arms"]["champion"]["engine"]
        for n in (1, 2):
            port = free_port()
            cfg = tmp/f"haproxy-{n}.cfg"
            cfg.write_text(T.haproxy_config(port, reps[:n]))
            procs.append(subprocess.Popen(["haproxy", "-W", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
            url = f"http://127.0.0.1:{port}"
            T.wait_until(lambda: T._ready_through(url), timeout=30, what="haproxy")
            _wrk(url, body, 3)                                                   # warm-up
            out[f"rps_{n}_replica{'s' if n > 1 else ''}"] = round(_wrk(url, body), 0)
        out["rps_direct_1_replica"] = round(_wrk(reps[0].url, body), 0)
        # promote-to-served across replicas (alias moved in the registry, each replica polls every 0.2 s)
        from mlnb.registry import ModelRegistry
        times = []
        for _ in range(5):
            t0 = time.monotonic(); ModelRegistry(s).promote(force=True, reason="bench"); seen = {}
            while len(seen) < 2:
                for r in reps:
                    if r.port not in seen and httpx.get(r.url + "/health/ready").json().get("model_version") == "2":
                        seen[r.port] = time.monotonic() - t0
                time.sleep(0.005)
            times.append(max(seen.values()))
            ModelRegistry(s).rollback(reason="bench"); ModelRegistry(s).set_challenger("2", reason="bench")
            T.wait_until(lambda: all(httpx.get(r.url + "/health/ready").json().get("model_version") == "1" for r in reps))
        out["promote_to_served_all_replicas_ms"] = {"median": round(sorted(times)[2] * 1000), "max": round(max(times) * 1000),
                                                     "poll_seconds": 0.2}
    finally:
        for p in procs: os.killpg(p.pid, signal.SIGTERM)
        for r in reps: r.stop()
        cluster.stop(); shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "tune"
    print(json.dumps(bench_tune(sample=float(sys.argv[2]) if len(sys.argv) > 2 else 0.05) if what == "tune" else bench_serve()))
