"""Project conventions that keep notebooks the source: pipelines are parametrised and stored without outputs."""
import json
from pathlib import Path
import pytest
from conftest import ROOT
from mlnb.pipeline import pipeline_parameters

PIPELINES = sorted((ROOT/"nbs"/"pipelines").glob("*.ipynb"))


def test_there_are_pipelines():
    assert [p.stem for p in PIPELINES] and "train" in [p.stem for p in PIPELINES]


@pytest.mark.parametrize("nb", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_is_parametrised_and_clean(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells) == 1
    assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"), \
        f"{nb} has stored outputs: run `make clean-pipelines`"
    params = pipeline_parameters(nb)        # every parameter line parses (papermill drops lines it cannot)
    assert all(p["help"] for p in params.values()), "document each parameter with a comment"


def test_settings_ini_matches_settings_fields():
    from mlnb.core import load_settings, Settings
    s = load_settings(ROOT/"settings.ini", env={})
    assert s.home == ROOT/".mlnb" and s.model_name == "flight-delay"
