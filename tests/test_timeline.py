"""The monitoring timeline, alert rules and `mlnb monitor` on real parts: the real prediction-log writer, a real
XGBoost model for explanation drift, real webhook receivers on 127.0.0.1, an S3-compatible server (moto) on
127.0.0.1 for object storage, real papermill runs and real CLI processes."""
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from datetime import date, datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
import xgboost as xgb

from mlnb.alerts import parse_rules, run_monitor, load_incidents
from mlnb.core import Settings
from mlnb.predlog import PredictionLog
from mlnb.timeline import Timeline, flagged
from mlnb.schema import FeatureSpec

DAY0 = date(2026, 1, 1)
FEATURES = ["x", "q", "c"]


def frame(rng, n, shift=False):
    "Rows like the reference; with `shift`, x moves by 2 std and q is 40% missing."
    q = rng.gamma(2.0, 1.0, n)
    if shift: q = np.where(rng.random(n) < 0.4, np.nan, q)
    return pl.DataFrame({"x": rng.normal(2.0 if shift else 0.0, 1.0, n), "q": q,
                         "c": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])})


@pytest.fixture(scope="module")
def model():
    "A reference sample, its contract and a real booster (y depends on x and c)."
    rng = np.random.default_rng(0)
    ref = frame(rng, 3000)
    spec = FeatureSpec.infer(ref, FEATURES, categorical=["c"], nullable=["q"])
    y = ((ref["x"].to_numpy() + 0.8 * (ref["c"] == "a").to_numpy() + rng.normal(0, 0.5, 3000)) > 0.5).astype(float)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": 0},
                        xgb.DMatrix(spec.encode_frame(ref), y, feature_names=spec.names,
                                    feature_types=spec.feature_types, enable_categorical=True), 40)
    ref = ref.with_columns(prediction=pl.Series(booster.inplace_predict(spec.encode_frame(ref)).astype(float)))
    return ref, spec, booster


def write_day(settings, spec, booster, day, rows: pl.DataFrame, model_name="m", version="1"):
    "Log `rows` for UTC `day` with the real prediction-log writer, one row a minute."
    t0 = datetime.combine(day, datetime.min.time(), timezone.utc)
    pred = booster.inplace_predict(spec.encode_frame(rows)) if booster is not None else np.full(rows.height, 0.5)
    recs = [dict(request_id=f"{model_name}-{day}-{i}", ts=t0 + timedelta(seconds=30 * i), model_name=model_name,
                 model_version=version, arm="champion", entity=None, latency_ms=2.0 + (i % 10) / 10,
                 prediction=float(p), features=r) for i, (r, p) in enumerate(zip(rows.iter_rows(named=True), pred))]
    with PredictionLog(settings, spec, start=False) as log:
        log.append(recs)


def days(i): return DAY0 + timedelta(days=i)


def test_a_known_shift_is_flagged_at_its_chunk_and_not_before(tmp_path, model):
    "Drift, quality and explanation-drift timelines flag day 7 (the shift) and none of days 1-6."
    ref, spec, booster = model
    s = Settings(home=tmp_path/"home")
    rng = np.random.default_rng(1)
    for i in range(9): write_day(s, spec, booster, days(i), frame(rng, 2000, shift=i >= 6))
    write_day(s, spec, booster, days(3), frame(rng, 500), model_name="other")       # another model: never mixed in
    tl = Timeline(s, "m", ref, spec=spec, booster=booster)
    res = tl.update()
    assert len(res["new_chunks"]) == 8 and res["provisional"] == ["2026-01-09T000000Z"] and res["rows_scanned"] == 18000
    fr = tl.frame()
    first_bad = "2026-01-07T000000Z"
    for group, metric, col in [("drift", "drift", "x"), ("quality", "null_rate", "q"), ("explain", "mean_abs_shap", "x")]:
        hits = flagged(fr, group, metric).filter(pl.col("column") == col)["chunk"].to_list()
        assert hits and hits[0] == first_bad, (group, metric, hits)
        assert set(hits) == {first_bad, "2026-01-08T000000Z", "2026-01-09T000000Z"}, (group, metric, hits)
    before = fr.filter(pl.col("chunk") < first_bad)
    assert before.filter(pl.col("status") == "alert").height == 0, before.filter(pl.col("status") == "alert")
    assert fr.filter(pl.col("column") == "c", pl.col("group") == "drift")["status"].to_list() == ["ok"] * 9
    # the unaffected model's own timeline sees only its own rows
    assert Timeline(s, "other", ref, spec=spec).update()["rows_scanned"] == 500
    # the n/a values say why
    na = fr.filter(pl.col("status") == "n/a")
    assert set(na["metric"]) == {"rejected", "error_rate"}
    assert na["reason"].str.contains("logs successful predictions only").all()


