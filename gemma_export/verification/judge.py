"""The one pass/fail rule. `verify`, `verify --all`, `verify --outputs` and golden bundles all ask it.

An artifact is judged in one of two ways, chosen by its recipe:

- against the reference (the same recipe applied in PyTorch, so the same codes): the recipe's
  thresholds on the comparison, and greedy generation must agree;
- against fp32, relative to the recipe in PyTorch, when the runtime quantizes activations itself
  (int8-dynamic: XNNPACK, LiteRT, onnxruntime's MatMulNBits). Two faithful implementations of
  such a recipe round activations differently and differ from each other about as much as each
  differs from fp32, so the artifact must lose no more against fp32 than the recipe does: a
  lowering bug (wrong codes, scales or layout) lands far outside these bounds.

Threshold overrides (`--min-top1`, `--max-mean-kl`, ...) always apply: they replace the bound the
judge would put on that metric, in either mode, and every verdict lists its bounds with where each
came from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ArtifactError, ConfigError, ParityError
from ..quant.recipes import QuantRecipe, Thresholds, resolve

RELATIVE_KL = 1.25  # the artifact's mean KL to fp32 may be this multiple of the recipe's ...
RELATIVE_KL_SLACK = 1e-3  # ... or this much above it, whichever is larger
RELATIVE_TOP1 = 0.02  # and its top-1 agreement with fp32 this much below the recipe's, or one
# standard error of the recipe's agreement over the compared positions if larger: on few positions
# or flat distributions a couple of near-ties flipping by rounding moves top-1 by more than 2%

# threshold field -> (summary key, comparison)
CHECKS = {
    "min_top1": ("top1_agreement", ">="),
    "min_top5": ("top5_overlap", ">="),
    "max_mean_kl": ("mean_kl", "<="),
    "max_abs_diff": ("max_abs_diff", "<="),
    "min_cosine": ("min_cosine", ">="),
}
_AGAINST_FP32 = {"mean_kl": "mean KL to fp32", "top1_agreement": "top-1 agreement with fp32"}
ABSOLUTE = "against the reference"
RELATIVE = "against fp32, relative to the recipe in PyTorch"


@dataclass(frozen=True)
class Rule:
    """How an artifact of a recipe is judged, with the user's threshold overrides."""

    relative: bool
    thresholds: Thresholds  # the recipe's, before overrides
    overrides: dict = field(default_factory=dict)  # Thresholds fields -> limits

    @classmethod
    def for_recipe(cls, recipe: QuantRecipe | dict | str | None, overrides: dict | None = None) -> "Rule":
        recipe = resolve(recipe)
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(overrides) - set(CHECKS)
        if unknown:
            raise ConfigError(f"unknown thresholds: {', '.join(sorted(unknown))}; known: {', '.join(CHECKS)}")
        return cls(recipe.runtime_quantizes_activations, recipe.thresholds, overrides)

    @property
    def mode(self) -> str:
        return RELATIVE if self.relative else ABSOLUTE

    @property
    def require_greedy(self) -> bool:
        return not self.relative

    def bounds(self, recipe_vs_fp32: dict | None = None) -> list["Bound"]:
        """The limits on the artifact's comparison; in relative mode computed from the recipe's
        own comparison with fp32 (`recipe_vs_fp32`, a summary)."""
        if self.relative:
            if recipe_vs_fp32 is None:
                raise ValueError("a relative judgement needs the recipe's comparison with fp32")
            r_kl, r_top1 = recipe_vs_fp32["mean_kl"], recipe_vs_fp32["top1_agreement"]
            n = recipe_vs_fp32.get("positions") or 0
            se = math.sqrt(r_top1 * (1 - r_top1) / n) if n else 0.0
            own = {"max_mean_kl": (max(RELATIVE_KL * r_kl, r_kl + RELATIVE_KL_SLACK), r_kl),
                   "min_top1": (r_top1 - max(RELATIVE_TOP1, se), r_top1)}
            out = [Bound(*CHECKS[k], limit, "relative to the recipe", recipe)
                   for k, (limit, recipe) in own.items() if k not in self.overrides]
        else:
            limits = dataclasses.asdict(self.thresholds)
            out = [Bound(*CHECKS[k], v, "recipe") for k, v in limits.items() if v is not None and k not in self.overrides]
        return out + [Bound(*CHECKS[k], v, "override") for k, v in self.overrides.items()]

    def to_dict(self) -> dict:
        return {"relative": self.relative, "thresholds": self.thresholds.to_dict(), "overrides": dict(self.overrides)}


