"""Audit forwarding against real collectors on 127.0.0.1: an HTTP receiver stopped and restarted mid-stream, a
collector that hangs, process exit with the collector down (spool) and up (drain), syslog over UDP."""
import json, os, socket, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import pytest
from conftest import ROOT
from mlnb.audit import AuditLog, audited, read_audit
from mlnb.audit_forward import close_forwarders, forwarders


class Collector:
    "An HTTP audit collector: deduplicates by (audit_id, phase), as the forwarder's contract asks of it."
    def __init__(self, port: int = 0, hold: threading.Event | None = None, otlp: bool = False):
        self.records, self.raw_lines, self.posts, self.in_flight = {}, 0, 0, 0
        self.entered, self.hold, self.lock = threading.Event(), hold, threading.Lock()
        self.port, self.otlp = port, otlp
        self.start()

    def start(self):
        me = self
        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with me.lock: me.in_flight += 1
                me.entered.set()
                if me.hold is not None: me.hold.wait(60)
                with me.lock:
                    me.posts += 1; me.in_flight -= 1
                    for line in (_otlp_lines(body) if me.otlp else body.splitlines()):
                        r = json.loads(line); me.raw_lines += 1
                        me.records.setdefault((r["audit_id"], r["phase"]), line)
                self.send_response(204); self.end_headers()
            def log_message(self, *a): pass
        self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def stop(self):
        self.srv.shutdown(); self.srv.server_close()

    @property
    def url(self): return f"http://127.0.0.1:{self.port}/audit"


def _otlp_lines(body: bytes) -> list[bytes]:
    "The audit lines inside an OTLP/HTTP JSON logs request (parsed with the OpenTelemetry protobuf definitions)."
    from google.protobuf import json_format
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    req = json_format.Parse(body, ExportLogsServiceRequest())
    return [lr.body.string_value.encode() for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records]


def local_lines(settings) -> dict:
    log = AuditLog(settings)
    out = {}
    for p in [*log.segments(), log.path]:
        if p.exists():
            for line in p.read_bytes().splitlines():
                r = json.loads(line); out[(r["audit_id"], r["phase"])] = line
    return out


@pytest.fixture(autouse=True)
def _no_leftover_forwarders():
    yield
    close_forwarders(1.0)


@pytest.mark.parametrize("fmt", ["ndjson", "otlp"])
def test_collector_stopped_and_restarted_mid_stream_loses_and_duplicates_nothing(scratch_settings, fmt):
    col = Collector(otlp=fmt == "otlp")
    s = scratch_settings.replace(audit_forward_url=col.url, audit_forward_batch=20, audit_forward_format=fmt)
    (fw,) = forwarders(s)
    for i in range(300):
        if i == 100: col.stop()                                    # the collector goes away ...
        if i == 200: col.start()                                   # ... and comes back on the same port
        with audited("op", s, details={"i": i}): pass
    assert fw.flush(30), (fw.stats, fw.spool.files())
    local = local_lines(s)
    assert len(local) == 600 and set(col.records) == set(local)     # nothing lost
    assert all(col.records[k] == local[k] for k in local)           # byte-identical to the local source of truth
    assert col.raw_lines == len(local)                              # and nothing sent twice
    assert fw.stats["failures"] >= 1 and fw.stats["sent"] == 600 and not fw.spool.files()


def test_operations_do_not_wait_for_a_hanging_collector(scratch_settings):
    hold = threading.Event()
    col = Collector(hold=hold)
    s = scratch_settings.replace(audit_forward_url=col.url, audit_forward_timeout=60.0)
    (fw,) = forwarders(s)
    with audited("first", s): pass
    assert col.entered.wait(10)                                     # the forwarder is stuck inside a POST ...
    for i in range(200):
        with audited("op", s): pass                                 # ... and operations go on regardless
    assert col.in_flight == 1 and col.posts == 0 and len(read_audit(s)) == 402
    hold.set()
    assert fw.flush(30)
    assert set(col.records) == set(local_lines(s))


def _write_ops(settings, n, exit_seconds):
    env = {**os.environ, **settings.to_env(), "MLNB_AUDIT_FORWARD_EXIT_SECONDS": str(exit_seconds)}
    code = (f"from mlnb.audit import audited\nfrom mlnb.core import load_settings\ns = load_settings()\n"
            f"for i in range({n}):\n    with audited('proc_op', s): pass\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)


def test_spool_survives_process_exit_and_the_next_process_drains_it(scratch_settings, free_port):
    s = scratch_settings.replace(audit_forward_url=f"http://127.0.0.1:{free_port}/audit")
    _write_ops(s, 20, 0.5)                                          # collector down: the exit drain gives up after 0.5 s
    spool = s.home/"audit"/"spool"
    assert sum(p.read_bytes().count(b"\n") for p in spool.glob("*.ndjson")) == 40
    col = Collector(port=free_port)
    _write_ops(s, 5, 10)                                            # collector up: this process ships both
    col.stop()
    assert set(col.records) == set(local_lines(s)) and len(col.records) == 50 and col.raw_lines == 50
    assert not list(spool.glob("*.ndjson"))


def test_misconfigured_forwarder_never_fails_the_operation(scratch_settings, capfd):
    s = scratch_settings.replace(audit_forward_url="ftp://collector.invalid/audit")
    with audited("op", s): pass
    with audited("op", s): pass
    assert [r["outcome"] for r in read_audit(s)] == ["started", "success"] * 2
    assert capfd.readouterr().err.count("forwarding disabled") == 1


def test_syslog_forwarding_over_udp(scratch_settings):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0)); rx.settimeout(10)
        s = scratch_settings.replace(audit_forward_syslog=f"udp://127.0.0.1:{rx.getsockname()[1]}")
        with audited("promote", s, model_name="m", model_version="2"): pass
        (fw,) = forwarders(s)
        assert fw.flush(5)
        got = [rx.recv(65536).decode() for _ in range(2)]
    local = list(local_lines(s).values())
    for msg, line in zip(got, local):
        assert msg.startswith("<") and "mlnb-audit: " in msg          # <PRI> then the ident
        assert msg.split("mlnb-audit: ", 1)[1].rstrip("\x00").encode() == line
