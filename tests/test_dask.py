"""Training on a real 2-worker Dask LocalCluster: quality close to the single-process model; the pipeline on Dask."""
import os
from pathlib import Path
import mlflow, numpy as np, pytest
from conftest import make_settings
from mlnb.distributed import dask_client, train_booster_dask, resolve_scheduler
from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET
from mlnb.train import time_split, train_booster, binary_metrics
from mlnb.schema import FeatureSpec


def test_two_worker_local_cluster_matches_single_process_quality(tmp_path):
    frame = build_training_set(make_settings(tmp_path), months=(1, 4), sample=0.05)
    train, valid, test = time_split(frame)
    spec = FeatureSpec.infer(train, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
    kw = dict(num_boost_round=150, early_stopping_rounds=20, seed=42)
    cols = [*spec.names, TARGET]
    train.select(cols).write_parquet(tmp_path/"train.parquet"); valid.select(cols).write_parquet(tmp_path/"valid.parquet")
    with dask_client("local") as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids                  # two real worker processes
        on_dask = train_booster_dask(client, spec, train, valid, **kw)
        from_files = train_booster_dask(client, spec, tmp_path/"train.parquet", tmp_path/"valid.parquet", **kw)
    local = train_booster(spec, train, valid, nthread=1, **kw)
    X, y = spec.encode_frame(test), test[TARGET].to_numpy()
    auc = {name: binary_metrics(y, r.booster.inplace_predict(X))["auc"]
           for name, r in (("dask", on_dask), ("dask_parquet", from_files), ("local", local))}
    assert 0.6 < auc["local"] < 0.9, auc
    assert abs(auc["dask"] - auc["local"]) < 0.02 and abs(auc["dask_parquet"] - auc["local"]) < 0.02, auc
    # the same TrainResult: cut at the best round, with the learning curve of both evaluation sets
    assert on_dask.booster.num_boosted_rounds() == on_dask.best_iteration + 1 <= on_dask.num_rounds
    assert {"train_auc", "valid_auc"} <= set(on_dask.learning_curve.columns)
    assert on_dask.learning_curve.height == on_dask.num_rounds


def test_pipeline_trains_on_dask_from_the_settings(tmp_path):
    """dask_scheduler=local in the settings (MLNB_DASK_SCHEDULER for the kernel): the unchanged pipeline trains on a
    LocalCluster, with the same MLflow outputs and registration."""
    from mlnb.pipeline import run_pipeline
    from mlnb.registry import load_model
    s = make_settings(tmp_path, dask_scheduler="local")
    assert s.to_env()["MLNB_DASK_SCHEDULER"] == "local" and resolve_scheduler("", s) == "local"
    run = run_pipeline("train", {"sample": 0.05, "num_boost_round": 80, "nthread": 1}, s)
    m = run.metrics
    assert run.outcome == "success" and 0.6 < m["test_auc"] < 0.9, m
    client = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri)
    r = client.get_run(m["mlflow_run_id"])
    assert r.data.tags["mlnb.trainer"] == "dask local"
    # one valid_auc per boosted round (the learning curve), then the final model's at step 0
    assert len(client.get_metric_history(r.info.run_id, "valid_auc")) == m["num_rounds"] + 1
    assert load_model(s, "champion").booster.num_boosted_rounds() == m["best_iteration"] + 1
