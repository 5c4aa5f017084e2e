"""The secret that marks the fine-tune runs this session started (mrcnn.training.jobs.Job.owner).

A run a session started stays its own — cancelled without asking — across page switches and reloads. The
token lives in session state, which page switches keep, and in the page's address (?run_owner=…), which a
reload keeps: the reloaded page reads it back. Streamlit's page links drop the address's query, so app.py
puts the token back on every page's run, not only on Fine-tune's: a reload on Detect keeps it too. Share
links are built from their own parameters, never from the address, so they never carry it.
"""
from __future__ import annotations

import secrets

import streamlit as st

PARAM = "run_owner"  # the address's parameter that holds the token
_KEY = "ft_owner"  # its session-state key


def token(create: bool = False) -> str | None:
    """The session's token, read back from the address after a reload; made with ``create`` (on a start),
    else None before the session's first start. Puts it in the address when a page switch dropped it."""
    ss = st.session_state
    if not ss.get(_KEY) and (in_url := st.query_params.get(PARAM)):
        ss[_KEY] = in_url
    if not ss.get(_KEY) and create:
        ss[_KEY] = secrets.token_urlsafe(16)
    kept = ss.get(_KEY)
    if kept and st.query_params.get(PARAM) != kept:
        st.query_params[PARAM] = kept
    return kept


def owns(job_owner: str | None) -> bool:
    """Whether a run with ``job_owner`` (its record's token) was started by this session."""
    return bool(job_owner) and job_owner == st.session_state.get(_KEY)
