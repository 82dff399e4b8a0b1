"""Quantization lens: see what quantization does to a transformer classifier.

Entry point: `streamlit run dashboard.py`. Navigation, the sidebar's pickers, and the pages.
"""
from pathlib import Path

import streamlit as st

st.set_page_config(page_title="Quantization lens", page_icon="🔬", layout="wide")

from app_pages.common import sidebar  # noqa: E402  (set_page_config must come first)
from app_pages.upload_fix import keep_upload_answers  # noqa: E402
from engine.runtime.memory import release_freed_memory  # noqa: E402
from engine.runtime.threads import single_core_here  # noqa: E402

release_freed_memory()  # one server, many sessions' evaluations: freed activations must not stay resident
single_core_here()  # this session's script thread: the evaluations' cores belong to the queue's worker
keep_upload_answers()

ROOT = Path(__file__).resolve().parent
PAGES = [
    ("app_pages/home.py", "Home", "🏠"),
    ("app_pages/layer_map.py", "Layer map", "🧩"),
    ("app_pages/compare.py", "Precision comparison", "⚖️"),
    ("app_pages/robustness.py", "Typo playground", "⌨️"),
    ("app_pages/smoothquant.py", "SmoothQuant", "🌊"),
    ("app_pages/sensitivity.py", "Sensitivity & search", "🎯"),
]

navigation = st.navigation([st.Page(str(ROOT / path), title=title, icon=icon, default=(path == PAGES[0][0]))
                            for path, title, icon in PAGES])
sidebar()
navigation.run()
