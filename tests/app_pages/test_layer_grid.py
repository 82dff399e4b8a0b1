"""The layer map's grid: the page applies each click exactly once and in order, across reruns that carry the
whole log, a page reload (a new epoch) and a log the browser trimmed; the mounted grid hands the page the
log the browser sent."""
from __future__ import annotations

from streamlit.testing.v1 import AppTest

from app_pages.layer_grid import new_clicks


def _log(epoch: str, layers: list[str], total: int | None = None) -> dict:
    """What the browser sends: its numbered clicks (the last ones when trimmed) and how many it has made."""
    total = len(layers) if total is None else total
    first = total - len(layers) + 1
    return {"epoch": epoch, "log": [{"seq": first + i, "layer": layer} for i, layer in enumerate(layers)],
            "total": total}


def test_no_clicks_change_nothing():
    assert new_clicks(None, ("e1", 3)) == ([], ("e1", 3))
    assert new_clicks({}, (None, 0)) == ([], (None, 0))


def test_the_first_clicks_of_a_page_load_all_count_in_order():
    assert new_clicks(_log("e1", ["a", "b", "a"]), (None, 0)) == (["a", "b", "a"], ("e1", 3))


def test_a_rerun_carrying_the_whole_log_applies_only_the_new_clicks():
    fresh, acked = new_clicks(_log("e1", ["a", "b"]), (None, 0))
    fresh, acked = new_clicks(_log("e1", ["a", "b", "c", "b"]), acked)
    assert (fresh, acked) == (["c", "b"], ("e1", 4))
    assert new_clicks(_log("e1", ["a", "b", "c", "b"]), acked) == ([], ("e1", 4))  # the same log again: nothing


def test_a_reload_starts_a_new_epoch_whose_clicks_all_count():
    acked = ("e1", 5)
    assert new_clicks(_log("e2", ["x"]), acked) == (["x"], ("e2", 1))


def test_a_trimmed_log_still_gives_the_clicks_since_the_last_acknowledged():
    trimmed = _log("e1", [f"layer{i}" for i in range(200)], total=250)  # the browser keeps its last 200 clicks
    fresh, acked = new_clicks(trimmed, ("e1", 240))
    assert fresh == [f"layer{i}" for i in range(190, 200)] and acked == ("e1", 250)


def test_the_mounted_grid_returns_the_log_the_browser_sent():
    def script():
        import streamlit as st

        from app_pages.layer_grid import layer_grid

        cells = [{"layer": "l0", "row": "block 0", "col": "q", "label": "", "precision": "fp32", "tag": "", "tip": ""}]
        st.session_state["got"] = layer_grid("grid", ["block 0"], ["q"], cells, {"fp32": "#fff"}, {"fp32": "#000"},
                                             "cycle", (None, 0))

    at = AppTest.from_function(script, default_timeout=60).run()
    assert not at.exception and at.session_state["got"] is None  # nothing clicked yet
    sent = _log("e1", ["l0", "l0"])
    at.session_state["grid"] = {"clicks": sent}
    at.run()
    assert not at.exception and at.session_state["got"] == sent
