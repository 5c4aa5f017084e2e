"""Mask R-CNN Explorer — the Streamlit entry point: page config, the shared sidebar, navigation.

    streamlit run app.py

Each page is a file in ui/ (UI only; the work is done by ``mrcnn``) with a ``render()`` that draws it:
title, a one-line caption, the sidebar's model, then the page's sections. ``st.navigation`` runs the file as
a script, which calls ``render()``. To add a page, add an entry to PAGES. Session state is initialised in
ui/state.py; every page has its own link (/detect, /inspect, …).
"""
import gc

import streamlit as st

import ui
from ui import run_owner, share, sidebar, state

# Streamlit runs gc.collect(2) after every run (a slider press included). With torch, torchvision and plotly
# loaded that walks ~400k objects made at import, ~200 ms holding the GIL, so the page's last messages wait.
# Frozen once, those objects are left out of every collection; what the runs make is still collected. Once is
# a flag, not gc.get_freeze_count(): that walks every frozen object, ~40 ms of every run of this script (a
# page switch, a control outside Detect's results; a fragment's rerun does not run it).
if not ui.imports_frozen:
    gc.freeze()
    ui.imports_frozen = True

st.set_page_config(page_title="Mask R-CNN Explorer", page_icon=":material/category:", layout="wide")
if problem := state.server_settings_problem():
    st.error(f"The server is misconfigured: {problem}", icon=":material/settings:")
    st.stop()
state.init()
share.restore()  # a shared link's view, before any widget is drawn and before / switches to Detect
run_owner.token()  # on every page: a page link drops it from the address, and a reload must find it there

DETECT = st.Page("ui/detect.py", title="Detect", icon=":material/center_focus_strong:", url_path="detect")
PAGES = [
    DETECT,
    st.Page("ui/inspect.py", title="Inspect", icon=":material/account_tree:", url_path="inspect"),
    st.Page("ui/finetune.py", title="Fine-tune", icon=":material/model_training:", url_path="finetune"),
    st.Page("ui/evaluate.py", title="Evaluate", icon=":material/analytics:", url_path="evaluate"),
]


def open_detect() -> None:
    st.switch_page(DETECT)


# Streamlit serves its default page at `/` only: a page marked default would answer "Page not found" at
# its own link. So `/` is a hidden page that opens Detect, and every page keeps its link (/detect …).
page = st.navigation([st.Page(open_detect, url_path="start", default=True, visibility="hidden"), *PAGES])
sidebar.render()
if page.url_path:  # not the start page (at ""), which only switches to Detect: the warning goes there
    share.show_problems()
page.run()
