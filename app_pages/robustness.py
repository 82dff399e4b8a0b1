"""Typo playground: type a review, inject typos, and watch FP32, INT8, INT4 and the current plan answer;
word importance per precision, a flip search, and robustness curves over a whole evaluation set."""
from __future__ import annotations

import hashlib
import html

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app_pages import common
from cache import keys
from engine.analysis import attack, predict as pred
from engine.analysis.perturb import KINDS, PerturbError, highlight_html, perturb, words
from engine.analysis.predict import Prediction, WordScore
from engine.analysis.robustness_results import AttackResult, SweepResult, SweepRow
from engine.core.errors import EngineError
from engine.core.plan import Plan, PlanError
from engine.data.sets import available_sets

EXAMPLES = {
    "Mixed feelings": "A warm, funny film whose clumsy last act almost undoes all the good will it earns.",
    "Plainly positive": "An absolute delight from start to finish, with a career-best performance at its heart.",
    "Plainly negative": "Dull, overlong and badly acted; I checked my watch every ten minutes.",
    "Faint praise": "Not the worst thing I have seen this year, and the soundtrack is rather good.",
    "Already noisy": "teh moive was gr8 but the endng was terible and way 2 long",
}
COLORS = {"fp32": "#525252", "int8": common.PRECISION_COLORS["int8"], "int4": common.PRECISION_COLORS["int4"],
          "current": "#3182bd"}
CLASS_COLORS = ("#d73027", "#1a9850", "#4575b4", "#fdae61", "#8073ac", "#35978f", "#bf812d", "#878787")
SENTIMENT_COLORS = {"negative": "#d73027", "positive": "#1a9850", "neutral": "#878787"}
RATE_OPTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
LONG_TEXT_TOKENS = 128  # above this, word importance waits for a click (each word costs a forward)


def _names(plans: dict[str, Plan]) -> dict[str, str]:
    names = {"fp32": "FP32", "int8": "INT8", "int4": "INT4"}
    if "current" in plans:
        names["current"] = f"Current plan ({plans['current'].label()})"
    return names


@st.cache_data(max_entries=512, show_spinner=False)
def _predictions(model_name: str, text: str, plans: dict[str, Plan]) -> dict[str, dict]:
    model, tokenizer, _ = common.shared_model(model_name)
    answers = common.in_queue("predict", lambda: pred.predict_all(model, tokenizer, text, plans))
    return {key: p.to_json() for key, p in answers.items()}


def answers(model_name: str, text: str, plans: dict[str, Plan]) -> dict[str, Prediction]:
    """Every plan's Prediction for `text` (the cache keeps their to_json(), as it always has)."""
    return {key: Prediction.from_json(p) for key, p in _predictions(model_name, text, plans).items()}


@st.cache_data(max_entries=256, show_spinner=False)
def _occlusion(model_name: str, text: str, plan: Plan) -> list[dict]:
    model, tokenizer, _ = common.shared_model(model_name)
    scores = common.in_queue("occlusion", lambda: pred.occlusion(model, tokenizer, text, plan))
    return [s.to_json() for s in scores]


def occlusion(model_name: str, text: str, plan: Plan) -> list[WordScore]:
    """The plan's WordScores for `text` (the cache keeps their to_json(), as it always has)."""
    return [WordScore.from_json(s) for s in _occlusion(model_name, text, plan)]


def _probability_bar(prediction: Prediction) -> go.Figure:
    """Every class's probability as one stacked bar (sentiment classes in their usual colours)."""
    figure = go.Figure()
    for index, (label, p) in enumerate(prediction.probs.items()):
        color = SENTIMENT_COLORS.get(label, CLASS_COLORS[index % len(CLASS_COLORS)])
        figure.add_bar(x=[p], y=[""], orientation="h", name=label, marker_color=color,
                       text=f"{label} {p:.0%}" if p >= 0.12 else "", textposition="inside",
                       hovertemplate=f"{label}: {p:.4f}<extra></extra>")
    figure.update_layout(barmode="stack", height=70, margin=dict(l=0, r=0, t=0, b=0), showlegend=False,
                         xaxis=dict(range=[0, 1], visible=False), yaxis=dict(visible=False))
    return figure


def show_predictions(predictions: dict[str, Prediction], names: dict[str, str], section: str,
                     reference: dict[str, Prediction] | None = None) -> None:
    """One column per precision: label, confidence, probability bar; with `reference`, what changed."""
    for column, (key, p) in zip(st.columns(len(predictions)), predictions.items()):
        with column:
            changed = reference is not None and reference[key].label != p.label
            st.metric(names[key], p.label, f"was {reference[key].label}" if changed else None,
                      delta_color="inverse" if changed else "normal")
            st.caption(f"confidence {p.confidence:.1%}")
            st.plotly_chart(_probability_bar(p), width="stretch", config={"displayModeBar": False},
                            key=f"bar-{section}-{key}")
    message = pred.disagreement(predictions, names)
    if message:
        st.warning(message)


