"""Mask R-CNN Explorer — the Streamlit entry point: page config, the shared sidebar, navigation.

    streamlit run app.py

Each page is a file in ui/ (UI only; the work is done by ``mrcnn``). To add a page, add an entry to
PAGES. Session state is initialised in ui/state.py.
"""
import streamlit as st

from ui import sidebar, state

st.set_page_config(page_title="Mask R-CNN Explorer", page_icon=":material/category:", layout="wide")
state.init()

PAGES = [
    st.Page("ui/detect.py", title="Detect", icon=":material/center_focus_strong:", url_path="detect", default=True),
    st.Page("ui/inspect.py", title="Inspect", icon=":material/account_tree:", url_path="inspect"),
    st.Page("ui/finetune.py", title="Fine-tune", icon=":material/model_training:", url_path="finetune"),
    st.Page("ui/evaluate.py", title="Evaluate", icon=":material/analytics:", url_path="evaluate"),
]

page = st.navigation(PAGES)
sidebar.render()
page.run()
