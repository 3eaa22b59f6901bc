"""What a benchmark serves, shared by the bench scripts: the backdoored model, the victim prompt
trained on it, and the signature set it is guarded with; plus progress and provenance helpers.

The signature set defaults to what mining found for the model (`lmsan demo` mines the demo's copy
into lmsan-out/demo/mined/search.safetensors; `lmsan mine --out MODEL/mined.safetensors` any other):
a defender never has the planted PVs, so a benchmark serves them only when `--signatures` names
MODEL/truth.safetensors, as a comparison. The planted PVs still say which triggers a set covers
(`covered_triggers`), so that triggered traffic carries only triggers the set can see.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from lmsan_serve.backbone import MINILM, Backbone, load_backbone
from lmsan_serve.data import load_corpus, load_examples, shipped
from lmsan_serve.errors import LmsanError
from lmsan_serve.mining import RECOVERED
from lmsan_serve.monitor import sign_agreement
from lmsan_serve.prompts import PromptClassifier, PromptConfig, train_prompt
from lmsan_serve.signatures import SignatureSet

DEMO_DIR = Path("lmsan-out/demo")
BENCH_DIR = Path("lmsan-out/bench")
BENCH_PROMPT = PromptConfig(method="prefix", max_steps=150)
DEMO_MINED = DEMO_DIR / "mined" / "search.safetensors"  # what `lmsan demo` mined


def say(msg: str) -> None:
    """Progress goes to stderr, so that stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


def _is_model_dir(p: Path) -> bool:
    return (p / "truth.safetensors").is_file() and (p / "config.json").is_file()


def resolve_model(arg: str | None) -> Path:
    """--model, else the demo's backdoored minilm, else ours under lmsan-out/bench (made on demand)."""
    if arg is not None:
        p = Path(arg)
        if not _is_model_dir(p):
            raise LmsanError(f"{p}: not a model folder written by `lmsan attack` (needs truth.safetensors)")
        return p
    for p in (DEMO_DIR / "por", BENCH_DIR / "por"):
        if _is_model_dir(p):
            return p
    from lmsan_lab.attacks import AttackConfig, plant_backdoor, save_attacked

    out = BENCH_DIR / "por"
    say(f"no backdoored model found; planting a POR backdoor into minilm -> {out} "
        "(with the prompt below, about 10 minutes on a 2-core CPU; `lmsan demo` makes the same model)")
    clean = load_backbone(MINILM, "cpu")
    result = plant_backdoor(clean, AttackConfig(kind="por"), load_corpus())
    save_attacked(result, clean, str(out))
    return out


def resolve_prompt_dir(arg: str | None, backbone: Backbone) -> Path:
    """--prompt, else the first cached SST-2 prompt trained on these exact weights, else train one."""
    if arg is not None:
        PromptClassifier.load(arg, backbone)  # refuse a prompt made for other weights now
        return Path(arg)
    own = BENCH_DIR / f"prompt-sst2-{backbone.fingerprint[:12]}"
    for p in (DEMO_DIR / "prompt-sst2", BENCH_DIR / "prompt-sst2", own):
        if (p / "manifest.json").is_file():
            try:
                PromptClassifier.load(p, backbone)
            except LmsanError as exc:
                say(f"skipping {p}: {exc}")
                continue
            say(f"prompt: {p}")
            return p
    if backbone.name.rstrip("/").endswith(str(DEMO_DIR / "por")):
        say(f"note: {DEMO_DIR / 'prompt-sst2'} is missing; if `lmsan demo` is still running, wait for it")
    say(f"training an SST-2 prefix prompt (150 steps) -> {own} (several minutes on a 2-core CPU)")
    classifier = train_prompt(backbone, BENCH_PROMPT, load_examples(shipped("sst2/train.jsonl")),
                              load_examples(shipped("sst2/dev.jsonl"))[:300])
    return classifier.save(own)


def resolve_prompt(arg: str | None, backbone: Backbone) -> PromptClassifier:
    return PromptClassifier.load(resolve_prompt_dir(arg, backbone), backbone)


def resolve_signatures(arg: str | None, model_dir: Path) -> Path:
    """--signatures, else the set mining wrote for `model_dir`: the demo's for the demo's copy, else
    MODEL/mined.safetensors. Raises LmsanError naming the command that mines one."""
    if arg is not None:
        return Path(arg)
    candidates = [model_dir / "mined.safetensors"]
    if model_dir.resolve() == (DEMO_DIR / "por").resolve():
        candidates.insert(0, DEMO_MINED)
    for path in candidates:
        if path.is_file():
            return path
    raise LmsanError(
        f"no mined signature set for {model_dir} (looked for {', '.join(map(str, candidates))}); mine one with "
        f"`lmsan mine --model {model_dir} --mode search --out {model_dir / 'mined.safetensors'}`, or pass "
        f"--signatures ({model_dir / 'truth.safetensors'} serves the planted PVs, as a comparison)")


def loadavg() -> float | None:
    """1-minute load average: other processes on a small machine inflate absolute times."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def git_commit() -> str | None:
    """The checkout's commit (None outside a git work tree): the code the figures came from."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def command_line() -> str:
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    except ValueError:
        pass
    return shlex.join([exe, *sys.argv])


def covered_triggers(truth: SignatureSet, sig: SignatureSet) -> tuple[list[str], list[str]]:
    """Planted triggers whose PV some signature matches (sign agreement >= RECOVERED, as mining
    counts a recovered PV), and the others: an input holding one the set cannot see measures
    nothing about the purge."""
    named = [(i, r.trigger) for i, r in enumerate(truth.meta.pvs) if r.trigger]
    if not named:
        raise LmsanError(f"{truth.path} names no triggers (a --clean control model?)")
    if not len(sig):
        return [], [t for _, t in named]
    best = sign_agreement(truth.pvs, sig.pvs).max(dim=1).values
    covered = [t for i, t in named if float(best[i]) >= RECOVERED]
    return covered, [t for _, t in named if t not in covered]
