"""The protocols clients already speak, against a real `mlnb serve --grpc-port` process and independent clients:
MLflow's own scoring client and payload helpers (answers compared with a real `mlflow models serve` on the same
registered model), `tritonclient.http` and `tritonclient.grpc` for the Open Inference Protocol; routing, the
prediction log, metrics and feedback whichever protocol a request came in on."""
import json, math, subprocess, sys, time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, ServerProcess, find_free_port

TOL = 1e-6          # the server predicts with the compiled trees or XGBoost, checked equal within 1e-6
ADMIN = "protocols-test-token"
PROTOCOLS = ("native", "mlflow", "oip_rest", "oip_grpc")


class ProtocolServer(ServerProcess):
    "`mlnb serve --grpc-port N`: the HTTP routes and the OIP gRPC service in one process."
    def __init__(self, env: dict, port: int, grpc_port: int, log_path: Path):
        super().__init__(env, port, log_path)
        self.grpc_port = grpc_port

    def start(self, timeout: float = 90, wait: bool = True, fail_on_load_error: bool = True) -> "ProtocolServer":
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "serve", "--port", str(self.port),
                                          "--grpc-port", str(self.grpc_port)], env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self.wait_ready(timeout, fail_on_load_error) if wait else self

    def admin(self, path: str, payload=None) -> httpx.Response:
        return self.client.post(path, json=payload or {}, headers={"authorization": f"Bearer {ADMIN}"})


