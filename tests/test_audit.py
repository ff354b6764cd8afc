"""Audit records: the standard record + JSON Schema, change tickets, correlation (through papermill's kernel and child
processes), retention rotation with a fake clock, tamper evidence (`mlnb audit verify`), concurrent writers."""
import json, multiprocessing as mp, os, subprocess, sys, tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path
import jsonschema, pytest
from conftest import ROOT, make_settings
from mlnb.audit import (AUDIT_FIELDS, AUDIT_RECORD_SCHEMA, AuditLog, ChangeTicketRequired, audited, child_env,
                        correlation, deployment_context, read_audit, schema_path, verify)

VALIDATOR = jsonschema.Draft202012Validator(json.loads(schema_path().read_text()))


def valid_lines(settings) -> list[dict]:
    "Every record line of the home (sealed segments and current file), each validated against the shipped schema."
    log, out = AuditLog(settings), []
    for p in [*log.segments(), log.path]:
        if not p.exists(): continue
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            VALIDATOR.validate(rec)
            out.append(rec)
    return out


def cli(settings, *args, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "mlnb.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **settings.to_env(), **(env or {})}, check=check, timeout=600)


# --- the record and its schema -----------------------------------------------------------------------------------
def test_schema_is_shipped_as_package_data_and_matches_the_module():
    assert json.loads(schema_path().read_text()) == AUDIT_RECORD_SCHEMA
    jsonschema.Draft202012Validator.check_schema(AUDIT_RECORD_SCHEMA)
    pkg = tomllib.loads((ROOT/"pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mlnb"]
    assert schema_path().name in pkg
    bad = {**valid_record(), "ts": "2026-01-01"}                      # the old field names are not the standard
    with pytest.raises(jsonschema.ValidationError): VALIDATOR.validate(bad)
    with pytest.raises(jsonschema.ValidationError): VALIDATOR.validate({**valid_record(), "outcome": "failure"})


def valid_record() -> dict:
    return dict(timestamp="2026-01-01T00:00:00.000+00:00", audit_id="a" * 32, phase="end", operation="x",
                outcome="success", user="u", change_ticket="", environment="local", model_name=None, model_version=None,
                command="mlnb x", resources_affected=[], rollback_available=False, duration_seconds=0.1, metrics={},
                error_detail=None, details={}, correlation_id="c", parent_id=None, seq=1, prev_sha256="0" * 64)


def test_success_and_failure_records(scratch_settings, monkeypatch):
    s = scratch_settings
    monkeypatch.setenv("MLNB_USER", "alice")
    with audited("train", s, model_name="flight-delay", resources=["runs:/x"]) as rec:   # the older kwarg name
        rec.model_version = "7"; rec.metrics["auc"] = 0.7
    with pytest.raises(ZeroDivisionError):
        with audited("deploy", s, model_name="flight-delay", rollback_available=True):
            1 / 0
    recs = read_audit(s)
    assert [(r["operation"], r["phase"], r["outcome"]) for r in recs] == [
        ("train", "start", "started"), ("train", "end", "success"),
        ("deploy", "start", "started"), ("deploy", "end", "failure")]
    assert recs == valid_lines(s)
    for r in recs:
        assert tuple(r) == AUDIT_FIELDS
        assert r["user"] == "alice" and r["environment"] == "local" and r["timestamp"].endswith("+00:00")
    ok, fail = recs[1], recs[3]
    assert ok["model_version"] == "7" and ok["metrics"] == {"auc": 0.7} and ok["duration_seconds"] >= 0
    assert ok["resources_affected"] == ["runs:/x"] and ok["error_detail"] is None
    assert fail["error_detail"]["type"] == "ZeroDivisionError" and "division by zero" in fail["error_detail"]["message"]
    assert "Traceback" in fail["error_detail"]["traceback"] and fail["rollback_available"] is True
    assert recs[0]["audit_id"] == ok["audit_id"] != fail["audit_id"]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]


def test_decorator_form_still_works(scratch_settings):
    @audited("decorated", scratch_settings)
    def f(x): return x + 1
    assert f(1) == 2 and [r["outcome"] for r in read_audit(scratch_settings, operation="decorated")] == ["started", "success"]


def test_torn_last_line_is_skipped_and_not_chained(scratch_settings):
    s = scratch_settings
    with audited("x", s): pass
    with open(s.audit_path, "a") as f: f.write('{"timestamp": "2026-01-01", "operati')    # a writer killed mid-line
    assert [r["operation"] for r in read_audit(s)] == ["x", "x"]
    with audited("y", s): pass                                 # the next writer starts a fresh line
    assert [r["operation"] for r in read_audit(s)] == ["x", "x", "y", "y"]
    v = verify(s)
    assert v.ok and v.records == 4 and any("torn" in w for w in v.warnings)


def test_legacy_records_are_read_with_standard_names(scratch_settings):
    s = scratch_settings
    s.home.mkdir(parents=True, exist_ok=True)
    s.audit_path.write_text(json.dumps({"ts": "2025-01-01T00:00:00+00:00", "operation": "old", "actor": "bob@h",
                                        "duration_s": 1.0, "error": None, "resources": []}) + "\n")
    with audited("new", s): pass
    old = read_audit(s, operation="old")[0]
    assert old["timestamp"].startswith("2025") and old["user"] == "bob@h" and old["duration_seconds"] == 1.0
    assert verify(s).ok                                        # the chain starts at the first chained record


# --- change tickets ----------------------------------------------------------------------------------------------
def test_production_change_without_ticket_is_refused_and_audited(tmp_path, monkeypatch):
    s = make_settings(tmp_path, environment="production")
    monkeypatch.delenv("MLNB_CHANGE_TICKET", raising=False)
    ran = []
    with pytest.raises(ChangeTicketRequired, match="change ticket"):
        with audited("promote", s, model_name="m", model_version="3"): ran.append(1)
    assert ran == []                                           # refused before the body ran
    with audited("pipeline_run", s): pass                      # does not change production: no ticket needed
    monkeypatch.setenv("MLNB_CHANGE_TICKET", "CHG-1001")
    with audited("promote", s, model_name="m", model_version="3"): ran.append(2)
    assert ran == [2]
    ends = [(r["outcome"], r["change_ticket"], (r["error_detail"] or {}).get("type"))
            for r in read_audit(s, operation="promote", phase="end")]
    assert ends == [("failure", "", "ChangeTicketRequired"), ("success", "CHG-1001", None)]
    local = make_settings(tmp_path/"local")                    # environment = local: an empty ticket is fine
    monkeypatch.delenv("MLNB_CHANGE_TICKET")
    with audited("promote", local): pass
    valid_lines(s); valid_lines(local)


# --- correlation -------------------------------------------------------------------------------------------------
def test_correlation_reaches_child_processes(scratch_settings):
    s = scratch_settings
    with correlation(command="mlnb schedule run nightly") as c, audited("retrain_trigger", s) as parent:
        env = {**os.environ, **s.to_env(), **child_env()}
        code = ("from mlnb.audit import audited\nfrom mlnb.core import load_settings\n"
                "with audited('worker_step', load_settings()): pass")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)
    child = read_audit(s, operation="worker_step", phase="end")[0]
    assert child["correlation_id"] == c.correlation_id == parent.correlation_id
    assert child["parent_id"] == parent.audit_id and child["command"] == "mlnb schedule run nightly"
    assert {r["operation"] for r in read_audit(s, correlation_id=c.correlation_id)} == {"retrain_trigger", "worker_step"}