def test_incremental_update_computes_only_new_chunks(tmp_path, model):
    ref, spec, booster = model
    s = Settings(home=tmp_path/"home")
    rng = np.random.default_rng(2)
    for i in range(4): write_day(s, spec, None, days(i), frame(rng, 300))
    tl = Timeline(s, "m", ref, spec=spec)
    r1 = tl.update()
    assert (len(r1["new_chunks"]), r1["rows_scanned"]) == (3, 1200)
    chunks = tl.dir/"chunks"
    mtimes = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.parquet")}
    r2 = tl.update()
    assert (r2["new_chunks"], r2["rows_scanned"], r2["days_scanned"]) == ([], 300, 1)      # only the open day again
    write_day(s, spec, None, days(4), frame(rng, 300))
    r3 = tl.update()
    assert r3["new_chunks"] == ["2026-01-04T000000Z"] and r3["provisional"] == ["2026-01-05T000000Z"]
    assert r3["rows_scanned"] == 600 and r3["days_scanned"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.parquet")}
    for name in ("2026-01-01T000000Z.parquet", "2026-01-02T000000Z.parquet", "2026-01-03T000000Z.parquet"):
        assert after[name] == mtimes[name]                     # final chunks are never recomputed
    # a changed configuration recomputes everything, and says so
    r4 = Timeline(s, "m", ref, spec=spec, thresholds={"latency.p99_ms": {"upper": 1.0}}).update()
    assert r4["recomputed_all"] and len(r4["new_chunks"]) == 4
    lat = Timeline(s, "m", ref, spec=spec, thresholds={"latency.p99_ms": {"upper": 1.0}}).frame() \
        .filter(pl.col("metric") == "p99_ms")
    assert set(lat["status"]) == {"alert"} and lat["column"][0] == "version=1 arm=champion"


def test_row_count_chunks_are_incremental(tmp_path, model):
    ref, spec, _ = model
    s = Settings(home=tmp_path/"home")
    rng = np.random.default_rng(3)
    for i in range(3): write_day(s, spec, None, days(i), frame(rng, 250))
    tl = Timeline(s, "m", ref, spec=spec, chunk_rows=200)
    r1 = tl.update()
    assert r1["new_chunks"] == [f"rows-{i:06d}" for i in range(3)] and r1["provisional"] == ["rows-000003"]
    write_day(s, spec, None, days(3), frame(rng, 250))
    r2 = tl.update()
    assert r2["new_chunks"] == ["rows-000003", "rows-000004"] and r2["provisional"] == []
    assert tl.frame().filter(pl.col("metric") == "rows", pl.col("column") == "")["value"].to_list() == [200.0] * 5


def test_bad_input_gives_a_message_or_na_with_reason(tmp_path, model):
    ref, spec, _ = model
    s = Settings(home=tmp_path/"home")
    # an empty window: no log at all
    empty = Timeline(s, "m", ref, spec=spec).update()
    assert empty["new_chunks"] == [] and "no prediction log" in empty["message"]
    out = run_monitor(s, timeline=Timeline(s, "m", ref, spec=spec), rules=parse_rules("", "empty"))
    assert out["chunks"] == 0 and "no prediction log" in out["message"]
    with pytest.raises(ValueError, match="reference frame is empty"):
        Timeline(s, "m", ref.head(0), spec=spec)
    rng = np.random.default_rng(4)
    day1 = frame(rng, 400)
    day2 = frame(rng, 400).with_columns(q=pl.lit(None, pl.Float64))                    # all-null column
    xs = day2["x"].to_numpy().copy(); xs[:80] = np.inf                                    # 20% inf
    day2 = day2.with_columns(x=pl.Series(xs))
    write_day(s, spec, None, days(0), day1)
    write_day(s, spec, None, days(1), day2)
    write_day(s, spec, None, days(2), frame(rng, 3))                                      # a 3-row chunk
    write_day(s, spec, None, days(3), frame(rng, 400))
    ref_z = ref.with_columns(z=pl.lit(1.0))                                              # z: not in the log
    tl = Timeline(s, "m", ref_z, features=["x", "q", "c", "z"], categorical=["c"])
    tl.update()
    fr = tl.frame()
    get = lambda chunk, g, m, c: fr.filter(pl.col("chunk") == chunk, pl.col("group") == g, pl.col("metric") == m,
                                          pl.col("column") == c).row(0, named=True)
    z = get("2026-01-01T000000Z", "drift", "drift", "z")
    assert z["status"] == "n/a" and z["value"] is None and "not in the prediction log" in z["reason"]
    assert get("2026-01-01T000000Z", "quality", "null_rate", "z")["status"] == "n/a"
    nul = get("2026-01-02T000000Z", "quality", "null_rate", "q")
    assert nul["value"] == 1.0 and nul["status"] == "alert"
    qd = get("2026-01-02T000000Z", "drift", "drift", "q")
    assert qd["status"] == "alert" and qd["value"] > 1
    inf = get("2026-01-02T000000Z", "quality", "out_of_range", "x")
    assert inf["status"] == "alert" and abs(inf["value"] - 0.2) < 0.01
    small = fr.filter(pl.col("chunk") == "2026-01-03T000000Z", pl.col("group") != "volume",
                      ~pl.col("status").is_in(["n/a"]))
    assert set(small["status"]) == {"insufficient data"}
    assert small["reason"].str.contains("3 rows (in this chunk|on the smaller side); at least 30").all()
    assert get("2026-01-01T000000Z", "drift", "drift", "x")["status"] == "ok"


def test_a_constant_column_that_moves_is_drift_in_the_timeline(tmp_path):
    s = Settings(home=tmp_path/"home")
    ref = pl.DataFrame({"k": [5.0] * 1000, "flag": [0.0, 1.0] * 500})
    spec = FeatureSpec.infer(ref, ["k", "flag"])
    write_day(s, spec, None, days(0), pl.DataFrame({"k": [5.0] * 300, "flag": [0.0, 1.0] * 150}))
    write_day(s, spec, None, days(1), pl.DataFrame({"k": [6.0] * 300, "flag": [0.0, 5.0] * 150}))
    write_day(s, spec, None, days(2), pl.DataFrame({"k": [5.0] * 10, "flag": [0.0] * 10}))
    tl = Timeline(s, "m", ref, spec=spec)
    tl.update()
    d = tl.frame().filter(pl.col("group") == "drift").sort("chunk", "column")
    assert d.filter(pl.col("chunk") == "2026-01-01T000000Z")["status"].to_list() == ["ok", "ok"]
    moved = d.filter(pl.col("chunk") == "2026-01-02T000000Z")
    assert moved["status"].to_list() == ["alert", "alert"] and (moved["value"] > 1).all()
    assert d.filter(pl.col("chunk") == "2026-01-03T000000Z")["status"].to_list() == ["insufficient data"] * 2


class Receiver:
    "A webhook receiver on 127.0.0.1 that records every POSTed JSON body."
    def __init__(self):
        got = self.got = []
        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200); self.end_headers()
            def log_message(self, *a): pass
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_port}/hook"


