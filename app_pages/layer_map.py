"""The layer map: click a layer to change its precision and watch accuracy, agreement, size and latency move."""
from __future__ import annotations

import json
import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit.errors import StreamlitAPIException

from app_pages import common, deployment, error_map, page_state
from app_pages.layer_grid import layer_grid, new_clicks
from app_pages.layer_rules import CYCLE, ClickChoice, click_tags, method_controls, method_tag
from cache import results
from service.scheduler import SCHEDULER
from engine.analysis.toggle import CYCLE as CYCLE_PRECISIONS
from engine.analysis.toggle import change_label, next_precision, set_layers
from engine.core.cpu import TARGET_NAMES, this_cpu
from engine.core.errors import EngineError
from engine.core.plan import FP32, PRECISIONS, Plan, PlanError
from engine.core.stats import SIGNIFICANCE
from engine.evaluation.evaluator import Cancelled, RunSummary
from engine.evaluation.session import Session
from engine.model.families import ALL_ROLES
from engine.runtime.latency import describe
from engine.core.vocabulary import TIMING_TOKENS, Runtime, runtime_label

CLICK_ACTIONS = {"cycle FP32 → INT8 → INT4": CYCLE, **{f"set {p.upper()}": p for p in PRECISIONS}}
state = st.session_state


def engine_session(evaluator) -> Session:
    """This browser session's incremental state: its own plan and trace, never shared. A new model or set
    starts a new history (the figures of one set say nothing of another's)."""
    session = state.get("lm_session")
    if session is None or session.evaluator is not evaluator:
        if session is not None:
            session.close()
        session = state["lm_session"] = Session(evaluator)
        page_state.restart_history(common.current_plan())
    return session


def _pick_runtime() -> None:
    page_state.change_plan(common.current_plan().on(state["lm_runtime"]))


THIS_MACHINE = "this machine"  # a name, not None: a selectbox shows None as "no choice made"


def _pick_target_cpu() -> None:
    chosen = state["lm_target_cpu"]
    page_state.change_plan(common.current_plan().for_cpu(None if chosen == THIS_MACHINE else chosen))


def runtime_selector() -> None:
    """Whose INT8 numerics the figures follow and which runtime the latency is timed on: the current
    plan's runtime option, so every later click keeps it."""
    state["lm_runtime"] = common.current_plan().runtime
    st.radio("Runtime", list(Runtime), format_func=runtime_label, horizontal=True, key="lm_runtime",
             on_change=_pick_runtime,
             help="torch: its dynamic per-token int8 activations and eager kernels. ONNX Runtime: the numerics of "
                  "the exported model (uint8 activations per tensor), timed on the exported graph itself.")
    plan = common.current_plan()
    if plan.runtime == Runtime.ONNXRUNTIME:
        here = this_cpu().value
        state["lm_target_cpu"] = plan.target_cpu or THIS_MACHINE
        st.selectbox("Target CPU", [THIS_MACHINE, *TARGET_NAMES], key="lm_target_cpu", on_change=_pick_target_cpu,
                     format_func=lambda name: f"this machine ({here})" if name == THIS_MACHINE else name,
                     help="The CPU the exported model will run on: ONNX Runtime's int8 sums are exact on VNNI and "
                          "AMX CPUs; on AVX2 (and AVX-512 without VNNI) they saturate, so a plan for those CPUs "
                          "uses 7-bit int8 weights, exact everywhere.")
        st.caption(f"ONNX Runtime int8 written for {plan.cpu.kernel}.")
        if plan.cpu.saturates != this_cpu().saturates:
            st.caption(f"This machine is {here}: the exported model's latency here runs another integer path than "
                       f"the target's, while accuracy and agreement are the target's (simulated exactly).")


