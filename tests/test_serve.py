"""End-to-end tests of the model server: a real `mlnb serve` process on 127.0.0.1, a trained champion, httpx."""
import json, math, signal, subprocess, sys
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH, MAX_BODY = 64, 200_000
ADMIN_TOKEN = "serve-test-token"
TOL = 1e-6      # the server predicts with XGBoost or with the compiled trees, checked equal to XGBoost within 1e-6


def _clean(row: dict, spec) -> dict:
    "A reference row as a JSON-able request record: the spec's features only, float NaN as null."
    return {n: (None if isinstance(v := row.get(n), float) and math.isnan(v) else v) for n in spec.names}


@pytest.fixture
def server(trained_home, serve_process, tmp_path):
    "A real `mlnb serve` process, ready to serve; stopped (SIGTERM) at the end if still running."
    env = {**trained_home.env, "MLNB_MAX_BATCH": str(MAX_BATCH), "MLNB_MAX_BODY_BYTES": str(MAX_BODY),
           "MLNB_SERVE_STATE": str(tmp_path/"serving.db"), "MLNB_ADMIN_TOKEN": ADMIN_TOKEN,
           # flush only on shutdown, so the SIGTERM test proves close() writes everything
           "MLNB_LOG_FLUSH_SECONDS": "600", "MLNB_LOG_FLUSH_ROWS": "1000000"}
    return serve_process(env, log=tmp_path/"server.log").start(fail_on_load_error=True)


@pytest.fixture(scope="module")
def bundle(trained_home):
    from mlnb.registry import load_model
    return load_model(trained_home.settings, "champion")


@pytest.fixture(scope="module")
def rows(bundle):
    return [_clean(r, bundle.spec) for r in bundle.reference.head(200).to_dicts()]


def expected(bundle, records) -> list[float]:
    return bundle.booster.inplace_predict(bundle.spec.encode_records(records)).tolist()


def test_predictions_match_the_booster(server, bundle, rows):
    c = server.client
    ready = c.get("/health/ready").json()
    assert (ready["model_name"], ready["model_version"]) == (bundle.name, bundle.version)
    assert c.get("/health/live").status_code == 200
    info = c.get("/models").json()
    assert [(f["name"], f["kind"]) for f in info["features"]] == [(f.name, f.kind) for f in bundle.spec.features]
    assert (info["name"], info["version"], info["run_id"]) == (bundle.name, bundle.version, bundle.run_id)

    for rec in rows[:20]:
        r = c.post("/predict", json=rec)
        assert r.status_code == 200, r.text
        body = r.json()
        assert abs(body["prediction"] - expected(bundle, [rec])[0]) <= TOL
        assert (body["model_name"], body["model_version"], body["arm"]) == (bundle.name, bundle.version, "champion")
        assert len(body["request_id"]) == 32 and body["latency_ms"] >= 0

    batch = rows[:MAX_BATCH]
    for payload in ({"records": batch}, batch):
        r = c.post("/predict", json=payload)
        assert r.status_code == 200, r.text
        assert np.abs(np.array(r.json()["predictions"]) - expected(bundle, batch)).max() <= TOL

    r = c.post("/predict", json={**rows[0], "entity": "flight-42"}, headers={"x-request-id": "my-request-1"})
    assert (r.status_code, r.json()["request_id"], r.headers["x-request-id"]) == (200, "my-request-1", "my-request-1")


def test_bad_requests_get_a_clear_4xx(server, bundle, rows):
    c, spec, rec = server.client, bundle.spec, rows[0]
    num = next(f.name for f in spec.features if f.kind == "num" and not f.nullable)
    cat = next(f.name for f in spec.features if f.kind == "cat" and not f.nullable)
    missing = {k: v for k, v in rec.items() if k != num}
    big = json.dumps([rec] * 4000).encode()
    assert len(big) > MAX_BODY

    def chunked():
        for i in range(0, len(big), 16_384): yield big[i:i + 16_384]

    cases = [  # (name, request kwargs, status, text the answer must contain)
        ("missing field", dict(json=missing), 422, f"field '{num}': missing field"),
        ("wrong type", dict(json={**rec, num: "eleven"}), 422, f"field '{num}': expected a number"),
        ("wrong type (cat)", dict(json={**rec, cat: 7}), 422, f"field '{cat}': expected a string"),
        ("NaN", dict(content=json.dumps({**rec, num: float("nan")}).encode()), 422, f"field '{num}': must be finite"),
        ("null not allowed", dict(json={**rec, cat: None}), 422, f"field '{cat}': null is not allowed"),
        ("bad record in batch", dict(json={"records": [rec, {**rec, num: None}]}), 422, f"record 1: field '{num}'"),
        ("empty body", dict(content=b""), 400, "body is empty"),
        ("invalid JSON", dict(content=b'{"carrier": "UA",'), 400, "not valid JSON"),
        ("not an object", dict(content=b'"hello"'), 400, "must be a JSON object"),
        ("too many records", dict(json=[rec] * (MAX_BATCH + 1)), 413, f"max_batch={MAX_BATCH}"),
        ("body too large", dict(content=big), 413, "max_body_bytes=200,000"),
        ("body too large (chunked)", dict(content=chunked()), 413, "max_body_bytes=200,000"),
    ]
    assert "NaN" in cases[3][1]["content"].decode()
    problems = []
    for name, kw, status, text in cases:
        r = c.post("/predict", **kw)
        if r.status_code != status or text not in r.text:
            problems.append(f"{name}: expected {status} containing {text!r}, got {r.status_code} {r.text[:300]}")
        elif r.status_code == 422:
            assert r.json()["error"] == "invalid_record" and r.json()["detail"]["field"] in (num, cat), r.text
        ok = c.post("/predict", json=rec)      # the server still answers a valid request afterwards
        if ok.status_code != 200: problems.append(f"after {name}: valid request got {ok.status_code} {ok.text[:200]}")
    r = c.get("/predict")
    if (r.status_code, r.headers.get("allow")) != (405, "POST"): problems.append(f"GET /predict: {r.status_code}")
    if c.get("/nope").status_code != 404: problems.append("unknown path is not a 404")
    assert not problems, "\n".join(problems) + "\n" + server.log()
    assert "Traceback" not in server.log()


