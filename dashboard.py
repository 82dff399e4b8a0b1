"""Quantization lens: see what quantization does to a transformer classifier.

Entry point: `streamlit run dashboard.py`. Navigation, the sidebar's pickers, and the pages.
"""
from pathlib import Path

import streamlit as st

st.set_page_config(page_title="Quantization lens", page_icon="🔬", layout="wide")

ROOT = Path(__file__).resolve().parent
PAGES = [  # script, navigation label, icon, the page's title
    ("app_pages/home.py", "Home", "🏠", "Quantization lens"),
    ("app_pages/layer_map.py", "Layer map", "🧩", "Layer map"),
    ("app_pages/compare.py", "Precision comparison", "⚖️", "Precision comparison"),
    ("app_pages/robustness.py", "Typo playground", "⌨️", "Typo playground"),
    ("app_pages/smoothquant.py", "SmoothQuant", "🌊", "SmoothQuant"),
    ("app_pages/sensitivity.py", "Sensitivity & search", "🎯", "Layer sensitivity and automatic mixed precision"),
]
navigation = st.navigation([st.Page(str(ROOT / path), title=label, icon=icon, default=(path == PAGES[0][0]))
                            for path, label, icon, _ in PAGES])

# The first paint: the page's title, drawn here for every page before the engine's imports (torch, transformers:
# seconds on a loaded machine, once per process) and the model load, and a status while they take more than
# half a second, so that a page is never blank.
st.title(next(title for _, label, _, title in PAGES if label == navigation.title))
with st.spinner("Loading the model…"):
    from app_pages.common import sidebar  # noqa: E402  (after the first paint)
    from app_pages.upload_fix import keep_upload_answers  # noqa: E402
    from cache import problem as cache_problem  # noqa: E402
    from engine.model.admission import serving  # noqa: E402
    from engine.runtime.memory import release_freed_memory  # noqa: E402
    from engine.runtime.threads import single_core_here  # noqa: E402

    serving(st.get_option("server.address"))  # models others may load: any on 127.0.0.1 (ENGINE_ALLOWED_MODELS)
    release_freed_memory()  # one server, many sessions' evaluations: freed activations must not stay resident
    single_core_here()  # this session's script thread: the evaluations' cores belong to the queue's worker
    keep_upload_answers()
    sidebar()
    if cache_problem():
        st.sidebar.warning(cache_problem())
navigation.run()