@dataclass(frozen=True)
class Bound:
    metric: str  # a comparison summary key
    op: str  # ">=" or "<="
    limit: float
    source: str  # "recipe", "override" or "relative to the recipe"
    recipe: float | None = None  # relative bounds: the recipe's own value

    def holds(self, value: float) -> bool:
        return value >= self.limit if self.op == ">=" else value <= self.limit

    def failure(self, value: float, relative: bool) -> str:
        if not relative:
            return f"{self.metric} = {value:.6g}, needs {self.op} {self.limit:g}"
        name = _AGAINST_FP32.get(self.metric, f"{self.metric} to fp32")
        spec = ".4f" if self.metric == "top1_agreement" else ".4g"
        why = f"the recipe in PyTorch: {self.recipe:{spec}}" if self.recipe is not None else self.source
        return f"{name} = {value:{spec}}, needs {self.op} {self.limit:{spec}} ({why})"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    mode: str
    failures: tuple[str, ...]
    checks: tuple[dict, ...]  # every bound with its measured value

    def to_dict(self) -> dict:
        return {"pass": self.passed, "judged": self.mode, "failures": list(self.failures), "checks": list(self.checks)}

    def raise_if_failed(self, what: str) -> None:
        """The exit code is the judge's: a failed verdict is a ParityError (exit 3)."""
        if not self.passed:
            raise ParityError(f"{what}: parity FAILED: " + "; ".join(self.failures))


def judge(rule: Rule, artifact: dict[str, dict], recipe: dict[str, dict] | None = None,
          greedy: tuple[list, list] | dict | None = None) -> Verdict:
    """Judge an artifact's comparisons (summaries by label: one label, or several such as the
    top-k logits and the full logits of a device run). In relative mode `artifact` is against
    fp32 and `recipe` holds the recipe in PyTorch against fp32 under the same labels. `greedy` is
    one (reference, test) token pair, or such pairs by label."""
    failures, checks = [], []
    prefix = len(artifact) > 1
    for label, summary in artifact.items():
        for bound in rule.bounds(recipe[label] if rule.relative else None):
            value = summary[bound.metric]
            ok = bound.holds(value)
            checks.append({"label": label, **dataclasses.asdict(bound), "measured": value, "ok": ok})
            if not ok:
                failures.append((f"{label}: " if prefix else "") + bound.failure(value, rule.relative))
    pairs = greedy if isinstance(greedy, dict) else {None: greedy}  # several runs: by label
    for label, pair in pairs.items():
        if pair is not None and rule.require_greedy and list(pair[0]) != list(pair[1]):
            at = next((i for i, (a, b) in enumerate(zip(*pair)) if a != b), min(map(len, pair)))
            failures.append((f"{label}: " if label else "") + f"greedy generation diverges at token {at} of {len(pair[0])}")
    return Verdict(not failures, rule.mode, tuple(failures), tuple(checks))


def judge_build(rows: list[dict]) -> None:
    """A build folder passes when every artifact could be verified (else ArtifactError, exit 1)
    and every verdict passed (else ParityError, exit 3)."""
    errors = [r["artifact"] for r in rows if "error" in r]
    failed = [r["artifact"] for r in rows if "error" not in r and not r["pass"]]
    if errors:
        raise ArtifactError(f"{len(errors)} artifact(s) could not be verified: {', '.join(errors)}")
    if failed:
        raise ParityError(f"parity FAILED for {len(failed)} of {len(rows)} artifacts: " + ", ".join(failed))
