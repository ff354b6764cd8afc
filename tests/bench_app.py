"""Render times of every app page on a large project home: `python tests/bench_app.py --from-home HOME_DIR`.

Copies a trained home (e.g. the one `make demo` leaves in .mlnb, with its settings), then makes it large with real
registry calls and files in the layouts mlnb writes: `--versions` registered versions (gated, promoted in turn, so
the audit trail has the alias history), `--rows` logged predictions over `--days` days (part files of the prediction
log, scored by the champion), a monitoring timeline of `--days` daily chunks, `--audit` extra audit records and
`--runs` pipeline runs. Then starts the app, opens every page twice in headless chromium and prints the render
times as ONE JSON object on the last line (first load, and after the first load: served by st.cache_data)."""
from __future__ import annotations
import argparse, json, os, shutil, sys, tempfile, time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import find_free_port, make_settings                       # noqa: E402
from test_app import PAGES, browse_all, start_app, stop_app              # noqa: E402


def build(src_home: Path, src_reports: Path | None, out: Path, versions: int, rows: int, days: int, n_audit: int,
          n_runs: int) -> dict:
    import mlflow
    from mlnb import dashboard as db
    from mlnb.audit import audited
    from mlnb.gate import GateCheck, GateResult
    from mlnb.predlog import log_schema
    from mlnb.registry import ModelRegistry, mlflow_setup
    shutil.copytree(src_home, out/"home")
    if src_reports and src_reports.exists(): shutil.copytree(src_reports, out/"reports")
    s = make_settings(out)
    reg = ModelRegistry(s)
    base = reg.load("champion")
    t0 = time.perf_counter()
    mlflow_setup(s)
    have = len(reg.list_versions(1000))
    for i in range(have, versions):
        with mlflow.start_run(run_name=f"bench-v{i + 1}"):
            mlflow.log_params({"max_depth": 4 + i % 4, "learning_rate": 0.05 + 0.01 * (i % 5)})
            mlflow.log_metric("test_auc", 0.70 + 0.001 * i)
            v = str(reg.register(base.booster, base.spec, base.reference).version)
        champ = reg.current_version("champion")
        reg.record_gate(v, GateResult(True, [GateCheck("auc", True, f"auc +0.001 (95% CI [-0.002, +0.004]) vs v{champ}",
                                                       0.001, 0.0)], "auc"), champion_version=champ)
        reg.set_challenger(v); reg.promote(reason="bench")
    t_registry = time.perf_counter() - t0

    champion = reg.load("champion")
    rng = np.random.default_rng(0)
    start = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days)
    ref = champion.reference.select(champion.spec.names)
    schema = log_schema(champion.spec)
    per_day = rows // days
    t0 = time.perf_counter()
    for d in range(days):
        day = start + timedelta(days=d)
        f = ref.sample(per_day, with_replacement=True, seed=d)
        pred = np.asarray(champion.predict_frame(f), dtype=np.float64)
        ts = (int(day.timestamp() * 1e6) + np.sort(rng.integers(0, 86_400_000_000, per_day))).astype("int64")
        part = f.with_columns(request_id=pl.Series([f"r{d}-{i}" for i in range(per_day)]),
                              ts=pl.Series(ts).cast(pl.Datetime("us", "UTC")), model_name=pl.lit(champion.name),
                              model_version=pl.lit(champion.version), arm=pl.lit("champion"), entity=pl.lit(None, pl.String),
                              latency_ms=pl.Series(rng.gamma(2.0, 1.0, per_day)), prediction=pl.Series(pred))
        folder = s.predictions_dir/f"date={day:%Y-%m-%d}"
        folder.mkdir(parents=True, exist_ok=True)
        part.select([pl.col(c).cast(t) for c, t in schema.items()]).write_parquet(folder/"part-00000.parquet")
    t_log = time.perf_counter() - t0

    feats = champion.spec.names
    tl_dir = db.monitoring_home(s, champion.name)/"timeline"/"chunks"
    tl_dir.mkdir(parents=True, exist_ok=True)
    for d in range(days):
        st = start + timedelta(days=d)
        key = st.strftime("%Y-%m-%dT%H%M%SZ")
        b = dict(chunk=key, start=st, reason=None, detail=None, n=per_day)
        out_rows = []
        for j, c in enumerate(feats):
            psi = float(abs(rng.normal(0.03, 0.02)) + (0.004 * max(0, d - days + 30) if j < 3 else 0))
            out_rows += [{**b, "group": "drift", "metric": "drift", "column": c, "value": psi, "lower": 0.0, "upper": 0.25,
                          "status": "alert" if psi > 0.25 else "ok"},
                         {**b, "group": "quality", "metric": "null_rate", "column": c, "value": 0.01, "lower": 0.0, "upper": 0.05, "status": "ok"},
                         {**b, "group": "explain", "metric": "mean_abs_shap", "column": c, "value": 0.1 + 0.01 * j, "lower": 0.0, "upper": 1.0, "status": "ok"}]
        lab = min(1.0, (days - d) / 30)
        out_rows += [{**b, "group": "prediction", "metric": "drift", "column": "prediction", "value": 0.01, "lower": 0.0, "upper": 0.25, "status": "ok"},
                     {**b, "group": "latency", "metric": "p50_ms", "column": f"version={champion.version} arm=champion", "value": 1.5, "lower": None, "upper": None, "status": "ok"},
                     {**b, "group": "latency", "metric": "p99_ms", "column": f"version={champion.version} arm=champion", "value": 6.0, "lower": None, "upper": None, "status": "ok"},
                     {**b, "group": "errors", "metric": "error_rate", "column": f"version={champion.version} arm=champion", "value": 0.001, "lower": None, "upper": None, "status": "ok"},
                     {**b, "group": "performance", "metric": "labeled_fraction", "column": "", "value": lab, "lower": None, "upper": None, "status": "ok"},
                     {**b, "group": "performance", "metric": "auc", "column": "estimated", "value": 0.72, "lower": 0.68, "upper": 0.76, "status": "ok"},
                     {**b, "group": "performance", "metric": "auc", "column": "realized", "value": 0.71 if lab > 0.2 else None,
                      "lower": 0.68, "upper": 0.76, "status": "ok" if lab > 0.2 else "n/a", "reason": None if lab > 0.2 else "too few labels"}]
        pl.DataFrame(out_rows, schema=db.TIMELINE_COLUMNS).write_parquet(tl_dir/f"{key}.parquet")

    for i in range(n_audit):
        with audited("monitor_run", s, model_name=champion.name) as rec: rec.metrics.update(rows_scanned=per_day)
    for i in range(n_runs):
        rid = f"{(start + timedelta(hours=i)):%Y%m%dT%H%M%S}-{i:06x}"
        d = s.reports_dir/"monitor"/rid
        d.mkdir(parents=True, exist_ok=True)
        ok = i % 17 != 0
        (d/"status.json").write_text(json.dumps({"name": "monitor", "run_id": rid, "outcome": "success" if ok else "failure",
                                                 "params": {"day": i}, "seconds": 12.0, "notebook": str(d/"monitor.ipynb"),
                                                 "metrics": {}, "error": None if ok else {"type": "ValueError", "message": "bad"}}))
    return {"settings": s, "registry_seconds": round(t_registry, 1), "log_seconds": round(t_log, 1),
            "champion": champion.version}