def test_correlation_from_mlnb_run_train_through_the_kernel_to_register(tmp_path):
    "`mlnb --change-ticket .. run train` in production: the register record in the kernel names the person's command."
    s = make_settings(tmp_path, environment="production")
    args = ["--change-ticket", "CHG-9", "run", "train", "-p", "sample=0.03", "-p", "num_boost_round=20", "-p", "nthread=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLNB_CORRELATION_ID", "MLNB_COMMAND", "MLNB_PARENT_ID")}
    p = subprocess.run([sys.executable, "-m", "mlnb.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**env, **s.to_env(), "MLNB_USER": "carol"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    cid, version = out["correlation_id"], str(out["metrics"]["model_version"])
    recs = [json.loads(l) for l in cli(s, "audit", "--correlation", cid).stdout.splitlines()]
    ops = {(r["operation"], r["phase"]) for r in recs}
    assert {("pipeline_run", "start"), ("pipeline_run", "end"), ("register", "start"), ("register", "end")} <= ops
    run = next(r for r in recs if r["operation"] == "pipeline_run" and r["phase"] == "end")
    reg = next(r for r in recs if r["operation"] == "register" and r["phase"] == "end")
    for r in (run, reg):
        assert r["command"].startswith("mlnb --change-ticket CHG-9 run train -p sample=0.03"), r["command"]
        assert r["change_ticket"] == "CHG-9" and r["user"] == "carol" and r["environment"] == "production"
    assert reg["parent_id"] == run["audit_id"] and reg["outcome"] == "success" and reg["model_version"] == version
    assert "ipykernel" not in reg["command"]
    by_model = [json.loads(l) for l in cli(s, "audit", "--model", s.model_name, "--version", version).stdout.splitlines()]
    assert {(r["operation"], r["phase"]) for r in by_model} >= {("register", "start"), ("register", "end")}
    assert all(r["model_version"] in (version, None) for r in by_model)   # start records: version not known yet
    # a server that reloads because of this registration joins the same correlation
    assert deployment_context(s, s.model_name, version) == dict(correlation_id=cid, parent_id=reg["audit_id"],
                                                                 command=reg["command"])
    # production: `mlnb models promote` without a ticket is refused and audited; with one it goes through
    no = cli(s, "models", "promote", "--version", version, env={"MLNB_CHANGE_TICKET": ""}, check=False)
    assert no.returncode == 1 and "change ticket" in no.stderr and "Traceback" not in no.stderr, no.stderr
    yes = cli(s, "--change-ticket", "CHG-10", "models", "promote", "--version", version, env={"MLNB_CHANGE_TICKET": ""})
    assert '"changed": false' in yes.stdout                                     # v1 is already the champion
    refused, done = read_audit(s, operation="promote", phase="end")
    assert (refused["outcome"], refused["error_detail"]["type"], refused["change_ticket"]) == ("failure", "ChangeTicketRequired", "")
    assert (done["outcome"], done["change_ticket"]) == ("success", "CHG-10")
    assert done["command"] == f"mlnb --change-ticket CHG-10 models promote --version {version}"
    assert done["correlation_id"] not in (cid, refused["correlation_id"])        # a new command, a new correlation
    # every record this home holds (pipeline, validation, training, register, promote) matches the schema
    assert len(valid_lines(s)) == len(read_audit(s)) and verify(s).ok
    assert {"pipeline_run", "register", "promote"} <= {r["operation"] for r in read_audit(s)}


# --- retention -------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, t): self.t = t
    def __call__(self): return self.t
    def advance(self, **kw): self.t += timedelta(**kw)


def test_retention_rotation_keeps_each_class_for_its_period(scratch_settings):
    s = scratch_settings
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    log = AuditLog(s, now=clock)
    with audited("pipeline_run", s, now=clock): pass           # segment 1: pipeline records only
    assert log.rotate() == {"sealed": "audit-000001.jsonl", "pruned": []}
    clock.advance(days=10)
    with audited("pipeline_run", s, now=clock): pass           # segment 2: pipeline + a deployment record
    with audited("promote", s, model_name="m", now=clock): pass
    log.rotate()
    clock.advance(days=85)                                     # segment 1 is 95 days old, segment 2 is 85 days old
    with audited("train", s, now=clock): pass
    assert log.rotate()["pruned"] == ["audit-000001.jsonl"]
    assert [p.name for p in log.segments()] == ["audit-000002.jsonl", "audit-000003.jsonl"]
    clock.advance(days=100)                                    # segment 2: pipeline records 185 days old, promote too
    assert log.rotate()["pruned"] == ["audit-000003.jsonl"]    # ...but the promote (deployment) keeps segment 2
    assert "audit-000002.jsonl" in [p.name for p in log.segments()]
    clock.advance(days=270)                                    # the promote is now 370 days old
    assert "audit-000002.jsonl" in log.rotate()["pruned"]
    assert read_audit(s, operation="promote") == []
    prunes = read_audit(s, operation="audit_retention", phase="end")       # pruning is itself audited
    assert [p["segment"] for p in prunes[-1]["details"]["pruned"]] == ["audit-000002.jsonl", "audit-000004.jsonl"]
    assert prunes[-1]["details"]["retention_days"] == {"pipeline": 90, "deployment": 365}
    res = verify(s)                                            # the chain still checks across the pruned files
    assert res.ok, res.first_problem
    valid_lines(s)
    with pytest.raises(ValueError, match="below the floor"):
        AuditLog(s.replace(audit_retention_days_deployment=30), now=clock).rotate()


def test_rotation_by_size_keeps_the_chain(scratch_settings):
    s = scratch_settings.replace(audit_rotate_bytes=3000)
    for i in range(40):
        with audited("op", s, details={"i": i}): pass
    log = AuditLog(s)
    assert len(log.segments()) >= 5
    assert [r["details"]["i"] for r in read_audit(s, phase="end")] == list(range(40))
    res = verify(s)
    assert res.ok and res.records == 80 and len(res.files) == len(log.segments()) + 1


# --- tamper evidence ---------------------------------------------------------------------------------------------
def _home_with_records(settings, n=6):
    for i in range(n):
        with audited(f"op{i}", settings, details={"i": i}): pass
    return settings.audit_path.read_text().splitlines()


def _verify_cli(settings):
    p = cli(settings, "audit", "verify", check=False)
    return p.returncode, json.loads(p.stdout)


def test_verify_detects_an_edited_line(scratch_settings):
    s = scratch_settings
    lines = _home_with_records(s)
    assert _verify_cli(s)[0] == 0
    lines[4] = lines[4].replace('"outcome":"started"', '"outcome":"success"')   # line 5 (seq 5) is edited
    s.audit_path.write_text("\n".join(lines) + "\n")
    code, res = _verify_cli(s)
    assert code == 1 and not res["ok"]
    assert res["first_problem"]["kind"] == "changed" and res["first_problem"]["line"] == 5 and res["first_problem"]["seq"] == 5


def test_verify_detects_a_deleted_line(scratch_settings):
    s = scratch_settings
    lines = _home_with_records(s)
    s.audit_path.write_text("\n".join(lines[:6] + lines[7:]) + "\n")             # seq 7 removed
    code, res = _verify_cli(s)
    assert code == 1 and res["first_problem"]["kind"] == "removed"
    assert res["first_problem"]["line"] == 7 and res["first_problem"]["seq"] == 8 and "7..7" in res["first_problem"]["message"]


def test_verify_detects_swapped_lines(scratch_settings):
    s = scratch_settings
    lines = _home_with_records(s)
    lines[2], lines[3] = lines[3], lines[2]                                       # seq 3 and 4 swapped
    s.audit_path.write_text("\n".join(lines) + "\n")
    code, res = _verify_cli(s)
    assert code == 1 and res["first_problem"]["kind"] == "reordered" and res["first_problem"]["line"] == 3


def test_verify_detects_a_truncated_tail_and_an_edited_newest_record(scratch_settings):
    s = scratch_settings
    lines = _home_with_records(s)
    s.audit_path.write_text("\n".join(lines[:-2]) + "\n")                      # the last two records removed
    res = verify(s)
    assert not res.ok and res.first_problem["kind"] == "removed" and res.first_problem["seq"] == 11
    s.audit_path.write_text("\n".join(lines[:-1] + [lines[-1].replace('"i":5', '"i":0')]) + "\n")
    res = verify(s)
    assert not res.ok and res.first_problem["kind"] == "changed" and res.first_problem["line"] == 12


def test_verify_across_rotated_files(scratch_settings):
    s = scratch_settings
    log = AuditLog(s)
    _home_with_records(s, 3); log.rotate(); _home_with_records(s, 3); log.rotate(); _home_with_records(s, 2)
    assert verify(s).ok and len(verify(s).files) == 3
    first = log.segments()[0]
    text = first.read_text().replace('"i":1', '"i":9')                           # edit inside a sealed file
    first.write_text(text)
    res = verify(s)
    assert not res.ok and res.first_problem["kind"] == "changed" and res.first_problem["file"] == first.name
    first.write_text(text.replace('"i":9', '"i":1'))
    assert verify(s).ok
    log.segments()[1].unlink()                                                     # a whole sealed file removed
    res = verify(s)
    assert not res.ok and res.first_problem["kind"] == "removed" and "audit-000002.jsonl" in res.first_problem["message"]


# --- concurrency -----------------------------------------------------------------------------------------------
N_PROCS, N_THREADS, N_OPS = 4, 2, 500   # 4 processes x 2 threads x 500 operations x 2 records = 8000 lines


def _writer(args):
    "One process: N_THREADS threads (like a server's) auditing N_OPS operations each."
    import threading
    home, i = args
    from mlnb.core import load_settings
    s = load_settings(ROOT/"settings.ini", env={}, home=home, audit_rotate_bytes=400_000)
    def run(t):
        for j in range(N_OPS):
            with audited("load_test", s, model_name="m", model_version=f"{i}-{t}.{j}") as rec:
                rec.metrics["j"] = j
    threads = [threading.Thread(target=run, args=(t,)) for t in range(N_THREADS)]
    for t in threads: t.start()
    for t in threads: t.join()


def test_concurrent_writers_never_interleave_and_the_chain_verifies(tmp_path):
    home = tmp_path/"home"
    with mp.get_context("spawn").Pool(N_PROCS) as pool:
        pool.map(_writer, [(str(home), i) for i in range(N_PROCS)])
    s = make_settings(tmp_path)
    recs = valid_lines(s)                                     # every line is whole JSON and a valid record
    assert len(recs) == N_PROCS * N_THREADS * N_OPS * 2
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert len(AuditLog(s).segments()) >= 2                    # sealed while the writers were running
    per_writer = {}
    for r in recs: per_writer.setdefault(r["model_version"].split(".")[0], []).append(int(r["model_version"].split(".")[1]))
    assert len(per_writer) == N_PROCS * N_THREADS
    assert all(v == sorted(v) and len(v) == 2 * N_OPS for v in per_writer.values())
    res = verify(s)
    assert res.ok and res.records == len(recs), res.first_problem


# --- command line ------------------------------------------------------------------------------------------------
def test_cli_audit_filters(scratch_settings):
    s = scratch_settings
    with audited("a", s): pass
    with pytest.raises(RuntimeError):
        with audited("b", s, correlation_id="corr-1"): raise RuntimeError("boom")
    out = cli(s, "audit", "--outcome", "failure").stdout
    recs = [json.loads(l) for l in out.splitlines()]
    assert [(r["operation"], r["error_detail"]["message"]) for r in recs] == [("b", "boom")]
    assert [r["operation"] for r in map(json.loads, cli(s, "audit", "--correlation", "corr-1").stdout.splitlines())] == ["b", "b"]
    from mlnb.cli import _change_ticket        # `mlnb --change-ticket ID ...` (the train test checks it reaches records)
    assert _change_ticket(["--change-ticket=CHG-1", "models", "promote"]) == (["models", "promote"], "CHG-1")
    assert _change_ticket(["--change-ticket", "CHG-2", "run", "deploy"]) == (["run", "deploy"], "CHG-2")


def test_cli_audit_rotate(scratch_settings):
    s = scratch_settings
    with audited("a", s): pass
    assert json.loads(cli(s, "audit", "rotate").stdout) == {"sealed": "audit-000001.jsonl", "pruned": []}
    assert [r["operation"] for r in read_audit(s)] == ["a", "a"] and verify(s).ok
    bad = cli(s, "audit", "rotate", env={"MLNB_AUDIT_RETENTION_DAYS_PIPELINE": "30"}, check=False)
    assert bad.returncode == 2 and "below the floor of 90 days" in bad.stderr
