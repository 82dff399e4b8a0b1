"""Predictions for any text, occlusion, the flip search and batch robustness; the predict/perturb commands and
the typo playground page."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.analysis.attack import attack_success, flip_search, sample, sweep
from engine.analysis.perturb import apply_edits, words
from engine.analysis.predict import (MAX_OCCLUDED, Prediction, RobustnessError, WordScore, disagreement,
                                     importance_html, occlusion, predict, predictions, reference_plans)
from engine.analysis.robustness_results import AttackResult, SweepResult
from engine.cli import main
from engine.data.sets import load_dataset
from engine.core.plan import Plan
from engine.evaluation.evaluate import evaluate
from engine.model.loading import input_limit

REPO = Path(__file__).resolve().parents[2]
BAD_INPUTS = {
    "empty": "",
    "whitespace": " \t\n  \r\n ",
    "emoji": "😀🎬👍🏽❤️‍🔥",
    "arabic": "هذا الفيلم رائع جدا",
    "hebrew": "הסרט הזה נהדר מאוד",
    "mixed": "Great фильм 很好 ταινία مرحبا שלום 😀 naïve café",
    "control": "bad\x00movie\x07really\x1b[31m awful\x7f",
    "invisible": "gr\u200beat m\u200dovie",
    "html": '<script>alert("x")</script> <b>good</b> &amp; film',
    "one_long_word": "a" * 2500 + "b" * 2500,
    "twenty_thousand": ("Worth it, mostly? " * 1200)[:20_000],
    "lone_surrogate": "bad \ud800 film",
}


def _check_prediction(result: dict, text: str) -> None:
    assert result["text"] == text
    assert result["label"] in ("positive", "negative")
    probs = result["probs"]
    assert set(probs) == {"negative", "positive"}
    assert probs["negative"] + probs["positive"] == pytest.approx(1.0)
    assert result["confidence"] == pytest.approx(max(probs.values()))
    assert result["confidence"] == probs[result["label"]]
    assert isinstance(result["truncated"], bool)


@pytest.fixture(scope="module")
def tiny_folder(tiny_bert, tokenizer, tmp_path_factory) -> Path:
    """The tiny random BERT saved as a local model folder, so the CLI and the page can load it by path."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- predict --------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["fp32", "int8", "int4"])
def test_predict_answers_every_bad_input(tiny_bert, tokenizer, plan) -> None:
    texts = list(BAD_INPUTS.values())
    results = predict(tiny_bert, tokenizer, texts, plan)
    assert len(results) == len(texts)
    for text, result in zip(texts, results):
        _check_prediction(result, text)
    by_name = dict(zip(BAD_INPUTS, results))
    limit = input_limit(tiny_bert, tokenizer)
    assert limit == 128  # the tiny model's position table, shorter than the tokenizer's 512
    assert by_name["twenty_thousand"]["truncated"] and by_name["twenty_thousand"]["tokens"] == limit
    assert "truncated" in by_name["twenty_thousand"]["note"]
    assert not any(r["truncated"] for name, r in by_name.items() if name != "twenty_thousand")
    for name in ("empty", "whitespace"):
        assert by_name[name]["tokens"] == 2 and "no tokens" in by_name[name]["note"]
    assert "unknown" in by_name["one_long_word"]["note"]  # one 5,000-letter word is a single unknown token


