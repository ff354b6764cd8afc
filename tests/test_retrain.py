"""The retrain loop end to end: real `mlnb serve` processes, real papermill train/evaluate runs, real traffic with
labels fed back, the loop driven by `mlnb retrain run` processes killed with SIGKILL in training, shadow and canary
(it resumes each time and promotes), a bad candidate forced past the gate and rolled back by the canary's sequential
test, person commands, and the policy file's bad values."""
from __future__ import annotations
import json, math, os, signal, subprocess, sys, threading, time
from pathlib import Path
import httpx, polars as pl, pytest
from conftest import ROOT, make_settings


# ---------------------------------------------------------------------------------------------------------------
# policy file
def test_policy_bad_values_get_clear_errors(tmp_path):
    from mlnb.policy import RetrainPolicy, PolicyError, load_policy
    base = {"triggers": {"schedule": {"every_days": 7}}}
    cases = [({**base, "triggers": {"weather": {}}}, "triggers.weather: unknown trigger; known triggers: alert, drift, realized_decay"),
             ({**base, "rollout": {"canary": {"steps": [5, 25, 25, 100]}}}, "rollout.canary.steps: must be strictly increasing"),
             ({**base, "rollout": {"canary": {"steps": [50, 5, 100]}}}, "rollout.canary.steps: must be strictly increasing"),
             ({**base, "rollout": {"canary": {"guards": [{"metric": "accuracy", "max": 1}]}}},
              "rollout.canary.guards[0].metric: unknown metric 'accuracy'; known guard metrics: error_rate"),
             ({**base, "rollout": {"shadow": {"guards": [{"metric": "sequential_test"}]}}}, "cannot guard this phase"),
             ({**base, "rollout": {"canary": {"guards": [{"metric": "sequential_test", "loss": "auc"}]}}}, "loss: must be one of brier, logloss"),
             ({**base, "rollout": {"canary": {"on_inconclusive": "wait"}}}, "on_inconclusive: must be one of advance, rollback, pause"),
             ({**base, "training": {"window_months": 0}}, "training.window_months: must be from 1 to 120"),
             ({**base, "version": 2}, "version: this mlnb reads policy version 1")]
    for doc, msg in cases:
        with pytest.raises(PolicyError) as e: RetrainPolicy.from_dict(doc)
        assert msg in str(e.value), (msg, str(e.value))
    bad = tmp_path/"retrain.toml"; bad.write_text("[triggers.schedule]\nevery_days = 7\n[rollout.canary]\nsteps = [5, 50, 25, 100]\n")
    with pytest.raises(PolicyError, match="strictly increasing"): load_policy(make_settings(tmp_path), bad)
    env = {**os.environ, **make_settings(tmp_path).to_env(), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "mlnb.cli", "retrain", "--policy", str(bad), "status"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "rollout.canary.steps: must be strictly increasing" in r.stderr


def test_person_commands_are_audited(tmp_path):
    "pause / resume / abort of an active loop (no pipelines needed before training): audited, and one loop per model."
    from mlnb.policy import RetrainPolicy
    from mlnb.retrain import RetrainLoop, LoopConflict
    from mlnb.audit import read_audit
    s = make_settings(tmp_path)
    rl = RetrainLoop(s, RetrainPolicy.from_dict({"triggers": {"schedule": {}}}), who="alice")
    loop = rl.start({"kind": "manual"}, month=7)
    assert loop.data["months"] == "1-6"
    with pytest.raises(LoopConflict): rl.start()
    assert rl.command("pause", "look first").paused
    assert rl.advance(rl.store.get(loop.id)).state == "triggered"          # paused: nothing moves
    assert not rl.command("resume").paused
    done = rl.command("abort", "not now")
    assert done.state == "aborted" and rl.store.active(rl.model) is None
    cmds = read_audit(s, operation="retrain_command", phase="end")
    assert [(c["details"]["action"], c["details"]["by"]) for c in cmds] == [("pause", "alice"), ("resume", "alice"), ("abort", "alice")]
    last = rl.store.transitions(loop.id)[-1]
    assert (last["to"], last["actor"], last["reason"]) == ("aborted", "alice", "abort by alice: not now")


# ---------------------------------------------------------------------------------------------------------------
# real server + traffic
class Server:
    "`mlnb serve` as a real process on 127.0.0.1 (XGBoost engine, fast polling)."
    def __init__(self, settings, port: int, log: Path):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT), "MLNB_SERVE_ENGINE": "xgboost",
               "MLNB_SERVE_POLL_SECONDS": "0.2", "MLNB_LOG_FLUSH_SECONDS": "0.2"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200: break
            except httpx.TransportError: pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try: self.proc.wait(30)
        except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL)