def server_times(env: dict) -> dict[str, float]:
    "Each page's script run (server side, AppTest) once the cache is warm: the part of a render the app controls."
    from streamlit.testing.v1 import AppTest
    from test_app import APP
    os.environ.update({k: v for k, v in env.items() if k.startswith("MLNB_")})
    at = AppTest.from_file(str(APP), default_timeout=600).run()
    out = {}
    for rnd in range(2):
        for slug in PAGES:
            t0 = time.perf_counter()
            at.switch_page(f"app_pages/{slug}.py").run()
            assert not at.exception, (slug, [e.value for e in at.exception])
            if rnd: out[slug] = round(time.perf_counter() - t0, 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-home", required=True, help="a trained project home (MLNB_HOME) to copy")
    p.add_argument("--from-reports", default="", help="its reports folder (optional)")
    p.add_argument("--out", default="", help="where to build the large home (default: a temporary folder, removed)")
    p.add_argument("--versions", type=int, default=20)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=180)
    p.add_argument("--audit", type=int, default=2000)
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3, help="cached passes in the browser (the median is reported)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="mlnb-bench-app-"))
    try:
        t0 = time.perf_counter()
        info = build(Path(a.from_home), Path(a.from_reports) if a.from_reports else None, out, a.versions, a.rows,
                     a.days, a.audit, a.runs)
        s = info.pop("settings")
        env = {**os.environ, **s.to_env()}
        proc, url = start_app(env, find_free_port(), out/"streamlit.log")
        try: times = browse_all(url, None, rounds=a.rounds)
        finally: stop_app(proc)
        server = server_times(env)
        print(json.dumps({"bench": "app", "rows": a.rows, "days": a.days, "versions": a.versions, "audit_records": a.audit,
                          "pipeline_runs": a.runs, "build_seconds": round(time.perf_counter() - t0, 1), **info,
                          "pages": times, "max_first_s": max(t["first_s"] for t in times.values()),
                          "max_cached_s": max(t["cached_s"] for t in times.values()),
                          "server_script_cached_s": server, "load_average": os.getloadavg()[0]}))
    finally:
        if not a.out: shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
