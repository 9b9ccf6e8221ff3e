"""Cleaning recipes: an ordered list of normalizers and quality filters, from YAML.

Schema (data-juicer style; every op is a one-key mapping, ``{}`` or nothing for no
parameters)::

    name: steel_text            # optional, defaults to the file name
    description: ...            # optional, free text
    process:
      - nfkc:                   # normalizers first (NORMALIZERS), applied in order
      - clean_whitespace: {max_blank_lines: 1}
      - text_length: {min: 10, max: 100000}      # filters (STATS): inclusive bounds,
      - char_rep_ratio: {rep_len: 10, max: 0.4}  # plus the stat's own parameters
      - language: {langs: [zh, en], min_score: 0.5}

A filter op is named after its stat (``steelworks.data.filters.STATS``) and takes ``min``
and/or ``max`` plus the stat's parameters; ``language`` is the filter on ``lang_score``
with ``langs`` and ``min_score``. Every stat is computed on the fully normalized text, so
normalizers may not follow a filter. Unknown ops, unknown parameters and ill-typed
thresholds are ``RecipeError``s naming the file, the op's index and name, and the valid
choices.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from steelworks.data.filters import (
    STATS,
    compute_stats,
    flagged_words_path,
    load_flagged_words,
    stat_params,
)
from steelworks.data.normalize import NORMALIZERS

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
KEPT = "kept"  # the status of a row still in the running (steelworks.data.clean)
# Filter op -> stat. Ops are named after their stat, except `language`.
FILTER_OPS: dict[str, str] = {**{s: s for s in STATS}, "language": "lang_score"}


class RecipeError(ValueError):
    """A recipe that cannot be used, with the file and op at fault."""


@dataclass(frozen=True)
class NormalizerSpec:
    op: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FilterSpec:
    op: str
    stat: str
    params: dict[str, Any] = field(default_factory=dict)
    min: float | None = None  # inclusive bounds; None: unbounded
    max: float | None = None

    @property
    def column(self) -> str:
        return f"stat_{self.stat}"

    def passes(self, value: float) -> bool:
        return ((self.min is None or value >= self.min)
                and (self.max is None or value <= self.max))


@dataclass
class Recipe:
    name: str
    normalizers: list[NormalizerSpec] = field(default_factory=list)
    filters: list[FilterSpec] = field(default_factory=list)
    source: str | None = None  # the YAML file, for manifests and error messages
    # Ready-to-call forms, built once (a flagged-word file is read here, not per document).
    _norm_fns: list[Callable[[str], str]] = field(init=False, repr=False, compare=False)
    _specs: dict[str, dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = Path(self.source).parent if self.source else None
        self._norm_fns = [partial(NORMALIZERS[n.op], **n.params) for n in self.normalizers]
        self._specs = {}
        for f in self.filters:
            params = dict(f.params)
            if "words" in params:
                params["words"] = load_flagged_words(params["words"], base)
            self._specs[f.stat] = params

    @classmethod
    def default(cls, min_chars: int, max_chars: int) -> Recipe:
        """The built-in cleaning: NFKC, control characters, whitespace (empty lines dropped),
        length bounds; what ``clean.normalize`` plus its length filter did."""
        return cls(
            name="default",
            normalizers=[NormalizerSpec("nfkc"), NormalizerSpec("remove_control_chars"),
                         NormalizerSpec("clean_whitespace", {"max_blank_lines": 0})],
            filters=[FilterSpec("text_length", "text_length", {}, min_chars, max_chars)],
        )

    def files(self) -> list[Path]:
        """The files this recipe was loaded from: its YAML and every flagged-word list it
        names (what the data stage's cache key hashes); none for a recipe built in code."""
        if not self.source:
            return []
        base = Path(self.source).parent
        words = [flagged_words_path(f.params["words"], base) for f in self.filters
                 if isinstance(f.params.get("words"), (str, Path))]
        return [Path(self.source), *dict.fromkeys(words)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for run manifests."""
        return {
            "name": self.name,
            "source": self.source,
            "normalizers": [{"op": n.op, "params": dict(n.params)} for n in self.normalizers],
            "filters": [{"op": f.op, "stat": f.stat, "column": f.column, "params": dict(f.params),
                         "min": f.min, "max": f.max} for f in self.filters],
        }

    def normalize(self, text: str) -> str:
        """The normalizers alone, in recipe order."""
        for fn in self._norm_fns:
            text = fn(text)
        return text

    def apply(self, text: str) -> tuple[str, dict[str, float], str | None]:
        """Normalized text, every filter's stat, and the first failing filter's op (or None).
        All stats are computed even after a failure, so histograms show the whole
        distribution, not only the documents that survived the earlier filters."""
        text = self.normalize(text)
        stats = compute_stats(text, self._specs)
        for f in self.filters:
            if not f.passes(stats[f.stat]):
                return text, stats, f.op
        return text, stats, None

    def apply_batch(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows with status ``kept``: text normalized, one ``stat_<name>`` float column per
        filter (NaN on other rows), status ``filtered:<op>`` where a filter fails."""
        df = df.copy()
        if "status" not in df.columns:
            df["status"] = KEPT
        ok = (df["status"] == KEPT).to_numpy()
        rows = np.flatnonzero(ok)
        results = [self.apply(t) for t in df["text"].iloc[rows]]
        if len(rows):
            # A whole new column, not item assignment: writing items into the Arrow-backed
            # string column Ray Data hands over peaked at ~15x the batch's text (measured:
            # +836 MiB for 55 MiB of text), and that set the data stage's memory per worker.
            texts = df["text"].tolist()
            for i, r in zip(rows, results):
                texts[i] = r[0]
            df["text"] = texts
        for f in self.filters:
            col = np.full(len(df), np.nan)
            col[rows] = [r[1][f.stat] for r in results]
            df[f.column] = col
        status = df["status"].to_numpy(dtype=object, copy=True)
        for i, r in zip(rows, results):
            if r[2] is not None:
                status[i] = f"filtered:{r[2]}"
        df["status"] = status
        return df


def _valid(kind: str, names: Any) -> str:
    return f"valid {kind}: {', '.join(sorted(names))}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _parse_op(where: str, op: str, params: dict[str, Any], base: Path | None
              ) -> NormalizerSpec | FilterSpec:
    if op in NORMALIZERS:
        sig = list(inspect.signature(NORMALIZERS[op]).parameters.values())[1:]
        allowed = {p.name: p.default for p in sig}
        for k, v in params.items():
            if k not in allowed:
                raise RecipeError(f"{where}: unknown parameter {k!r}; {_valid('parameters', allowed) if allowed else 'it takes none'}")
            want = type(allowed[k])
            if not isinstance(v, want) or isinstance(v, bool) != (want is bool):
                raise RecipeError(f"{where}: parameter {k!r} must be {want.__name__}, got {v!r}")
        return NormalizerSpec(op, dict(params))
    stat = FILTER_OPS[op]
    own = stat_params(stat)
    bounds = ("min_score",) if op == "language" else ("min", "max")
    for k in params:
        if k not in own and k not in bounds:
            raise RecipeError(f"{where}: unknown parameter {k!r}; {_valid('parameters', [*own, *bounds])}")
    for k in bounds:
        if params.get(k) is not None and not _is_num(params[k]):
            raise RecipeError(f"{where}: {k!r} must be a number, got {params[k]!r}")
    if op == "language":
        lo, hi = params.get("min_score", 0.5), None
        if not 0.0 < lo <= 1.0:  # 0 would keep documents in any language (their score is 0)
            raise RecipeError(f"{where}: 'min_score' must be in (0, 1], got {lo!r}")
    else:
        lo, hi = params.get("min"), params.get("max")
        if lo is None and hi is None:
            raise RecipeError(f"{where}: a filter needs 'min' and/or 'max'")
        if lo is not None and hi is not None and lo > hi:
            raise RecipeError(f"{where}: 'min' ({lo}) is greater than 'max' ({hi})")
    sp = {k: v for k, v in params.items() if k in own}
    if "rep_len" in sp and (isinstance(sp["rep_len"], bool) or not isinstance(sp["rep_len"], int)
                            or sp["rep_len"] < 1):
        raise RecipeError(f"{where}: 'rep_len' must be a positive integer, got {sp['rep_len']!r}")
    if "langs" in sp:
        langs = [sp["langs"]] if isinstance(sp["langs"], str) else sp["langs"]
        if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs):
            raise RecipeError(f"{where}: 'langs' must be a list of language codes, got {sp['langs']!r}")
        sp["langs"] = langs
    if stat == "flagged_words_ratio" and "words" not in sp:
        raise RecipeError(f"{where}: needs 'words' (a list of words or a file path)")
    if "words" in sp:
        w = sp["words"]
        if not (isinstance(w, str) or (isinstance(w, list) and all(isinstance(x, str) for x in w))):
            raise RecipeError(f"{where}: 'words' must be a list of words or a file path, got {w!r}")
        try:
            load_flagged_words(w, base)
        except OSError as e:
            raise RecipeError(f"{where}: cannot read the flagged-word file: {e}") from e
    return FilterSpec(op, stat, sp, lo, hi)