class Traffic(threading.Thread):
    "Sends flights one per request, feeds each label back right after, counts failed requests."
    def __init__(self, url: str, records: list[tuple[dict, int]], pause: float = 0.002):
        super().__init__(daemon=True)
        self.url, self.records, self.pause = url, records, pause
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self.stop_ = threading.Event()
    def run(self):
        with httpx.Client(base_url=self.url, timeout=10) as c:
            i = 0
            while not self.stop_.is_set():
                rec, label = self.records[i % len(self.records)]; i += 1
                try:
                    r = c.post("/predict", json=rec)
                    self.sent += 1
                    if r.status_code != 200: self.failed += 1; self.errors.append(r.text[:200]); continue
                    c.post("/feedback", json={"request_id": r.json()["request_id"], "label": label})
                except httpx.HTTPError as e: self.failed += 1; self.errors.append(repr(e))
                time.sleep(self.pause)
    def stop(self): self.stop_.set(); self.join(30)


def flight_records(settings, month: int, sample: float) -> list[tuple[dict, int]]:
    from mlnb.examples.flights import build_training_set, FEATURES, TARGET
    df = build_training_set(settings, months=(month, month), sample=sample)
    fix = lambda v: None if isinstance(v, float) and math.isnan(v) else v
    return [({f: fix(r[f]) for f in FEATURES}, int(r[TARGET])) for r in df.iter_rows(named=True)]


