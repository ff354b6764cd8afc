"""Small UI helpers shared by the app's pages: settings, cached loaders, colours. Computation lives in mlnb."""
from __future__ import annotations
from pathlib import Path

import polars as pl
import streamlit as st
from mlnb.core import Settings, load_settings

STATUS_COLORS = {"ok": "#2e7d32", "warn": "#f9a825", "drift": "#c62828"}


def settings() -> Settings:
    "The project's settings (re-read on every run: cheap, and env changes are picked up)."
    return load_settings()


def _has_registry(s: Settings) -> bool:
    "False when the default embedded registry (SQLite under home) was never created: no model can exist."
    uri = s.mlflow_tracking_uri
    if s.tracking_uri or not uri.startswith("sqlite:///"): return True
    return Path(uri[len("sqlite:///"):]).exists()


@st.cache_data(ttl=10, show_spinner=False)
def champion_version(_s: Settings, home: str, tracking_uri: str, model_name: str) -> str | None:
    "The version the `champion` alias points to (re-checked every 10 s), or None."
    if not _has_registry(_s): return None
    from mlnb.registry import ModelRegistry
    return ModelRegistry(_s, model_name).current_version("champion")


@st.cache_resource(show_spinner="Loading the champion model...", max_entries=4)
def load_bundle(_s: Settings, home: str, model_name: str, version: str):
    "The verified model bundle of `version` (one shared object per version; never mutate it)."
    from mlnb.registry import load_model
    return load_model(_s, version, name=model_name)


@st.cache_data(show_spinner="Computing SHAP importance...", max_entries=8)
def shap_importance(_bundle, home: str, model_name: str, version: str) -> pl.DataFrame:
    from mlnb.explain import global_importance
    return global_importance(_bundle)


@st.cache_data(ttl=60, show_spinner=False)
def run_metrics(tracking_uri: str, run_id: str) -> dict:
    "The MLflow run's logged metrics."
    from mlflow import MlflowClient
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.metrics)


def spec_table(spec) -> pl.DataFrame:
    "The feature contract as a table."
    return pl.DataFrame([{"feature": f.name, "kind": "categorical" if f.kind == "cat" else "numeric",
                          "nullable": f.nullable, "n_categories": len(f.categories) if f.kind == "cat" else None,
                          "categories": ", ".join(f.categories[:12]) + (" ..." if len(f.categories) > 12 else ""),
                          "min": f.min, "max": f.max} for f in spec.features],
                        schema={"feature": pl.String, "kind": pl.String, "nullable": pl.Boolean,
                                "n_categories": pl.Int64, "categories": pl.String, "min": pl.Float64, "max": pl.Float64})


def fmt_metric(v) -> str:
    "A metric for display: counts without decimals, scores with four."
    if isinstance(v, bool) or not isinstance(v, (int, float)): return str(v)
    return f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 2 else f"{v:,.4f}"
