"""The Streamlit app: every page headless with AppTest (a home filled by real pipeline runs and real registry, serving
and monitoring calls, and an empty home), admin actions, `mlnb app` stopping its child, then every page in a real
browser (render times recorded; `make screenshots` keeps the screenshots)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT/"apps"/"app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PAGES = {"overview": "Overview", "explain": "Explainability", "drift": "Drift and data quality",
         "performance": "Performance", "abtest": "A/B comparison", "registry": "Registry",
         "pipelines": "Pipelines and audit"}


def _set_env(monkeypatch, env: dict):
    for k, v in env.items(): monkeypatch.setenv(k, str(v))


@pytest.fixture(scope="module")
def app_home(trained_home, tmp_path_factory):
    """A copy of the trained home, then real operations on it: a second version registered, gated and promoted
    (v2 champion, v1 previous), 300 served predictions in the prediction log, a drift report on them, a failed
    pipeline run, and the monitoring timeline when this build has `mlnb.monitor`'s timeline."""
    import mlflow
    from mlnb.registry import ModelRegistry, mlflow_setup
    from mlnb.gate import GateResult, GateCheck
    from mlnb.predlog import PredictionLog
    from mlnb.monitor import drift_from_predictions, save_latest_report
    from mlnb.pipeline import run_pipeline, PipelineError
    from mlnb import dashboard as db
    tmp = tmp_path_factory.mktemp("app")
    src = trained_home.settings
    shutil.copytree(src.home, tmp/"home"); shutil.copytree(src.reports_dir, tmp/"reports")
    s = make_settings(tmp)
    reg = ModelRegistry(s)
    v1 = reg.load("champion")
    mlflow_setup(s)
    with mlflow.start_run(run_name="app-test-v2"):
        mlflow.log_params({"max_depth": 4, "note": "app test"}); mlflow.log_metric("test_auc", 0.7)
        v2 = str(reg.register(v1.booster, v1.spec, v1.reference).version)
    with mlflow.start_run(run_name="app-test-other-model"):           # a second model in the project: the selector
        ModelRegistry(s, "other-model").register(v1.booster, v1.spec, v1.reference)
    check = GateCheck("auc", True, "auc +0.0000 (95% CI [-0.0100, +0.0100]) not below the margin -0.01", 0.0, -0.01)
    reg.record_gate(v2, GateResult(True, [check], "auc"), champion_version=v1.version)
    reg.set_challenger(v2, reason="app test")
    reg.promote(reason="app test")
    champion = reg.load("champion")
    rows = v1.reference.head(300)
    pred = champion.predict_frame(rows)
    now = time.time()
    with PredictionLog(s, champion.spec, flush_rows=100) as log:
        log.append([{"request_id": f"req-{i}", "ts": now - 3 * 86400 + i * 800, "model_name": champion.name,
                     "model_version": champion.version, "arm": "champion", "latency_ms": 1.0 + (i % 7),
                     "prediction": float(pred[i]), "features": {f: r[f] for f in champion.spec.names}}
                    for i, r in enumerate(rows.iter_rows(named=True))])
    report = drift_from_predictions(s, champion)
    save_latest_report(s, report)
    exp = _ab_experiment(s, champion, v1, rows) if db.optional_module("abtest") is not None else None
    with pytest.raises(PipelineError):
        run_pipeline("validate", {"data_path": str(tmp/"missing.csv")}, s)
    alerts = db.optional_module("alerts")
    if alerts is not None and hasattr(alerts, "run_monitor"):
        alerts.run_monitor(s)
    env = {**os.environ, **s.to_env(), "PYTHONUNBUFFERED": "1"}
    return {"settings": s, "env": env, "v1": v1.version, "v2": v2, "report": report, "name": champion.name, "experiment": exp}