def _dead_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def test_alerts_fire_once_repeat_after_the_interval_resolve_and_survive_a_dead_webhook(tmp_path, model):
    ref, spec, _ = model
    s = Settings(home=tmp_path/"home")
    rx = Receiver()
    rules = parse_rules(f"""
[alerting]
repeat_interval = "1h"
webhook_retries = 1
webhook_timeout = 1.0
[[webhooks]]
name = "ops"
url = "{rx.url}"
[[webhooks]]
name = "dead"
url = "{_dead_url()}"
[[rules]]
name = "x_drift"
metric = "drift.drift"
column = "x"
for = 2
severity = "critical"
channels = ["audit", "prometheus", "ops", "dead"]
""")
    rng = np.random.default_rng(5)
    run = lambda now: run_monitor(s, timeline=Timeline(s, "m", ref, spec=spec), rules=rules, now=now, webhook_wait=10)
    for i in range(3): write_day(s, spec, None, days(i), frame(rng, 1500))
    assert run(0)["notifications"] == []
    write_day(s, spec, None, days(3), frame(rng, 1500, shift=True))                     # one shifted chunk: a blip so far
    assert run(10)["notifications"] == [] and rx.got == []
    write_day(s, spec, None, days(4), frame(rng, 1500, shift=True))                     # sustained: fires once
    out = run(20)
    assert [n["event"] for n in out["notifications"]] == ["firing"] and out["open_alerts"] == ["x_drift"]
    assert out["webhooks"] == {"delivered": 1, "failed": 1, "pending": 0}              # the dead one did not stop us
    assert len(rx.got) == 1 and rx.got[0]["status"] == "firing"
    assert rx.got[0]["commonLabels"] == {"alertname": "x_drift", "severity": "critical", "model_name": "m",
                                         "metric": "drift.drift"}
    write_day(s, spec, None, days(5), frame(rng, 1500, shift=True))
    assert run(600)["notifications"] == [] and len(rx.got) == 1                        # within the repeat interval
    write_day(s, spec, None, days(6), frame(rng, 1500, shift=True))
    out = run(4000)                                                                     # after it: notified again
    assert [n["event"] for n in out["notifications"]] == ["firing"] and len(rx.got) == 2
    write_day(s, spec, None, days(7), frame(rng, 1500))                                 # cleared: resolved
    out = run(4100)
    assert [n["event"] for n in out["notifications"]] == ["resolved"] and rx.got[-1]["status"] == "resolved"
    assert out["open_alerts"] == []
    inc = list(load_incidents(s, "m").values())
    assert len(inc) == 1 and inc[0]["status"] == "resolved" and inc[0]["notifications"] == 3
    prom = (s.home/"monitoring"/"mlnb_monitor_m.prom").read_text()
    assert 'mlnb_alert_firing{alertname="x_drift"' in prom and "mlnb_monitor_value{" in prom
    from mlnb.audit import read_audit
    assert [r["operation"] for r in read_audit(s, phase="end") if r["operation"].startswith("alert_")] == \
        ["alert_firing", "alert_firing", "alert_resolved"]
    assert "x_drift" in (s.home/"monitoring"/"m"/"report.html").read_text()
    # a blip among normal chunks never fires
    s2 = Settings(home=tmp_path/"home2")
    for i, shift in enumerate([False, False, True, False, False]): write_day(s2, spec, None, days(i), frame(rng, 1500, shift))
    out = run_monitor(s2, timeline=Timeline(s2, "m", ref, spec=spec), rules=rules, now=0)
    assert out["notifications"] == [] and ("drift", "drift", "x") not in out["latest_alerts"]