def notices(text: str, prediction: Prediction) -> None:
    """Plain words for input the model cannot really read: empty, unknown tokens only, truncated."""
    if not text.strip():
        st.info("The text is empty, so every model sees only its special tokens: the answers below "
                "are the models' default leanings, not a reading of a review. Type a review or pick an example.")
    elif prediction.truncated:
        st.info(f"This review is longer than the model can read ({prediction.note}); everything after "
                "that point was ignored by every precision.")
    elif prediction.note:
        st.info(f"Note: {prediction.note}.")


def _plans() -> dict[str, Plan]:
    plans = pred.reference_plans(common.current_plan())
    try:
        plans["current"].resolve(common.layer_names())
    except PlanError as error:
        st.warning(f"The layer map's plan does not fit this model ({error}); showing FP32, INT8 and INT4 only.")
        del plans["current"]
    return plans


def show_html(body: str) -> None:
    """Highlighted text as HTML (st.html, not markdown, so a review's * or # stays literal; line breaks kept)."""
    st.html(f'<div style="white-space:pre-wrap;line-height:1.9">{body or "&nbsp;"}</div>')


def _use_text(text: str) -> None:
    st.session_state["rob_text"] = text


def _pick_example() -> None:
    st.session_state["rob_text"] = EXAMPLES[st.session_state["rob_example"]]


# ---- flip search ----------------------------------------------------------------------------
@st.fragment
def flip_section(text: str, plans: dict[str, Plan], names: dict[str, str]) -> None:
    st.subheader("Find a flip")
    st.caption("Greedy search: rank the words by how much they support the target's answer (occlusion), then try "
               "single-character edits on the most important word first, keep the edit that most lowers the "
               "target's confidence, and stop when its answer flips or the edit budget is spent.")
    left, middle, right = st.columns([1, 1, 2])
    targets = list(plans)
    target = left.selectbox("Target precision", targets, index=targets.index("int4"), format_func=names.get,
                            key="flip_target")
    budget = middle.slider("Edit budget", 1, 10, 3, key="flip_budget")
    kinds = right.multiselect("Edit kinds", KINDS, default=list(KINDS), key="flip_kinds")
    keep_ends = left.checkbox("Keep first and last letters", key="flip_keep_ends")
    seed = middle.number_input("Seed", 0, 10_000, 0, key="flip_seed")
    if st.button("Find a flip", type="primary", disabled=not words(text) or not kinds):
        model, tokenizer = common.model_and_tokenizer()
        bar = st.progress(0.0, text="ranking words")

        def work(progress):
            return attack.flip_search(model, tokenizer, text, target, plans, budget, kinds, int(seed), keep_ends,
                                      progress=lambda f, m: progress(min(f, 1.0), m))

        key = keys.flip_search(model, text, target, budget, kinds, int(seed), keep_ends,
                               {k: p.key() for k, p in plans.items()})
        st.session_state["flip_result"] = common.cached_job(
            key, "Searching for a flip", work, kind="flip-search",
            show_progress=lambda p: bar.progress(p[0], text=p[1]))
        bar.empty()
    result = st.session_state.get("flip_result")
    if result is None or result.perturbation.text != text or set(result.after) != set(plans):
        return
    p = result.perturbation
    what = f"{len(p.edits)} edit{'s' if len(p.edits) != 1 else ''} and {result.queries} model queries"
    if result.flipped:
        st.success(f"{names[result.target]} flipped from {result.before[result.target].label} to "
                   f"{result.after[result.target].label} with {what}.")
    else:
        st.warning(f"No flip of {names[result.target]} within the budget ({what}); the closest attempt is shown.")
    show_html(highlight_html(p))
    if p.edits:
        st.dataframe([{"kind": e.kind, "position": e.position, "before": repr(e.before), "after": repr(e.after)}
                      for e in p.edits], hide_index=True, width="stretch")
    show_predictions(result.after, names, "flip", reference=result.before)
    st.button("Use this text as the review", on_click=_use_text, args=(p.perturbed,))


