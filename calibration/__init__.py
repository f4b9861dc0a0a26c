"""Calibration corpora (real multilingual text and chat samples; provenance in data/SOURCES.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
# held out from calibration: the default text of `verify` and `eval`
EVAL_TEXT = DATA / "eval-en-maintguide.txt"


def calibration_files() -> list[Path]:
    return sorted(DATA.glob("calib-*.txt"))


def chat_samples() -> list[dict]:
    path = DATA / "calib-chat.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build(tokenizer, samples: int, seq_len: int, seed: int = 0) -> tuple[list[list[int]], str]:
    """`samples` token sequences of `seq_len`, drawn round-robin over languages and chat.

    Returns the sequences and the sha256 of the whole set (recorded in the manifest).
    """
    import random

    pools = []
    for path in calibration_files():
        ids = tokenizer.encode(path.read_text(), bos=False)
        pools.append([[tokenizer.bos_id, *ids[i:i + seq_len - 1]] for i in range(0, len(ids) - seq_len, seq_len - 1)])
    chat = []
    for s in chat_samples():
        text = f"<start_of_turn>user\n{s['user']}<end_of_turn>\n<start_of_turn>model\n{s['model']}<end_of_turn>\n"
        chat += tokenizer.encode(text, bos=False)
    pools.append([[tokenizer.bos_id, *chat[i:i + seq_len - 1]] for i in range(0, len(chat) - seq_len, seq_len - 1)])
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    out, k = [], 0
    while len(out) < samples and any(pools):
        pool = pools[k % len(pools)]
        if pool:
            out.append(pool.pop())
        k += 1
    digest = hashlib.sha256(json.dumps(out).encode()).hexdigest()
    return out, digest