def test_predict_matches_the_models_own_forward(tiny_bert, tokenizer) -> None:
    text = "a gentle, funny film"
    encoded = tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        expected = torch.softmax(tiny_bert(**encoded).logits.double(), -1)[0]
    result = predict(tiny_bert, tokenizer, [text])[0]
    assert result["probs"]["negative"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert result["probs"]["positive"] == pytest.approx(float(expected[1]), abs=1e-6)


def test_predict_reads_the_class_order_from_id2label(tiny_bert, tokenizer) -> None:
    swapped = copy.deepcopy(tiny_bert)
    swapped.config.id2label = {0: "positive", 1: "negative"}
    swapped.config.label2id = {"positive": 0, "negative": 1}
    plain = predict(tiny_bert, tokenizer, ["not bad at all"])[0]["probs"]
    flipped = predict(swapped, tokenizer, ["not bad at all"])[0]["probs"]
    assert flipped["positive"] == pytest.approx(plain["negative"])
    assert flipped["negative"] == pytest.approx(plain["positive"])


def test_int8_answer_does_not_depend_on_the_other_texts(tiny_bert, tokenizer) -> None:
    """INT8's per-tensor activation scale spans the batch, so predict runs INT8 plans one text at a time."""
    alone = predict(tiny_bert, tokenizer, ["a fine film"], "int8")[0]
    together = predict(tiny_bert, tokenizer, ["a fine film", BAD_INPUTS["twenty_thousand"], "awful"], "int8")[0]
    assert alone["probs"] == together["probs"]


def test_predict_rejects_a_plan_that_does_not_fit(tiny_bert, tokenizer) -> None:
    from engine.core.plan import PlanError

    with pytest.raises(PlanError, match="no_such_layer"):
        predict(tiny_bert, tokenizer, ["x"], {"no_such_layer": "int8"})


def test_prediction_round_trips_through_its_json(tiny_bert, tokenizer) -> None:
    """predict's documents are the typed predictions' to_json(), and from_json (the page's cache) gives them back."""
    texts = ["a fine film", "", BAD_INPUTS["twenty_thousand"]]
    typed = predictions(tiny_bert, tokenizer, texts, "int4")
    documents = predict(tiny_bert, tokenizer, texts, "int4")
    assert [p.to_json() for p in typed] == documents
    assert list(documents[0]) == ["text", "label", "confidence", "probs", "truncated", "tokens"]  # no note: none
    assert list(documents[1]) == ["text", "label", "confidence", "probs", "truncated", "tokens", "note"]
    assert [Prediction.from_json(json.loads(json.dumps(d))) for d in documents] == typed


def _answer(label: str, confidence: float) -> Prediction:
    return Prediction(text="x", label=label, confidence=confidence, probs={label: confidence}, truncated=False,
                      tokens=3)


def test_disagreement_message() -> None:
    agree = {"fp32": _answer("positive", 0.9), "int4": _answer("positive", 0.6)}
    assert disagreement(agree) is None
    split = {"fp32": _answer("positive", 0.9), "int4": _answer("negative", 0.55)}
    message = disagreement(split, {"fp32": "FP32", "int4": "INT4"})
    assert message.startswith("The precisions disagree") and "INT4 says negative (55%)" in message


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_predict_answers_bad_input_with_json(tiny_folder) -> None:
    args = [BAD_INPUTS[name] for name in ("empty", "whitespace", "emoji", "html", "twenty_thousand", "one_long_word")]
    stdin = "first line\n\n😀 third\xa0line\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "engine", "predict", "--model", str(tiny_folder), "--plan", "int8",
                           "--json", *args, "-"], input=stdin.encode(), capture_output=True, cwd=REPO, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    results = json.loads(done.stdout)
    expected = args + ["first line", "", "😀 third\xa0line"]
    assert [r["text"] for r in results] == expected
    for text, result in zip(expected, results):
        _check_prediction(result, text)
    assert [r["truncated"] for r in results] == [text == BAD_INPUTS["twenty_thousand"] for text in expected]


def test_cli_predict_bad_plan_exits_2(tiny_folder, capsys) -> None:
    for plan in ("int9", '{"no_such_layer": "int8"}'):
        assert main(["predict", "--model", str(tiny_folder), "--plan", plan, "--json", "x"]) == 2
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert captured.out == "" and len(errors) == 1 and "Traceback" not in captured.err