def _ab_experiment(s, champion, previous, rows) -> str:
    """A real A/B experiment (`mlnb ab design` + `start`): champion vs previous, 50/50 by entity; 300 requests logged
    on the arm the router assigns, with their labels as feedback."""
    from mlnb.abtest import ab_design, ab_start
    from mlnb.feedback import ServingStore, state_path
    from mlnb.predlog import PredictionLog
    from mlnb.routing import Router, RoutingConfig
    ab_design(s, {"id": "exp-1", "arms": {"champion": "champion", "previous": "previous"}, "metric": "logloss"}, sigma=0.5)
    started = ab_start(s, "exp-1")
    router = Router(RoutingConfig.from_dict(started["routing"]))
    models = {"champion": champion, "previous": previous}
    target = champion.spec.target
    recs, labels = [], []
    for i, r in enumerate(rows.iter_rows(named=True)):
        arm = router.choose(f"e{i}")
        m = models[arm]
        recs.append({"request_id": f"ab-{i}", "ts": started["started_at"] + 0.001 * (i + 1), "model_name": m.name,
                     "model_version": m.version, "arm": arm, "entity": f"e{i}", "latency_ms": 2.0,
                     "prediction": float(m.predict_frame(rows.slice(i, 1))[0]),
                     "features": {f: r[f] for f in m.spec.names}})
        labels.append({"request_id": f"ab-{i}", "label": float(r[target])})
    with PredictionLog(s, champion.spec, flush_rows=100) as log: log.append(recs)
    ServingStore(state_path(s)).add_feedback(labels)
    return "exp-1"


def _texts(at) -> str:
    return "\n".join([e.value for e in at.title] + [e.value for e in at.markdown] + [e.value for e in at.caption]
                     + [e.value for e in at.info] + [e.value for e in at.subheader])


def _clean(at, page: str, allowed_error: str | None = None):
    assert not at.exception, (page, [e.value for e in at.exception])
    assert all(allowed_error and allowed_error in e.value for e in at.error), (page, [e.value for e in at.error])
    assert at.title[0].value == PAGES[page], (page, at.title[0].value)


def _app(env, monkeypatch) -> AppTest:
    _set_env(monkeypatch, env)
    return AppTest.from_file(str(APP), default_timeout=180).run()


