"""The Streamlit app's pages and parts. UI only: every computation is a call into ``mrcnn``."""

imports_frozen = False  # app.py froze what the imports made (gc.freeze): once per process
