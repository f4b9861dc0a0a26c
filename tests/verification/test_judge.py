"""The one judge: absolute and relative bounds, overrides that always apply, greedy, exit codes."""

import pytest

from gemma_export.errors import ArtifactError, ConfigError, ParityError
from gemma_export.quant.recipes import PRESETS
from gemma_export.verification.judge import ABSOLUTE, RELATIVE, Rule, judge, judge_build

GOOD = {"top1_agreement": 0.9995, "top5_overlap": 0.995, "mean_kl": 1e-6, "max_abs_diff": 1e-3, "min_cosine": 1.0}


def test_fp32_is_judged_absolutely_with_the_recipes_thresholds():
    rule = Rule.for_recipe("fp32")
    assert rule.mode == ABSOLUTE and rule.require_greedy
    assert judge(rule, {"a": GOOD}, greedy=([1, 2], [1, 2])).passed
    bad = judge(rule, {"a": {**GOOD, "top1_agreement": 0.5}}, greedy=([1, 2, 3], [1, 5, 6]))
    assert bad.failures == ("top1_agreement = 0.5, needs >= 0.999", "greedy generation diverges at token 1 of 3")
    assert {c["metric"]: c["source"] for c in bad.checks} == {"top1_agreement": "recipe", "top5_overlap": "recipe",
                                                              "mean_kl": "recipe"}


def test_runtime_quantized_recipes_are_judged_relative_to_the_recipe():
    rule = Rule.for_recipe(PRESETS["int8"])
    assert rule.mode == RELATIVE and not rule.require_greedy
    recipe = {"mean_kl": 0.0130, "top1_agreement": 0.92}
    assert judge(rule, {"a": {"mean_kl": 0.0140, "top1_agreement": 0.91}}, {"a": recipe}).passed
    assert len(judge(rule, {"a": {"mean_kl": 0.0200, "top1_agreement": 0.85}}, {"a": recipe}).failures) == 2
    # a near-lossless recipe still leaves room for a different rounding (absolute slack)
    near = {"mean_kl": 1e-5, "top1_agreement": 0.98}
    assert judge(rule, {"a": {"mean_kl": 0.0009, "top1_agreement": 0.97}}, {"a": near}).passed
    failed = judge(rule, {"a": {"mean_kl": 0.05, "top1_agreement": 0.91}}, {"a": recipe}, greedy=([1], [2]))
    assert failed.failures == ("mean KL to fp32 = 0.05, needs <= 0.01625 (the recipe in PyTorch: 0.013)",)


def test_top1_slack_widens_to_one_standard_error_on_few_positions():
    rule = Rule.for_recipe("int8")
    few = {"mean_kl": 0.002, "top1_agreement": 0.32, "positions": 96}  # one SE = 0.0476
    assert judge(rule, {"a": {"mean_kl": 0.002, "top1_agreement": 0.30}}, {"a": few}).passed
    assert not judge(rule, {"a": {"mean_kl": 0.002, "top1_agreement": 0.27}}, {"a": few}).passed
    many = {**few, "top1_agreement": 0.92, "positions": 2000}  # SE 0.006: the 2% floor applies
    assert not judge(rule, {"a": {"mean_kl": 0.002, "top1_agreement": 0.895}}, {"a": many}).passed


def test_overrides_replace_the_bound_in_either_mode_and_are_reported():
    absolute = Rule.for_recipe("fp32", {"min_top1": 1.5})
    v = judge(absolute, {"a": GOOD})
    assert v.failures == ("top1_agreement = 0.9995, needs >= 1.5",)
    assert [c["source"] for c in v.checks if c["metric"] == "top1_agreement"] == ["override"]
    relative = Rule.for_recipe("int8", {"max_mean_kl": 0.1, "min_top1": None})
    recipe = {"mean_kl": 0.0130, "top1_agreement": 0.92}
    v = judge(relative, {"a": {"mean_kl": 0.05, "top1_agreement": 0.91}}, {"a": recipe})
    assert v.passed and {(c["metric"], c["source"]) for c in v.checks} == {
        ("mean_kl", "override"), ("top1_agreement", "relative to the recipe")}
    with pytest.raises(ConfigError, match="unknown thresholds: min_top3"):
        Rule.for_recipe("fp32", {"min_top3": 0.5})


def test_several_comparisons_are_labelled():
    v = judge(Rule.for_recipe("fp32"), {"top-64 logits": {**GOOD, "top1_agreement": 0.5}, "full logits": GOOD})
    assert v.failures == ("top-64 logits: top1_agreement = 0.5, needs >= 0.999",)


def test_greedy_runs_are_judged_by_label():
    rule = Rule.for_recipe("fp32")
    v = judge(rule, {"artifact": GOOD, "image+text": GOOD},
              greedy={None: ([1, 2], [1, 2]), "image+text": ([4, 5, 6], [4, 5, 7]), "pan-and-scan": ([1], [1])})
    assert v.failures == ("image+text: greedy generation diverges at token 2 of 3",)


def test_the_judge_owns_the_exit_codes():
    v = judge(Rule.for_recipe("fp32"), {"a": {**GOOD, "mean_kl": 1.0}})
    with pytest.raises(ParityError, match="art: parity FAILED: mean_kl = 1, needs <= 0.0001") as e:
        v.raise_if_failed("art")
    assert e.value.exit_code == 3
    judge(Rule.for_recipe("fp32"), {"a": GOOD}).raise_if_failed("art")  # passes: no error
    with pytest.raises(ArtifactError, match="1 artifact\\(s\\) could not be verified: b"):
        judge_build([{"artifact": "a", "pass": True}, {"artifact": "b", "pass": False, "error": "x"}])
    with pytest.raises(ParityError, match="parity FAILED for 1 of 2 artifacts: b"):
        judge_build([{"artifact": "a", "pass": True}, {"artifact": "b", "pass": False}])
    judge_build([{"artifact": "a", "pass": True}])
