"""The demo: float baseline vs INT8 and INT4 weight-only round-to-nearest on the default model."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from .eval import evaluate
from .eval.report import format_table, write_report
from .models import DEFAULT_MODEL, load
from .quant.api import quantize

DEMO_RECIPES = ("w8a16", "w4a16_rtn")


def run_demo(model: str = DEFAULT_MODEL, data: str = "wiki", max_tokens: int = 8192, speed: bool = True,
             out: str | Path = "demo-report", recipes=DEMO_RECIPES, progress: bool = True, echo=print) -> dict:
    """Evaluate the float model and each recipe's quantized copy; write and return the report."""
    timings = {}
    t = time.perf_counter()
    base, tok = load(model)
    timings["load"] = time.perf_counter() - t
    results = []

    def run(name, m):
        t = time.perf_counter()
        echo(f"[{len(results) + 1}/{len(recipes) + 1}] evaluating {name}")
        r = evaluate(m, tok, data=data, max_tokens=max_tokens, speed=speed, name=name, progress=progress)
        timings[name] = time.perf_counter() - t
        results.append(r)

    run("float32", base)
    for recipe in recipes:
        t = time.perf_counter()
        q = quantize(copy.deepcopy(base), recipe, progress=progress)
        timings[f"quantize {recipe}"] = time.perf_counter() - t
        run(recipe, q)
        del q
    paths = write_report(results, out, title=f"leanlm demo: {model} on {data}")
    echo("")
    echo(format_table(results))
    echo("")
    echo("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    echo(f"report: {paths['html']} (also {paths['md'].name}, {paths['json'].name})")
    return {"results": results, "paths": paths, "timings": timings}