def test_every_page_with_data(monkeypatch, app_home):
    from mlnb import dashboard as db
    s, name, v1, v2 = app_home["settings"], app_home["name"], app_home["v1"], app_home["v2"]
    at = _app(app_home["env"], monkeypatch)
    _clean(at, "overview")
    m = {e.label: e.value for e in at.metric}
    assert m["Champion"] == f"v{v2}" and m["Challenger"] == "none"
    assert m["Routing"] == ("ab" if app_home["experiment"] else "single")     # the experiment's routing
    aliases = at.dataframe[0].value
    assert dict(zip(aliases["alias"], aliases["version"])) == {"champion": v2, "previous": v1}
    assert len(at.get("plotly_chart")) == 1                                  # requests, latency, errors
    runs = at.dataframe[-1].value
    assert "failure" in set(runs["status"]) and "success" in set(runs["status"])
    picker = at.sidebar.selectbox[0]                                       # several models: a selector
    assert picker.label == "Model" and picker.options == [name, "other-model"] and picker.value == name
    picker.select("other-model").run()
    _clean(at, "overview")
    assert "Model **other-model**" in _texts(at) and {e.label: e.value for e in at.metric}["Champion"] == "v1"
    at.sidebar.selectbox[0].select(name).run()

    at.switch_page("app_pages/explain.py").run()
    _clean(at, "explain")
    assert len(at.get("plotly_chart")) >= 2                                  # importance + dependence
    at.text_input[0].input("req-7").run()
    _clean(at, "explain")
    assert f"served by **v{v2}**" in _texts(at)
    ex = db.explain_request(s, name, "req-7")
    assert ex["matches_log"] and abs(ex["waterfall"]["end"][-1] - ex["margin"]) < 1e-6
    at.text_input[0].input("no-such-request").run()
    assert "No request `no-such-request`" in _texts(at)

    at.switch_page("app_pages/drift.py").run()
    _clean(at, "drift")
    m = {e.label: e.value for e in at.metric}
    assert m["Overall status"] == app_home["report"].summary["status"].upper()
    table = at.dataframe[-1].value
    assert set(table["feature"]) >= set(db.ModelRegistry(s).load("champion").spec.names)

    timeline = db.timeline_frame(s, name)
    if not db.is_empty(timeline):                                          # `mlnb monitor` ran on the log
        assert m["Chunks"] == str(timeline["chunk"].n_unique())
        assert len(at.get("plotly_chart")) == 3                            # per-feature PSI, heatmap, latest report
        assert any(set(d.value.columns) >= {"feature", "latest", "chunks_flagged"} for d in at.dataframe)   # quality
    at.switch_page("app_pages/performance.py").run()
    _clean(at, "performance")
    if not db.is_empty(timeline) and db.performance_metrics(timeline):
        assert len(at.get("plotly_chart")) == 1                            # realized + estimated with bands
    at.switch_page("app_pages/abtest.py").run()
    _clean(at, "abtest")
    if app_home["experiment"]:
        m = {e.label: e.value for e in at.metric}
        detail = db.experiment_detail(s, app_home["experiment"])
        assert m["Status"] == "running" and m["Decision"] == detail["decision"]["decision"].upper()
        assert detail["decision"]["reason"] in _texts(at)
        arms = at.dataframe[0].value
        assert set(arms["arm"]) == {"champion", "previous"} and arms["units"].sum() == 300
        hist = db.sequential_history(s, app_home["experiment"], points=3)
        assert not db.is_empty(hist) and (hist["seq_low"] <= hist["diff"]).all() and (hist["diff"] <= hist["seq_high"]).all()
        assert len(at.get("plotly_chart")) == 1                          # the always-valid interval over time

    at.switch_page("app_pages/registry.py").run()
    _clean(at, "registry")
    versions = at.dataframe[0].value
    assert set(versions["version"]) >= {v1, v2}
    text = _texts(at)
    assert "Alias history" in text and "Release-gate decisions" in text
    hist = db.alias_history(s, name)
    assert hist["operation"].to_list()[-2:] == ["set_challenger", "promote"] and hist["champion"][-1] == v2
    frames = [d.value for d in at.dataframe]
    gates = next(f for f in frames if "check" in f.columns)
    assert gates["version"].iloc[0] == v2 and "CI [" in gates["message"].iloc[0]
    assert any("param" in f.columns and "max_depth" in set(f["param"]) for f in frames)   # the diff of v1 and v2
    assert any(e.value.startswith("# ") or "Model card" in e.value for e in at.markdown)

    at.switch_page("app_pages/pipelines.py").run()
    _clean(at, "pipelines", allowed_error="missing.csv")       # the selected (newest) run failed: its error is shown
    assert any("missing.csv" in e.value for e in at.error)
    runs = at.dataframe[0].value
    failed = runs[runs["status"] == "failure"]
    assert len(failed) == 1 and list(failed["pipeline"]) == ["validate"]
    if db.optional_module("schedule") is not None:                         # the run index names the failing cell
        assert failed["failed_cell"].iloc[0].startswith("cell ") and "missing.csv" in failed["failed_cell"].iloc[0]
    assert len(at.dataframe[1].value) == len(db.run_index(s))              # every run
    trail = at.dataframe[-1].value
    assert {"promote", "set_challenger", "gate", "pipeline_run"} <= set(trail["operation"])
    failures = at.dataframe[-2].value                                      # the failed operations, in red, on top
    assert set(failures["outcome"]) == {"failure"} and "pipeline_run" in set(failures["operation"])
    next(w for w in at.multiselect if w.label == "Outcome").select("failure").run()
    assert set(at.dataframe[-1].value["outcome"]) == {"failure"}


