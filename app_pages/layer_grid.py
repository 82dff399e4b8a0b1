"""The layer map's grid: one cell per layer, a click cycles its precision (or sets one, with a method), and no
click is ever lost.

A custom component (Streamlit components v2: inline HTML and JS, no build step). Every click is
appended to a log that the browser sends whole as the component's state, numbered within a page
load (its epoch), so reruns that Streamlit coalesces still carry every click; the page applies the
clicks it has not seen yet, in order. The browser also shows each click at once (the cell takes
its next precision, and the method the click sets) until the server's plan catches up. A cell names its method
when it is not round-to-nearest ("INT4·GPTQ"); the columns are as wide as the longest such label, never cut.
"""
from __future__ import annotations

import streamlit as st

_CSS = """
.frame { overflow-x: auto; padding: 2px; }
.grid { display: grid; gap: 4px; font-family: var(--st-font); font-size: 12px; min-width: min-content; }
.head { font-weight: 600; text-align: center; align-self: end; padding: 2px; color: var(--st-text-color);
        overflow-wrap: anywhere; }
.row { font-weight: 600; align-self: center; text-align: right; padding-right: 6px; color: var(--st-text-color); }
.cell { border: 1px solid #555; border-radius: 4px; min-height: 34px; display: flex; flex-direction: column;
        align-items: center; justify-content: center; cursor: pointer; user-select: none; text-align: center;
        line-height: 1.15; padding: 2px; overflow-wrap: anywhere; }
.cell b { white-space: nowrap; }
.cell:hover { outline: 2px solid var(--st-primary-color); }
.cell.pending { outline: 2px dashed var(--st-primary-color); }
.empty { min-height: 34px; }
"""

_JS = """
const epoch = Math.random().toString(36).slice(2);
const logs = new Map();

export default function(component) {
  const { data, parentElement, setStateValue } = component;
  const name = data.instance;
  if (!logs.has(name)) logs.set(name, []);
  const log = logs.get(name);
  const pending = log.filter(c => c.seq > (data.acked_epoch === epoch ? data.acked : 0));
  const shown = {};
  for (const cell of data.cells) shown[cell.layer] = cell.precision;
  for (const click of pending) shown[click.layer] = nextPrecision(shown[click.layer], data.action);
  // a cell the person has clicked shows what the click sets; the others, their plan's own method
  const tagOf = (cell, precision) => pending.some(c => c.layer === cell.layer) ? (data.tags[precision] || "")
                                                                                : cell.tag || "";
  const text = (precision, tag) => precision.toUpperCase() + (tag ? `\u00b7${tag}` : "");
  // about 7 px a character of the 12 px bold label (measured: "INT4·GPTQ+BC" is 78 px), and the padding
  const longest = Math.max(4, ...data.cells.map(c => text(c.precision, c.tag).length),
                           ...Object.entries(data.tags).map(([p, t]) => text(p, t).length));
  const width = Math.max(64, 7 * longest + 12);

  const grid = document.createElement("div");
  grid.className = "grid";
  grid.style.gridTemplateColumns = `max-content repeat(${data.columns.length}, minmax(${width}px, 1fr))`;
  grid.appendChild(div("", "head"));
  for (const column of data.columns) grid.appendChild(div(column, "head"));
  for (const row of data.rows) {
    grid.appendChild(div(row, "row"));
    for (const column of data.columns) {
      const cell = data.cells.find(c => c.row === row && c.col === column);
      if (!cell) { grid.appendChild(div("", "empty")); continue; }
      const precision = shown[cell.layer];
      // an overlay (the error map) shades the cell and adds a note under the precision until the next click
      const shaded = cell.shade && precision === cell.precision;
      const note = shaded && cell.note ? `<small>${cell.note}</small>` : "";
      const label = text(precision, tagOf(cell, precision));
      const box = div(`${cell.label ? `<span>${cell.label}</span>` : ""}<b>${label}</b>${note}`, "cell");
      box.style.background = shaded ? cell.shade : data.colors[precision];
      box.style.color = shaded ? cell.shade_text : data.text[precision];
      box.title = cell.tip;
      box.dataset.layer = cell.layer;
      if (pending.some(c => c.layer === cell.layer)) box.classList.add("pending");
      box.onclick = () => {
        log.push({ seq: log.length + 1, layer: cell.layer });
        setStateValue("clicks", { epoch, log: log.slice(-200), total: log.length });
        box.classList.add("pending");
        const next = nextPrecision(shown[cell.layer], data.action);
        shown[cell.layer] = next;
        box.style.background = data.colors[next];
        box.style.color = data.text[next];
        box.querySelector("b").textContent = text(next, data.tags[next] || "");
      };
      grid.appendChild(box);
    }
  }
  // parentElement is the shadow root, which also holds the element Streamlit mounted with this
  // component's CSS: replacing the root's children would remove the stylesheet, so the grid is
  // redrawn inside a frame of its own.
  let frame = parentElement.querySelector(".frame");
  if (!frame) {
    frame = div("", "frame");
    parentElement.appendChild(frame);
  }
  frame.replaceChildren(grid);

  function div(html, className) {
    const element = document.createElement("div");
    element.className = className;
    element.innerHTML = html;
    return element;
  }
  function nextPrecision(current, action) {
    if (action !== "cycle") return action;
    const cycle = ["fp32", "int8", "int4"];
    const index = cycle.indexOf(current);
    return index < 0 ? "fp32" : cycle[(index + 1) % cycle.length];
  }
}
"""

_GRID = st.components.v2.component("quantization_lens.layer_grid", css=_CSS, js=_JS)


def layer_grid(key: str, rows: list[str], columns: list[str], cells: list[dict], colors: dict, text: dict,
               action: str, acked: tuple[str | None, int], tags: dict[str, str] | None = None) -> dict | None:
    """Mount the grid; returns the click log {"epoch", "log": [{"seq", "layer"}], "total"} or None.

    `cells`: {"layer", "row", "col", "label", "precision", "tag", "tip"} ("tag": the method's word, "" for
    round-to-nearest), and for an overlay "shade", "shade_text" (CSS
    colours) and "note" (a short line under the precision); `action`: "cycle" or a precision;
    `acked`: (epoch, seq) of the last click the page has applied; `tags`: the tag a click gives each precision it
    sets (the chosen method where that precision takes it).
    """
    result = _GRID(key=key, data={"instance": key, "rows": rows, "columns": columns, "cells": cells, "colors": colors,
                                  "text": text, "action": action, "acked_epoch": acked[0], "acked": acked[1],
                                  "tags": tags or {}},
                   default={"clicks": None}, on_clicks_change=lambda: None)
    return getattr(result, "clicks", None)


def new_clicks(clicks: dict | None, acked: tuple[str | None, int]) -> tuple[list[str], tuple[str | None, int]]:
    """The layers clicked since `acked`, in click order, and the new acknowledgement."""
    if not clicks:
        return [], acked
    epoch, seen = clicks["epoch"], acked[1] if acked[0] == clicks["epoch"] else 0
    fresh = [click["layer"] for click in clicks["log"] if click["seq"] > seen]
    return fresh, (epoch, clicks["total"])