# ---- batch robustness -----------------------------------------------------------------------
def _band(figure: go.Figure, rows: list[SweepRow], key: str, y: str, ci: str, name: str, column: int,
          legend: bool) -> None:
    xs = [r.rate for r in rows]
    low, high = [getattr(r, ci)[0] for r in rows], [getattr(r, ci)[1] for r in rows]
    color = COLORS.get(key, "#999999")
    figure.add_scatter(x=xs + xs[::-1], y=high + low[::-1], fill="toself", fillcolor=color, opacity=0.2,
                       line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=key, row=1, col=column)
    figure.add_scatter(x=xs, y=[getattr(r, y) for r in rows], mode="lines+markers", name=name, line=dict(color=color),
                       legendgroup=key, showlegend=legend, row=1, col=column,
                       customdata=[[a, b] for a, b in zip(low, high)],
                       hovertemplate=f"{name}<br>rate %{{x}}: %{{y:.1%}} "
                                     "[%{customdata[0]:.1%}, %{customdata[1]:.1%}]<extra></extra>")


def sweep_figure(result: SweepResult, names: dict[str, str], y: str, ci: str, title: str) -> go.Figure:
    """One panel per kind: the SweepRow field `y` against the rate with its interval field `ci`, per precision."""
    kinds = list(result.kinds)
    figure = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True)
    for column, kind in enumerate(kinds, start=1):
        for key in dict.fromkeys(r.precision for r in result.rows):
            rows = [r for r in result.rows if r.kind == kind and r.precision == key]
            _band(figure, rows, key, y, ci, names.get(key, key), column, legend=column == 1)
    figure.update_layout(height=340, margin=dict(l=10, r=10, t=50, b=10), title=title,
                         legend=dict(orientation="h", y=-0.2))
    figure.update_yaxes(tickformat=".0%")
    figure.update_xaxes(title_text="perturbation rate")
    return figure


@st.fragment
def batch_section(plans: dict[str, Plan], names: dict[str, str]) -> None:
    st.subheader("Batch robustness")
    st.caption("Every text of a seeded sample perturbed at each rate (rate = share of its words edited): accuracy "
               "with its 95% Wilson interval, and the flip rate, the share of texts whose answer changed against "
               "the same precision on the clean text. Texts run in length-sorted batches of 64, so an INT8 answer "
               "here can differ slightly from the single-text answer above (INT8 picks one activation scale per "
               "batch, as the CPU kernel does).")
    sets = dict(available_sets()) | {n: "uploaded CSV" for n in st.session_state.get("uploaded_sets", {})}
    with st.form("rob_sweep"):
        left, middle, right = st.columns(3)
        names_list = list(sets)
        data_name = left.selectbox("Evaluation set", names_list,  # names alone fit; descriptions in the help
                                   index=names_list.index(common.data_name()) if common.data_name() in sets else 0,
                                   help="; ".join(f"{name}: {about}" for name, about in sets.items()))
        size = left.number_input("Sample size", 10, 5000, 200, step=10)
        kinds = middle.multiselect("Kinds", KINDS, default=["swap", "keyboard", "homoglyph"])
        rates = middle.multiselect("Rates", RATE_OPTIONS, default=[0.1, 0.2, 0.4])
        seed = right.number_input("Seed", 0, 10_000, 0)
        keep_ends = right.checkbox("Keep first and last letters")
        attack_n = left.number_input("Flip-search sample (0 = skip)", 0, 200, 10)
        budget = middle.slider("Flip-search edit budget", 1, 10, 3)
        run = st.form_submit_button("Run the sweep", type="primary")
    if run:
        if not kinds or not rates:
            st.error("Pick at least one perturbation kind and one rate.")
            return
        try:
            data = attack.sample(common.dataset(data_name), int(size), int(seed))
        except (EngineError, ValueError) as error:
            st.error(f"Cannot use {data_name}: {error}")
            return
        model, tokenizer = common.model_and_tokenizer()
        settings = dict(kinds=kinds, rates=sorted(rates), seed=int(seed), keep_ends=keep_ends, n=len(data),
                        plans={k: p.key() for k, p in plans.items()})
        bar = st.progress(0.0, text="starting")

        def queued(key: str, what: str, compute):
            return common.cached_job(key, f"Running the {what}", lambda progress: compute(
                lambda f, m: progress(min(f, 1.0), m)), kind=what,
                show_progress=lambda p: bar.progress(p[0], text=p[1]))

        # The cache and the session keep the results' to_json(), as they always have; read back with from_json.
        sweep = queued(keys.robustness(model, data.fingerprint, "sweep", **settings), "robustness sweep",
                       lambda progress: attack.sweep(model, tokenizer, data, kinds, rates, plans, int(seed),
                                                     keep_ends, progress=progress).to_json())
        attacked = None
        if attack_n:
            attack_data = attack.sample(data, int(attack_n), int(seed))
            attacked = queued(
                keys.robustness(model, attack_data.fingerprint, "attack", **settings, budget=budget), "flip search",
                lambda progress: attack.attack_success(model, tokenizer, attack_data, plans, None, budget, KINDS,
                                                       int(seed), keep_ends, progress=progress).to_json())
        bar.empty()
        st.session_state["rob_sweep_result"] = (sweep, attacked, data_name)
    stored = st.session_state.get("rob_sweep_result")
    if stored is None:
        return
    sweep_json, attacked_json, data_name = stored
    sweep = SweepResult.from_json(sweep_json)
    attacked = None if attacked_json is None else AttackResult.from_json(attacked_json)
    st.markdown(f"**{data_name}**, {sweep.n} texts, seed {sweep.seed}: clean accuracy " + ", ".join(
        f"{names.get(k, k)} {common.fmt_ci(v.accuracy, v.ci95)}" for k, v in sweep.clean.items()))
    st.plotly_chart(sweep_figure(sweep, names, "accuracy", "ci95", "Accuracy against perturbation rate"),
                    width="stretch", key="sweep-accuracy")
    st.plotly_chart(sweep_figure(sweep, names, "flip_rate", "flip_ci95", "Flip rate (answer changed vs clean text)"),
                    width="stretch", key="sweep-flips")
    if attacked is not None:
        st.markdown(f"**Flip search** on {attacked.n} texts, budget {attacked.budget} edits, all kinds")
        st.dataframe([{"precision": names.get(r.precision, r.precision),
                       "success rate [95% CI]": common.fmt_ci(r.success_rate, r.ci95),
                       "flipped": f"{r.successes} of {r.n}",
                       "mean edits (flips)": None if r.mean_edits is None else round(r.mean_edits, 2),
                       "mean queries": round(r.mean_queries, 1)} for r in attacked.rows],
                     hide_index=True, width="stretch")
    st.caption("Overlapping intervals mean the data do not separate those precisions.")


