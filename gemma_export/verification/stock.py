"""The artifact as shipped, run by its runtime's own LLM API (not our session), against PyTorch.

`stock_parity` generates greedily from one prompt with the stock runtime and with the artifact's
PyTorch reference (the same recipe's codes), and says whether the new tokens agree. The prompts a
release is checked with: a short one, one longer than the sliding window, and a chat prompt whose
answer must end at `<end_of_turn>`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .. import backends
from ..artifact import read_manifest
from ..gemma3 import family
from ..loading import Tokenizer
from ..session import generate

# a few turns the model can copy, so that even a base (not instruction-tuned) model ends its turn
CHAT_SHOTS = 3
CHAT_TURN = ("Say OK.", "OK")


@dataclass(frozen=True)
class StockParity:
    prompt: str  # "short", "long" or "chat"
    prompt_tokens: int
    reference: list[int]  # PyTorch's new tokens (stop token left out)
    stock: list[int] | None  # the runtime's, where its API gives ids
    stock_text: str
    reference_text: str
    stopped: bool  # the reference ended on a stop token within the budget

    @property
    def match(self) -> bool:
        if self.stock is not None:
            return self.stock == self.reference
        return self.stock_text == self.reference_text

    def to_dict(self) -> dict:
        return {**asdict(self), "match": self.match}


def chat_text(tok: Tokenizer) -> str:
    """A chat prompt (without <bos>) whose model turn should end at <end_of_turn>."""
    ask, answer = CHAT_TURN
    eot = family.SPECIAL_TOKENS["end_of_turn"]
    shots = "".join(family.chat_text(ask) + answer + eot + "\n" for _ in range(CHAT_SHOTS))
    return shots + family.chat_text(ask)


def prompts(tok: Tokenizer, text: str, window: int) -> dict[str, str]:
    """The release prompts: short, longer than the window (from `text`), and chat."""
    words = text.split()
    n = 8
    while len(tok.encode(" ".join(words[:n]))) <= window + 16 and n < len(words):
        n = int(n * 1.5) + 1
    return {"short": "The capital of France is", "long": " ".join(words[:n]), "chat": chat_text(tok)}


def stock_parity(folder: str | Path, name: str, text: str, new_tokens: int, reference=None) -> StockParity:
    """Generate `new_tokens` greedily from `text` (no <bos>) with the format's stock runtime and
    with `reference` (an `Opened`; default: the artifact's PyTorch reference)."""
    from ..runtime import reference_for

    folder = Path(folder)
    manifest = read_manifest(folder)
    reference = reference or reference_for(manifest)
    tok = reference.tokenizer
    ids = [tok.bos_id, *tok.encode(text, bos=False)]
    want = list(generate(reference.session, ids, new_tokens, tok.stop_ids))
    stopped = bool(want) and want[-1] in tok.stop_ids
    want = [t for t in want if t not in tok.stop_ids]
    got = backends.get(manifest.format).stock_generate(folder, manifest, text, new_tokens)
    return StockParity(name, len(ids), want, list(got.tokens) if got.tokens is not None else None,
                       got.text, tok.decode(want), stopped)
