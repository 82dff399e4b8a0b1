"""Layer sensitivity: each layer alone at low precision, or every layer but one, and a cheap proxy.

Single-layer effects are small, so every row carries its interval, flips, KL and McNemar p, and
comes from the one evaluation path: a row starts at the layer's cut from the FP32 states (direction
"one") or from the uniform plan's states ("all-but-one"), which gives exactly the result of a full
evaluation of the same plan at a fraction of its cost. The proxy (each layer's output SQNR on a
calibration batch) costs seconds; its rank correlation with the measured KL says how far to trust it.

A sweep may also measure each Linear at a precision by other weight methods (GPTQ, AWQ, HQQ: rows per
(layer, precision, method) where the method takes the precision); `rescued_by` reads off, for a layer that
RTN changes significantly, the cheapest method that does not.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from engine.core.errors import EngineError
from engine.core.numerics import sqnr_db
from engine.core.plan import DEFAULT_GROUP_SIZE, Plan
from engine.core.qmodules import linear_parts
from engine.core.rules import METHOD_PRECISIONS, Rule
from engine.core.stats import SIGNIFICANCE
from engine.core.tokens import encode, length_sorted, pad
from engine.core.vocabulary import WeightMethod, names
from engine.evaluation.evaluator import Evaluator, Trace
from engine.model.inventory import Layer, inventory
from engine.model.loading import fingerprint, input_limit
from engine.quant.apply import shallow_copy, simulated_linear, simulated_weight
from engine.quant.calibration import calibration_texts

DIRECTIONS = ("one", "all-but-one")
SWEEP_PRECISIONS = ("int8", "int4")
PROXY_SENTENCES = 64
HEAD_WORK = 0.1  # a head-only row costs about a tenth of one half-block (apply_plan and statistics)
# Weight methods by the cost of preparing them, cheapest first: RTN rounds; HQQ iterates on the weights alone;
# AWQ searches a grid of input scales on calibration activations; GPTQ inverts each layer's Hessian and updates
# its weights column by column.
COST_ORDER = (WeightMethod.RTN, WeightMethod.HQQ, WeightMethod.AWQ, WeightMethod.GPTQ)


class SweepError(EngineError):
    """A sweep asked for with a precision or direction it does not support; the message says which."""


def layer_plan(layer: str, precision: str, direction: str, method: WeightMethod = WeightMethod.RTN) -> Plan:
    """The plan of one sweep row: only `layer` at `precision` (by `method`), or every layer but `layer`."""
    if direction == "one":
        return Plan(rules=((layer, Rule(precision, () if method == WeightMethod.RTN else (("method", method),))),))
    if method != WeightMethod.RTN:
        raise SweepError(f"method {method} is swept one layer at a time (direction one), not {direction!r}")
    if direction == "all-but-one":
        return Plan(rules=(("*", precision), (layer, "fp32")))
    raise SweepError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")


def check_precisions(precisions: Iterable[str]) -> tuple[str, ...]:
    """The requested sweep precisions, validated (int8 and int4 are what the sweep is for)."""
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in precisions if p.strip()))
    bad = [p for p in chosen if p not in SWEEP_PRECISIONS]
    if bad or not chosen:
        raise SweepError(f"sweep precisions must be among {', '.join(SWEEP_PRECISIONS)}, "
                         f"not {bad[0] if bad else 'none'!r}")
    return chosen


def check_methods(methods: Iterable[str]) -> tuple[WeightMethod, ...]:
    """The requested weight methods, validated, in the given order (RTN first when it is asked)."""
    chosen = tuple(dict.fromkeys(m.strip().lower() for m in methods if m.strip()))
    bad = [m for m in chosen if m not in names(WeightMethod)]
    if bad or not chosen:
        raise SweepError(f"sweep methods must be among {', '.join(names(WeightMethod))}, "
                         f"not {bad[0] if bad else 'none'!r}")
    return tuple(WeightMethod(m) for m in chosen)


def applies(layer: Layer, precision: str, method: WeightMethod) -> bool:
    """Whether a sweep has a (layer, precision, method) row: the method takes the precision, and a method other
    than RTN is for Linears (none has activations or a Hessian for an embedding lookup)."""
    return method == WeightMethod.RTN or (layer.kind == "linear" and precision in METHOD_PRECISIONS[method])


def row_key(layer: str, precision: str, method: WeightMethod = WeightMethod.RTN) -> tuple:
    """A row's key in `done` and in lookups: (layer, precision) for RTN, as sweeps have always keyed it (so RTN
    sweeps and their memoized rows keep their keys), and (layer, precision, method) for any other method."""
    return (layer, precision) if method == WeightMethod.RTN else (layer, precision, WeightMethod(method))


def group_of(role: str, block: int | None) -> str:
    """Where a layer sits for aggregates and heatmaps: 'block b', 'embedding' or 'head'."""
    if role == "embedding":
        return "embedding"
    return "head" if block is None else f"block {block}"


@dataclass(frozen=True)
class Row:
    """One sweep result: a layer, a precision and a direction, measured on the whole set."""

    layer: str
    block: int | None
    role: str
    precision: str
    direction: str
    accuracy: float
    ci95: tuple[float, float]
    flips: int
    kl: float
    mcnemar_p: float
    sqnr_db: float | None
    drop: float  # accuracy points lost against FP32 (negative: gained)
    agreement: float
    n: int
    start_cut: int
    seconds: float
    method: WeightMethod = WeightMethod.RTN  # rows stored before methods existed are RTN's

    @property
    def key(self) -> tuple:
        return row_key(self.layer, self.precision, self.method)

    def to_json(self) -> dict:
        data = asdict(self)
        data["ci95"] = list(self.ci95)
        data["method"] = self.method.value
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Row":
        method = WeightMethod(data.get("method", WeightMethod.RTN))
        return cls(**{**data, "ci95": tuple(data["ci95"]), "method": method})


@dataclass(frozen=True)
class SweepProgress:
    """Where a running sweep stands; eta_s is None until a row has been computed."""

    done: int
    total: int
    elapsed_s: float
    eta_s: float | None
    row: Row | None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class SweepResult:
    rows: list[Row] = field(default_factory=list)
    stopped: bool = False
    computed: int = 0  # rows evaluated in this call (the others were given in `done`)
    seconds: float = 0.0


def _work(cut: int, n_blocks: int) -> float:
    """Half-blocks a row runs from `cut`: the quantity a row's time is proportional to."""
    return 2 * n_blocks - cut + HEAD_WORK