def test_sigterm_flushes_every_answered_prediction(server, bundle, rows, trained_home):
    from mlnb.predlog import read_predictions
    c, answered = server.client, {}
    for rec in rows[:30]:
        r = c.post("/predict", json={**rec, "entity": "e1"})
        assert r.status_code == 200, r.text
        answered[r.json()["request_id"]] = [r.json()["prediction"]]
    r = c.post("/predict", json={"records": rows[30:40]})
    answered[r.json()["request_id"]] = r.json()["predictions"]
    assert c.post("/predict", json={**rows[0], "distance": "x"}).status_code == 422   # not logged
    # uvicorn shuts down gracefully, then re-raises the signal it caught, so the exit status says "terminated"
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM), server.log()
    assert "Application shutdown complete" in server.log()

    log = read_predictions(trained_home.settings)
    assert set(answered) <= set(log["request_id"].to_list()), server.log()
    mine = log.filter(log["request_id"].is_in(list(answered)))
    assert mine.height == 40
    for rid, preds in answered.items():
        assert mine.filter(mine["request_id"] == rid)["prediction"].to_list() == preds
    assert set(mine["model_version"].to_list()) == {bundle.version}
    assert set(mine["arm"].to_list()) == {"champion"}
    first = mine.filter(mine["entity"] == "e1").head(1).to_dicts()[0]     # raw request values, one column each
    raw = lambda f, v: v if v is None or f.kind == "cat" else float(v)
    assert {f.name: first[f.name] for f in bundle.spec.features} == {f.name: raw(f, rows[0][f.name])
                                                                    for f in bundle.spec.features}
    assert mine["latency_ms"].min() > 0 and mine["ts"].is_sorted()


def test_openapi_fuzzing_finds_no_server_error(server, tmp_path):
    "schemathesis against the server's own OpenAPI document (admin routes with the token): never a 5xx."
    doc = server.client.get("/openapi.json").json()
    assert {"/predict", "/feedback", "/admin/routing", "/metrics"} <= set(doc["paths"])
    st = Path(sys.executable).with_name("st")
    p = subprocess.run([str(st), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "25", "--seed", "7", "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
                        "--exclude-path-regex", "^/(invocations|ping|version|v2)|^/health$",   # tests/test_protocols.py
                        "--request-timeout", "20"],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:] + server.log()
    assert "No issues found" in p.stdout and "generated" in p.stdout
    assert server.client.get("/health/ready").status_code == 200
    assert "Traceback" not in server.log()


def test_batch_scoring_cli(trained_home, bundle, tmp_path):
    "`mlnb predict` streams a CSV through the contract and the model in chunks; invalid rows stop it or are skipped."
    import polars as pl
    src, out = tmp_path/"flights.csv", tmp_path/"scored.parquet"
    frame = bundle.reference.head(2500)
    frame.write_csv(src)
    mlnb = Path(sys.executable).with_name("mlnb")                       # the console script users run
    assert mlnb.exists(), f"{mlnb} is not installed"
    run = lambda *a: subprocess.run([str(mlnb), "predict", *a], env=trained_home.env,
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
    p = run("--input", str(src), "--output", str(out), "--chunk-size", "1000")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["invalid_rows"], summary["model_version"]) == (2500, 0, bundle.version)
    assert "2500/2500" in p.stderr                                       # the progress bar
    scored = pl.read_parquet(out)
    assert scored.columns == [*frame.columns, "prediction"] and scored.height == 2500
    want = bundle.booster.inplace_predict(bundle.spec.encode_frame(frame))
    assert np.abs(scored["prediction"].to_numpy() - want).max() <= TOL
    num = next(f.name for f in bundle.spec.features if f.kind == "num" and not f.nullable)
    frame.with_row_index().with_columns(pl.when(pl.col("index") == 1234).then(None).otherwise(pl.col(num)).alias(num)
                                        ).drop("index").write_csv(src)
    p = run("--input", str(src), "--output", str(tmp_path/"x.csv"), "--quiet")
    assert p.returncode == 2 and f"record 1234: field '{num}': null is not allowed" in p.stderr, p.stderr
    assert not (tmp_path/"x.csv").exists()                                # nothing half-written
    p = run("--input", str(src), "--output", str(tmp_path/"x.csv"), "--invalid", "skip", "--quiet")
    assert p.returncode == 0, p.stderr
    skipped = pl.read_csv(tmp_path/"x.csv")
    assert skipped["prediction"].null_count() == 1 and skipped["error"][1234] == f"field '{num}': null is not allowed"
