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
from ..errors import ArtifactError
from ..gemma3 import family
from ..loading import Tokenizer
from ..runtime import reference_for
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


# ----------------------------------------------------------------------------------------------
# In golden bundles: the phone's stock runtime tool generates, `verify --outputs` checks its text
# ----------------------------------------------------------------------------------------------

STOCK_SCRIPT = "run_stock_on_device.sh"
STOCK_PROMPT = "stock_prompt.txt"
STOCK_OUTPUT = "stock_output.txt"  # what the tool printed (stdout)


def stock_record(manifest, tok: Tokenizer, prompt: str, reference_tokens: list[int]) -> dict:
    """What a bundle says of the stock tool run: the prompt as the tool takes it, the tool's
    arguments, and the text the reference generated (stop token left out)."""
    runner = backends.get(manifest.format).runner
    new = [t for t in reference_tokens if t not in tok.stop_ids]
    text = (family.SPECIAL_TOKENS["bos"] if runner.bos_in_prompt else "") + prompt
    seq_len = len(tok.encode(prompt)) + len(reference_tokens)
    args = [a.format(prompt="$PROMPT", seq_len=seq_len, new_tokens=len(reference_tokens)) for a in runner.stock_args]
    return {"script": STOCK_SCRIPT, "prompt_file": STOCK_PROMPT, "prompt": text, "args": args,
            "output": STOCK_OUTPUT, "reference_text": tok.decode(new), "reference_tokens": len(new)}


def stock_script(index: dict, bundle_sha: str) -> str:
    a, st = index["artifact"], index["stock"]
    env = backends.get(a["format"]).runner.env
    args = " ".join(r'\"\$PROMPT\"' if x == "$PROMPT" else x for x in st["args"])
    return _STOCK_SCRIPT.format(fmt=a["format"], name=a["name"], env=env, files=" ".join(sorted(a["files"])),
                                args=args, manifest_sha=a["manifest_sha256"], bundle_sha=bundle_sha,
                                prompt=STOCK_PROMPT, output=STOCK_OUTPUT)


def run_stock(bundle_dir: Path, artifact: Path, out: Path, index: dict) -> dict:
    """The desktop twin of the script: the runtime's own Python API generates from the bundle's
    prompt; its text goes where the phone's tool output would."""
    manifest = read_manifest(artifact)
    if "stock" not in index:
        raise ArtifactError(f"{bundle_dir}: the {manifest.format} artifact has no stock LLM tool, so its bundle has "
                            "no stock run")
    st = index["stock"]
    prompt = Path(bundle_dir, st["prompt_file"]).read_text()
    prompt = prompt.removeprefix(family.SPECIAL_TOKENS["bos"])  # stock_generate adds <bos> its runtime's way
    got = backends.get(manifest.format).stock_generate(artifact, manifest, prompt, index["greedy"]["new_tokens"])
    out.mkdir(parents=True, exist_ok=True)
    (out / STOCK_OUTPUT).write_text(got.text)
    return {"produced_by": f"gemma-export bundle-run --stock ({manifest.format}'s own Python LLM API)"}


def check_stock_output(outputs_dir: Path, index: dict) -> tuple[dict, list[str]]:
    """The tool's printed text must hold the reference's greedy text (tools also echo the prompt
    and print timings around it)."""
    st = index["stock"]
    printed = (outputs_dir / STOCK_OUTPUT).read_text(errors="replace")
    found = st["reference_text"] in printed
    failures = [] if found else [f"the stock runtime's output does not contain the reference's "
                                 f"{st['reference_tokens']} greedy tokens"]
    return {"stock_output": str(outputs_dir / STOCK_OUTPUT), "reference_text": st["reference_text"],
            "printed": printed[-2000:], "found": found}, failures


_STOCK_SCRIPT = r"""#!/bin/sh
# run_stock_on_device.sh: the {fmt} artifact {name} run by its runtime's stock tool on an
# adb-connected phone, greedy, from the bundle's prompt; the tool's output comes back to be checked.
#
# Usage:  ./run_stock_on_device.sh ARTIFACT_DIR [OUTPUTS_DIR]
# Then:   gemma-export verify --outputs OUTPUTS_DIR
# Environment: {env} = the stock tool built for the phone; ANDROID_SERIAL, DEVICE_DIR, ADB as in
# run_on_device.sh.
set -eu
die() {{ echo "run_stock_on_device.sh: $2" >&2; exit "$1"; }}
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || die 2 "usage: $0 ARTIFACT_DIR [OUTPUTS_DIR]"
ARTIFACT=$1
OUT=${{2:-$HERE/stock-outputs}}
ADB=${{ADB:-adb}}
DEVICE_DIR=${{DEVICE_DIR:-/data/local/tmp/gemma-stock}}
RUNNER=${{{env}:-}}
[ -n "$RUNNER" ] || die 2 "set {env} to the stock runtime tool built for the phone"
[ -f "$RUNNER" ] || die 2 "{env}=$RUNNER: no such file"
MANIFEST_SHA256={manifest_sha}
SHA=$( (sha256sum "$ARTIFACT/manifest.json" 2>/dev/null || shasum -a 256 "$ARTIFACT/manifest.json") | awk '{{ print $1 }}')
[ "$SHA" = "$MANIFEST_SHA256" ] || die 1 "$ARTIFACT: not the artifact this bundle was made from"
"$ADB" shell "rm -rf '$DEVICE_DIR' && mkdir -p '$DEVICE_DIR/artifact'"
for f in {files} manifest.json; do "$ADB" push "$ARTIFACT/$f" "$DEVICE_DIR/artifact/$f" >&2; done
"$ADB" push "$HERE/{prompt}" "$DEVICE_DIR/{prompt}" >&2
"$ADB" push "$RUNNER" "$DEVICE_DIR/runner" >&2
mkdir -p "$OUT"
"$ADB" shell "cd '$DEVICE_DIR' && chmod 755 runner && PROMPT=\$(cat {prompt}) && LD_LIBRARY_PATH=. ./runner {args}" > "$OUT/{output}" \
    || die 1 "the stock tool failed on the phone"
printf '{{"bundle": "%s", "bundle_sha256": "%s", "produced_by": "run_stock_on_device.sh with %s"}}\n' \
    "$HERE" "{bundle_sha}" "$RUNNER" > "$OUT/index.json"
echo "run_stock_on_device.sh: output in $OUT; check it with: gemma-export verify --outputs $OUT" >&2
"""
