"""Compare any runtime's logits with a reference, position by position.

Used by the parity tests, `eval`, `verify` and the benchmarks. What counts as a pass is the
judge's decision (verification.judge), never a constant here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _t(x):
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().to(torch.float64).reshape(-1, x.shape[-1])


@dataclass
class Comparison:
    """Per-position metrics accumulated over chunks of (reference, test) logits."""

    top1: list = field(default_factory=list)  # 1.0 where argmaxes agree
    top5: list = field(default_factory=list)  # |top5(ref) ∩ top5(test)| / 5
    kl: list = field(default_factory=list)  # KL(ref || test) in nats
    cosine: list = field(default_factory=list)
    max_abs: list = field(default_factory=list)
    nll_ref: list = field(default_factory=list)
    nll_test: list = field(default_factory=list)

    def add(self, ref, test, targets=None) -> None:
        """ref, test: [..., V] logits for the same positions; targets: next-token ids or None."""
        import torch

        r, t = _t(ref), _t(test)
        if r.shape != t.shape:
            raise ValueError(f"logit shapes differ: reference {tuple(r.shape)}, test {tuple(t.shape)}")
        lr, lt = torch.log_softmax(r, -1), torch.log_softmax(t, -1)
        self.top1 += (r.argmax(-1) == t.argmax(-1)).double().tolist()
        k = min(5, r.shape[-1])
        r5, t5 = r.topk(k, -1).indices, t.topk(k, -1).indices
        overlap = (r5[:, :, None] == t5[:, None, :]).any(-1).double().mean(-1)
        self.top5 += overlap.tolist()
        self.kl += (lr.exp() * (lr - lt)).sum(-1).clamp_min(0.0).tolist()
        self.cosine += torch.nn.functional.cosine_similarity(r, t, dim=-1).tolist()
        self.max_abs += (r - t).abs().amax(-1).tolist()
        if targets is not None:
            tg = torch.as_tensor(np.asarray(targets), dtype=torch.int64).reshape(-1, 1)
            self.nll_ref += (-lr.gather(1, tg)).squeeze(1).tolist()
            self.nll_test += (-lt.gather(1, tg)).squeeze(1).tolist()

    @property
    def n(self) -> int:
        return len(self.top1)

    def summary(self) -> dict:
        if not self.n:
            raise ValueError("no positions compared")
        out = {
            "positions": self.n,
            "top1_agreement": float(np.mean(self.top1)),
            "top5_overlap": float(np.mean(self.top5)),
            "mean_kl": float(np.mean(self.kl)),
            "max_kl": float(np.max(self.kl)),
            "mean_cosine": float(np.mean(self.cosine)),
            "min_cosine": float(np.min(self.cosine)),
            "max_abs_diff": float(np.max(self.max_abs)),
        }
        if self.nll_ref:
            out["perplexity_reference"] = float(np.exp(np.mean(self.nll_ref)))
            out["perplexity_test"] = float(np.exp(np.mean(self.nll_test)))
        return out

    def per_position(self) -> dict[str, list]:
        return {
            "top1": self.top1, "top5": self.top5, "kl": self.kl,
            "cosine": self.cosine, "max_abs": self.max_abs,
        }


def perplexity(logits, targets) -> float:
    """exp(mean NLL) of next-token targets under logits [N, V]."""
    import torch

    lp = torch.log_softmax(_t(logits), -1)
    tg = torch.as_tensor(np.asarray(targets), dtype=torch.int64).reshape(-1, 1)
    return float(torch.exp(-lp.gather(1, tg).mean()))