def sweep(evaluator: Evaluator, precisions: Sequence[str] = SWEEP_PRECISIONS, direction: str = "one",
          sqnr: dict[tuple[str, str], float] | None = None, done: dict[tuple, Row] | None = None,
          should_stop: Callable[[], bool] | None = None, on_row: Callable[[Row], None] | None = None,
          progress: Callable[[SweepProgress], None] | None = None,
          methods: Sequence[str] = (WeightMethod.RTN,)) -> SweepResult:
    """Every (layer, precision, method) row in forward order (methods where they apply), a layer's rows from
    the same start.

    `done` rows (keyed by `row_key`) are kept as given (a resumed sweep); `should_stop` is asked between rows
    and the rows finished so far are returned; `on_row` sees each newly computed row (to memoize it). The SQNR
    proxy is RTN's, so only RTN rows carry it.
    """
    precisions, methods = check_precisions(precisions), check_methods(methods)
    if direction not in DIRECTIONS:
        raise SweepError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    if direction != "one" and methods != (WeightMethod.RTN,):
        raise SweepError(f"methods other than rtn are swept one layer at a time (direction one), not {direction!r}")
    done = dict(done or {})
    started = time.perf_counter()
    tasks = [(layer, p, m) for layer in evaluator.layers for p in precisions for m in methods if applies(layer, p, m)]
    cuts = {layer.name: evaluator.cuts[layer.name] for layer in evaluator.layers}
    todo_work = {row_key(layer.name, p, m): _work(cuts[layer.name], evaluator.stages.n_blocks)
                 for layer, p, m in tasks if row_key(layer.name, p, m) not in done}
    if direction == "all-but-one":  # each precision's uniform run, once, if any of its rows is missing
        for p in {key[1] for key in todo_work}:
            todo_work[("*", p)] = _work(0, evaluator.stages.n_blocks)
    remaining, spent_work, spent_s = sum(todo_work.values()), 0.0, 0.0
    starts: dict[str, Trace] = {}
    result = SweepResult()

    def report(row: Row | None) -> None:
        if progress is not None:
            eta = max(remaining, 0.0) * spent_s / spent_work if spent_work else None
            progress(SweepProgress(len(result.rows), len(tasks), time.perf_counter() - started, eta, row))

    report(None)
    for layer, precision, method in tasks:
        key = row_key(layer.name, precision, method)
        if key in done:
            result.rows.append(done[key])
            continue
        if should_stop is not None and should_stop():
            result.stopped = True
            break
        if direction == "one":
            source = evaluator.baseline_trace
        else:
            if precision not in starts:
                t0 = time.perf_counter()
                starts[precision] = evaluator.run(Plan.uniform(precision), keep=True)[1]
                spent_s += time.perf_counter() - t0
                spent_work += todo_work[("*", precision)]
                remaining -= todo_work[("*", precision)]
            source = starts[precision]
        row = measure_row(evaluator, layer, precision, direction, source, sqnr, method)
        spent_s += row.seconds
        spent_work += todo_work[key]
        remaining -= todo_work[key]
        result.rows.append(row)
        result.computed += 1
        if on_row is not None:
            on_row(row)
        report(row)
    result.seconds = time.perf_counter() - started
    return result