POLICY = """
[triggers.schedule]
every_days = 30
[training]
window_months = 5
params = {{ sample = 0.15, num_boost_round = 150, nthread = 1 {extra} }}
[gate]
params = {{ sample = 0.3, n_bootstrap = 200 }}
[rollout.shadow]
min_requests = 200
guards = [ {{ metric = "error_rate", max = 0.01 }}, {{ metric = "latency_p99_ms", max = 500 }} {shadow_extra} ]
[rollout.canary]
steps = [50, 100]
min_requests = {canary_min}
min_labeled = 100
guards = [ {{ metric = "error_rate", max = 0.01 }}, {{ metric = "latency_p99_ms", max = 500 }}, {{ metric = "sequential_test", loss = "brier", alpha = 0.05 }} ]
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A home with a small champion trained on months 1-5 by the real train pipeline, and July flights to send."
    from mlnb.pipeline import run_pipeline
    tmp = tmp_path_factory.mktemp("loop")
    s = make_settings(tmp)
    run_pipeline("train", {"months": "1-5", "sample": 0.05, "num_boost_round": 150, "nthread": 1}, s)
    return s, flight_records(s, 7, 0.05)


def _free_port():
    import socket
    with socket.socket() as so: so.bind(("127.0.0.1", 0)); return so.getsockname()[1]


def _driver(s, policy: Path, url: str, log: Path):
    env = {**os.environ, **s.to_env(), "PYTHONPATH": str(ROOT), "MLNB_ACTOR": "retrain-driver"}
    return subprocess.Popen([sys.executable, "-m", "mlnb.cli", "retrain", "--policy", str(policy), "run", "--month", "7",
                             "--poll", "0.3", "--server", url], env=env, cwd=ROOT, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_loop_resumes_after_kill_9_in_training_shadow_and_canary(project, tmp_path):
    from mlnb.retrain import LoopStore
    from mlnb.registry import ModelRegistry
    from mlnb.audit import read_audit
    s, records = project
    reg = ModelRegistry(s)
    champion = reg.aliases()["champion"]
    policy = tmp_path/"retrain.toml"; policy.write_text(POLICY.format(extra="", canary_min=200, shadow_extra=', { metric = "disagreement", max = 0.3 }'))
    srv = Server(s, _free_port(), tmp_path/"server.log")
    traffic = Traffic(srv.url, records); traffic.start()
    store, log = LoopStore(s), tmp_path/"driver.log"
    kills = []
    try:
        proc = _driver(s, policy, srv.url, log)
        for state, step, delay in (("training", 0, 4.0), ("shadow", 0, 0.5), ("canary", 1, 0.5)):
            deadline = time.monotonic() + 240
            while True:
                loop = store.active(s.model_name)
                if loop and loop.state == state and loop.step == step: break
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, f"never reached {state} {step}: {log.read_text()[-4000:]}"
                time.sleep(0.1)
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(); kills.append(store.active(s.model_name).state)
            proc = _driver(s, policy, srv.url, log)
        assert proc.wait(300) == 0, log.read_text()[-4000:]
    finally:
        traffic.stop(); srv.stop()
    assert kills == ["training", "shadow", "canary"]
    loop = store.loops(s.model_name, 1)[0]
    assert loop.state == "promoted", log.read_text()[-3000:]
    cand = loop.data["candidate_version"]
    assert reg.aliases()["champion"] == cand != champion and reg.aliases()["previous"] == champion
    tr = store.transitions(loop.id)
    assert [(t["to"], t["step"]) for t in tr] == [("triggered", 0), ("training", 0), ("gating", 0), ("shadow", 0),
                                                 ("canary", 0), ("canary", 1), ("promoted", 1)]
    gate = tr[3]["evidence"]
    assert gate["gate_passed"] and gate["ci_low"] > 0 and gate["candidate_version"] == cand
    shadow = tr[4]["evidence"]
    assert shadow["requests"] >= 200 and shadow["compared"] > 0 and {g["guard"] for g in shadow["guards"]} == {"error_rate", "latency_p99_ms", "disagreement"}
    seq = [g for g in tr[6]["evidence"]["guards"] if g["guard"] == "sequential_test"][0]["value"]
    assert seq["decision"] in ("not_worse", "inconclusive") and seq["n_challenger"] >= 100 and seq["low"] < seq["high"]
    audits = read_audit(s, operation="retrain_transition", phase="end")
    assert [a["details"]["to_state"] for a in audits] == ["training", "gating", "shadow", "canary", "canary", "promoted"]
    assert all(a["outcome"] == "success" for a in audits)
    assert {a["correlation_id"] for a in audits} == {f"retrain-{loop.id}"}            # one correlation per loop...
    runs = read_audit(s, operation="pipeline_run", phase="end", correlation_id=f"retrain-{loop.id}")
    assert {r["details"]["pipeline"] for r in runs} == {"train", "evaluate"}            # ... its pipeline runs included
    served = store.served_history(s.model_name)
    assert [h["routing"] and h["routing"].get("strategy") for h in served] == ["shadow", "canary", "canary", None, None]
    assert served[1]["routing"]["percent"] == 50 and served[2]["routing"]["percent"] == 100
    assert served[-1]["versions"]["champion"] == cand and served[0]["versions"]["champion"] == champion
    assert store.served_at(s.model_name, tr[4]["ts"])["routing"]["percent"] == 50          # which version served when
    assert store.served_at(s.model_name, tr[3]["ts"])["routing"]["strategy"] == "shadow"
    assert store.served_at(s.model_name, tr[0]["ts"]) is None
    assert traffic.failed == 0 and traffic.sent > 1000, traffic.errors[:5]


def test_bad_candidate_forced_past_gate_is_rolled_back_by_canary(project, tmp_path):
    "A model trained on inverted labels, forced past the gate by a person: the canary's sequential test rolls it back."
    from mlnb.policy import load_policy
    from mlnb.retrain import RetrainLoop
    from mlnb.registry import ModelRegistry
    from mlnb.examples.flights import build_training_set, FEATURES, TARGET
    s, records = project
    reg = ModelRegistry(s)
    champion = reg.aliases()["champion"]
    bad = build_training_set(s, months=(2, 6), sample=0.1).select(*FEATURES, TARGET).drop_nulls(["pressure", "plane_age"]).with_columns((1 - pl.col(TARGET)).alias(TARGET))
    bad.write_parquet(tmp_path/"inverted.parquet")
    policy = tmp_path/"retrain.toml"
    policy.write_text(POLICY.format(extra=f', data_path = "{tmp_path/"inverted.parquet"}", target = "{TARGET}"', canary_min=1500,
                                    shadow_extra=""))   # no disagreement guard: shadow would catch it first; this drills the canary
    srv = Server(s, _free_port(), tmp_path/"server.log")
    traffic = Traffic(srv.url, records); traffic.start()
    try:
        rl = RetrainLoop(s, load_policy(s, policy), server_url=srv.url, poll_seconds=0.3, who="bob")
        rl.start({"kind": "manual"}, month=7)
        rl.command("force", "sabotage drill: skip the gate")
        loop = rl.drive(timeout=300)
    finally:
        traffic.stop(); srv.stop()
    assert loop.state == "rolled_back", rl.status()["transitions"][-1]
    last = rl.store.transitions(loop.id)[-1]
    assert last["evidence"]["guard"] == "sequential_test" and "canary 50%" in last["reason"]
    seq = [g for g in last["evidence"]["guards"] if g["guard"] == "sequential_test"][0]["value"]
    assert seq["decision"] == "worse" and seq["low"] > 0
    shadow_entry = rl.store.transitions(loop.id)[3]
    assert shadow_entry["to"] == "shadow" and shadow_entry["evidence"]["forced"] and shadow_entry["actor"] == "bob"
    assert reg.aliases().get("champion") == champion and "challenger" not in reg.aliases()
    assert reg.version(loop.data["candidate_version"]).tags["mlnb.retrain_outcome"].startswith("rolled_back")
    assert traffic.failed == 0, traffic.errors[:5]


def test_scheduled_retrain_check_starts_a_loop(project, tmp_path):
    "The hourly monitor job raises an alert; the daily `retrain-check` job (the retrain pipeline, action=check) fires on it and on new labels."
    from mlnb.schedule import JobSpec, run_job
    from mlnb.retrain import RetrainLoop
    from mlnb.policy import load_policy
    s, records = project
    srv = Server(s, _free_port(), tmp_path/"server.log")
    traffic = Traffic(srv.url, records); traffic.start()
    try:
        while traffic.sent < 400: time.sleep(0.2)
    finally: traffic.stop(); srv.stop()              # SIGTERM flushes the prediction log
    rules = tmp_path/"monitoring.toml"
    rules.write_text('[[rules]]\nname = "slow"\nmetric = "latency.p99_ms"\ncondition = "value > 0"\n')
    mon = run_job(JobSpec("monitor", "monitor", "0 * * * *", params={"rules": str(rules), "period": "hour"}, retries=0), s)
    assert mon["status"] == "success", mon                   # the real monitor pipeline: timeline + alert rules
    policy = tmp_path/"retrain.toml"
    policy.write_text("cooldown_hours = 0\nmax_retrains_per_day = 10\n[triggers.alert]\nrules = [\"slow\"]\n"
                      "[triggers.new_labels]\nmin_rows = 100\n"
                      "[triggers.realized_decay]\nmargin = 0.5\nmin_labeled = 100\n[triggers.estimated_decay]\nmargin = 0.5\nmin_requests = 100\n"
                      "[triggers.schedule]\nevery_days = 30\n")
    rl = RetrainLoop(s, load_policy(s, policy))
    ev = rl.check_triggers()                         # the evidence the job will see
    rd = ev["triggers"]["realized_decay"]
    assert rd["labeled"] >= 100 and rd["ci_low"] < rd["auc"] < rd["ci_high"] and not rd["fired"]
    assert 0.5 < ev["triggers"]["estimated_decay"]["estimated_auc"] < 1 and not ev["triggers"]["schedule"]["fired"]
    assert ev["fired"] == ["alert", "new_labels"] and ev["triggers"]["new_labels"]["labeled_since_last"] >= 100
    assert ev["triggers"]["alert"]["firing"] == ["slow"]
    row = run_job(JobSpec("retrain-check", "retrain", "30 6 * * *", params={"action": "check", "policy_path": str(policy)},
                          retries=0), s)
    assert row["status"] == "success", row
    m = json.loads((s.reports_dir/"retrain"/row["run_ids"][0]/"metrics.json").read_text())
    assert m["fired"] == ["alert", "new_labels"] and m["started"] and m["state"] == "triggered"
    assert rl.check_triggers()["suppressed"] == "a retrain loop is already active"
    assert rl.command("abort", "test cleanup").state == "aborted"


def test_label_shuffled_candidate_is_stopped_by_the_gate(project, tmp_path):
    "A candidate trained on label-shuffled data never reaches traffic: the gate rejects it, the champion stays."
    from mlnb.policy import load_policy
    from mlnb.retrain import RetrainLoop
    from mlnb.registry import ModelRegistry
    from mlnb.examples.flights import build_training_set, FEATURES, TARGET
    s, _ = project
    reg = ModelRegistry(s)
    before = reg.aliases()
    df = build_training_set(s, months=(2, 6), sample=0.1).select(*FEATURES, TARGET).drop_nulls(["pressure", "plane_age"])
    df.with_columns(df[TARGET].shuffle(seed=1)).write_parquet(tmp_path/"shuffled.parquet")
    policy = tmp_path/"retrain.toml"
    policy.write_text(POLICY.format(extra=f', data_path = "{tmp_path/"shuffled.parquet"}", target = "{TARGET}"', canary_min=200, shadow_extra=""))
    rl = RetrainLoop(s, load_policy(s, policy), poll_seconds=0.3)
    rl.start({"kind": "manual"}, month=7)
    loop = rl.drive(timeout=300)
    assert loop.state == "rejected", rl.status()["transitions"][-1]
    last = rl.store.transitions(loop.id)[-1]
    assert last["evidence"]["guard"] == "gate" and last["evidence"]["gate_passed"] is False and last["reason"].startswith("gate: ")
    assert reg.aliases() == before and [t["to"] for t in rl.store.transitions(loop.id)] == ["triggered", "training", "gating", "rejected"]