@pytest.fixture(scope="module")
def server(trained_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    env = {**trained_home.env, "MLNB_SERVE_STATE": str(tmp/"serving.db"), "MLNB_ADMIN_TOKEN": ADMIN,
           "MLNB_MAX_BATCH": "500", "MLNB_SERVE_POLL_SECONDS": "0.5"}
    srv = ProtocolServer(env, find_free_port(), find_free_port(), tmp/"server.log").start()
    try: yield srv
    finally:
        try: srv.stop(timeout=20)
        finally: srv.kill_group() if srv.proc.poll() is None else None


@pytest.fixture(scope="module")
def bundle(trained_home):
    return trained_home.bundle


@pytest.fixture(scope="module")
def rows(bundle):
    "Reference rows as raw records (category names, None for missing)."
    return [{n: (None if isinstance(v := r[n], float) and math.isnan(v) else v) for n in bundle.spec.names}
            for r in bundle.reference.head(120).to_dicts()]


@pytest.fixture(scope="module")
def encoded(bundle, rows):
    "The same rows as MLflow's pyfunc of the booster takes them: float64 columns, categories as codes, NaN missing."
    X = bundle.spec.encode_records(rows).astype("float64")
    return pd.DataFrame(X, columns=bundle.spec.names)


def expected(bundle, records) -> np.ndarray:
    return bundle.booster.inplace_predict(bundle.spec.encode_records(records))


def triton_inputs(mod, spec, records, binary=True):
    "One tritonclient input per feature: BYTES for categorical features, FP32 (NaN = missing) for numeric ones."
    out = []
    for f in spec.features:
        if f.kind == "cat": arr = np.array([r[f.name] or "" for r in records], dtype=np.object_)
        else: arr = np.array([np.nan if r[f.name] is None else r[f.name] for r in records], dtype=np.float32)
        x = mod.InferInput(f.name, [len(records)], "BYTES" if f.kind == "cat" else "FP32")
        if mod.__name__.endswith("http"): x.set_data_from_numpy(arr, binary_data=binary)
        else: x.set_data_from_numpy(arr)
        out.append(x)
    return out


# --- MLflow's scoring protocol -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(trained_home, bundle, tmp_path_factory):
    "A real `mlflow models serve` on the same registered model (the benchmark's way of starting it)."
    from mlnb.bench_serve import Child
    tmp = tmp_path_factory.mktemp("mlflow-serve")
    s = trained_home.settings
    port = find_free_port()
    env = {**trained_home.env, "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "MLFLOW_REGISTRY_URI": s.mlflow_registry_uri,
           "PATH": f"{Path(sys.executable).parent}:{trained_home.env.get('PATH', '')}"}
    ml = Child([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{bundle.name}@champion",
                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env, tmp/"mlflow.log", cwd=tmp)
    try:
        ml.wait(f"http://127.0.0.1:{port}/ping", 180)
        yield port
    finally: ml.stop()


def test_mlflow_client_payloads_match_mlflow_models_serve(server, mlflow_server, bundle, rows, encoded):
    from mlflow.models import convert_input_example_to_serving_input
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient
    mlnb_client, mlflow_client = ScoringServerClient("127.0.0.1", server.port), ScoringServerClient("127.0.0.1", mlflow_server)
    mlnb_client.ping()
    assert mlnb_client.get_version()

    want = expected(bundle, rows)
    frame = encoded.head(60)
    compared = 0
    for data in (frame, frame.head(1), frame.to_numpy()):      # dataframe_split (with NaN), then `inputs` rows
        got = np.asarray(mlnb_client.invoke(data).get_predictions()).ravel()
        assert np.abs(got - want[:len(got)]).max() <= TOL
        try: ref = np.asarray(mlflow_client.invoke(data).get_predictions()).ravel()
        except Exception as e:                                 # MLflow may refuse rows for a column schema
            assert isinstance(data, np.ndarray), e; continue
        assert np.abs(got - ref).max() <= TOL; compared += 1
    assert compared >= 2

    bodies = {"serving input example": convert_input_example_to_serving_input(encoded.head(5)),
              "dataframe_records": json.dumps({"dataframe_records": json.loads(encoded.head(30).to_json(orient="records"))}),
              "inputs (columns)": json.dumps({"inputs": {c: [None if math.isnan(v) else v for v in encoded[c].head(30)]
                                                         for c in encoded.columns}}),
              "instances": json.dumps({"instances": json.loads(encoded.head(30).to_json(orient="records"))})}
    for name, body in bodies.items():
        got = httpx.post(f"{server.url}/invocations", content=body, headers={"content-type": "application/json"})
        ref = httpx.post(f"http://127.0.0.1:{mlflow_server}/invocations", content=body,
                         headers={"content-type": "application/json"})
        assert got.status_code == 200, (name, got.text)
        g = np.asarray(got.json()["predictions"], dtype=float)
        assert np.abs(g - want[:len(g)]).max() <= TOL, name
        if ref.status_code == 200:
            assert np.abs(g - np.asarray(ref.json()["predictions"], dtype=float).ravel()).max() <= TOL, name

    csv = encoded.head(40).to_csv()                       # what DataFrame.to_csv() writes, index column first
    got = httpx.post(f"{server.url}/invocations", content=csv, headers={"content-type": "text/csv"})
    ref = httpx.post(f"http://127.0.0.1:{mlflow_server}/invocations", content=csv, headers={"content-type": "text/csv"})
    assert got.status_code == 200 == ref.status_code, (got.text, ref.text[:500])
    assert np.abs(np.asarray(got.json()["predictions"]) - np.asarray(ref.json()["predictions"]).ravel()).max() <= TOL

    # mlnb's own records (category names) are understood too, in every MLflow format
    raw = httpx.post(f"{server.url}/invocations", json={"dataframe_records": rows[:50]}).json()["predictions"]
    assert np.abs(np.asarray(raw) - want[:50]).max() <= TOL


def test_mlflow_errors_have_mlflows_shape_and_native_statuses(server, mlflow_server, bundle, rows, encoded):
    num = next(f.name for f in bundle.spec.features if f.kind == "num" and not f.nullable)
    missing = json.loads(encoded.head(2).drop(columns=[num]).to_json(orient="split"))
    cases = {"missing column": ({"dataframe_split": missing}, 422, "INVALID_PARAMETER_VALUE"),
             "no format key": ({"data": [[1]]}, 400, "BAD_REQUEST"),
             "two format keys": ({"instances": [], "inputs": []}, 400, "BAD_REQUEST"),
             "too many records": ({"dataframe_records": rows[:1] * 501}, 413, "RESOURCE_LIMIT_EXCEEDED")}
    for name, (payload, status, code) in cases.items():
        got = httpx.post(f"{server.url}/invocations", json=payload)
        native = httpx.post(f"{server.url}/predict", json={"records": mlnb_records(payload, rows, bundle)})
        assert (got.status_code, got.json()["error_code"]) == (status, code), (name, got.text)
        assert isinstance(got.json()["message"], str) and got.json()["message"]
        if name in ("missing column", "too many records"): assert native.status_code == status, name
        ref = httpx.post(f"http://127.0.0.1:{mlflow_server}/invocations", json=payload)
        if name != "too many records":                      # MLflow has no batch limit
            assert 400 <= ref.status_code < 500 and {"error_code", "message"} <= set(ref.json()), (name, ref.text[:300])
    got = httpx.post(f"{server.url}/invocations", json={"dataframe_records": [{**rows[0], num: None}]})
    assert got.status_code == 422 and got.json()["detail"] == {"field": num, "problem": "null is not allowed", "index": 0}
    got = httpx.post(f"{server.url}/invocations", content=b"<xml/>", headers={"content-type": "application/xml"})
    assert got.status_code == 415 and got.json()["error_code"] == "BAD_REQUEST"


def mlnb_records(payload, rows, bundle):
    "The native equivalent of an MLflow error case (same rows, same problem)."
    if "dataframe_records" in payload: return payload["dataframe_records"]
    if "dataframe_split" in payload:
        return [{k: v for k, v in r.items() if k in payload["dataframe_split"]["columns"]} for r in rows[:2]]
    return rows[:1]


# --- The Open Inference Protocol -----------------------------------------------------------------------------------

def test_oip_rest_with_tritonclient_http(server, bundle, rows):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException
    c = th.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(bundle.name)
    assert not c.is_model_ready("no-such-model")
    md = c.get_model_metadata(bundle.name)
    assert [(t["name"], t["datatype"]) for t in md["inputs"]] == \
           [(f.name, "BYTES" if f.kind == "cat" else "FP32") for f in bundle.spec.features]
    assert md["versions"] == [bundle.version] and md["outputs"][0]["name"] == "prediction"
    want = expected(bundle, rows)
    for binary in (True, False):                       # Triton's binary tensors (the default) and plain JSON
        for n in (1, 100):
            r = c.infer(bundle.name, triton_inputs(th, bundle.spec, rows[:n], binary),
                        outputs=[th.InferRequestedOutput("prediction", binary_data=binary)], request_id=f"http-{binary}-{n}")
            got = r.as_numpy("prediction")
            assert got.shape == (n,) and np.abs(got - want[:n]).max() <= TOL
            assert r.get_response()["id"] == f"http-{binary}-{n}"
    r = c.infer(bundle.name, triton_inputs(th, bundle.spec, rows[:3]), model_version=bundle.version)
    assert r.get_response()["model_version"] == bundle.version
    with pytest.raises(InferenceServerException, match="not served here"):
        c.infer("no-such-model", triton_inputs(th, bundle.spec, rows[:1]))
    num = next(f for f in bundle.spec.features if f.kind == "num" and not f.nullable)
    with pytest.raises(InferenceServerException, match=f"field '{num.name}': null is not allowed"):
        c.infer(bundle.name, triton_inputs(th, bundle.spec, [{**rows[0], num.name: None}]))
    bad = httpx.post(f"{server.url}/v2/models/{bundle.name}/infer", json={"inputs": [{"name": num.name, "datatype": "FP32",
                                                                                         "shape": [2], "data": [1.0]}]})
    assert bad.status_code == 400 and "needs 2 values, got 1" in bad.json()["error"]


def test_oip_2d_tensor_with_named_columns(server, bundle, rows, encoded):
    "One FP32 tensor [n, k] of the encoded row (categories as codes), its columns named in `parameters`."
    names = bundle.spec.names
    body = {"inputs": [{"name": "rows", "datatype": "FP64", "shape": [20, len(names)], "parameters": {"columns": names},
                        "data": [[None if math.isnan(v) else v for v in r] for r in encoded.head(20).to_numpy().tolist()]}]}
    r = httpx.post(f"{server.url}/v2/models/{bundle.name}/infer", json=body)
    assert r.status_code == 200, r.text
    assert np.abs(np.asarray(r.json()["outputs"][0]["data"]) - expected(bundle, rows[:20])).max() <= TOL


def test_oip_grpc_with_tritonclient_grpc(server, bundle, rows):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException
    c = tg.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(bundle.name)
    assert not c.is_model_ready("no-such-model")
    md = c.get_model_metadata(bundle.name, as_json=True)
    assert [t["name"] for t in md["inputs"]] == bundle.spec.names and md["versions"] == [bundle.version]
    want = expected(bundle, rows)
    for n in (1, 100):
        r = c.infer(bundle.name, triton_inputs(tg, bundle.spec, rows[:n]), request_id=f"grpc-{n}")
        got = r.as_numpy("prediction")
        assert got.shape == (n,) and np.abs(got - want[:n]).max() <= TOL
        resp = r.get_response()
        assert (resp.id, resp.model_version, resp.parameters["arm"].string_param) == (f"grpc-{n}", bundle.version, "champion")
    num = next(f for f in bundle.spec.features if f.kind == "num" and not f.nullable)
    with pytest.raises(InferenceServerException, match=f"field '{num.name}': null is not allowed"):
        c.infer(bundle.name, triton_inputs(tg, bundle.spec, [{**rows[0], num.name: None}]))
    with pytest.raises(InferenceServerException, match="not served here"):
        c.infer("no-such-model", triton_inputs(tg, bundle.spec, rows[:1]))
    with pytest.raises(InferenceServerException, match="max_batch=500"):
        c.infer(bundle.name, triton_inputs(tg, bundle.spec, rows[:1] * 501))


def test_readme_client_snippets_work_unchanged(server, bundle, rows, encoded):
    "The Python snippets of README's 'Switching from MLflow / KServe', run as written (only the ports and names filled in)."
    import re
    text = (ROOT/"README.md").read_text()
    section = text[text.index("### Switching from MLflow / KServe"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    subst = lambda code: (code.replace('"127.0.0.1", 5000', f'"127.0.0.1", {server.port}')
                              .replace("127.0.0.1:8000", f"127.0.0.1:{server.port}").replace("flight-delay", bundle.name))
    want = expected(bundle, rows)
    ns = {"frame": encoded.head(5)}
    got = eval(compile(subst(blocks[0]).strip().splitlines()[-1], "readme", "eval"),
               {**ns, **_exec(subst(blocks[0]), ns)})
    assert np.abs(np.asarray(got).ravel() - want[:5]).max() <= TOL
    lines = subst(blocks[1]).strip().splitlines()
    ns = _exec("\n".join(lines[:-1]), {"flight": rows[0]})
    got = eval(lines[-1], ns)
    assert abs(float(got[0]) - want[0]) <= TOL
    ns = _exec("\n".join(lines[:-1]).replace("tritonclient.http", "tritonclient.grpc")
               .replace(f"127.0.0.1:{server.port}", f"127.0.0.1:{server.grpc_port}"), {"flight": rows[0]})
    assert abs(float(eval(lines[-1], ns)[0]) - want[0]) <= TOL


def _exec(code: str, ns: dict) -> dict:
    ns = dict(ns); exec(compile(code, "readme", "exec"), ns); return ns


# --- One scoring path, whichever the protocol -----------------------------------------------------------------------

def send(proto: str, server, bundle, record: dict, rid: str) -> dict:
    "One record through `proto`; returns `{arm, prediction}` as that protocol answers them."
    if proto == "native":
        b = server.client.post("/predict", json=record, headers={"x-request-id": rid}).json()
        return {"arm": b["arm"], "prediction": b["prediction"]}
    if proto == "mlflow":
        r = server.client.post("/invocations", json={"dataframe_records": [record]}, headers={"x-request-id": rid})
        return {"arm": None, "prediction": r.json()["predictions"][0], "rid": r.headers["x-request-id"]}
    if proto == "oip_rest":
        import tritonclient.http as th
        inputs = triton_inputs(th, bundle.spec, [record]) + [_entity(th, record)]
        r = th.InferenceServerClient(url=f"127.0.0.1:{server.port}").infer(bundle.name, inputs, request_id=rid)
        return {"arm": r.get_response()["parameters"]["arm"], "prediction": float(r.as_numpy("prediction")[0])}
    import tritonclient.grpc as tg
    inputs = triton_inputs(tg, bundle.spec, [record]) + [_entity(tg, record)]
    r = tg.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}").infer(bundle.name, inputs, request_id=rid)
    return {"arm": r.get_response().parameters["arm"].string_param, "prediction": float(r.as_numpy("prediction")[0])}


def _entity(mod, record):
    x = mod.InferInput("entity", [1], "BYTES")
    x.set_data_from_numpy(np.array([record["entity"]], dtype=np.object_))
    return x


def test_routing_log_metrics_and_feedback_are_the_same_for_every_protocol(server, trained_home, bundle, rows):
    from mlnb.predlog import read_predictions
    from mlnb.prometheus import metric_value
    v = bundle.version
    r = server.admin("/admin/routing", {"strategy": "canary", "percent": 50, "arms": {"champion": "champion", "challenger": v}})
    assert r.status_code == 200, r.text
    arms: dict = {}
    for i in range(24):
        rec = {**rows[i], "entity": f"flight-{i}"}
        for proto in PROTOCOLS:
            a = send(proto, server, bundle, rec, f"{proto}-{i}")
            assert abs(a["prediction"] - float(expected(bundle, [rows[i]])[0])) <= TOL
            if a["arm"] is not None: arms.setdefault(rec["entity"], set()).add(a["arm"])
    assert all(len(s) == 1 for s in arms.values()), arms          # one entity, one arm, whatever the protocol
    assert {next(iter(s)) for s in arms.values()} == {"champion", "challenger"}

    # the bandit learns from feedback on requests that came in on any protocol
    r = server.admin("/admin/routing", {"strategy": "bandit", "arms": {"champion": "champion", "challenger": v}})
    assert r.status_code == 200, r.text
    answered = {}
    for proto in PROTOCOLS:
        for i in range(5):
            rid = f"bandit-{proto}-{i}"
            a = send(proto, server, bundle, {**rows[i], "entity": f"b-{proto}-{i}"}, rid)
            answered[rid] = a["arm"]
    fb = server.client.post("/feedback", json=[{"request_id": rid, "reward": 1.0} for rid in answered]).json()
    assert fb["stored"] == fb["attributed"] == len(answered), fb
    for res in fb["results"]:
        if answered[res["request_id"]] is not None: assert res["arm"] == answered[res["request_id"]]

    # the shadow arm scores requests from every protocol after the answer
    r = server.admin("/admin/routing", {"strategy": "shadow", "arms": {"champion": "champion", "challenger": v}})
    assert r.status_code == 200, r.text
    for proto in PROTOCOLS: send(proto, server, bundle, {**rows[0], "entity": "s-1"}, f"shadow-{proto}")
    text = server.client.get("/metrics").text
    assert metric_value(text, "mlnb_shadow_total", outcome="ok") >= len(PROTOCOLS)
    for proto, route in (("native", "/predict"), ("mlflow", "/invocations"), ("oip_rest", "/v2/models/{name}/infer"),
                         ("oip_grpc", "/inference.GRPCInferenceService/ModelInfer")):
        assert metric_value(text, "mlnb_requests_total", route=route, protocol=proto, status="200") >= 30, proto
        assert metric_value(text, "mlnb_request_duration_seconds_count", protocol=proto) >= 30, proto
    assert metric_value(text, "mlnb_requests_total", protocol="oip_grpc", status="422") >= 1

    server.stop()                                                     # flushes the prediction logs
    log = read_predictions(trained_home.settings)
    for proto in PROTOCOLS:
        got = log.filter(log["request_id"] == f"{proto}-3")
        assert got.height == 1 and got["entity"][0] == "flight-3", proto
        assert got["arm"][0] == next(iter(arms["flight-3"]))
        shadow = log.filter((log["request_id"] == f"shadow-{proto}") & (log["arm"] == "shadow"))
        assert shadow.height == 1, proto


def test_generated_grpc_modules_are_up_to_date():
    from mlnb.grpc_server import PROTO_DIR, generate_stubs
    fresh = generate_stubs()
    assert {n: (PROTO_DIR/n).read_text() for n in fresh} == fresh, "run `make proto` and commit mlnb/proto/"


def test_openapi_fuzzing_of_the_protocol_routes_finds_no_server_error(trained_home, tmp_path):
    "schemathesis on the protocol routes of the server's OpenAPI document: never a 5xx. (Tensor bodies have cross-field"
    " constraints a schema cannot state, so most generated bodies are refused with a 4xx: that warning is off.)"
    env = {**trained_home.env, "MLNB_SERVE_STATE": str(tmp_path/"serving.db")}
    srv = ProtocolServer(env, find_free_port(), find_free_port(), tmp_path/"server.log").start()
    try:
        doc = srv.client.get("/openapi.json").json()
        assert {"/invocations", "/v2/models/{name}/infer", "/ping"} <= set(doc["paths"])
        st = Path(sys.executable).with_name("st")
        p = subprocess.run([str(st), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
                            "--include-path-regex", "^/(invocations|ping|version|v2)|^/health$", "--warnings", "off",
                            "--max-examples", "25", "--seed", "7", "--request-timeout", "20"],
                           capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:] + srv.log()
        assert "No issues found" in p.stdout and "generated" in p.stdout
        assert srv.client.get("/ping").status_code == 200 and "Traceback" not in srv.log()
    finally:
        srv.stop(timeout=20)


def test_grpc_with_two_workers_shares_the_port_and_the_metrics(trained_home, bundle, rows, tmp_path):
    "With 2 uvicorn workers, each serves gRPC on the same port (SO_REUSEPORT); /metrics sums both workers' counts."
    import tritonclient.grpc as tg
    from mlnb.prometheus import metric_value
    env = {**trained_home.env, "MLNB_SERVE_STATE": str(tmp_path/"serving.db"), "MLNB_SERVE_WORKERS": "2"}
    srv = ProtocolServer(env, find_free_port(), find_free_port(), tmp_path/"server.log").start(timeout=120)
    try:
        deadline = time.monotonic() + 120              # both workers up (each binds the gRPC port once its model loaded)
        while srv.log().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.2)
        want = expected(bundle, rows[:10])
        for i in range(10):                           # a new client (channel) per request
            with tg.InferenceServerClient(url=f"127.0.0.1:{srv.grpc_port}") as c:
                got = c.infer(bundle.name, triton_inputs(tg, bundle.spec, rows[i:i + 1])).as_numpy("prediction")
                assert abs(float(got[0]) - want[i]) <= TOL
        text = srv.client.get("/metrics").text
        assert metric_value(text, "mlnb_requests_total", protocol="oip_grpc", status="200") == 10
    finally:
        srv.stop(timeout=30)
