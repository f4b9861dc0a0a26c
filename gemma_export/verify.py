"""Parity of a runtime Session against the PyTorch reference: teacher-forced and greedy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .metrics import Comparison, Thresholds
from .session import Session, feed, generate

def schedule_for(prefill_len: int) -> list[int]:
    """Chunk pattern for teacher forcing: a full prefill chunk, decode steps, and partial chunks,
    so every entry point and padding path runs on both sides of the window boundary."""
    t = prefill_len
    return [t, 1, 1, max(2, round(0.75 * t)), 1, max(2, round(0.25 * t))]


@dataclass
class ParityResult:
    teacher_forced: Comparison
    greedy_reference: list[int]
    greedy_test: list[int]
    seconds: dict = field(default_factory=dict)
    against_fp32: dict[str, Comparison] = field(default_factory=dict)  # "reference"/"test" vs fp32

    @property
    def greedy_match(self) -> int:
        """Number of leading greedy tokens that agree."""
        n = 0
        for a, b in zip(self.greedy_reference, self.greedy_test):
            if a != b:
                break
            n += 1
        return n

    def summary(self) -> dict:
        return {
            **self.teacher_forced.summary(),
            "greedy_tokens": len(self.greedy_reference),
            "greedy_equal_prefix": self.greedy_match,
            "greedy_equal": self.greedy_reference == self.greedy_test,
            "seconds": self.seconds,
        }

    def failures(self, th: Thresholds, require_greedy: bool = True) -> list[str]:
        out = self.teacher_forced.failures(th)
        if require_greedy and self.greedy_reference != self.greedy_test:
            out.append(f"greedy generation diverges at token {self.greedy_match} of {len(self.greedy_reference)}")
        return out


def teacher_forced(reference: Session, test: Session, ids: Sequence[int], schedule=None) -> Comparison:
    """Feed the same ids through both sessions with the same chunking; compare every position."""
    return teacher_forced_many({"reference": reference, "test": test}, [("reference", "test")], ids,
                               schedule or schedule_for(test.info.prefill_len))[("reference", "test")]


def teacher_forced_many(sessions: dict[str, Session], pairs: Sequence[tuple[str, str]], ids: Sequence[int],
                        schedule: Sequence[int]) -> dict[tuple[str, str], Comparison]:
    """One pass of the same ids through several sessions, comparing each (reference, test) pair
    at every position: each session runs once however many pairs it is in."""
    for s in sessions.values():
        s.reset()
    out = {pair: Comparison() for pair in pairs}
    names = list(sessions)
    for chunks in zip(*(feed(sessions[n], ids, schedule=schedule) for n in names)):
        p = chunks[0][0]
        logits = {n: lg for n, (_, lg) in zip(names, chunks)}
        k = min(len(logits[names[0]]), len(ids) - 1 - p)  # positions that have a next token (for perplexity)
        for (r, t), c in out.items():
            if k > 0:
                c.add(logits[r][:k], logits[t][:k], ids[p + 1:p + 1 + k])
            if k < len(logits[r]):
                c.add(logits[r][k:], logits[t][k:])
    return out


def perplexity_of(session: Session, ids: Sequence[int]) -> float:
    import numpy as np

    from .metrics import perplexity

    session.reset()
    nll = []
    for p, logits in feed(session, ids):
        k = min(len(logits), len(ids) - 1 - p)
        if k > 0:
            nll.append(np.log(perplexity(logits[:k], ids[p + 1:p + 1 + k])) * k)
    return float(np.exp(sum(nll) / (len(ids) - 1)))


def parity(reference: Session, test: Session, ids: Sequence[int], prompt: Sequence[int], new_tokens: int,
           stop_ids: Sequence[int] = (), fp32: Session | None = None) -> ParityResult:
    """Teacher-forced comparison over `ids` and greedy generation from `prompt`. With `fp32`, the
    same pass also compares the fp32 model with the reference and with the test (`against_fp32`)."""
    t0 = time.perf_counter()
    if fp32 is None:
        tf, against = teacher_forced(reference, test, ids), {}
    else:
        sessions = {"reference": reference, "test": test, "fp32": fp32}
        pairs = [("reference", "test"), ("fp32", "test"), ("fp32", "reference")]
        comps = teacher_forced_many(sessions, pairs, ids, schedule_for(test.info.prefill_len))
        tf, against = comps[pairs[0]], {"test": comps[pairs[1]], "reference": comps[pairs[2]]}
    t1 = time.perf_counter()
    ref_gen = list(generate(reference, prompt, new_tokens, stop_ids))
    test_gen = list(generate(test, prompt, new_tokens, stop_ids))
    t2 = time.perf_counter()
    return ParityResult(tf, ref_gen, test_gen, {"teacher_forced": round(t1 - t0, 2), "greedy": round(t2 - t1, 2)},
                        against)


def reference_for(manifest: dict, override: str | None = None, threads: int = 2):
    """The PyTorch reference Session for an artifact: the model it was exported from, by default."""
    from .api import open_session

    spec = dict(manifest["model"].get("spec") or {})
    if override:
        spec = {"source": override, "random_weights": False, "seed": 0}
    if not spec.get("source"):
        from .errors import ArtifactError

        raise ArtifactError("the manifest does not say which model it came from; pass --reference")
    recipe = manifest.get("recipe") or {"name": "fp32"}
    # a quantized artifact is compared with the same recipe applied in PyTorch (the same codes)
    return open_session(spec["source"], random_weights=spec.get("random_weights", False), seed=spec.get("seed", 0),
                        max_context=manifest["max_context"], prefill_len=manifest["prefill_len"], threads=threads,
                        recipe="fp32" if recipe.get("name") == "fp32" else recipe)


# A runtime that quantizes activations itself (int8-dynamic: XNNPACK, LiteRT, onnxruntime's
# MatMulNBits) rounds them its own way, so two correct implementations of one recipe differ from
# each other about as much as each differs from fp32 (real 270M int8: the .pte, whose graph is the
# PyTorch recipe's own choose-qparams/quantize pattern, agrees with it on 92.5% of top-1 at KL 0.013,
# while each is KL ~0.013 from fp32). Such artifacts are judged against the fp32 model instead,
# relative to what the recipe loses in PyTorch: a lowering bug (wrong codes, scales or layout) lands
# far outside these bounds, a different but faithful rounding inside them.
RELATIVE_KL = 1.25  # the artifact's mean KL to fp32 may be this multiple of the recipe's ...
RELATIVE_KL_SLACK = 1e-3  # ... or this much above it, whichever is larger
RELATIVE_TOP1 = 0.02  # and its top-1 agreement with fp32 this much below the recipe's


def runtime_rounds_activations(recipe: dict | None) -> bool:
    """Whether a recipe (as stored in a manifest) leaves activation quantization to the runtime."""
    return bool(recipe) and any((r.get("scheme") or {}).get("activations") == "int8-dynamic"
                                for r in recipe.get("rules", []))


def relative_failures(artifact: dict, recipe: dict) -> list[str]:
    """Judge an artifact's comparison with fp32 against the PyTorch recipe's (summary dicts)."""
    out = []
    kl = max(RELATIVE_KL * recipe["mean_kl"], recipe["mean_kl"] + RELATIVE_KL_SLACK)
    if not artifact["mean_kl"] <= kl:
        out.append(f"mean KL to fp32 = {artifact['mean_kl']:.4g}, needs <= {kl:.4g} "
                   f"(the recipe in PyTorch: {recipe['mean_kl']:.4g})")
    top1 = recipe["top1_agreement"] - RELATIVE_TOP1
    if not artifact["top1_agreement"] >= top1:
        out.append(f"top-1 agreement with fp32 = {artifact['top1_agreement']:.4f}, needs >= {top1:.4f} "
                   f"(the recipe in PyTorch: {recipe['top1_agreement']:.4f})")
    return out


def thresholds_for(manifest: dict) -> Thresholds:
    recipe = manifest.get("recipe") or {}
    if isinstance(recipe, dict) and recipe.get("thresholds"):
        return Thresholds.from_dict(recipe["thresholds"])
    from .recipes import PRESETS

    name = manifest.get("request", {}).get("recipe", "fp32")
    return (PRESETS.get(name) or PRESETS["fp32"]).thresholds


# Relative L2 error of a layer's output above which `locate` calls it diverged (fp32 artifacts
# sit near 1e-6; a wrong weight or a miscompiled op lands far above).
LOCATE_THRESHOLD = 1e-2


def locate(reference: Session, test: Session, ids: Sequence[int], threshold: float = LOCATE_THRESHOLD) -> dict:
    """The first decoder layer whose output (residual stream) diverges from the reference.

    Both sessions run one prefill chunk at position 0 through their debug entry point, which
    returns the hidden state after the embedding and after every layer.
    """
    import numpy as np

    ids = list(ids)[: test.info.prefill_len]
    a, b = reference.hidden_states(ids), test.hidden_states(ids)
    if a.shape != b.shape:
        raise ValueError(f"hidden state shapes differ: reference {a.shape}, artifact {b.shape}")
    rel = [float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in range(len(a))]
    first = next((k for k, r in enumerate(rel) if r > threshold), None)
    if first is None:
        where = None
    elif first == 0:
        where = "embedding"
    else:
        where = f"layer {first - 1}"
    return {
        "threshold": threshold,
        "tokens": len(ids),
        "relative_error": {("embedding" if k == 0 else f"layer {k - 1}"): r for k, r in enumerate(rel)},
        "first_diverging": where,
        "first_diverging_layer": None if first in (None, 0) else first - 1,
    }
