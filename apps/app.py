"""mlnb monitoring app: `mlnb app` (or `streamlit run apps/app.py`). MLNB_HOME / MLNB_SETTINGS select the project."""
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
if str(_here) not in sys.path: sys.path.insert(0, str(_here))      # so pages can `import lib`

import streamlit as st
import lib

st.set_page_config(page_title="mlnb", page_icon=":material/monitoring:", layout="wide")
PAGES = [st.Page("app_pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
         st.Page("app_pages/explain.py", title="Explainability", icon=":material/insights:"),
         st.Page("app_pages/drift.py", title="Drift and data quality", icon=":material/query_stats:"),
         st.Page("app_pages/performance.py", title="Performance", icon=":material/speed:"),
         st.Page("app_pages/abtest.py", title="A/B comparison", icon=":material/compare_arrows:"),
         st.Page("app_pages/registry.py", title="Registry", icon=":material/inventory_2:"),
         st.Page("app_pages/pipelines.py", title="Pipelines and audit", icon=":material/history:")]
page = st.navigation(PAGES)
names = lib.load("model_names")
if len(names) > 1: st.sidebar.selectbox("Model", names, key="model")
else: st.session_state["model"] = names[0]
st.sidebar.caption(f"Project home: `{lib.settings().home}`")
page.run()
