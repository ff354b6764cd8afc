"""Training outgrows one machine: a `dask scheduler` and two `dask worker` processes started separately (as a user
would on several machines, here all on 127.0.0.1), training from Parquet files every worker reads itself. The model
equals the one trained on a LocalCluster from the same files, within tolerance. Configuration only:
`dask_scheduler=tcp://host:8786` (`MLNB_DASK_SCHEDULER`)."""
from __future__ import annotations
import os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_settings
from pg import free_port


@pytest.fixture
def dask_cluster(tmp_path):
    "`dask scheduler` + two `dask worker` processes (one thread each) on 127.0.0.1; yields the scheduler address."
    dask = Path(sys.executable).parent/"dask"
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    logs, procs = [], []
    def start(name, args):
        logs.append(open(tmp_path/f"{name}.log", "w"))
        procs.append(subprocess.Popen([str(dask), *args], stdout=logs[-1], stderr=subprocess.STDOUT, env=env,
                                      cwd=tmp_path, start_new_session=True))
    start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"])
    for i in range(2):
        start(f"worker-{i}", ["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                              "--no-dashboard", "--name", f"w{i}", "--local-directory", str(tmp_path/f"w{i}")])
    try:
        yield address
    finally:
        for p in reversed(procs):
            try: os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError: pass
        for p in procs:
            try: p.wait(20)
            except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait(10)
        for f in logs: f.close()


def test_separate_scheduler_and_workers_train_from_parquet_like_a_local_cluster(dask_cluster, tmp_path):
    from mlnb.distributed import dask_client, train_booster_dask
    from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET
    from mlnb.metrics import binary_metrics
    from mlnb.train import time_split
    from mlnb.schema import FeatureSpec
    frame = build_training_set(make_settings(tmp_path), months=(1, 4), sample=0.05)
    train, valid, test = time_split(frame)
    spec = FeatureSpec.infer(train, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
    cols = [*spec.names, TARGET]
    for name, f in (("train", train), ("valid", valid)):          # several part files, as a data lake would hold
        (tmp_path/name).mkdir()
        n = 4 if name == "train" else 2
        for i in range(n):
            f.select(cols).slice(i * f.height // n, (i + 1) * f.height // n - i * f.height // n).write_parquet(
                tmp_path/name/f"part-{i}.parquet")
    kw = dict(num_boost_round=40, early_stopping_rounds=None, seed=42)    # fixed rounds: the same model to compare
    train_glob, valid_glob = str(tmp_path/"train"/"*.parquet"), str(tmp_path/"valid"/"*.parquet")
    deadline = time.monotonic() + 120
    with dask_client(dask_cluster, timeout="60s") as client:
        while len(client.scheduler_info(n_workers=-1)["workers"]) < 2:          # the workers register themselves
            assert time.monotonic() < deadline, "the two dask workers did not join the scheduler"
            time.sleep(0.2)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert sorted(w["name"] for w in workers.values()) == ["w0", "w1"]
        assert all(w["nthreads"] == 1 for w in workers.values())
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids                        # two separate worker processes
        remote = train_booster_dask(client, spec, train_glob, valid_glob, **kw)
    with dask_client("local") as client:
        local = train_booster_dask(client, spec, train_glob, valid_glob, **kw)
    X, y = spec.encode_frame(test), test[TARGET].to_numpy()
    p_remote, p_local = remote.booster.inplace_predict(X), local.booster.inplace_predict(X)
    auc_remote, auc_local = binary_metrics(y, p_remote)["auc"], binary_metrics(y, p_local)["auc"]
    assert 0.6 < auc_local < 0.9
    assert abs(auc_remote - auc_local) < 0.01, (auc_remote, auc_local)
    assert remote.booster.num_boosted_rounds() == local.booster.num_boosted_rounds() == 40
    assert np.abs(p_remote - p_local).mean() < 0.01, np.abs(p_remote - p_local).mean()
    print(f"\nseparate scheduler + 2 workers: AUC {auc_remote:.4f}, LocalCluster {auc_local:.4f}, "
          f"max |dp| {np.abs(p_remote - p_local).max():.2e}, {remote.seconds:.1f} s vs {local.seconds:.1f} s")
