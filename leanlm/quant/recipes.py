"""Recipes: which layers get which quantizers, as ordered wildcard rules (later rules win).

A recipe in YAML or JSON::

    description: INT4 weights, group 64, attention output left in INT8
    algorithm: rtn             # rtn (round-to-nearest)
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

ALGORITHMS = ("rtn",)
_SPEC_KEYS = {"format", "block_size", "symmetric", "scale_format", "dynamic"}
_RULE_KEYS = {"pattern", "weight", "input", "enable"}
_RECIPE_KEYS = {"name", "description", "algorithm", "exclude", "rules"}


@dataclass(frozen=True)
class Rule:
    pattern: str
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    enable: bool = True


@dataclass
class Recipe:
    name: str
    description: str
    rules: list[Rule]
    algorithm: str = "rtn"
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])

    def layer_specs(self, layer: str) -> tuple[QuantSpec | None, QuantSpec | None] | None:
        """The (weight, input) specs for a module name, or None when the layer stays float."""
        if any(fnmatch.fnmatchcase(layer, p) or layer.endswith("." + p) or layer == p for p in self.exclude):
            return None
        found = None
        for r in self.rules:
            if fnmatch.fnmatchcase(layer, r.pattern):
                found = (r.weight, r.input) if r.enable else None
        if found is None or found == (None, None):
            return None
        return found

    def to_dict(self) -> dict:
        def spec(s):
            return None if s is None else asdict(s)

        return {"name": self.name, "description": self.description, "algorithm": self.algorithm,
                "exclude": list(self.exclude),
                "rules": [{"pattern": r.pattern, "weight": spec(r.weight), "input": spec(r.input), "enable": r.enable}
                          for r in self.rules]}


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
    if algorithm not in ALGORITHMS:
        raise LeanLMError(f"recipe '{name}': unknown algorithm '{algorithm}': use one of {', '.join(ALGORITHMS)}")
    rules = []
    for i, r in enumerate(d.get("rules") or []):
        where = f"recipe '{name}' rule {i + 1}"
        if not isinstance(r, dict) or "pattern" not in r:
            raise LeanLMError(f"{where}: each rule needs a 'pattern'")
        unknown = set(r) - _RULE_KEYS
        if unknown:
            raise LeanLMError(f"{where}: unknown key(s) {sorted(unknown)}: allowed keys are {sorted(_RULE_KEYS)}")
        rules.append(Rule(str(r["pattern"]), _parse_spec(r.get("weight"), where + " weight"),
                          _parse_spec(r.get("input"), where + " input"), bool(r.get("enable", True))))
    if not rules:
        raise LeanLMError(f"recipe '{name}' has no rules: add at least one {{pattern, weight}} rule")
    exclude = d.get("exclude", ["lm_head"])
    if not isinstance(exclude, list):
        raise LeanLMError(f"recipe '{name}': 'exclude' must be a list of layer patterns")
    return Recipe(d.get("name", name), d.get("description", ""), rules, algorithm, [str(e) for e in exclude])


def _weight_only(name: str, description: str, spec: QuantSpec) -> Recipe:
    return Recipe(name, description, [Rule("*", weight=spec)])


PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        _weight_only("w8a16", "INT8 weights, per-channel symmetric scales; activations float",
                     QuantSpec("int8", block_size=-1)),
        _weight_only("w4a16_rtn", "INT4 weights, groups of 128 (partial groups padded), symmetric, round-to-nearest",
                     QuantSpec("int4", block_size=128)),
        _weight_only("w4a16_rtn_g64", "INT4 weights, groups of 64, symmetric, round-to-nearest",
                     QuantSpec("int4", block_size=64)),
    )
}


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