def measure_row(evaluator: Evaluator, layer: Layer, precision: str, direction: str, source: Trace,
                sqnr: dict[tuple[str, str], float] | None = None, method: WeightMethod = WeightMethod.RTN) -> Row:
    """One row, resumed from `source`: the FP32 states for "one", the uniform plan's for "all-but-one"."""
    started = time.perf_counter()
    evaluated, _ = evaluator.run(layer_plan(layer.name, precision, direction, method), source=source)
    c = evaluated.comparison
    drop = 100.0 * (evaluator.baseline.comparison.accuracy - c.accuracy)
    proxy = (sqnr or {}).get((layer.name, precision)) if method == WeightMethod.RTN else None
    return Row(layer.name, layer.block, layer.role, precision, direction, c.accuracy, tuple(c.ci95), c.flips, c.kl,
               c.mcnemar_p, proxy, drop, c.agreement, c.n, evaluated.start_cut, time.perf_counter() - started,
               WeightMethod(method))


def rescued_by(rows: Iterable[Row]) -> dict[tuple[str, str], WeightMethod | None]:
    """For each single-layer (layer, precision) whose RTN row changes correctness significantly against FP32
    (McNemar p < SIGNIFICANCE), the cheapest method (COST_ORDER) whose row is within noise, or None when no
    swept method is. Layers RTN leaves within noise need no rescue and are not listed."""
    single = {row.key: row for row in rows if row.direction == "one"}
    out: dict[tuple[str, str], WeightMethod | None] = {}
    for (layer, precision), row in ((k, r) for k, r in single.items() if r.method == WeightMethod.RTN):
        if row.mcnemar_p >= SIGNIFICANCE:
            continue
        out[(layer, precision)] = next(
            (m for m in COST_ORDER[1:] if (layer, precision, m) in single
             and single[(layer, precision, m)].mcnemar_p >= SIGNIFICANCE), None)
    return out