# ---- the grid -----------------------------------------------------------------------------------
def grid_cells(layers, plan: Plan, effects: dict) -> tuple[list[str], list[str], list[dict]]:
    """Rows (before the blocks, each block, the head), columns (roles, numbered when a block has several
    layers of one role) and one cell per layer."""
    specs = plan.specs([layer.name for layer in layers], strict=False)
    blocks = sorted({layer.block for layer in layers if layer.block is not None})
    shared = max((layer.shared for layer in layers), default=1)
    block_row = (lambda b: f"blocks 0-{shared - 1} (shared)") if shared > 1 else (lambda b: f"block {b}")
    cells, seen = [], {}
    for layer in layers:
        row = "input" if layer.role in ("embedding", "embedding-proj") else \
            "head" if layer.block is None else block_row(layer.block)
        seen[(row, layer.role)] = seen.get((row, layer.role), 0) + 1
        column = layer.role if seen[(row, layer.role)] == 1 else f"{layer.role}·{seen[(row, layer.role)]}"
        spec = specs[layer.name]
        precision = spec.precision
        tip = (f"{layer.name}: {spec.describe()}\nrole {layer.role}, shape {tuple(layer.shape)}\n"
               f"{layer.params:,} parameters, {layer.bytes_at(precision, spec.group_size):,} bytes at "
               f"{precision.upper()}"
               + (f"\nshared by {layer.shared} blocks" if layer.shared > 1 else "")
               + f"\nlast effect: {effects.get(layer.name, 'not measured yet')}")
        cells.append({"layer": layer.name, "row": row, "col": column, "precision": precision, "tip": tip,
                      "tag": method_tag(spec),
                      "label": "" if layer.block is not None else layer.role})
    order = {role: i for i, role in enumerate(ALL_ROLES)}
    columns = sorted({cell["col"] for cell in cells}, key=lambda c: (order.get(c.split("·")[0], 99), c))
    rows = ["input"] + list(dict.fromkeys(block_row(b) for b in blocks)) + ["head"]
    return rows, columns, cells


def apply_rule(choice: ClickChoice, precision: str, targets: list[str], layer: str | None = None) -> None:
    """Set `targets` to `precision` with the chosen method and options; a rule the plan cannot take is refused
    with the reason, like any plan its runtime cannot run."""
    current = common.current_plan()
    try:
        rule = choice.rule(current, precision)
    except PlanError as error:
        state["lm_refused"] = str(error)
        return
    page_state.change_plan(set_layers(current, common.layer_names(), targets, rule), layer)


def grid_section(layers, diagnosis: dict | None = None, overlay: str = "precision") -> ClickChoice:
    """The grid and what a click sets; returns the method choice, which the bulk changes use too."""
    label = st.radio("A click", list(CLICK_ACTIONS), horizontal=True, key="click_action")
    action = CLICK_ACTIONS[label]
    plan = common.current_plan()
    choice = method_controls(action, plan)
    names = [layer.name for layer in layers]
    rows, columns, cells = grid_cells(layers, plan, page_state.layer_map_state().effects)
    if diagnosis is not None:
        error_map.annotate(cells, diagnosis, overlay)
    clicks = layer_grid("lm_grid", rows, columns, cells, common.PRECISION_COLORS, common.TEXT_ON, action,
                        state["lm_acked"], click_tags(choice, plan, action, list(CYCLE_PRECISIONS)))
    clicked, state["lm_acked"] = new_clicks(clicks, state["lm_acked"])
    for name in clicked:
        if name not in names:
            continue
        current = common.current_plan()
        precision = next_precision(current.resolve(names, strict=False)[name]) if action == CYCLE else action
        apply_rule(choice, precision, [name], name)
    if clicked:
        rerun_grid()  # redraw the grid from the server's plan, acknowledging the clicks
    return choice


def rerun_grid() -> None:
    """Rerun the grid and its results alone after a click in them; the whole page when the click arrived in a
    full run (a fragment-scoped rerun is refused there)."""
    try:
        st.rerun(scope="fragment")
    except StreamlitAPIException:
        st.rerun()


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate_pending(evaluator) -> None:
    """Evaluate every queued change in order (each incremental from the last), from the cache when seen."""
    session = engine_session(evaluator)
    lm = page_state.layer_map_state()
    box, bar = st.empty(), st.empty()
    while lm.pending:
        entry = lm.pending[0]
        plan = entry.plan
        summary = results.cached_evaluation(evaluator, plan)
        if summary is None:
            waiting = len(lm.pending)

            def show(partial, waiting=waiting) -> None:
                bar.progress(partial.done / partial.total, text=f"Evaluated {partial.done} of {partial.total}"
                             + (f" · {waiting - 1} more change(s) queued" if waiting > 1 else ""))
                box.info(f"Estimate after {partial.done} of {partial.total} sentences: accuracy "
                         f"{common.fmt_ci(partial.accuracy, partial.ci95)}, agreement with FP32 "
                         f"{partial.agreement:.1%} ({partial.elapsed_s:.2f} s)")

            def work(progress, plan=plan, model=common.model_and_tokenizer()[0]):
                result = session.update(plan, progress=progress, cancelled=progress.cancelled)
                # The history's size, measured here in the queue: torch work on a script thread would run
                # next to the following session's evaluation, and its OpenMP threads with it.
                results.size(model, plan)
                return result.summary()

            try:
                summary = common.run_job("layer-map", "Updating the figures", work, box, tag=plan.key(),
                                         show_progress=show)
            except Cancelled:
                box.warning("The update was cancelled; change a layer to start again.")
                lm.pending.clear()
                return
            except EngineError as error:
                # A plan the checks let through but the quantizer cannot build: back to the last plan evaluated.
                box.error(f"Not applied: {error}")
                bar.empty()
                lm.pending.clear()
                if lm.history:
                    common.set_current_plan(lm.history[-1].plan)
                return
            results.store_evaluation(evaluator, plan, summary)
        record(plan, summary, entry.layer)
        lm.pending.pop(0)
    box.empty()
    bar.empty()


