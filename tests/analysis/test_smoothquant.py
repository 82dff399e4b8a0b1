"""SmoothQuant: the invariant, the formula's limits, calibration, static scales, export, CLI and page."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.analysis import smoothquant as sq
from engine.analysis.smoothquant_export import export, export_metadata, load_export
from engine.data.sets import load_dataset, rt_split
from engine.core.torch_int8 import int8_linear_weight
from engine.core.numerics import int8_reduce_range, static_qparams
from engine.core.plan import Plan
from engine.core.qmodules import ScaledInput, SimLinear
from engine.evaluation.evaluate import get_evaluator
from engine.evaluation.evaluator import Evaluator
from engine.model.inventory import inventory
from engine.model.loading import fingerprint
from engine.quant.apply import apply_plan
from engine.quant.prepare import prepare_with
from engine.quant.calibration import calibrate, calibration_texts
from engine.quant.smoothing import EPS, EXPLICIT, NONE, smooth, smoothing_factor

SENTENCES = ["a gorgeous, witty, seductive movie.",
             "the plot is nothing but boilerplate clichés from start to finish,",
             "", "not bad at all", "it's a bad sign when you're rooting for the film to end"]
TRAIN = rt_split("train").texts


@pytest.fixture(scope="module")
def tiny_calibrated(tiny_model, tokenizer):
    return tiny_model, calibrate(tiny_model, tokenizer, calibration_texts(TRAIN, 48))


def _logits(model, tokenizer, texts=SENTENCES):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**encoded).logits


def _smoothed_modules(model):
    return [m for m in model.modules() if isinstance(m, (SimLinear, ScaledInput)) and m.in_scale is not None]


def _apply(model, plan, calibration, kernels="simulated"):
    return apply_plan(model, plan, kernels, prepared=prepare_with(model, plan, calibration))


# ---- the invariant ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_smoothing_alone_keeps_logits(tiny_calibrated, tokenizer, alpha):
    model, calibration = tiny_calibrated
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Plan(smooth_alpha=alpha)
    for kernels in ("simulated", "real"):
        smoothed = _apply(model, plan, calibration, kernels)
        # it really smooths: in these post-LN encoders every Linear but attention-out has an explicit input scale,
        # and the value absorbs attention-out's fold
        n_blocks = sum(1 for layer in inventory(model) if layer.role == "query")
        assert len(_smoothed_modules(smoothed)) == 5 * n_blocks + 2
        value = next(l.name for l in inventory(model) if l.role == "value")
        changed = dict(smoothed.named_modules())[value]
        weight = changed.weight if isinstance(changed, SimLinear) else changed.inner.weight
        assert not torch.allclose(weight, model.get_submodule(value).weight)
        difference = (_logits(smoothed, tokenizer) - _logits(model, tokenizer)).abs().max().item()
        assert difference < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


def test_invariant_through_the_evaluator(tiny_model, tokenizer):
    evaluator = Evaluator(tiny_model, tokenizer, load_dataset("embedded").head(64))
    per_layer = sq.auto_alphas(tiny_model, sq.calibration_for(evaluator, 32), "static")
    for alpha in (0.0, 0.35, 1.0, per_layer):
        assert sq.max_logit_diff(evaluator, alpha, calib=32) < 1e-4


def test_invariant_embedded_test_split(embedded):
    model, tokenizer = embedded
    evaluator = get_evaluator(model, tokenizer, load_dataset("embedded"))  # shared with other tests
    assert len(evaluator.labels) == 1056
    assert sq.max_logit_diff(evaluator, 0.5) < 1e-4
    small = Evaluator(model, tokenizer, load_dataset("embedded").head(128))
    for alpha in (0.0, 1.0):
        assert sq.max_logit_diff(small, alpha) < 1e-4


# ---- the formula and where it goes -----------------------------------------------------------
def test_alpha_limits_hand_computed():
    x = torch.tensor([4.0, 1.0, 0.25, 0.0])
    w = torch.tensor([0.5, 2.0, 1.0, 0.1])
    assert torch.allclose(smoothing_factor(x, w, 0.0), torch.tensor([2.0, 0.5, 1.0, 10.0]))
    assert torch.allclose(smoothing_factor(x, w, 1.0), torch.tensor([4.0, 1.0, 0.25, EPS]))
    half = smoothing_factor(x, w, 0.5)
    assert torch.allclose(half, torch.tensor([2 / 0.5 ** 0.5, 1 / 2 ** 0.5, 0.5, (EPS / 0.1) ** 0.5]))


def test_factors_on_a_model(tiny_calibrated):
    model, calibration = tiny_calibrated
    layers = {(layer.block, layer.role): layer.name for layer in inventory(model) if layer.block is not None}
    qkv = [layers[(0, role)] for role in ("query", "key", "value")]
    ffn_out = layers[(0, "ffn-out")]
    joint = torch.stack([model.get_submodule(n).weight.abs().amax(0) for n in qkv]).amax(0)
    at0 = smooth(model, Plan(smooth_alpha=0.0), calibration)
    at1 = smooth(model, Plan(smooth_alpha=1.0), calibration)
    # alpha 0: s = 1 / max|W| (jointly over q, k, v); alpha 1: s = max|X|
    assert torch.allclose(at0.factor(qkv[0]), 1 / joint)
    assert at0.factor(qkv[0]) is at0.factor(qkv[2])  # one shared divisor
    assert torch.allclose(at0.factor(ffn_out), 1 / model.get_submodule(ffn_out).weight.abs().amax(0))
    assert torch.allclose(at1.factor(ffn_out), calibration.absmax(ffn_out))
    assert torch.allclose(at1.factor(qkv[1]), calibration.absmax(qkv[1]))
    forms = {row["layer"]: row["form"] for row in smooth(model, Plan(smooth_alpha=0.5), calibration).forms(model)}
    assert forms[layers[(0, "attention-out")]] == f"folded into {layers[(0, 'value')]}"
    assert forms[qkv[0]] == forms[layers[(0, "ffn-in")]] == forms[ffn_out] == EXPLICIT
    assert inventory(model)[0].name not in forms  # the embedding takes no activation scale
    partial = {row["layer"]: row["form"]
               for row in smooth(model, Plan(smooth_alpha=((ffn_out, 0.5),)), calibration).forms(model)}
    assert partial[ffn_out] == EXPLICIT and partial[qkv[0]] == NONE


# ---- calibration ------------------------------------------------------------------------------
def test_calibration_deterministic_and_clean(tiny_bert, tokenizer):
    fp = fingerprint(tiny_bert)
    texts = calibration_texts(TRAIN, 40, seed=3)
    assert texts == calibration_texts(TRAIN, 40, seed=3) and texts != calibration_texts(TRAIN, 40, seed=4)
    assert set(texts) <= set(rt_split("train").texts) and not set(texts) & set(rt_split("test").texts)
    first = calibrate(tiny_bert, tokenizer, texts, batch_size=32)
    second = calibrate(tiny_bert, tokenizer, texts, batch_size=7)  # batching and padding must not matter
    for name in first.low:
        assert torch.allclose(first.low[name], second.low[name], atol=1e-5)
        assert torch.allclose(first.high[name], second.high[name], atol=1e-5)
        assert torch.all(first.low[name] <= first.high[name])
    assert first.n == 40 and first.tokens > 40
    assert fingerprint(tiny_bert) == fp
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny_bert.modules())
    assert calibrate(tiny_bert, tokenizer, texts) is calibrate(tiny_bert, tokenizer, texts)  # memoized


def test_calibration_comes_from_the_evaluated_source_and_never_its_rows(tiny_bert, tokenizer):
    for name in ("embedded", "amazon"):
        data = load_dataset(name).head(64)
        evaluator = Evaluator(tiny_bert, tokenizer, data)
        texts = calibration_texts(data.calibration, 32)
        assert set(texts) <= set(data.calibration) and not set(texts) & set(load_dataset(name).texts)
        assert sq.calibration_for(evaluator, 32).n == 32
    with pytest.raises(Exception, match="no calibration rows"):
        calibration_texts((), 8)


# ---- static scales ----------------------------------------------------------------------------
def test_static_scales_cover_what_the_smoothed_layer_sees(tiny_model, tokenizer):
    """A second pass over the calibration sentences through the smoothed model sees exactly low/s..high/s."""
    texts = calibration_texts(TRAIN, 24)
    calibration = calibrate(tiny_model, tokenizer, texts)
    plan = sq.smoothed_plan(0.6, "static", 24)
    quantized = _apply(tiny_model, plan, calibration)
    smoothing_only = _apply(tiny_model, Plan(smooth_alpha=0.6, calib=24), calibration)
    table = smooth(tiny_model, plan, calibration)
    seen: dict[str, list[torch.Tensor]] = {}
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    mask = encoded["attention_mask"].bool()

    def observe(name):
        def hook(module, args):
            x = args[0] if module.in_scale is None else args[0] / module.in_scale
            seen.setdefault(name, []).append(x[mask] if x.dim() == 3 else x)
        return hook

    handles = [smoothing_only.get_submodule(name).register_forward_pre_hook(observe(name)) for name in calibration.low]
    with torch.inference_mode():
        smoothing_only(**encoded)
    for handle in handles:
        handle.remove()
    for name in calibration.low:
        x = torch.cat(seen[name])
        expected = static_qparams(*calibration.input_range(name, table), int8_reduce_range())
        actual = torch._choose_qparams_per_tensor(torch.stack([x.min(), x.max()]).float(), int8_reduce_range())
        layer = quantized.get_submodule(name)
        assert layer.static_scale == expected
        assert expected[0] == pytest.approx(actual[0], rel=1e-4) and abs(expected[1] - actual[1]) <= 1
    unsmoothed = _apply(tiny_model, Plan.uniform("int8", act="static", calib=24), calibration)
    name = next(iter(calibration.low))
    expected = static_qparams(calibration.low[name], calibration.high[name], int8_reduce_range())
    assert unsmoothed.get_submodule(name).static_scale == expected
    assert unsmoothed.get_submodule(name).in_scale is None


# ---- per-layer error and auto alpha ------------------------------------------------------------
def test_the_per_layer_error_uses_the_real_kernels_weight(tiny_calibrated):
    model, calibration = tiny_calibrated
    name = next(l.name for l in inventory(model) if l.role == "ffn-in")
    weight = model.get_submodule(name).weight
    quantized = apply_plan(model, Plan.from_mapping({name: "int8"})).get_submodule(name)
    assert torch.equal(quantized.dequantized(), int8_linear_weight(weight))
    signal, noise = sq._error_energy(model, calibration, name, None, "dynamic")
    assert signal > 0 and 0 < noise < signal


def test_auto_alpha_minimizes_each_layer_error(tiny_calibrated):
    model, calibration = tiny_calibrated
    alphas = sq.auto_alphas(model, calibration, "token")
    linears = [layer.name for layer in inventory(model) if layer.kind == "linear"]
    assert set(alphas) == set(linears) and all(a in sq.ALPHA_GRID for a in alphas.values())
    name = next(l.name for l in inventory(model) if l.role == "ffn-out")
    w = model.get_submodule(name).weight.abs().amax(0)

    def sqnr(alpha):
        return sq.layer_sqnr(model, calibration, name, smoothing_factor(calibration.absmax(name), w, alpha), "token")
    assert all(sqnr(alphas[name]) >= sqnr(a) - 1e-9 for a in sq.ALPHA_GRID)
    rows = sq.sqnr_table(model, calibration, sq.smoothed_plan(alphas, "token"))
    assert len(rows) == len(linears) and all(np.isfinite(r["sqnr_after_db"]) for r in rows)
    view = sq.outlier_view(model, calibration, name, 1.0, "static")
    assert np.allclose(view["x_after"], 1.0, atol=1e-4)  # alpha 1 flattens every channel's max|X| to 1


def test_smoothed_w8a8_real_matches_simulated(tiny_calibrated, tokenizer):
    """Real int8 kernels behind the explicit scale compute what the simulation computes (per-tensor dynamic)."""
    model, calibration = tiny_calibrated
    ffn_in = [layer.name for layer in inventory(model) if layer.role == "ffn-in"]
    plan = Plan(rules=tuple((name, "int8") for name in ffn_in), smooth_alpha=0.5, calib=48)
    simulated = _apply(model, plan, calibration)
    real = _apply(model, plan, calibration, "real")
    assert any(isinstance(m, ScaledInput) for m in real.modules())
    assert (_logits(simulated, tokenizer) - _logits(real, tokenizer)).abs().max().item() < 1e-4


def test_size_needs_no_calibration(tiny_bert):
    from engine.runtime.size import model_size_bytes

    # the bytes of a smoothed, statically scaled plan are its precisions' bytes: no calibration is run for them
    smoothed = sq.smoothed_plan(0.5, "static", 17)
    assert model_size_bytes(tiny_bert, smoothed) == model_size_bytes(tiny_bert, Plan.uniform("int8"))
    assert model_size_bytes(tiny_bert, smoothed) < model_size_bytes(tiny_bert, Plan())


def test_apply_plan_asks_for_what_a_plan_needs(tiny_bert):
    from engine.core.plan import PlanError

    with pytest.raises(PlanError, match="smooth"):
        apply_plan(tiny_bert, Plan(smooth_alpha=0.5))
    with pytest.raises(PlanError, match="calibrated static activation ranges"):
        apply_plan(tiny_bert, Plan.uniform("int8", act="static"))


# ---- export -----------------------------------------------------------------------------------
def test_export_round_trip(tiny_calibrated, tokenizer):
    model, calibration = tiny_calibrated
    plan = sq.smoothed_plan(0.7, "static", 48)
    data = export(model, plan, calibration)
    metadata = export_metadata(data)
    assert Plan.from_json(json.loads(metadata["plan"])).key() == plan.key()
    stats = json.loads(metadata["calibration"])
    assert stats["n"] == 48 and set(stats["layers"]) == set(calibration.low)
    forms = {row["form"].split(" into ")[0] for row in json.loads(metadata["forms"])}
    assert forms == {EXPLICIT, "folded"}
    loaded = load_export(data, model)
    expected = _apply(model, plan, calibration)
    assert torch.allclose(_logits(loaded, tokenizer), _logits(expected, tokenizer), atol=1e-6)


# ---- CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    from conftest import _tiny

    folder = tmp_path_factory.mktemp("tiny-bert")
    _tiny("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_fields(tiny_folder, tmp_path, monkeypatch):
    from engine.cli import main

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["smoothquant", "--model", str(tiny_folder), "--alpha", "0,1,auto", "--act", "dynamic",
                     "--calib", "16", "--limit", "24", "--json"])
    assert code == 0
    rows = json.loads(out.getvalue())
    assert [row["alpha"] for row in rows] == [0.0, 1.0, "auto"]
    for row in rows:
        assert {"alpha", "accuracy", "ci95", "agreement", "kl", "w8a8_accuracy", "fp32_max_logit_diff"} <= set(row)
        assert row["fp32_max_logit_diff"] < 1e-4 and row["act"] == "token" and row["n"] == 24
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]


@pytest.mark.parametrize("alpha", ["1.5", "half", ""])
def test_cli_bad_alpha(alpha, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["smoothquant", "--alpha", alpha, "--json"])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# ---- page -------------------------------------------------------------------------------------
def test_page_renders_and_slider_changes_figures(embedded, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    page = Path(__file__).resolve().parents[2] / "app_pages" / "smoothquant.py"
    app = AppTest.from_file(str(page), default_timeout=600)
    app.session_state["limit"] = 64
    app.run()
    assert not app.exception and not app.error
    assert app.slider(key="sq_alpha").value == 0.75  # no sweep cached: opens at the best alpha measured here
    assert not [m for m in app.metric if m.label.startswith("Accuracy")]  # nothing expensive before it is asked
    app.button(key="sq_evaluate").click().run()
    assert not app.exception

    def figures():
        sqnr = next(m.value for m in app.metric if m.label == "W8A8 SQNR after smoothing")
        kl = [c.value for c in app.caption if "KL" in c.value]
        return sqnr, kl[2]  # columns: FP32, W8A8, W8A8 + SmoothQuant at the slider's alpha
    before = figures()
    app.slider(key="sq_alpha").set_value(0.85).run()
    assert not app.exception
    app.button(key="sq_evaluate").click().run()
    after = figures()
    assert after[0] != before[0] and after[1] != before[1]
    app.button(key="sq_invariant").click().run()
    assert app.success and "e-" in app.success[0].value
    app.button(key="sq_send").click().run()
    assert app.session_state["plan"].smooth_alpha == 0.85
    app.button(key="sq_error_map").click().run()  # the outlier view opens the layer map's error overlay
    assert not app.exception and app.session_state["lm_overlay"] == "local"
    app.button(key="sq_auto").click().run()
    assert not app.exception
    accuracies = len([m for m in app.metric if m.label.startswith("Accuracy")])
    app.button(key="sq_auto_eval").click().run()
    assert len([m for m in app.metric if m.label.startswith("Accuracy")]) == accuracies + 1  # the per-layer plan's
    assert any(m.value == "**W8A8 + per-layer α**" for m in app.markdown)
    app.button(key="sq_send_auto").click().run()
    assert isinstance(app.session_state["plan"].smooth_alpha, tuple)