# ---- page -----------------------------------------------------------------------------------
common.plan_note()
st.markdown("Type a review, inject typos, and watch each precision answer. Does INT8 or INT4 break sooner than "
            "FP32 on noisy text, and on which words?")

plans = _plans()
names = _names(plans)
model_name = common.model_name()

st.session_state.setdefault("rob_text", EXAMPLES["Mixed feelings"])
st.selectbox("Start from an example", list(EXAMPLES), key="rob_example", on_change=_pick_example)
text = st.text_area("Review", key="rob_text", height=100)
clean = answers(model_name, text, plans)
notices(text, clean["fp32"])
show_predictions(clean, names, "clean")

st.subheader("Inject typos")
columns = st.columns(4)
kind = columns[0].selectbox("Kind", KINDS, index=KINDS.index("keyboard"))
rate = columns[1].slider("Rate (share of words edited)", 0.0, 1.0, 0.2, 0.05)
seed = columns[2].number_input("Seed", 0, 10_000, 0)
keep_ends = columns[3].checkbox("Keep first and last letters")
try:
    perturbation = perturb(text, kind, rate, int(seed), keep_ends)
except PerturbError as error:
    st.error(str(error))
    st.stop()
show_html(highlight_html(perturbation))
st.caption(f"{len(perturbation.edits)} edit(s); hover a highlight to see what changed.")
state = hashlib.sha256(repr((text, kind, rate, int(seed), keep_ends)).encode("utf-8", "surrogatepass")).hexdigest()
# The key follows the perturbation's inputs, so new settings refill the box and hand edits stay until then.
noisy = st.text_area("Perturbed text (edit it by hand too)", value=perturbation.perturbed,
                     key=f"rob_noisy_{state[:16]}", height=100)
if noisy != perturbation.perturbed:
    st.caption("Edited by hand.")
show_predictions(answers(model_name, noisy, plans), names, "noisy", reference=clean)

st.subheader("Why: word importance")
st.caption("Occlusion: each word is removed in turn; green words support the class that precision predicts, red "
           "ones argue against it, and the stronger the colour the larger the change in its probability. Hover a "
           "word for its value.")
which = st.radio("Explain", ["the review", "the perturbed text"], horizontal=True)
explained = text if which == "the review" else noisy
explained_tokens = answers(model_name, explained, plans)["fp32"].tokens
if not words(explained):
    st.info("There are no words to score in this text.")
elif explained_tokens <= LONG_TEXT_TOKENS or st.toggle(
        f"Score the words of this long text ({explained_tokens} tokens; one forward per word, slower)"):
    for key, plan in plans.items():
        scores = occlusion(model_name, explained, plan)
        predicted = scores[0].label if scores else ""
        show_html(f"<b>{html.escape(names[key])}</b> (for {html.escape(predicted)}): "
                  f"{pred.importance_html(explained, scores)}")
    if len(words(explained)) > pred.MAX_OCCLUDED:
        st.caption(f"Only the first {pred.MAX_OCCLUDED} words the model reads are scored.")

flip_section(text, plans, names)
batch_section(plans, names)