def test_cli_perturb_is_deterministic_and_checks_its_input(capsys) -> None:
    text = "the acting was wonderful and the story kept me guessing"
    outputs = []
    for _ in range(2):
        assert main(["perturb", "--kind", "keyboard", "--rate", "0.5", "--seed", "7", "--json", text]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    assert outputs[0]["text"] == text and outputs[0]["perturbed"] != text and outputs[0]["edits"]
    assert main(["perturb", "--kind", "swap", "--rate", "0", "--json", text]) == 0
    assert json.loads(capsys.readouterr().out) == {"text": text, "perturbed": text, "edits": []}
    for bad in (["--kind", "typo", "--rate", "0.1"], ["--kind", "swap", "--rate", "2"],
                ["--kind", "swap", "--rate", "lots"]):
        assert main(["perturb", *bad, "--json", text]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1


# ---- occlusion ------------------------------------------------------------------------------
def test_occlusion_scores_every_word(tiny_bert, tokenizer) -> None:
    text = "A warm, funny film -- whose last act almost undoes it."
    scores = occlusion(tiny_bert, tokenizer, text, "int4")
    assert [(s.start, s.end, s.word) for s in scores] == words(text)
    assert all(isinstance(s.importance, float) for s in scores)
    # The definition: P(c | text) - P(c | text without the word), c the class predicted for the text.
    first = scores[1]
    without = text[:first.start] + text[first.end:]
    full, removed = predictions(tiny_bert, tokenizer, [text, without], "int4")
    assert all(s.label == full.label for s in scores)
    assert first.importance == pytest.approx(full.probs[full.label] - removed.probs[full.label], abs=1e-6)
    assert occlusion(tiny_bert, tokenizer, "   ") == []
    # The page caches to_json(): the same keys as ever, and from_json gives the scores back.
    assert list(first.to_json()) == ["start", "end", "word", "importance", "class"]
    assert first.to_json()["class"] == full.label
    assert [WordScore.from_json(json.loads(json.dumps(s.to_json()))) for s in scores] == scores


def test_occlusion_skips_words_the_model_never_reads(tiny_bert, tokenizer) -> None:
    text = "good " * 300  # 300 words, 128 tokens read
    scores = occlusion(tiny_bert, tokenizer, text)
    assert len(scores) == 300
    scored = [s for s in scores if s.importance is not None]
    assert len(scored) == MAX_OCCLUDED and scored == scores[:MAX_OCCLUDED]


def test_importance_html_escapes_and_colours() -> None:
    text = "<b>great</b> & awful"
    scores = [WordScore(start=s, end=e, word=w, importance=v, label="positive")
              for (s, e, w), v in zip(words(text), (0.0, 0.3, 0.0, -0.2))]
    rendered = importance_html(text, scores)
    assert "<b>" not in rendered and "&lt;" in rendered and "&amp;" in rendered
    assert "rgba(26,152,80" in rendered and "rgba(215,48,39" in rendered  # green for great, red for awful


# ---- flip search ----------------------------------------------------------------------------
def test_flip_search_really_flips_the_target(embedded) -> None:
    model, tokenizer = embedded
    text = "A warm, funny film whose clumsy last act almost undoes all the good will it earns."
    result = flip_search(model, tokenizer, text, target="int4", budget=6, seed=0)
    assert result.flipped, result.to_json()
    assert 1 <= len(result.perturbation.edits) <= 6 and result.queries > len(result.perturbation.edits)
    perturbed = result.perturbation.perturbed
    assert perturbed == apply_edits(text, result.perturbation.edits) != text
    (before,), (after,) = (predictions(model, tokenizer, [t], Plan.uniform("int4")) for t in (text, perturbed))
    assert before.label != after.label
    assert after == result.after["int4"] and before == result.before["int4"]
    assert set(result.after) == set(reference_plans())


def test_flip_search_checks_its_arguments(tiny_bert, tokenizer) -> None:
    with pytest.raises(RobustnessError, match="target"):
        flip_search(tiny_bert, tokenizer, "fine", target="int3")
    with pytest.raises(RobustnessError, match="kind"):
        flip_search(tiny_bert, tokenizer, "fine", kinds=["typo"])
    result = flip_search(tiny_bert, tokenizer, "", target="fp32")
    assert not result.flipped and result.perturbation.edits == ()


# ---- batch robustness -----------------------------------------------------------------------
def test_sweep_rate_zero_is_the_clean_accuracy(tiny_bert, tokenizer) -> None:
    model = tiny_bert
    data = sample(load_dataset("embedded"), 64, seed=1)
    seen = []
    result = sweep(model, tokenizer, data, kinds=["swap", "homoglyph"], rates=[0.0, 0.5], seed=3,
                   progress=lambda fraction, message: seen.append(fraction))
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    assert {(r.kind, r.rate) for r in result.rows} == {(k, r) for k in ("swap", "homoglyph") for r in (0, 0.5)}
    for row in result.rows:
        low, high = row.ci95
        assert low <= row.accuracy <= high and row.n == 64
        if row.rate == 0:
            assert row.accuracy == result.clean[row.precision].accuracy
            assert row.flip_rate == 0 and row.changed == 0
        else:
            assert row.changed > 0.9
    assert result.clean["fp32"].accuracy == evaluate(model, tokenizer, data)["accuracy"]
    # to_json() is the dict the page's cache has always stored; from_json reads it back, through JSON too.
    document = result.to_json()
    assert list(document) == ["dataset", "n", "kinds", "rates", "seed", "keep_ends", "batch_size", "clean", "rows",
                              "seconds"]
    assert list(document["rows"][0]) == ["precision", "plan", "kind", "rate", "accuracy", "ci95", "flip_rate",
                                         "flip_ci95", "changed", "n"]
    assert document["kinds"] == ["swap", "homoglyph"] and document["rates"] == [0.0, 0.5]
    assert document["clean"]["int8"] == {"accuracy": result.clean["int8"].accuracy,
                                         "ci95": list(result.clean["int8"].ci95)}
    assert SweepResult.from_json(json.loads(json.dumps(document))) == result
    assert json.dumps(SweepResult.from_json(document).to_json()) == json.dumps(document)


def test_attack_success_counts_flips(tiny_bert, tokenizer) -> None:
    data = sample(load_dataset("embedded"), 3, seed=0)
    result = attack_success(tiny_bert, tokenizer, data, reference_plans(), targets=["int8"], budget=1,
                            kinds=["swap"])
    (row,) = result.rows
    assert row.precision == "int8" and row.n == 3 and 0 <= row.successes <= 3
    assert row.ci95[0] <= row.success_rate <= row.ci95[1] and row.mean_queries >= 1
    assert (row.mean_edits is None) == (row.successes == 0)
    document = result.to_json()
    assert list(document) == ["dataset", "n", "budget", "kinds", "seed", "rows", "seconds"]
    assert list(document["rows"][0]) == ["precision", "plan", "success_rate", "ci95", "successes", "n", "mean_edits",
                                         "mean_queries"]
    assert document["kinds"] == ["swap"] and document["rows"][0]["ci95"] == list(row.ci95)
    assert AttackResult.from_json(json.loads(json.dumps(document))) == result
    assert json.dumps(AttackResult.from_json(document).to_json()) == json.dumps(document)


def test_sample_is_seeded_and_ordered() -> None:
    data = load_dataset("embedded")
    a, b, c = sample(data, 50, 0), sample(data, 50, 0), sample(data, 50, 1)
    assert a.texts == b.texts and a.texts != c.texts and len(a) == 50
    assert sample(data, None) is data
    with pytest.raises(RobustnessError):
        sample(data, 0)


# ---- the page -------------------------------------------------------------------------------
def test_page_reacts_to_typed_text(tiny_folder, tmp_path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    app = AppTest.from_file(str(REPO / "app_pages" / "robustness.py"), default_timeout=120)
    app.session_state["model_name"] = str(tiny_folder)
    app.session_state["plan"] = Plan.uniform("int8").with_rules([("*.intermediate.dense", "int4")])
    app.run()
    assert not app.exception
    columns = ["FP32", "INT8", "INT4", f"Current plan ({app.session_state['plan'].label()})"]
    assert [m.label for m in app.metric][:4] == columns

    app.text_area(key="rob_text").set_value("An utterly joyless, tedious film.").run()
    assert not app.exception
    labels = [m.label for m in app.metric]
    assert labels[:4] == columns and labels[4:8] == columns  # clean and perturbed rows
    assert all(m.value in ("positive", "negative") for m in app.metric)
    sentences = [element.proto.body for element in app.get("html")]
    assert sum("joyless" in body and "background:rgba" in body for body in sentences) == 4  # importance per precision

    app.text_area(key="rob_text").set_value("").run()
    assert not app.exception and any("empty" in i.value for i in app.info)
    app.text_area(key="rob_text").set_value(BAD_INPUTS["twenty_thousand"]).run()
    assert not app.exception and any("longer than the model can read" in i.value for i in app.info)