def test_every_page_on_an_empty_home(monkeypatch, tmp_path):
    (tmp_path/"settings.ini").write_text(f"[mlnb]\nhome = {tmp_path/'home'}\nreports_dir = {tmp_path/'reports'}\n")
    at = _app({"MLNB_HOME": tmp_path/"home", "MLNB_SETTINGS": tmp_path/"settings.ini"}, monkeypatch)
    for page in PAGES:
        at.switch_page(f"app_pages/{page}.py").run()
        _clean(at, page)
        assert at.info, page                                                # every page says what to run
        assert not at.get("plotly_chart"), page
        text = _texts(at)
        assert "`mlnb" in text or "`make demo" in text, (page, text)
    assert not (tmp_path/"home"/"mlflow.db").exists()                       # looking creates nothing
    assert not (tmp_path/"home"/"experiments.db").exists() and not (tmp_path/"home"/"serving.db").exists()


def _port_open(port: int) -> bool:
    with socket.socket() as sk:
        sk.settimeout(0.5)
        return sk.connect_ex(("127.0.0.1", port)) == 0


def test_mlnb_app_sigterm_stops_streamlit(tmp_path, free_port):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLNB_")}, "MLNB_HOME": str(tmp_path/"home"),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}               # this repo's settings.ini, an empty home
    log = open(tmp_path/"app.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "app", "--port", str(free_port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while not _port_open(free_port):
            assert proc.poll() is None and time.time() < deadline, (tmp_path/"app.log").read_text()
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, 128 + signal.SIGTERM), (tmp_path/"app.log").read_text()
        deadline = time.time() + 10
        while _port_open(free_port) and time.time() < deadline: time.sleep(0.2)
        assert not _port_open(free_port), "the Streamlit child still holds the port after SIGTERM"
    finally:
        log.close()
        try: os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError: pass


def start_app(env: dict, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    "`streamlit run apps/app.py` headless on 127.0.0.1:`port`; returns (process, url) once healthy."
    env = {**env, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
                             "--server.address", "127.0.0.1", "--server.port", str(port), "--client.toolbarMode", "minimal"],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None: raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200: return proc, url
        except httpx.HTTPError: pass
        if time.time() > deadline: raise TimeoutError(log.read_text())
        time.sleep(0.3)


def stop_app(proc):
    proc.terminate()
    try: proc.wait(10)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def _rendered(page, title: str, timeout: float):
    "Wait until the page titled `title` is drawn and its script has finished (no running widget, no stale element)."
    page.locator("h1", has_text=title).first.wait_for(timeout=timeout)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
                           " && !document.querySelector('[data-stale=\"true\"]')", timeout=timeout)


_CHARTS_DRAWN = ("() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
                 ".every(c => c.querySelector('.js-plotly-plot .main-svg'))")


def _screenshot(page, path: Path, scroll_to: str | None = None):
    "A screenshot once every plotly chart on the page is drawn (optionally scrolled to the text `scroll_to`)."
    page.wait_for_function(_CHARTS_DRAWN, timeout=60_000)
    if scroll_to: page.get_by_text(scroll_to).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)                                           # plotly's transitions
    page.screenshot(path=str(path), full_page=scroll_to is None)


def assert_clean(page):
    assert page.locator("[data-testid='stException']").count() == 0, page.inner_text("body")[:2000]
    body = page.inner_text("body")
    assert "Traceback" not in body, body[:2000]


