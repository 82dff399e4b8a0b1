"""Every memoization key: what determines each kind of result. Pages, the CLI and the grid build keys
only here, so the same question asked anywhere finds the same answer."""
from __future__ import annotations

from engine.core.cpu import this_cpu
from engine.core.plan import Plan
from engine.core.vocabulary import Kernels, Runtime, WeightMethod
from engine.model.loading import fingerprint

from cache import make_key


def evaluation(model_fp: str, data_fp: str, plan: Plan, kernels: str = Kernels.SIMULATED, device: str = "cpu",
               batch: int = 32) -> str:
    """A plan's evaluation on a set (EvalResult.summary()). The exported graph run by ONNX Runtime computes
    what this CPU's int8 instructions compute (engine.core.cpu), so that result is keyed by the CPU too."""
    ran_on = {"cpu": this_cpu().value} if kernels == Kernels.REAL and plan.runtime == Runtime.ONNXRUNTIME else {}
    return make_key("evaluation", model=model_fp, data=data_fp, plan=plan.key(), kernels=kernels, device=device,
                    batch=batch, **ran_on)


def evaluator_evaluation(evaluator, plan: Plan, kernels: str = Kernels.SIMULATED) -> str:
    model_fp, data_fp, device = evaluator.key
    return evaluation(model_fp, data_fp, plan, kernels, device, evaluator.batch_size)


def layer_row(model_fp: str, data_fp: str, device: str, batch: int, layer: str, precision: str,
              direction: str) -> str:
    """One sensitivity row (a layer at a precision, alone or all but it)."""
    return make_key("sensitivity-row", model=model_fp, data=data_fp, device=device, batch=batch, layer=layer,
                    precision=precision, direction=direction)


def sweep_row(evaluator, layer: str, precision: str, direction: str, method: WeightMethod = WeightMethod.RTN) -> str:
    """A sweep's row on the evaluator's set. RTN's key has no method part (the rows stored before methods existed
    stay found); another method's row is RTN's key with the method added."""
    model_fp, data_fp, device = evaluator.key
    if WeightMethod(method) == WeightMethod.RTN:
        return layer_row(model_fp, data_fp, device, evaluator.batch_size, layer, precision, direction)
    return make_key("sensitivity-row", model=model_fp, data=data_fp, device=device, batch=evaluator.batch_size,
                    layer=layer, precision=precision, direction=direction, method=WeightMethod(method).value)


def methods_report(evaluator, plans: list[tuple[str, str]]) -> str:
    """The methods view's table: each (label, plan key) of the settings compared, on the evaluator's set."""
    model_fp, data_fp, device = evaluator.key
    return make_key("methods-compare", model=model_fp, data=data_fp, device=device, plans=plans)


def methods_curve(evaluator, calibrators: list[str], sizes: list[int]) -> str:
    """W8A8-static accuracy against the number of calibration texts, per calibrator."""
    model_fp, data_fp, device = evaluator.key
    return make_key("methods-curve", model=model_fp, data=data_fp, device=device, calibrators=calibrators,
                    sizes=sorted(sizes))


def sqnr(model, data_fp: str, precisions: tuple[str, ...]) -> str:
    return make_key("sqnr-proxy", model=fingerprint(model), data=data_fp, precisions=list(precisions))


def size(model, plan: Plan) -> str:
    """`model`: the model or its fingerprint."""
    model_fp = model if isinstance(model, str) else fingerprint(model)
    return make_key("size", model=model_fp, plan=plan.precisions_only().key())


def latency(model, plan: Plan, reference: Plan, batch: int, tokens: int, device: str,
            runtime: str = Runtime.TORCH) -> str:
    return make_key("latency", model=fingerprint(model), plan=plan.key(), reference=reference.key(), batch=batch,
                    tokens=tokens, device=device, runtime=runtime)


def worker_latency(model_fp: str, plan: Plan, device: str, batch: int, tokens: int) -> str:
    """A grid task's latency, timed alone on the worker that ran it (its machine is in the value)."""
    return make_key("worker-latency", model=model_fp, plan=plan.key(), device=device, batch=batch, tokens=tokens)


def comparison(model, data_fps: list[str], plans: list[tuple[str, str]], device: str, limit: int | None,
               runtimes: list[str]) -> str:
    return make_key("compare", model=fingerprint(model), data=data_fps, plans=plans, device=device, limit=limit,
                    runtimes=runtimes)


def flip_search(model, text: str, target: str, budget: int, kinds: list[str], seed: int, keep_ends: bool,
                plans: dict[str, str]) -> str:
    return make_key("flip-search", model=fingerprint(model), text=text, target=target, budget=budget, kinds=kinds,
                    seed=seed, keep_ends=keep_ends, plans=plans)


def robustness(model, data_fp: str, what: str, **settings) -> str:
    return make_key(f"robustness-{what}", model=fingerprint(model), data=data_fp, **settings)


def smoothquant(evaluator, what: str, **settings) -> str:
    model_fp, data_fp, device = evaluator.key
    return make_key(f"smoothquant-{what}", model=model_fp, data=data_fp, device=device, **settings)


def search(evaluator, budget: list, latency: bool, ladder: int, refine: int) -> str:
    model_fp, data_fp, device = evaluator.key
    return make_key("search", model=model_fp, data=data_fp, device=device, budget=budget, latency=latency,
                    ladder=ladder, refine=refine)


def diagnosis(model, data_fp: str, plan: Plan, sample: int, exported: bool = False) -> str:
    """Every op's error under a plan, on a seeded sample of the set (`exported`: each layer's, measured on the
    exported graph run by this CPU's ONNX Runtime)."""
    ran_on = {"cpu": this_cpu().value} if exported else {}
    return make_key("diagnosis-exported" if exported else "diagnosis", model=fingerprint(model), data=data_fp,
                    plan=plan.key(), sample=sample, **ran_on)