def test_the_log_is_read_from_object_storage(tmp_path, model):
    "The same timeline code reads the log from an S3-compatible store (moto's server on 127.0.0.1)."
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    ref, spec, _ = model
    local = Settings(home=tmp_path/"home")
    rng = np.random.default_rng(6)
    for i in range(3): write_day(local, spec, None, days(i), frame(rng, 300, shift=i == 2))
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        so = {"aws_endpoint_url": f"http://{host}:{port}", "aws_access_key_id": "test", "aws_secret_access_key": "test",
              "aws_region": "us-east-1", "aws_allow_http": "true"}
        fs = s3fs.S3FileSystem(key="test", secret="test", endpoint_url=so["aws_endpoint_url"])
        fs.mkdir("mlnb")
        fs.put(str(local.predictions_dir), "mlnb/predictions", recursive=True)
        remote = Timeline(Settings(home=tmp_path/"remote"), "m", ref, spec=spec, log="s3://mlnb/predictions",
                          storage_options=so)
        res = remote.update()
        assert res["rows_scanned"] == 900 and len(res["new_chunks"]) == 2
        here = Timeline(local, "m", ref, spec=spec)
        here.update()
        cols = ["chunk", "group", "metric", "column", "value", "status"]
        assert remote.frame().select(cols).equals(here.frame().select(cols))
        assert flagged(remote.frame(), "drift")["chunk"].unique().to_list() == ["2026-01-03T000000Z"]
    finally:
        srv.stop()