def parse_recipe(data: Any, source: str | None = None) -> Recipe:
    """A recipe from its parsed YAML (``source`` names the file in errors)."""
    src = source or "<recipe>"
    if not isinstance(data, dict):
        raise RecipeError(f"{src}: a recipe is a mapping with 'process' (and 'name'), got {type(data).__name__}")
    extra = set(data) - {"name", "description", "process"}
    if extra:
        raise RecipeError(f"{src}: unknown keys {sorted(extra)}; valid keys: description, name, process")
    process = data.get("process")
    if not isinstance(process, list) or not process:
        raise RecipeError(f"{src}: 'process' must be a non-empty list of operators")
    base = Path(source).parent if source else None
    normalizers: list[NormalizerSpec] = []
    filters: list[FilterSpec] = []
    for i, item in enumerate(process):
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{src}: process[{i}]: each operator is a one-key mapping "
                              f"'op: {{params}}', got {item!r}")
        (op, params), = item.items()
        where = f"{src}: process[{i}] {op!r}"
        if op not in NORMALIZERS and op not in FILTER_OPS:
            raise RecipeError(f"{where}: unknown operator; {_valid('normalizers', NORMALIZERS)}; "
                              f"{_valid('filters', FILTER_OPS)}")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise RecipeError(f"{where}: parameters must be a mapping, got {params!r}")
        spec = _parse_op(where, op, params, base)
        if isinstance(spec, NormalizerSpec):
            if filters:
                raise RecipeError(f"{where}: normalizers must come before every filter "
                                  "(stats are computed on the normalized text)")
            normalizers.append(spec)
        else:
            if any(f.stat == spec.stat for f in filters):
                raise RecipeError(f"{where}: a second filter on stat {spec.stat!r}; "
                                  "each stat may be filtered once")
            filters.append(spec)
    name = data.get("name") or (Path(source).stem if source else "recipe")
    return Recipe(str(name), normalizers, filters, source)


def resolve_recipe_path(ref: str) -> Path:
    """A YAML path, or a bare name looked up as ``recipes/<name>.yaml`` in the repository."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.parent != Path(".") or p.is_file():
        if not p.is_file():
            raise RecipeError(f"recipe file {ref!r} not found")
        return p
    p = RECIPES_DIR / f"{ref}.yaml"
    if not p.is_file():
        names = sorted(f.stem for f in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
        raise RecipeError(f"unknown recipe {ref!r}; shipped recipes: {', '.join(names) or 'none'}")
    return p


def load_recipe(ref: str) -> Recipe:
    """Load a recipe by path or by name (see ``resolve_recipe_path``)."""
    path = resolve_recipe_path(ref)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    return parse_recipe(data, str(path))
