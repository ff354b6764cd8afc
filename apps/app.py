"""mlnb monitoring app: `mlnb app` (or `streamlit run apps/app.py`). MLNB_HOME / MLNB_SETTINGS select the project."""
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
if str(_here) not in sys.path: sys.path.insert(0, str(_here))      # so pages can `import lib`

import streamlit as st

st.set_page_config(page_title="mlnb", page_icon=":material/monitoring:", layout="wide")
page = st.navigation([st.Page("app_pages/model.py", title="Champion model", icon=":material/model_training:", default=True),
                      st.Page("app_pages/drift.py", title="Drift", icon=":material/query_stats:")])
page.run()
