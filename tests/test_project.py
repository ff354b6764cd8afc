"""Project conventions that keep notebooks the source: pipelines are parametrised and stored without outputs."""
import configparser, dataclasses, json, re
from pathlib import Path
import pytest
from conftest import ROOT
from mlnb.pipeline import pipeline_parameters

PIPELINES = sorted((ROOT/"nbs"/"pipelines").glob("*.ipynb"))


def test_every_pipeline_the_code_runs_exists():
    "Each `run_pipeline(\"NAME\", ...)` in mlnb's modules names a notebook in nbs/pipelines (checked below)."
    src = "\n".join(p.read_text() for p in (ROOT/"mlnb").rglob("*.py"))
    used = set(re.findall(r'run_pipeline\(\s*"(\w+)"', src))
    assert {"train", "evaluate", "deploy"} <= used, used
    assert used <= {p.stem for p in PIPELINES}, used - {p.stem for p in PIPELINES}


@pytest.mark.parametrize("nb", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_is_parametrised_and_clean(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells) == 1
    assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"), \
        f"{nb} has stored outputs: run `make clean-pipelines`"
    params = pipeline_parameters(nb)        # every parameter line parses (papermill drops lines it cannot)
    assert all(p["help"] for p in params.values()), "document each parameter with a comment"


def test_settings_ini_matches_settings_fields():
    "settings.ini documents every `Settings` field (and nothing else); it loads with each field's type."
    from mlnb.core import load_settings, Settings
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(ROOT/"settings.ini")
    fields = {f.name: f for f in dataclasses.fields(Settings) if f.name != "root"}
    assert set(cp["mlnb"]) == set(fields), set(cp["mlnb"]) ^ set(fields)
    s = load_settings(ROOT/"settings.ini", env={})
    for name, f in fields.items():
        assert type(getattr(s, name)).__name__ in (f.type, "PosixPath" if f.type == "Path" else f.type), name
    # this repository is the flights demo project; the code's own defaults know nothing of flights
    assert s.home == ROOT/".mlnb" and (s.model_name, s.experiment) == ("flight-delay", "mlnb-flights")
    assert s.feature_modules == "mlnb.examples.flights"
    assert (Settings().model_name, Settings().experiment, Settings().train_months, Settings().feature_modules) == ("model", "mlnb", "", "")
