"""Training: reproducible bytes, kill -9 and resume from checkpoints (real subprocesses), time-ordered CV, class weights."""
import hashlib, json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, polars as pl, pytest
from conftest import ROOT, make_settings
from mlnb.train import (time_split, train_booster, cross_validate, time_folds, checkpoint_path, list_checkpoints,
                        binary_metrics, make_params, CheckpointMismatch)
from mlnb.schema import FeatureSpec
from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET

# Trains on a 5% sample of months 1-4 with settings from the environment; writes a summary of the result as JSON.
# Slow enough (low learning rate, one thread) that the test can kill it between checkpoints.
TRAIN_SCRIPT = r"""
import hashlib, json, sys
from mlnb.core import load_settings, write_json
from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE, TARGET
from mlnb.train import time_split, train_booster, checkpoint_path
from mlnb.schema import FeatureSpec
run_id, out = sys.argv[1], sys.argv[2]
s = load_settings()
frame = build_training_set(s, months=(1, 4), sample=0.05)
train, valid, _ = time_split(frame)
spec = FeatureSpec.infer(train, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
r = train_booster(spec, train, valid, params={"learning_rate": 0.03, "max_depth": 5}, num_boost_round=400,
                  early_stopping_rounds=40, nthread=1, seed=s.seed,
                  checkpoint_dir=checkpoint_path(s, run_id), checkpoint_every=10)
raw = bytes(r.booster.save_raw("ubj"))
write_json(out, {"num_rounds": r.num_rounds, "best_iteration": r.best_iteration, "resumed_from": r.resumed_from,
                 "sha256": hashlib.sha256(raw).hexdigest(), "curve_rows": r.learning_curve.height})
"""


@pytest.fixture(scope="module")
def flights():
    s = make_settings(Path("/tmp"))
    frame = build_training_set(s, months=(1, 4), sample=0.05)
    train, valid, test = time_split(frame)
    spec = FeatureSpec.infer(train, FEATURES, target=TARGET, categorical=CATEGORICAL, nullable=NULLABLE)
    return spec, frame, train, valid, test


def test_same_data_and_params_give_the_same_model_bytes(flights):
    spec, _, train, valid, _ = flights
    a = train_booster(spec, train, valid, num_boost_round=60, nthread=1)
    b = train_booster(spec, train, valid, num_boost_round=60, nthread=1)
    assert bytes(a.booster.save_raw("ubj")) == bytes(b.booster.save_raw("ubj"))
    c = train_booster(spec, train, valid, num_boost_round=60, nthread=1, seed=7)   # the seed is really used
    assert bytes(c.booster.save_raw("ubj")) != bytes(a.booster.save_raw("ubj"))


def _run(script: Path, run_id: str, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), run_id, str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_training_resumes_from_its_last_checkpoint(tmp_path):
    s = make_settings(tmp_path)
    env = {**os.environ, **s.to_env(), "OMP_NUM_THREADS": "1"}
    script = tmp_path/"train_run.py"; script.write_text(TRAIN_SCRIPT)
    # an uninterrupted run, for reference
    p = _run(script, "full", tmp_path/"full.json", env); _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    full = json.loads((tmp_path/"full.json").read_text())
    assert full["resumed_from"] == 0 and full["num_rounds"] > 60, full     # long enough to be killed mid-way
    # the same run, killed with SIGKILL once it has written a checkpoint past round 30
    p = _run(script, "killed", tmp_path/"killed.json", env)
    ckdir = checkpoint_path(s, "killed")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if any(int(f.stem.split("-")[1]) >= 30 for f in list_checkpoints(ckdir)): break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL); p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL, "the training finished before it could be killed"
    assert not (tmp_path/"killed.json").exists()
    left = [int(f.stem.split("-")[1]) for f in list_checkpoints(ckdir)]
    assert left and 30 <= max(left) < full["num_rounds"], left
    # started again with the same run id: resumes from the newest checkpoint and ends exactly like the full run
    p = _run(script, "killed", tmp_path/"killed.json", env); _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    resumed = json.loads((tmp_path/"killed.json").read_text())
    assert resumed["resumed_from"] == max(left)
    assert {k: resumed[k] for k in ("num_rounds", "best_iteration", "sha256", "curve_rows")} == \
           {k: full[k] for k in ("num_rounds", "best_iteration", "sha256", "curve_rows")}


