"""`lmsan demo`: the main job on the embedded default backbone, end to end, with cached artifacts.

1. backdoor `minilm` with POR (six triggers)   -> OUT/por/
2. prompt-tune SST-2 on the backdoored encoder -> OUT/prompt-sst2/
3. guard with the signature file and measure clean accuracy and attack success, guard off and on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from .attacks import AttackConfig, plant_backdoor, save_attacked
from .backbone import MINILM, load_backbone
from .data import load_corpus, load_examples, shipped
from .errors import LmsanError
from .evaluation import evaluate_guard
from .guard import Guard
from .prompts import PromptClassifier, PromptConfig, train_prompt
from .signatures import SignatureSet

DEMO_ATTACK = AttackConfig(kind="por")
DEMO_PROMPT = PromptConfig(method="prefix", epochs=1.0, eval_every=60)
VALIDATION = 500  # last SST-2 training rows, held out to pick the best prompt checkpoint


def _cached_config(path: Path) -> dict | None:
    """The attack settings a cached copy was made with; None when attack.json is unreadable (stale)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("config") if isinstance(data, dict) else None


def run_demo(
    out: str,
    *,
    device: str = "auto",
    eval_size: int = 400,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict:
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmsanError(f"cannot create output folder {root}: {exc.strerror or exc}") from exc
    if eval_size < 1:
        raise LmsanError("--eval-size must be at least 1")
    timings: dict[str, float] = {}

    # 1. attack (cached: reuse a finished copy made with the same settings)
    por_dir = root / "por"
    started = time.time()
    cached = por_dir / "attack.json"
    if cached.is_file() and (por_dir / "truth.safetensors").is_file() and \
            _cached_config(cached) == DEMO_ATTACK.model_dump():
        say(f"[1/3] backdoored minilm: reusing {por_dir}")
    else:
        say("[1/3] planting a POR backdoor (triggers cf mn tq qt mm pt) into minilm ...")
        clean_backbone = load_backbone(MINILM, device)
        result = plant_backdoor(clean_backbone, DEMO_ATTACK, load_corpus(), progress=progress)
        summary = save_attacked(result, clean_backbone, str(por_dir))
        say(f"      held-out sign agreement with the PVs: min {summary['heldout']['min_agreement']:.3f}")
        del clean_backbone
    timings["attack_s"] = round(time.time() - started, 1)

    # 2. prompt-tune SST-2 on the backdoored encoder (frozen)
    backbone = load_backbone(str(por_dir), device)
    prompt_dir = root / "prompt-sst2"
    started = time.time()
    classifier = None
    if (prompt_dir / "manifest.json").is_file():
        try:
            classifier = PromptClassifier.load(prompt_dir, backbone)
            if classifier.config != DEMO_PROMPT:
                raise LmsanError("made with other settings")
            say(f"[2/3] SST-2 prompt: reusing {prompt_dir}")
        except LmsanError as exc:
            classifier = None
            say(f"[2/3] cached prompt unusable ({exc}); training again")
    if classifier is None:
        say("[2/3] prompt-tuning SST-2 on the frozen backdoored encoder ...")
        train = load_examples(shipped("sst2/train.jsonl"))
        classifier = train_prompt(backbone, DEMO_PROMPT, train[:-VALIDATION], train[-VALIDATION:],
                                  progress=progress)
        classifier.save(prompt_dir)
    timings["prompt_s"] = round(time.time() - started, 1)

    # 3. guard and measure
    started = time.time()
    sig = SignatureSet.load(por_dir / "truth.safetensors", hidden_size=backbone.hidden_size,
                            fingerprint=backbone.fingerprint)
    say(f"[3/3] guarding with {len(sig)} signatures ({sig.path}); evaluating on {eval_size} SST-2 dev sentences")
    guard = Guard(backbone, classifier, sig, mode="enforce")
    dev = load_examples(shipped("sst2/dev.jsonl"))[:eval_size]
    triggers = [r.trigger for r in sig.meta.pvs if r.trigger]
    ev = evaluate_guard(guard, dev, triggers, progress=progress)
    timings["eval_s"] = round(time.time() - started, 1)
    print(ev.table(), flush=True)
    summary = {
        "out": str(root),
        "asr_off": ev.asr_off,
        "asr_on": ev.asr_on,
        "cacc_off": ev.cacc_off,
        "cacc_on": ev.cacc_on,
        "false_flag_rate": ev.false_flag_rate,
        "detections": ev.detections,
        "purged": ev.purged,
        "blocked": ev.blocked,
        "timings": timings,
    }
    (root / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
