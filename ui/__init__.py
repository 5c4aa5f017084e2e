"""The Streamlit app's pages and parts. UI only: every computation is a call into ``mrcnn``."""
