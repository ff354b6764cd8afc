"""Shared fixtures: a real trained project home (papermill pipeline on the mlnb kernel, SQLite MLflow store)."""
from __future__ import annotations
import os, signal, socket, subprocess, sys, time
from dataclasses import dataclass
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # XGBoost's OpenMP threads collapse under CPU contention


def make_settings(tmp: Path, **kw):
    "Settings of this repo with all state under `tmp` and one XGBoost thread."
    from mlnb.core import load_settings
    return load_settings(ROOT/"settings.ini", env={}, home=str(tmp/"home"), reports_dir=str(tmp/"reports"),
                         nthread=1, log_flush_seconds=0.5, **kw)


@dataclass
class TrainedHome:
    settings: object
    env: dict
    run: object

    @property
    def bundle(self):
        from mlnb.registry import load_model
        return load_model(self.settings, "champion")


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory) -> TrainedHome:
    "A project home with one model trained by the real train pipeline (5% sample) and registered as champion."
    from mlnb.pipeline import run_pipeline
    tmp = tmp_path_factory.mktemp("trained")
    settings = make_settings(tmp)
    run = run_pipeline("train", {"sample": 0.05, "num_boost_round": 150, "nthread": 1}, settings)
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    return TrainedHome(settings, env, run)


def find_free_port() -> int:
    "A TCP port on 127.0.0.1 that is free now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return find_free_port()


class ServerProcess:
    "`mlnb serve` as a real process (its own session) on 127.0.0.1: `start()` waits until ready, `stop()` sends SIGTERM."
    def __init__(self, env: dict, port: int, log_path: Path):
        self.env, self.port, self.log_path = dict(env), port, Path(log_path)
        self.url = f"http://127.0.0.1:{port}"
        self.proc, self._client = None, None

    @property
    def client(self):
        "An httpx client on this server (closed by `stop`)."
        import httpx
        if self._client is None: self._client = httpx.Client(base_url=self.url, timeout=30)
        return self._client

    def start(self, timeout: float = 90, wait: bool = True, fail_on_load_error: bool = False) -> "ServerProcess":
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "serve", "--port", str(self.port)],
                                         env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self.wait_ready(timeout, fail_on_load_error) if wait else self

    def wait_ready(self, timeout: float = 90, fail_on_load_error: bool = False) -> "ServerProcess":
        "Poll `/health/ready` until 200; fail at once if the process exits (or, optionally, if the model failed to load)."
        import httpx
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log()}"
            try:
                r = httpx.get(self.url + "/health/ready", timeout=2)
                if r.status_code == 200: return self
                if fail_on_load_error and r.status_code == 503 and "could not be loaded" in r.text:
                    raise AssertionError(f"model failed to load: {r.text}\n{self.log()}")
            except httpx.TransportError: pass
            assert time.monotonic() < deadline, f"server not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str: return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        "Send `sig` and wait for the exit status; kill the whole group and fail if it does not stop within `timeout`."
        if self._client is not None: self._client.close(); self._client = None
        if self.proc is None: return 0
        if self.proc.poll() is not None: return self.proc.returncode
        self.proc.send_signal(sig)
        try: self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"server did not stop within {timeout}s after {sig!r}:\n{self.log()}")
        return self.proc.returncode

    def kill_group(self) -> None:
        "SIGKILL the process group (uvicorn's workers too)."
        if self.proc is not None:
            try: os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError: pass
            self.proc.wait(10)


@pytest.fixture
def serve_process(tmp_path):
    "Factory: `serve_process(env, port=None, log=None)` -> a not yet started `ServerProcess`; all are stopped at the end."
    made = []
    def make(env: dict, port: int | None = None, log: Path | None = None) -> ServerProcess:
        srv = ServerProcess(env, port or find_free_port(), log or tmp_path/f"server{len(made)}.log")
        made.append(srv); return srv
    yield make
    for srv in made:
        try: srv.stop(timeout=20)
        except AssertionError: pass
        srv.kill_group() if srv.proc is not None and srv.proc.poll() is None else None


@pytest.fixture
def scratch_settings(tmp_path):
    "Settings with an empty home under tmp_path."
    return make_settings(tmp_path)
