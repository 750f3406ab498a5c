"""Recipes: which layers get which quantizers, as ordered wildcard rules (later rules win).

A recipe in YAML or JSON::

    description: INT4 weights, group 64, attention output left in INT8
    algorithm: awq             # rtn, smoothquant, awq, gptq, or a list applied in order
    options: {awq_grid: 20}    # algorithm and calibration options (see DEFAULT_OPTIONS)
    kv_cache: fp8              # optional: fp8, int8 or nvfp4 KV cache
    exclude: ["lm_head"]       # default; layers never quantized
    rules:
      - pattern: "*"           # fnmatch wildcard on the module name
        weight: {format: int4, block_size: 64}
      - pattern: "*.o_proj"
        weight: int8           # a named spec: int8, int4, fp8, nvfp4, mxfp4, mxfp8
      - pattern: "*.layers.0.*"
        enable: false          # leave the first layer in float

Unknown keys, formats or algorithms are errors, never ignored.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..errors import LeanLMError
from .formats import NAMED_SPECS, QuantSpec

ALGORITHMS = ("rtn", "smoothquant", "awq", "gptq")
DEFAULT_OPTIONS = {
    "alpha": "search",  # SmoothQuant migration strength in [0, 1], or "search" (best per layer)
    "awq_grid": 20,  # AWQ scale-search points in [0, 1)
    "awq_clip": True,  # AWQ weight-clipping search after scaling
    "sample_tokens": 1024,  # input rows per layer kept for SmoothQuant's alpha search
    "gptq_block": 128,  # GPTQ columns updated together
    "gptq_damp": 0.01,  # GPTQ Hessian dampening (fraction of its mean diagonal)
    "act_order": False,  # GPTQ: columns by decreasing Hessian diagonal
    "weight_calibration": "max",  # max, or mse (clipping search on the weight alone; GPTQ starts from it)
    "act_calibration": "max",  # static activation ranges: max, percentile or mse
    "percentile": 99.99,
    # True: each layer is calibrated on the previous layer's quantized outputs. False: on the float
    # model's activations (one pass per layer where statistics allow: Model Optimizer's way, faster).
    "sequential": True,
    # Inside a sequential layer, each group of linear layers sharing an input (q/k/v, o, gate/up, down)
    # calibrated on the quantized outputs of the groups before it: true, false, or auto (where the
    # layer quantizes activations: there it helps, for weight-only formats it measured slightly worse).
    "staged": "auto",
}
KV_SPECS = {
    "fp8": QuantSpec("fp8_e4m3", block_size=0),
    "int8": QuantSpec("int8", block_size=0),
    "nvfp4": QuantSpec("fp4_e2m1", block_size=16, scale_format="e4m3", dynamic=True),
}
_SPEC_KEYS = {"format", "block_size", "symmetric", "scale_format", "dynamic"}
_RULE_KEYS = {"pattern", "weight", "input", "output", "enable"}
_RECIPE_KEYS = {"name", "description", "algorithm", "options", "kv_cache", "exclude", "rules"}


@dataclass(frozen=True)
class Rule:
    pattern: str
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    enable: bool = True

    @property
    def specs(self) -> tuple[QuantSpec | None, QuantSpec | None, QuantSpec | None]:
        return self.weight, self.input, self.output


@dataclass
class Recipe:
    name: str
    description: str
    rules: list[Rule]
    algorithm: list[str] = field(default_factory=lambda: ["rtn"])
    options: dict = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    kv_cache: QuantSpec | None = None
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])

    def layer_specs(self, layer: str) -> tuple[QuantSpec | None, QuantSpec | None, QuantSpec | None] | None:
        """The (weight, input, output) specs for a module name, or None when the layer stays float."""
        if any(fnmatch.fnmatchcase(layer, p) or layer.endswith("." + p) or layer == p for p in self.exclude):
            return None
        found = None
        for r in self.rules:
            if fnmatch.fnmatchcase(layer, r.pattern):
                found = r.specs if r.enable else None
        if found is None or found == (None, None, None):
            return None
        return found

    @property
    def needs_data(self) -> bool:
        """Whether calibration data is required (data-driven algorithms, static activations, KV cache)."""
        static = any(s is not None and not s.dynamic for r in self.rules for s in (r.input, r.output))
        return any(a != "rtn" for a in self.algorithm) or static or self.kv_cache is not None

    def to_dict(self) -> dict:
        def spec(s):
            return None if s is None else asdict(s)

        return {"name": self.name, "description": self.description, "algorithm": list(self.algorithm),
                "options": dict(self.options), "kv_cache": spec(self.kv_cache), "exclude": list(self.exclude),
                "rules": [{"pattern": r.pattern, "weight": spec(r.weight), "input": spec(r.input),
                           "output": spec(r.output), "enable": r.enable} for r in self.rules]}


def _parse_spec(value, where: str) -> QuantSpec | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in NAMED_SPECS:
            raise LeanLMError(f"{where}: unknown spec '{value}': use one of {', '.join(NAMED_SPECS)} or a mapping")
        return NAMED_SPECS[value]
    if not isinstance(value, dict):
        raise LeanLMError(f"{where}: a spec must be a name or a mapping, not {type(value).__name__}")
    unknown = set(value) - _SPEC_KEYS
    if unknown:
        raise LeanLMError(f"{where}: unknown key(s) {sorted(unknown)}: allowed keys are {sorted(_SPEC_KEYS)}")
    if "format" not in value:
        raise LeanLMError(f"{where}: a spec needs 'format'")
    base = NAMED_SPECS.get(value["format"])
    fields = dict(value)
    if base is not None:  # a named spec as format: its defaults, overridden by the given keys
        fields = {**asdict(base), **{k: v for k, v in value.items() if k != "format"}}
    return QuantSpec(**fields)


def recipe_from_dict(d: dict, name: str = "custom") -> Recipe:
    if not isinstance(d, dict):
        raise LeanLMError(f"recipe '{name}' must be a mapping with 'rules'")
    unknown = set(d) - _RECIPE_KEYS
    if unknown:
        raise LeanLMError(f"recipe '{name}': unknown key(s) {sorted(unknown)}: allowed keys are {sorted(_RECIPE_KEYS)}")
    algorithm = d.get("algorithm", "rtn")
    algorithm = algorithm.split("+") if isinstance(algorithm, str) else list(algorithm or ["rtn"])
    for a in algorithm:
        if a not in ALGORITHMS:
            raise LeanLMError(f"recipe '{name}': unknown algorithm '{a}': use one of {', '.join(ALGORITHMS)}")
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise LeanLMError(f"recipe '{name}': 'options' must be a mapping")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise LeanLMError(f"recipe '{name}': unknown option(s) {sorted(unknown)}: allowed are {sorted(DEFAULT_OPTIONS)}")
    options = {**DEFAULT_OPTIONS, **options}
    if options["alpha"] != "search" and not (isinstance(options["alpha"], (int, float)) and 0 <= options["alpha"] <= 1):
        raise LeanLMError(f"recipe '{name}': option alpha={options['alpha']!r} is invalid: use a number in [0, 1] or 'search'")
    if not isinstance(options["sequential"], bool):
        raise LeanLMError(f"recipe '{name}': option sequential={options['sequential']!r} is invalid: use true or false")
    if options["staged"] not in (True, False, "auto"):
        raise LeanLMError(f"recipe '{name}': option staged={options['staged']!r} is invalid: use true, false or auto")
    for key in ("weight_calibration", "act_calibration"):
        allowed = ("max", "mse") if key == "weight_calibration" else ("max", "percentile", "mse")
        if options[key] not in allowed:
            raise LeanLMError(f"recipe '{name}': option {key}='{options[key]}' is unknown: use one of {', '.join(allowed)}")
    kv = d.get("kv_cache")
    if isinstance(kv, str) and kv in KV_SPECS:
        kv = KV_SPECS[kv]
    elif kv is not None:
        kv = _parse_spec(kv, f"recipe '{name}' kv_cache")
    rules = []
    for i, r in enumerate(d.get("rules") or []):
        where = f"recipe '{name}' rule {i + 1}"
        if not isinstance(r, dict) or "pattern" not in r:
            raise LeanLMError(f"{where}: each rule needs a 'pattern'")
        unknown = set(r) - _RULE_KEYS
        if unknown:
            raise LeanLMError(f"{where}: unknown key(s) {sorted(unknown)}: allowed keys are {sorted(_RULE_KEYS)}")
        rules.append(Rule(str(r["pattern"]), _parse_spec(r.get("weight"), where + " weight"),
                          _parse_spec(r.get("input"), where + " input"), _parse_spec(r.get("output"), where + " output"),
                          bool(r.get("enable", True))))
    if not rules:
        raise LeanLMError(f"recipe '{name}' has no rules: add at least one {{pattern, weight}} rule")
    exclude = d.get("exclude", ["lm_head"])
    if not isinstance(exclude, list):
        raise LeanLMError(f"recipe '{name}': 'exclude' must be a list of layer patterns")
    return Recipe(d.get("name", name), d.get("description", ""), rules, algorithm, options, kv,
                  [str(e) for e in exclude])


def _preset(name: str, description: str, weight: QuantSpec | None, input: QuantSpec | None = None,
            algorithm: str = "rtn", **options) -> Recipe:
    return Recipe(name, description, [Rule("*", weight=weight, input=input)], algorithm.split("+"),
                  {**DEFAULT_OPTIONS, **options})


INT8_ROW = QuantSpec("int8", block_size=-1)
FP8_TENSOR = QuantSpec("fp8_e4m3", block_size=0)
FP8_ROW = QuantSpec("fp8_e4m3", block_size=-1)
NVFP4 = NAMED_SPECS["nvfp4"]
_BASE_PRESETS = [
    # Sequential, but not staged inside the layer: per-tensor max ranges gain little from staging and it
    # costs a pass per group (smollm2 +2.79% in 178 s, staged +2.33% in 218 s, ModelOpt +2.81% in 198-227 s;
    # gemma3 +7.41% in 112 s, staged +6.85% in 176 s). Ranges from float activations only (ModelOpt's way):
    # smollm2 +2.58%, but gemma3 +8.23%.
    _preset("fp8", "FP8 E4M3 weights and activations, per-tensor scales (static, max-calibrated)",
            FP8_TENSOR, FP8_TENSOR, staged=False),
    # MSE-searched weight scales: within a binade E4M3's steps are uniform, so the row maximum need not
    # land on 448 (smollm2: +2.3% perplexity against +2.7% for max scales).
    _preset("fp8_dynamic", "FP8 E4M3 weights per output channel (MSE-searched scales), activations per token with "
            "scales computed on every call (vLLM's FP8_DYNAMIC layout); needs no calibration data",
            FP8_ROW, FP8_ROW.with_(dynamic=True), weight_calibration="mse"),
    _preset("fp8_gptq", "fp8_dynamic with GPTQ error compensation of the weights (act-order, from MSE-searched "
            "scales; the same checkpoint format)", FP8_ROW, FP8_ROW.with_(dynamic=True), "gptq",
            weight_calibration="mse", act_order=True),
    _preset("int8_sq", "W8A8 INT8 with SmoothQuant: per-channel weights, per-tensor static activations",
            INT8_ROW, QuantSpec("int8", block_size=0), "smoothquant"),
    # Per-token ranges computed on every call (SmoothQuant's O1, llmcompressor's W8A8, vLLM's int8 W8A8
    # dynamic layout), and GPTQ on the smoothed weights, which carry the migrated outliers: gemma3-270m
    # +1.70% against +3.32% without GPTQ (and +7.0% static), though INT8 weights alone lose nothing there.
    _preset("int8_sq_dynamic", "W8A8 INT8 with SmoothQuant, then GPTQ on the smoothed weights: per-channel weights, "
            "per-token dynamic activations", INT8_ROW, QuantSpec("int8", block_size=-1, dynamic=True),
            "smoothquant+gptq"),
    _preset("w8a16", "INT8 weights, per-channel symmetric scales; activations float", INT8_ROW),
    _preset("w4a8_awq", "INT4 AWQ weights (groups of 128) with FP8 per-tensor static activations",
            QuantSpec("int4", block_size=128), FP8_TENSOR, "awq"),
    _preset("nvfp4", "NVFP4: E2M1 values, E4M3 scales per 16 values and an FP32 tensor scale; weights and "
            "activations (dynamic)", NVFP4, NVFP4.with_(dynamic=True)),
    _preset("nvfp4_awq", "NVFP4 with AWQ scaling and clipping of the weights", NVFP4, NVFP4.with_(dynamic=True), "awq"),
    _preset("mxfp4", "OCP MXFP4: E2M1 values, E8M0 scales per 32 values; weights and activations (dynamic)",
            NAMED_SPECS["mxfp4"], NAMED_SPECS["mxfp4"].with_(dynamic=True)),
    _preset("mxfp8", "OCP MXFP8: E4M3 values, E8M0 scales per 32 values; weights and activations (dynamic)",
            NAMED_SPECS["mxfp8"], NAMED_SPECS["mxfp8"].with_(dynamic=True)),
]
for _g in (128, 64):
    _sfx = "" if _g == 128 else f"_g{_g}"
    _BASE_PRESETS += [
        _preset(f"w4a16_rtn{_sfx}", f"INT4 weights, groups of {_g} (partial groups padded), symmetric, round-to-nearest",
                QuantSpec("int4", block_size=_g)),
        _preset(f"w4a16_awq{_sfx}", f"INT4 weights, groups of {_g}, AWQ scale and clipping search",
                QuantSpec("int4", block_size=_g), algorithm="awq"),
        _preset(f"w4a16_gptq{_sfx}", f"INT4 weights, groups of {_g}, GPTQ error compensation (act-order) from "
                "MSE-clipped scales", QuantSpec("int4", block_size=_g), algorithm="gptq", act_order=True,
                weight_calibration="mse"),
        # Block scales on both sides (vLLM's FP8_BLOCK activations: groups of 128 along the input dim) keep one
        # outlier from coarsening a whole row or token: smollm2 +0.81% against +1.58% for fp8_gptq.
        _preset(f"fp8_block{_sfx}", f"FP8 E4M3 weights in groups of {_g} (GPTQ, act-order, MSE-searched scales) and "
                f"activations in dynamic groups of {_g} per token", QuantSpec("fp8_e4m3", block_size=_g),
                QuantSpec("fp8_e4m3", block_size=_g, dynamic=True), "gptq", weight_calibration="mse", act_order=True),
    ]


def _with_kv(r: Recipe, kv: str) -> Recipe:
    return Recipe(f"{r.name}_kv_{kv}", f"{r.description}; {kv.upper()} KV cache", r.rules, r.algorithm,
                  r.options, KV_SPECS[kv], r.exclude)


PRESETS: dict[str, Recipe] = {r.name: r for r in _BASE_PRESETS}
PRESETS.update({f"{r.name}_kv_{kv}": _with_kv(r, kv) for r in _BASE_PRESETS for kv in ("fp8", "nvfp4")})


def get_recipe(recipe: "str | dict | Recipe") -> Recipe:
    """A preset name, a path to a YAML/JSON recipe file, a dict, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if recipe in PRESETS:
        return PRESETS[recipe]
    path = Path(recipe)
    if not path.is_file():
        raise LeanLMError(f"unknown recipe '{recipe}': use a preset ({', '.join(PRESETS)}) or a YAML/JSON file")
    text = path.read_text(encoding="utf-8")
    try:
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise LeanLMError(f"recipe file '{path}' does not parse ({str(e).splitlines()[0]}): fix its syntax") from None
    return recipe_from_dict(d, name=path.stem)