def test_mlnb_drift_compares_any_two_files(tmp_path):
    "`mlnb drift --reference FILE --current FILE`, a real CLI process (issue 14)."
    rng = np.random.default_rng(7)
    pl.DataFrame({"a": rng.normal(size=2000), "b": rng.choice(["u", "v"], 2000), "k": [5] * 2000,
                  "when": [date(2024, 1, 1)] * 2000}).write_csv(tmp_path/"ref.csv")
    pl.DataFrame({"a": rng.normal(size=2000), "b": rng.choice(["u", "v"], 2000), "k": [6] * 2000,
                  "when": [date(2024, 6, 1)] * 2000}).write_parquet(tmp_path/"cur.parquet")
    env = {**os.environ, "MLNB_HOME": str(tmp_path/"home")}
    cmd = [sys.executable, "-m", "mlnb.cli", "drift", "--reference", str(tmp_path/"ref.csv"),
           "--current", str(tmp_path/"cur.parquet")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["drifting"] == ["k"] and out["status"] == "drift"
    p = subprocess.run(cmd + ["--fail-on-drift"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    p = subprocess.run(cmd[:-1] + [str(tmp_path/"missing.csv")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "no such data file" in p.stderr
    pl.DataFrame({"a": [0.1, 0.2, 0.3]}).write_csv(tmp_path/"tiny.csv")                  # 3 rows: not drift
    p = subprocess.run(cmd[:-1] + [str(tmp_path/"tiny.csv")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["status"] == "insufficient data"


def test_monitor_pipeline_runs_with_papermill_on_a_trained_home(trained_home, tmp_path):
    "`mlnb run monitor` (real papermill) on a home with a champion and a logged week of real flights."
    from mlnb.examples.flights import build_training_set
    from mlnb.pipeline import run_pipeline
    bundle = trained_home.bundle
    # a log of its own: the session's shared home also holds what other tests served today
    s = trained_home.settings.replace(predictions_store=str(tmp_path/"predictions"))
    flights = build_training_set(s, months=(7, 7)).sort("sched_dep_ts")
    flights = flights.filter(pl.col("sched_dep_ts").dt.day() <= 9)
    preds = bundle.predict_frame(flights)
    recs = [dict(request_id=f"r{i}", ts=r["sched_dep_ts"], model_name=bundle.name, model_version=bundle.version,
                 arm="champion", entity=None, latency_ms=3.0, prediction=float(p), features={k: r[k] for k in bundle.spec.names})
            for i, (r, p) in enumerate(zip(flights.iter_rows(named=True), preds))]
    with PredictionLog(s, bundle.spec, start=False) as log:
        log.append(recs)
    from mlnb.timeline import log_days
    n_days = len(log_days(tmp_path/"predictions"))                      # UTC days of the logged flights
    run = run_pipeline("monitor", {"period": "day"}, s)
    m = run.metrics["monitor"]
    assert m["model_name"] == bundle.name and m["chunks"] == n_days and m["rows_scanned"] == flights.height
    assert (run.out_dir/"monitor_report.html").stat().st_size > 1_000_000        # plotly.js embedded
    fr = pl.read_parquet(sorted((s.home/"monitoring"/bundle.name/"timeline").glob("*/*.parquet")))
    assert fr.filter(pl.col("group") == "explain", pl.col("status") != "n/a").height == n_days * len(bundle.spec.names)
    perf = fr.filter(pl.col("group") == "performance", pl.col("metric") == "auc", pl.col("column") == "estimated")
    assert perf.height == n_days and perf["value"].is_not_null().all()         # CBPE before any label arrived
    assert "Performance: realized (labels) and estimated (CBPE" in (run.out_dir/"monitor_report.html").read_text()
    again = run_pipeline("monitor", {"period": "day"}, s).metrics["monitor"]
    assert again["new_chunks"] == [] and again["rows_scanned"] < flights.height / 5   # incremental
    p = subprocess.run([sys.executable, "-m", "mlnb.cli", "monitor", "alerts", "--all"], capture_output=True,
                       text=True, env=trained_home.env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def test_realized_performance_follows_late_labels_and_matches_a_fresh_recomputation(tmp_path, model):
    "Labels arrive in three late batches: each run updates the recent chunks' realized AUC; the last run equals a "
    "timeline computed from scratch; CBPE's estimate is there before any label."
    from mlnb.performance import CBPE
    ref, spec, booster = model
    s = Settings(home=tmp_path/"home")
    rng = np.random.default_rng(9)
    for i in range(4): write_day(s, spec, booster, days(i), frame(rng, 800))
    log = pl.read_parquet(sorted(s.predictions_dir.glob("date=*/part-*.parquet")))
    truth = log.select("request_id", label=(pl.Series(rng.random(log.height)) < pl.col("prediction")).cast(pl.Float64))
    y_ref = (rng.random(ref.height) < ref["prediction"].to_numpy()).astype(float)
    cbpe = CBPE().fit(ref["prediction"], y_ref)
    batches = [truth.sample(fraction=f, seed=k) for k, f in enumerate((0.2, 0.5, 1.0))]
    current = {"labels": truth.head(0)}
    tl = Timeline(s, "m", ref, spec=spec, labels=lambda: current["labels"], estimator=cbpe)
    get = lambda t: t.frame().filter(pl.col("group") == "performance").sort("chunk", "metric", "column")
    tl.update()
    first = get(tl)
    est = first.filter(pl.col("metric") == "auc", pl.col("column") == "estimated")
    assert est.height == 4 and est["value"].is_not_null().all()                      # estimated before any label
    assert first.filter(pl.col("metric") == "labeled_fraction")["value"].to_list() == [0.0] * 4
    seen = []
    for b in batches:
        current["labels"] = b
        tl.update()
        fr = get(tl)
        seen.append(fr.filter(pl.col("metric") == "labeled_fraction")["value"].to_list())
    assert [round(sum(x) / 4, 1) for x in seen] == [0.2, 0.5, 1.0]
    fresh = Timeline(Settings(home=tmp_path/"fresh"), "m", ref, spec=spec, labels=truth, estimator=cbpe,
                     log=str(s.predictions_dir))
    fresh.update()
    cols = ["chunk", "metric", "column", "value", "lower", "upper", "status"]
    assert get(tl).select(cols).equals(get(fresh).select(cols))
    short = Timeline(s, "m", ref, spec=spec, labels=truth, estimator=cbpe, label_horizon_days=1.5).update()
    assert short["performance_chunks"] == ["2026-01-03T000000Z", "2026-01-04T000000Z"]   # only the label horizon
    auc = get(tl).filter(pl.col("metric") == "auc").pivot("column", index="chunk", values="value")
    assert (auc["realized"] - auc["estimated"]).abs().max() < 0.08
