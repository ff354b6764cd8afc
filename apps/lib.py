"""Small UI helpers shared by the app's pages: settings, the model selector, cached calls into `mlnb.dashboard`,
empty states and the admin form. Every number a page shows is computed by `mlnb.dashboard`."""
from __future__ import annotations
import json

import polars as pl
import streamlit as st
from mlnb import dashboard as db
from mlnb.core import Settings, load_settings

TTL = 30                    # seconds a cached result is reused; heavy work is done by the monitoring runs
STATUS_COLORS = {"ok": "#2e7d32", "warn": "#f9a825", "alert": "#c62828", "drift": "#c62828",
                 "insufficient data": "#9e9e9e", "n/a": "#9e9e9e"}


def settings() -> Settings:
    "The project's settings (re-read on every run: cheap, and env changes are picked up)."
    return load_settings()


def _key(s: Settings) -> str: return json.dumps(s.to_dict(), default=str, sort_keys=True)


@st.cache_data(ttl=TTL, show_spinner=False, max_entries=512)
def _cached(fn: str, key: str, _s: Settings, args: tuple, kw: tuple):
    return getattr(db, fn)(_s, *args, **dict(kw))


def load(fn: str, *args, **kw):
    "`mlnb.dashboard.<fn>(settings, *args, **kw)`, cached for `TTL` seconds per project and arguments."
    s = settings()
    return _cached(fn, _key(s), s, args, tuple(sorted(kw.items())))


def model() -> str:
    "The model the pages show (the sidebar selector when the project has several)."
    return st.session_state.get("model") or settings().model_name


def empty(x, stop: bool = False) -> bool:
    "Show `x`'s empty state (an `mlnb.dashboard.Empty`) and return True; False when `x` holds data."
    if not db.is_empty(x): return False
    st.info(x.message)
    if stop: st.stop()
    return True


def status_style(df: pl.DataFrame, column: str = "status"):
    "A pandas Styler colouring rows by `column` (failures and alerts red, warnings amber)."
    bg = {"failure": "#f8d0cc", "alert": "#f8d0cc", "firing": "#f8d0cc", "drift": "#f8d0cc", "warn": "#fdf0c4",
          "failed": "#f8d0cc"}
    pdf = df.to_pandas()
    return pdf.style.apply(lambda r: [f"background-color: {bg.get(str(r[column]), '')}"] * len(r), axis=1)


def fmt_metric(v) -> str:
    "A metric for display: counts without decimals, scores with four."
    if v is None: return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)): return str(v)
    return f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 2 else f"{v:,.4f}"


def admin_form(action: str, name: str, label: str, experiment: str | None = None) -> None:
    """A production-changing `action` behind the admin token and a typed confirmation (audited by
    `mlnb.dashboard.admin_action`, like its command-line twin)."""
    s = settings()
    with st.expander(f":material/lock: {label}"):
        if not s.admin_token:
            st.caption("Admin actions are disabled: set `admin_token` (`MLNB_ADMIN_TOKEN`) to enable them.")
            return
        confirm_as = db.confirmation_text(action, name)
        with st.form(f"admin-{action}-{experiment or ''}"):
            token = st.text_input("Admin token", type="password")
            confirm = st.text_input(f"Type `{confirm_as}` to confirm")
            reason = st.text_input("Reason (recorded in the audit trail)")
            ticket = st.text_input("Change ticket (where the environment requires one)")
            if st.form_submit_button(label, type="primary"):
                try:
                    out = db.admin_action(s, name, action, token, confirm, reason, ticket, experiment=experiment)
                except (PermissionError, ValueError, LookupError, RuntimeError) as e:
                    st.error(f"{label} refused: {e}")
                else:
                    st.success(out.get("message") or f"{label}: done")
                    st.cache_data.clear()