# ---- the proxy ------------------------------------------------------------------------------
def sqnr_proxy(model: nn.Module, tokenizer, texts: Sequence[str], precisions: Sequence[str] = SWEEP_PRECISIONS,
               group_size: int = DEFAULT_GROUP_SIZE, batch_size: int = 32) -> dict[tuple[str, str], float]:
    """Each layer's output SQNR (dB) at each precision, on its FP32 inputs from `texts` (calibration texts).

    Forward hooks on a shallow copy see every layer's real input and FP32 output; the simulated
    quantized layer (the same weights and activation rounding the sweep evaluates) runs on the same
    input, batch by batch (length-sorted, as evaluation batches are), over real tokens only.
    """
    precisions = check_precisions(precisions)
    encoded = encode(tokenizer, texts, input_limit(model, tokenizer))
    device = next(model.parameters()).device
    model_key = fingerprint(model)
    layers = inventory(model)
    quantized = {(layer.name, p): _quantized_layer(model, model_key, layer, p, group_size)
                 for layer in layers for p in precisions}
    signal: dict[str, float] = {layer.name: 0.0 for layer in layers}
    noise: dict[tuple[str, str], float] = {key: 0.0 for key in quantized}
    mask: list[torch.Tensor] = []

    def measure(layer: Layer):
        def hook(_module, args, output):
            x, reference = args[0], output
            if reference.dim() == 3 and reference.shape[:2] == mask[0].shape:  # real tokens only
                x = x[mask[0]]
                reference = reference[mask[0]]
            signal[layer.name] += float(torch.linalg.vector_norm(reference.float())) ** 2
            for precision in precisions:
                error = F.mse_loss(quantized[(layer.name, precision)](x), reference, reduction="sum")
                noise[(layer.name, precision)] += float(error)
        return hook

    probe = shallow_copy(model)  # hooks go on a private copy: the shared model is never touched
    handles = [probe.get_submodule(layer.name).register_forward_hook(measure(layer)) for layer in layers]
    try:
        with torch.inference_mode():
            for rows in length_sorted(encoded.lengths, batch_size):
                ids, attention = pad([encoded.ids[i] for i in rows], tokenizer.pad_token_id or 0)
                mask[:] = [attention.bool().to(device)]
                probe(input_ids=ids.to(device), attention_mask=attention.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {(name, p): sqnr_db(signal[name], value) for (name, p), value in noise.items()}


def proxy_texts(evaluator: Evaluator) -> tuple[str, ...]:
    """The proxy's sentences: a seeded sample of the evaluated source's calibration pool."""
    return calibration_texts(evaluator.dataset.calibration, PROXY_SENTENCES)


def _quantized_layer(model: nn.Module, model_key: str, layer: Layer, precision: str,
                     group_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    original = model.get_submodule(layer.name)
    if layer.kind == "embedding":
        table = simulated_weight(model_key, layer.name, precision, original.weight.detach(), group_size, embedding=True)
        return lambda ids: F.embedding(ids, table)
    weight, bias = linear_parts(original)
    plan = Plan(rules=((layer.name, precision),), group_size=group_size)
    return simulated_linear(model_key, layer.name, plan.specs([layer.name])[layer.name], weight, bias, plan)


def proxy_agreement(rows: Iterable[Row]) -> dict[str, dict]:
    """Spearman's rho (with p) between the SQNR proxy and the measured KL, pooled and per precision.

    A good proxy has a strongly negative rho: a higher SQNR should mean a smaller KL.
    """
    usable = [r for r in rows if r.sqnr_db is not None and math.isfinite(r.sqnr_db) and math.isfinite(r.kl)]
    out: dict[str, dict] = {}
    for name in ("all",) + SWEEP_PRECISIONS:
        chosen = [r for r in usable if name in ("all", r.precision)]
        if len(chosen) < 3 or len({r.sqnr_db for r in chosen}) < 2 or len({r.kl for r in chosen}) < 2:
            continue
        rho, p = spearmanr([r.sqnr_db for r in chosen], [r.kl for r in chosen])
        out[name] = {"rho": float(rho), "p": float(p), "n": len(chosen)}
    return out


def block_summary(rows: Iterable[Row]) -> list[dict]:
    """Mean and worst drop, and mean KL, per (direction, precision, block / embedding / head), of RTN's rows."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in (r for r in rows if r.method == WeightMethod.RTN):
        groups.setdefault((row.direction, row.precision, group_of(row.role, row.block)), []).append(row)

    def order(key):
        where = key[2]
        return (key[0], key[1], -1 if where == "embedding" else 1 << 20 if where == "head" else int(where.split()[1]))

    return [{"direction": d, "precision": p, "group": g, "layers": len(rs),
             "mean_drop": float(np.mean([r.drop for r in rs])), "max_drop": float(np.max([r.drop for r in rs])),
             "mean_kl": float(np.mean([r.kl for r in rs]))}
            for (d, p, g), rs in sorted(groups.items(), key=lambda item: order(item[0]))]
