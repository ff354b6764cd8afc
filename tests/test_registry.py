"""Integrity of registered models: every artifact is hashed and verified at load."""
import shutil
from pathlib import Path
import numpy as np, pytest
from conftest import make_settings
from mlnb.registry import load_model, IntegrityError, sha256_file, MANIFEST_TAG
from mlnb.audit import read_audit


def _store_file(settings, rel: str) -> Path:
    "The file `rel` of the champion's model directory in the artifact store (not the local cache)."
    import mlflow
    c = mlflow.MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_registry_uri)
    mv = c.get_model_version_by_alias(settings.model_name, "champion")
    src = c.get_model_version_download_uri(settings.model_name, mv.version)
    return Path(src.removeprefix("file://"))/rel


@pytest.fixture(scope="module")
def small_model():
    "A small real model (2% of January-March), trained once for this module."
    from mlnb.core import Settings
    from mlnb.examples.flights import build_training_set, FEATURES, CATEGORICAL, NULLABLE
    from mlnb.schema import FeatureSpec
    from mlnb.train import train_booster
    df = build_training_set(Settings(), months=(1, 3), sample=0.02)
    spec = FeatureSpec.infer(df, FEATURES, target="delayed", categorical=CATEGORICAL, nullable=NULLABLE)
    return train_booster(spec, df, num_boost_round=20, early_stopping_rounds=None, nthread=1).booster, spec, df


@pytest.fixture
def own_home(tmp_path, small_model):
    "A fresh home of its own with one registered champion, so tampering cannot touch any other test's model."
    import mlflow
    from mlnb.registry import mlflow_setup, register_model
    s = make_settings(tmp_path)
    mlflow_setup(s)
    with mlflow.start_run():
        register_model(*small_model, settings=s)
    assert _store_file(s, "model.ubj").is_relative_to(tmp_path)
    return s


def test_load_verifies_and_predicts(trained_home):
    b = trained_home.bundle
    ref = b.reference.head(200)
    assert set(b.manifest["files"]) == {"model.ubj", "extra_files/feature_spec.json", "extra_files/reference.parquet",
                                        "extra_files/versions.json", "extra_files/data_contract.json"}
    for rel, h in b.manifest["files"].items():
        assert sha256_file(b.path/rel) == h
    p = b.predict_frame(ref)
    assert p.shape == (200,) and ((p > 0) & (p < 1)).all()


@pytest.mark.parametrize("rel", ["model.ubj", "extra_files/feature_spec.json", "extra_files/reference.parquet"])
def test_tampered_artifact_is_refused(own_home, rel):
    f = _store_file(own_home, rel)
    data = bytearray(f.read_bytes()); data[len(data) // 2] ^= 0x01      # flip one bit
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{rel} has SHA-256 .* expected"):
        load_model(own_home, "champion")


def test_truncated_artifact_is_refused(own_home):
    f = _store_file(own_home, "model.ubj")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(IntegrityError, match=r"model.ubj has SHA-256 .*\(100 bytes\)"):
        load_model(own_home, "champion")


def test_tampered_manifest_is_refused(own_home):
    "Rewriting the manifest to match a changed model does not help: its hash is in the registry DB."
    import json
    from mlnb.core import write_json
    mf = _store_file(own_home, "extra_files/manifest.json")
    m = json.loads(mf.read_text()); m["files"]["model.ubj"] = "0" * 64
    write_json(mf, m)
    with pytest.raises(IntegrityError, match="manifest.json has SHA-256 .* the registry expects"):
        load_model(own_home, "champion")


def test_damaged_cache_heals_from_store(own_home):
    b = load_model(own_home, "champion")
    (b.path/"model.ubj").write_bytes(b"garbage")
    b2 = load_model(own_home, "champion")           # re-downloaded from the (intact) store and verified
    assert sha256_file(b2.path/"model.ubj") == b.manifest["files"]["model.ubj"]


def test_unknown_alias_is_a_clear_error(trained_home):
    with pytest.raises(LookupError, match="has no version or alias 'nope'"):
        load_model(trained_home.settings, "nope")


def test_version_carries_its_data_contract(trained_home):
    "The train pipeline registers the data contract of its training rows inside the hashed bundle."
    import mlflow
    from mlnb.contracts import validate
    b = trained_home.bundle
    c = b.contract
    assert c is not None and set(b.spec.names) <= set(c.features)
    s = trained_home.settings
    mv = mlflow.MlflowClient(s.mlflow_tracking_uri, s.mlflow_registry_uri).get_model_version(s.model_name, b.version)
    assert mv.tags["mlnb.contract_sha256"] == c.sha256 == trained_home.run.metrics["contract_sha256"]
    report = validate(b.reference, c, mode="score")  # the training sample satisfies its own contract
    assert not report.errors, report.errors
    broken = b.reference.drop("distance")
    assert any(f.column == "distance" for f in validate(broken, c, mode="score").errors)
