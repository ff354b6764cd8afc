"""Registry: versions, aliases and alias history (which version served when), gate decisions with their intervals,
lineage, model cards, the diff of two versions; promote and rollback behind the admin token."""
import plotly.express as px
import polars as pl
import streamlit as st
import lib

name = lib.model()
st.title("Registry")
versions = lib.load("versions_frame", name)
lib.empty(versions, stop=True)
st.subheader("Versions and aliases")
st.dataframe(versions, hide_index=True, width="stretch")

st.subheader("Alias history")
hist = lib.load("alias_history", name)
if not lib.empty(hist):
    periods = lib.db.served_periods(hist)
    fig = px.timeline(periods.with_columns(version="v" + pl.col("version")).to_pandas(), x_start="start", x_end="end",
                      y="version", color="version", height=max(200, 40 * periods["version"].n_unique() + 80))
    fig.update_layout(margin=dict(l=10, r=10, t=10, b=10), showlegend=False, xaxis_title="champion (serving) from - to")
    st.plotly_chart(fig, width="stretch")
    st.dataframe(hist.sort("timestamp", descending=True), hide_index=True, width="stretch")

st.subheader("Release-gate decisions")
gates = lib.load("gate_decisions", name)
if not lib.empty(gates):
    st.dataframe(gates.to_pandas().style.apply(
        lambda r: ["background-color: #f8d0cc" if r["passed"] is False else ""] * len(r), axis=1),
        hide_index=True, width="stretch")
    st.caption("Each check's message gives the difference with its confidence interval against the champion of the day.")

st.subheader("One version")
labels = [f"v{v}" + (f" ({a})" if a else "") for v, a in versions.select("version", "aliases").iter_rows()]
i = st.selectbox("Version", range(len(labels)), format_func=lambda k: labels[k])
v = versions["version"][i]
tab_card, tab_lineage = st.tabs(["Model card", "Lineage"])
with tab_card:
    try: card = lib.load("model_card", name, v)
    except Exception as e: st.warning(f"No model card for v{v}: {e}")
    else:
        st.caption(f"source: {card['source']}")
        st.markdown(card["markdown"])
with tab_lineage:
    st.json(lib.load("lineage", name, v), expanded=1)

st.subheader("Diff of two versions")
vs = versions["version"].to_list()
c1, c2 = st.columns(2)
a = c1.selectbox("A", vs, index=min(1, len(vs) - 1), key="diff_a")
b = c2.selectbox("B", vs, index=0, key="diff_b")
diff = lib.load("registry_diff", name, a, b)
only = st.toggle("Only what changed", value=True)
for what in ("params", "metrics", "features"):
    df = diff[what].filter(pl.col("changed")) if only else diff[what]
    st.markdown(f"**{what}** ({diff[what].filter(pl.col('changed')).height} changed)")
    st.dataframe(df.rename({"a": f"v{diff['a']}", "b": f"v{diff['b']}"}), hide_index=True, width="stretch")

st.subheader("Change what serves")
lib.admin_form("promote", name, "Promote the challenger to champion")
lib.admin_form("rollback", name, "Roll back to the previous champion")