def record(plan: Plan, summary: RunSummary, layer: str | None) -> None:
    """Add the plan to the history and note the effect of the clicked layer."""
    lm = page_state.layer_map_state()
    history = lm.history
    previous = history[-1] if history else None
    if previous is None or previous.key != plan.key():
        model, _ = common.model_and_tokenizer()
        changed = change_label(previous.plan if previous else None, plan, common.layer_names())
        history.append(page_state.Tried(key=plan.key(), plan=plan, label=f"#{len(history) + 1}",
                                        accuracy=summary.accuracy, low=summary.ci95[0], high=summary.ci95[1],
                                        size_mb=results.size(model, plan) / 1e6, flips=summary.flips,
                                        kl=summary.kl, changed=changed))
    if layer and previous is not None:
        lm.effects[layer] = (f"{(summary.accuracy - previous.accuracy) * 100:+.2f} pts accuracy, "
                             f"KL {common.plain(summary.kl)}")


# ---- figures ------------------------------------------------------------------------------------
def results_section(evaluator, plan: Plan) -> None:
    summary = results.cached_evaluation(evaluator, plan)
    if summary is None:
        return
    model, _ = common.model_and_tokenizer()
    baseline = evaluator.baseline.comparison
    history = page_state.layer_map_state().history
    previous = history[-2] if len(history) > 1 and history[-1].key == plan.key() else None
    size, fp32_size = results.size(model, plan), results.size(model, FP32)
    accuracy, low, high = summary.accuracy, *summary.ci95
    columns = st.columns(4)
    # FP32's accuracy inside the plan's interval: no change this set can show, so no colour and no arrow.
    within = low <= baseline.accuracy <= high
    columns[0].metric(f"Accuracy (n = {summary.n:,})", f"{accuracy:.1%}",
                      f"{(accuracy - baseline.accuracy) * 100:+.2f} pts vs FP32",
                      delta_color="off" if within else "normal", delta_arrow="off" if within else "auto",
                      help="95% Wilson interval below")
    columns[0].caption(f"95% CI [{low:.1%}, {high:.1%}]"
                       + (f" · {(accuracy - previous.accuracy) * 100:+.2f} pts vs {previous.label}"
                          if previous else ""))
    columns[1].metric("Agreement with FP32", f"{summary.agreement:.1%}", f"{summary.flips} flips",
                      delta_color="off", help=f"McNemar p = {summary.mcnemar_p:.3g} against FP32")
    columns[2].metric("Mean KL from FP32", common.plain(summary.kl),
                      f"{common.plain(summary.kl - previous.kl, sign=True)} vs {previous.label}"
                      if previous else None,
                      delta_color="inverse")
    columns[3].metric("Size (real format)", f"{size / 1e6:.1f} MB", f"{size / fp32_size:.0%} of FP32",
                      delta_color="off")
    if summary.mcnemar_p >= SIGNIFICANCE:
        st.caption(f"The accuracy change against FP32 is not significant (McNemar p = {summary.mcnemar_p:.2f}).")
    flips_view(evaluator, summary)


