"""Shared fixtures: a real trained project home (papermill pipeline on the mlnb kernel, SQLite MLflow store)."""
from __future__ import annotations
import os, socket, sys
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


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scratch_settings(tmp_path):
    "Settings with an empty home under tmp_path."
    return make_settings(tmp_path)