def test_checkpoint_of_other_parameters_is_refused(flights, tmp_path):
    spec, _, train, valid, _ = flights
    kw = dict(num_boost_round=20, nthread=1, checkpoint_dir=tmp_path/"ck", checkpoint_every=5)
    train_booster(spec, train, valid, **kw)
    with pytest.raises(CheckpointMismatch, match="other data or parameters"):
        train_booster(spec, train, valid, params={"max_depth": 2}, **kw)
    with pytest.raises(CheckpointMismatch):
        train_booster(spec, train.head(train.height - 1), valid, **kw)


def test_time_ordered_cv_per_fold_and_mean_and_ensemble(flights):
    spec, frame, train, valid, test = flights
    cv = cross_validate(spec, pl.concat([train, valid]), n_folds=2, num_boost_round=60, nthread=1)
    t = cv.table
    assert t["folds"].to_list() == ["train month 1, validate 2", "train month 1-2, validate 3"]
    assert t["n_train"][0] < t["n_train"][1]                      # expanding window
    for fold in time_folds(pl.concat([train, valid]), 2):               # never trained on the future
        assert fold.train["sched_dep_ts"].max() < fold.valid["sched_dep_ts"].min()
    assert all(0.55 < a < 0.9 for a in t["valid_auc"].to_list()), t.to_dicts()
    assert cv.mean["valid_auc"] == pytest.approx(float(np.mean(t["valid_auc"].to_list())))
    assert set(cv.mean) == {"valid_auc", "valid_logloss", "valid_brier", "valid_positive_rate"}
    ens = cv.ensemble()
    X = spec.encode_frame(test)
    p = ens.predict(X)
    np.testing.assert_allclose(p, (cv.boosters[0].inplace_predict(X) + cv.boosters[1].inplace_predict(X)) / 2, rtol=1e-6)
    assert 0.6 < binary_metrics(test[TARGET], p)["auc"] < 0.9


def test_class_weight_balanced(flights):
    spec, _, train, valid, test = flights
    y = train[TARGET].to_numpy()
    r = train_booster(spec, train, valid, num_boost_round=40, nthread=1, class_weight="balanced")
    assert r.params["scale_pos_weight"] == pytest.approx((y == 0).sum() / (y == 1).sum())
    plain = train_booster(spec, train, valid, num_boost_round=40, nthread=1)
    X = spec.encode_frame(test)
    # up-weighting the minority (delayed) class raises the predicted probabilities towards 0.5
    assert r.booster.inplace_predict(X).mean() > plain.booster.inplace_predict(X).mean() + 0.1


def test_regression_objectives():
    rng = np.random.default_rng(1)
    n = 4000
    df = pl.DataFrame({"month": np.sort(rng.integers(1, 6, n)), "x": rng.normal(size=n), "k": rng.choice(["a", "b"], n)})
    df = df.with_columns(y=(0.8 * pl.col("x") + (pl.col("k") == "a") * 1.0 + rng.normal(size=n) * 0.2).exp())   # positive, skewed
    spec = FeatureSpec.infer(df, ["x", "k"], target="y", task="regression")
    tr, va, te = time_split(df)
    for obj in ("reg:squarederror", "reg:absoluteerror", "reg:tweedie"):
        r = train_booster(spec, tr, va, params={"objective": obj}, num_boost_round=200, nthread=1)
        assert r.params["objective"] == obj and "valid_rmse" in r.learning_curve.columns
        from sklearn.metrics import r2_score
        assert r2_score(te["y"], r.booster.inplace_predict(spec.encode_frame(te))) > 0.5, obj
    with pytest.raises(ValueError, match="binary tasks only"):
        make_params("regression", class_weight="balanced", y=[1.0])