def flips_view(evaluator, summary: dict) -> None:
    if not summary.flipped:
        return
    data = evaluator.dataset
    classes = evaluator.classes
    fp32 = evaluator.baseline.probs
    with st.expander(f"The {summary.flips} sentences whose prediction flipped against FP32"):
        rows = [{"text": data.texts[i], "label": classes.display(int(evaluator.labels[i])),
                 "FP32": f"{classes.display(int(fp32[i].argmax()))} ({fp32[i].max():.2f})",
                 "plan": f"{classes.display(summary.predicted[i])} ({summary.confidence[i]:.2f})"}
                for i in summary.flipped]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def latency_section(plan: Plan) -> None:
    """Real-kernel latency of the plan and of FP32, timed interleaved in one run; a cached figure says when
    and under what load it was taken."""
    model, tokenizer = common.model_and_tokenizer()
    data = common.dataset()  # read here: session state is this thread's, not the worker's
    where = "the exported graph on ONNX Runtime" if plan.runtime == Runtime.ONNXRUNTIME else Runtime.TORCH.label
    st.markdown(f"**Latency on real kernels** ({where}, this CPU, {TIMING_TOKENS}-token inputs; the plan and torch "
                "FP32 timed interleaved in one run)")
    # Each figure names its plan: after fast clicks the grid already shows later changes than the plan timed.
    entry = next((h for h in page_state.layer_map_state().history if h.key == plan.key()), None)
    plan_name = f"plan {entry.label} ({entry.changed})" if entry else "this plan"
    columns = st.columns(2)
    for column, batch in zip(columns, (1, 32)):
        measured = results.cached_latency(model, plan, FP32, batch, TIMING_TOKENS)
        fresh = column.button(f"Measure batch {batch} {'again' if measured else 'now'}", key=f"lm_measure_{batch}")
        # On torch batch 1 is timed after every change, when nothing else runs: a timing taken next to other
        # sessions' evaluations would mislead, and would hold their clicks back. An ONNX Runtime timing exports
        # the plan first, so it waits to be asked for.
        busy = SCHEDULER.load()
        quiet = busy.idle
        if (measured is None and batch == 1 and plan.runtime == Runtime.TORCH and quiet) or fresh:
            try:
                measured = common.run_job("latency", f"Timing batch {batch}", lambda job, batch=batch: results.latency(
                    model, tokenizer, plan, FP32, batch, TIMING_TOKENS, fresh=True, data=data,
                    cancelled=job.cancelled), column.empty())
            except Cancelled:
                column.caption(f"Batch {batch}: the timing gave way to another session's evaluation; measure it "
                               "when the server is quiet.")
                continue
            except EngineError as error:
                column.error(f"Cannot time this plan: {error}")
                continue
        if measured is None:
            column.caption(f"Batch {batch}: not measured yet (about 10 s"
                           + (", after exporting the plan)." if plan.runtime == Runtime.ONNXRUNTIME else ")")
                           + ("" if quiet or batch > 1 else "; not timed while other sessions' work runs."))
            continue
        age = time.time() - measured["measured_at"]
        when = "just now" if age < 60 else f"{age / 60:.0f} min ago" if age < 3600 else f"{age / 3600:.1f} h ago"
        clock = time.strftime("%H:%M:%S", time.localtime(measured["measured_at"]))
        low, high = measured["speedup_ci95"]
        column.metric(f"Batch {batch}, p50", f"{measured['latency_ms_p50']:.1f} ms",
                      f"{measured['speedup']:.2f}x FP32 [{low:.2f}, {high:.2f}]", delta_color="off",
                      help=f"FP32 {measured['reference_latency_ms_p50']:.1f} ms in the same run; p95 "
                           f"{measured['latency_ms_p95']:.1f} ms over {measured['repeats']} rounds")
        column.caption(f"For {plan_name}, measured at {clock} ({when}) on {describe(measured['machine'])} (load then "
                       f"{measured['load_average'][0]}–{measured['load_average'][1]}).")


# ---- controls and history -----------------------------------------------------------------------
def bulk_controls(layers, choice: ClickChoice) -> None:
    """Bulk changes set the chosen precision with the method chosen beside the grid."""
    names = [layer.name for layer in layers]
    with st.expander("Bulk changes, undo, reset, import and export", expanded=False):
        c1, c2, c3 = st.columns(3)
        precision = c1.selectbox("Precision", PRECISIONS, index=3, key="bulk_precision")
        blocks = sorted({layer.block for layer in layers if layer.block is not None})
        block = c2.selectbox("Block", ["—"] + [str(b) for b in blocks], key="bulk_block")
        roles = list(dict.fromkeys(layer.role for layer in layers))
        role = c3.selectbox("Role", ["—"] + roles, key="bulk_role")
        b1, b2, b3, b4, b5 = st.columns(5)
        current = common.current_plan()
        if b1.button("Apply to block", disabled=block == "—", width="stretch"):
            apply_rule(choice, precision, [l.name for l in layers if str(l.block) == block])
            st.rerun()
        if b2.button("Apply to role", disabled=role == "—", width="stretch"):
            apply_rule(choice, precision, [l.name for l in layers if l.role == role])
            st.rerun()
        if b3.button("Apply to everything", width="stretch"):
            apply_rule(choice, precision, names)
            st.rerun()
        if b4.button("Undo", disabled=not page_state.layer_map_state().undo, width="stretch"):
            page_state.undo()
            st.rerun()
        if b5.button("Reset to FP32", width="stretch"):
            page_state.change_plan(FP32)
            st.rerun()
        d1, d2 = st.columns(2)
        d1.download_button("Download plan (JSON)", json.dumps(current.to_json(), indent=2), "plan.json",
                           "application/json", width="stretch")
        upload = d2.file_uploader("Upload a plan (JSON)", type=["json"], key="plan_upload")
        if upload is not None and state.get("plan_upload_seen") != upload.file_id:
            state["plan_upload_seen"] = upload.file_id
            try:
                uploaded = Plan.from_json(json.loads(upload.getvalue().decode("utf-8")))
                uploaded.resolve(names)
                page_state.change_plan(uploaded)
                st.rerun()
            except (PlanError, ValueError) as error:
                st.error(f"That plan cannot be used: {error}")