def browse_all(url: str, shots: Path | None, expect: dict[str, str] | None = None,
               timeout: float = 120_000, rounds: int = 1) -> dict[str, dict]:
    """Every page in headless chromium, reached as a user does (the sidebar), twice: `first_s` when the server's
    cache is cold, `cached_s` after the first load (st.cache_data). Seconds from the click to the page drawn with
    its script finished; no exception box; the main element of each page (`expect`: page -> CSS selector) visible.
    With `rounds` > 1 the cached pass is repeated and `cached_s` is the median. Screenshots into `shots`."""
    from playwright.sync_api import sync_playwright
    times = {slug: {} for slug in PAGES}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            t0 = time.perf_counter()
            page.goto(url, wait_until="domcontentloaded")
            _rendered(page, PAGES["overview"], timeout)
            times["overview"]["first_s"] = round(time.perf_counter() - t0, 3)
            for k, rnd in enumerate(["first_s"] + [f"cached_{i}" for i in range(rounds)]):
                for slug, title in PAGES.items():
                    if rnd == "first_s" and slug == "overview": continue
                    t0 = time.perf_counter()
                    page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
                    _rendered(page, title, timeout)
                    sel = (expect or {}).get(slug)
                    if sel: page.locator(sel).first.wait_for(timeout=60_000)
                    times[slug][rnd] = round(time.perf_counter() - t0, 3)
                    assert_clean(page)
                    if shots is not None and rnd == "cached_0": _screenshot(page, shots/f"{slug}.png")
            if (expect or {}).get("request_id"):                   # one request explained, linked by its id
                page.goto(f"{url}/explain?request_id={expect['request_id']}", wait_until="domcontentloaded")
                _rendered(page, PAGES["explain"], timeout)
                page.get_by_text("served by").first.wait_for(timeout=60_000)
                assert_clean(page)
                if shots is not None: _screenshot(page, shots/"explain_request.png", scroll_to="Why this prediction?")
        finally:
            browser.close()
    return {slug: {"first_s": t["first_s"], "cached_s": round(float(np.median([v for k, v in t.items() if k != "first_s"])), 3)}
            for slug, t in times.items()}


def test_every_page_in_a_real_browser(app_home, free_port, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: `apt-get install -y chromium` (make test installs it)")
    shots = Path(os.environ.get("MLNB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    proc, url = start_app(app_home["env"], free_port, tmp_path/"streamlit.log")
    try:
        plot, table = ".js-plotly-plot", "[data-testid='stDataFrame']"
        times = browse_all(url, shots, {"overview": plot, "explain": plot, "drift": table, "registry": table,
                                        "pipelines": table, "abtest": plot if app_home["experiment"] else None,
                                        "request_id": "req-7"})
    finally:
        stop_app(proc)
    (tmp_path/"render_times.json").write_text(json.dumps(times, indent=1))
    print("render times (s):", json.dumps(times))
    assert set(times) == set(PAGES)
    for slug in PAGES: assert (shots/f"{slug}.png").stat().st_size > 10_000, slug


def test_admin_rollback_needs_token_and_confirmation_and_is_audited(monkeypatch, app_home):
    from mlnb import dashboard as db
    from mlnb.registry import ModelRegistry
    s, name, v1 = app_home["settings"], app_home["name"], app_home["v1"]
    at = _app({**app_home["env"], "MLNB_ADMIN_TOKEN": "t0ken"}, monkeypatch)
    at.switch_page("app_pages/registry.py").run()
    _clean(at, "registry")
    def submit(token, confirm):
        inputs = [t for t in at.text_input if t.label in ("Admin token", "Reason (recorded in the audit trail)")
                  or t.label.startswith("Type `rollback")]
        for t in inputs:
            if t.label == "Admin token": t.input(token)
            elif t.label.startswith("Type `rollback"): t.input(confirm)
            else: t.input("app test")
        next(b for b in at.button if b.label.startswith("Roll back")).click().run()
    submit("wrong", f"rollback {name}")
    assert any("wrong admin token" in e.value for e in at.error)
    assert ModelRegistry(s).current_version("champion") == app_home["v2"]
    submit("t0ken", f"rollback {name}")
    assert not at.exception and any("rolled back" in e.value for e in at.success), [e.value for e in at.error]
    assert ModelRegistry(s).current_version("champion") == v1
    trail = db.audit_frame(s, operations=["app_action", "rollback"])
    assert trail["operation"].to_list()[:2] == ["app_action", "rollback"]   # newest first: the action wraps its twin
    assert trail["outcome"].to_list()[:2] == ["success", "success"]
    assert "failure" in db.audit_frame(s, operations=["app_action"])["outcome"].to_list()   # the refused attempt