def history_section() -> None:
    history = page_state.layer_map_state().history
    if len(history) < 2:
        return
    st.subheader(f"{len(history)} plans tried in this session")
    frame = pd.DataFrame([h.row() for h in history])
    # Plans of the same size and accuracy share one point: one label naming them all, not labels printed on top
    # of each other.
    spot = list(zip(frame["size_mb"].round(2), frame["accuracy"].round(4)))
    together = {where: ", ".join(frame["label"][i] for i in range(len(spot)) if spot[i] == where) for where in spot}
    text = [together[where] if spot.index(where) == i else "" for i, where in enumerate(spot)]
    figure = go.Figure(go.Scatter(
        x=frame["size_mb"], y=frame["accuracy"], mode="markers+text", text=text, textposition="top center",
        customdata=frame["changed"], hovertemplate="%{customdata}<br>%{x:.1f} MB, %{y:.1%}<extra></extra>",
        error_y=dict(type="data", symmetric=False, array=frame["high"] - frame["accuracy"],
                     arrayminus=frame["accuracy"] - frame["low"])))
    figure.update_layout(height=320, xaxis_title="size (MB, real format)", yaxis_title="accuracy (95% CI)",
                         yaxis_tickformat=".1%", margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(figure, width="stretch", key=f"lm_history_{len(history)}")
    frame["kl"] = frame["kl"].map(common.plain)
    st.dataframe(frame, hide_index=True, width="stretch",
                 column_config={"accuracy": st.column_config.NumberColumn(format="percent"),
                                "low": None, "high": None, "kl": "mean KL",
                                "size_mb": st.column_config.NumberColumn("size (MB)", format="%.1f")})
    choice = st.selectbox("Restore a plan", [h.label for h in history], index=len(history) - 1)
    if st.button("Restore"):
        page_state.change_plan(next(h.plan for h in history if h.label == choice))
        st.rerun()


# ---- the page -----------------------------------------------------------------------------------
common.plan_note()
st.caption("Each cell is one layer. Click a cell to change its precision; every click is evaluated, from the "
           "first layer that changed, with a running estimate while the rest of the set is evaluated.")
evaluator = common.safe_evaluator()
if evaluator is None:
    st.stop()
page_state.layer_map_state()
state.setdefault("lm_acked", (None, 0))
engine_session(evaluator)
st.caption(f"Evaluated on {evaluator.dataset.name} ({len(evaluator.labels):,} sentences) with "
           f"{common.model_name()}.")
runtime_selector()


@st.fragment
def grid_to_results(evaluator) -> None:
    """The grid, the evaluation of its clicks, their figures, the history and the bulk controls (undo among
    them): a click reruns this part alone. The latency and the export below follow on the page's next full run
    (a button of theirs is one): the latency names the plan it was timed for."""
    if state.get("lm_refused"):  # a change refused here or by the runtime choice above
        st.error(f"Not applied: {state.pop('lm_refused')}")
    overlay = error_map.overlay_choice()
    diagnosis = error_map.diagnosis_for(common.current_plan(), evaluator) if overlay != "precision" else None
    choice = grid_section(evaluator.layers, diagnosis, overlay)
    evaluate_pending(evaluator)
    plan = common.current_plan()
    if diagnosis is not None:
        st.plotly_chart(error_map.depth_chart(diagnosis), width="stretch", key="lm_depth")
    with st.expander("Current plan (JSON)"):
        st.code(json.dumps(plan.to_json(), indent=2) if plan.rules else '"fp32"', language="json")
    results_section(evaluator, plan)
    history_section()
    bulk_controls(evaluator.layers, choice)


grid_to_results(evaluator)
plan = common.current_plan()
latency_section(plan)
st.markdown("**Deploy this plan**")
deployment.export_button(plan, "layer-map plan", "layer_map")
