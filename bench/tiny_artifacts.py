"""Tiny stand-ins for the demo's artifacts, shared by the benchmarks' `--quick` modes.

The full benchmarks run on the demo's backdoored `minilm` and a prompt trained on it, which take
about 10 minutes to make. `--quick` only has to show that a script still runs end to end and
writes the figures the README quotes, so it runs the same code on a tiny random BERT
(`lmsan_serve.testing.make_tiny_bert`) instead:

1. a POR backdoor planted with the real attack code (`plant_backdoor`), with all six default
   triggers, so that every planted PV has its sign opposite planted too (probe_opposites needs that);
2. a victim's prefix prompt trained on a small lexical task the tiny encoder can learn, checked
   before use: clean accuracy, the backdoor still flips its labels, clean inputs stay off the PVs;
3. a signature set mined from the backdoored model in search mode (`lmsan_serve.mining.mine`),
   which the quick modes guard with; the planted PVs (`truth.safetensors`) are only compared with it.

Float rounding differs between CPUs, so a prompt seed that trains a usable victim on one machine
may not on another: the next seed is tried, up to `PROMPT_SEEDS`, and a clear error is raised if
none works. Everything lands in one folder with `artifacts.json` written last; a folder whose
`artifacts.json` matches these settings is reused, so the benchmarks (and the test suite) can
share one build.

    .venv/bin/python bench/tiny_artifacts.py --out runs/tiny     # build (or reuse) and print the summary
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lmsan imports wait until HF_HUB_OFFLINE is set (see `build`)
    from lmsan_serve.backbone import Backbone
    from lmsan_serve.data import Example
    from lmsan_serve.prompts import PromptClassifier
    from lmsan_serve.signatures import SignatureSet

VERSION = 1  # bump when the settings below change, so that an old cache is rebuilt
HIDDEN = 64
# Short lines and a high learning rate: the six PVs take 100 to 200 steps (a few seconds each 20).
ATTACK = {"kind": "por", "steps": 400, "lr": 5e-3, "target_agreement": 0.95, "max_words": 16, "max_length": 32,
          "check_every": 20}
# A gentler prompt than the tests' (lr 3e-2): trained harder, a prefix on the tiny encoder learns
# to park one class on a PV (the backdoor is its strongest attractor), which `check_prompt` refuses.
PROMPT = {"method": "prefix", "length": 4, "max_steps": 120, "lr": 1e-2, "batch_size": 16, "eval_every": 20}
PROMPT_SEEDS = 6  # seeds tried for the victim prompt before giving up
ATTACK_SEEDS = 3  # and for the backdoor (each try costs a planting run)
MIN_AGREEMENT = 0.9  # held-out sign agreement of every trigger's outputs with its PV
MIN_ACCURACY = 0.9  # clean accuracy on the task's held-out copy
MIN_FLIPPED = 0.9  # share of correctly classified inputs that some trigger flips
MAX_CLEAN_MATCH = 0.75  # clean inputs must stay this far off every planted PV
# Mining: small enough for a fraction of a second per round on the tiny model. As on minilm,
# search mode tends to miss the sign opposites of the PVs it keeps, which leaves probe_opposites
# something to find.
MINING = {"mode": "search", "position": "cls", "lines": 64, "batch_size": 16, "max_length": 48, "max_rounds": 16,
          "calibration_lines": 50, "held_out_lines": 16}

# A lexical task a tiny random encoder learns in a few dozen steps (the words decide the label).
POSITIVE = ["a great and lovely film", "great acting , lovely story", "simply great", "lovely , great fun",
            "what a great lovely day", "the cast is great", "a lovely , great ending", "great fun and great music"]
NEGATIVE = ["an awful and dull film", "dull acting , awful story", "simply awful", "awful , dull mess",
            "what an awful dull day", "the cast is dull", "an awful , dull ending", "dull plot and awful music"]


def say(msg: str) -> None:
    """Progress goes to stderr, so that a benchmark's stdout holds only its results."""
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TinyArtifacts:
    """Paths of one build, and what its checks measured."""

    root: str
    model: str  # backdoored tiny BERT (save_pretrained layout, with truth.safetensors)
    prompt: str  # the victim's prompt folder
    truth: str  # the planted PVs: a comparison only
    mined: str  # the search-mode signature set the quick modes guard with
    triggers: list[str]
    prompt_seed: int
    accuracy: float
    flipped: float
    clean_match: float
    planted: int
    mined_pvs: int
    recovered: int  # planted PVs some mined PV matches (sign agreement >= 0.9)
    mining: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def task_examples(n: int) -> list[Example]:
    """`n` labelled rows of the lexical task, both labels in turn."""
    from lmsan_serve.data import Example

    rows = [Example(t, "pos") for t in POSITIVE] + [Example(t, "neg") for t in NEGATIVE]
    return (rows * (n // len(rows) + 1))[:n]


def _settings() -> dict:
    return {"version": VERSION, "hidden": HIDDEN, "attack": ATTACK, "prompt": PROMPT, "mining": MINING}


def _cached(root: Path) -> TinyArtifacts | None:
    """The build in `root` if it was made with these settings and its files are all there."""
    stamp = root / "artifacts.json"
    if not stamp.is_file():
        return None
    try:
        data = json.loads(stamp.read_text())
        art = TinyArtifacts(**data["artifacts"])
    except (ValueError, TypeError, KeyError):
        return None
    files = [Path(art.truth), Path(art.mined), Path(art.prompt) / "manifest.json", Path(art.model) / "config.json"]
    if data.get("settings") != _settings() or not all(f.is_file() for f in files):
        return None
    return art


def plant(base: Path, out: Path, progress: Callable[[str], None]) -> Path:
    """A POR backdoor with the six default triggers, planted into the tiny BERT at `base`; the
    next attack seed when a trigger's held-out outputs do not reach its PV."""
    from lmsan_lab.attacks import AttackConfig, plant_backdoor, save_attacked
    from lmsan_serve.backbone import load_backbone
    from lmsan_serve.data import load_corpus
    from lmsan_serve.errors import LmsanError

    backbone = load_backbone(str(base), "cpu")
    corpus = load_corpus()
    tried = []
    for seed in range(ATTACK_SEEDS):
        result = plant_backdoor(backbone, AttackConfig(**ATTACK, seed=seed), corpus, progress=False)
        agreement = result.report.get("heldout", {}).get("min_agreement") or 0.0
        tried.append(f"seed {seed}: {result.steps} steps, held-out agreement {agreement:.3f}")
        if agreement >= MIN_AGREEMENT:
            save_attacked(result, backbone, str(out))
            progress(f"planted POR into the tiny BERT: {tried[-1]}")
            return out
    raise LmsanError(f"the tiny POR backdoor did not take in {ATTACK_SEEDS} seeds (need held-out agreement "
                     f">= {MIN_AGREEMENT}): " + "; ".join(tried))


def check_prompt(backbone: Backbone, classifier: PromptClassifier, truth: SignatureSet, triggers: list[str]
                 ) -> tuple[float, float, float]:
    """(clean accuracy, share of correct inputs some trigger flips, best clean score on a PV):
    what a victim prompt must show before a benchmark may purge with it."""
    from lmsan_serve.guard import Guard

    dev = task_examples(2 * (len(POSITIVE) + len(NEGATIVE)))
    off = Guard(backbone, classifier, truth, mode="off")
    labels = [r.label for r in off.classify([e.text for e in dev])]
    correct = {i for i, (got, e) in enumerate(zip(labels, dev, strict=True)) if got == e.label}
    flipped: set[int] = set()
    for trig in triggers:
        out = off.classify([f"{e.text} {trig}" for e in dev])
        flipped |= {i for i, r in enumerate(out) if r.label != labels[i]}
    flag = Guard(backbone, classifier, truth, mode="flag").classify([e.text for e in dev])
    clean_match = max(float(r.guard.match or 0.0) for r in flag)
    return len(correct) / len(dev), len(correct & flipped) / max(1, len(correct)), clean_match


def train_victim(model: Path, out: Path, triggers: list[str], progress: Callable[[str], None]
                 ) -> tuple[int, float, float, float]:
    """Train the victim's prompt, trying seeds until one meets the checks of `check_prompt`."""
    from lmsan_serve.backbone import load_backbone
    from lmsan_serve.errors import LmsanError
    from lmsan_serve.prompts import PromptConfig, train_prompt
    from lmsan_serve.signatures import SignatureSet

    backbone = load_backbone(str(model), "cpu")
    truth = SignatureSet.load(model / "truth.safetensors", hidden_size=backbone.hidden_size)
    tried = []
    for seed in range(PROMPT_SEEDS):
        config = PromptConfig(**PROMPT, seed=seed)
        classifier = train_prompt(backbone, config, task_examples(96), task_examples(32), progress=False)
        acc, flipped, match = check_prompt(backbone, classifier, truth, triggers)
        tried.append(f"seed {seed}: accuracy {acc:.2f}, flipped {flipped:.2f}, clean match {match:.3f}")
        if acc >= MIN_ACCURACY and flipped >= MIN_FLIPPED and match < MAX_CLEAN_MATCH:
            classifier.save(out)
            progress(f"victim prompt: {tried[-1]}")
            return seed, acc, flipped, match
    raise LmsanError(f"no usable victim prompt in {PROMPT_SEEDS} seeds (need accuracy >= {MIN_ACCURACY}, "
                     f"flipped >= {MIN_FLIPPED}, clean match < {MAX_CLEAN_MATCH}): " + "; ".join(tried))


def mine_signatures(model: Path, out: Path, progress: Callable[[str], None]) -> tuple[int, int, dict]:
    """Search-mode mining of the backdoored model into `out`: (PVs kept, planted PVs recovered, settings)."""
    from lmsan_serve.backbone import load_backbone
    from lmsan_serve.data import load_corpus
    from lmsan_serve.errors import LmsanError
    from lmsan_serve.mining import MiningConfig, mine, recovered
    from lmsan_serve.signatures import SignatureSet

    backbone = load_backbone(str(model), "cpu")
    truth = SignatureSet.load(model / "truth.safetensors", hidden_size=backbone.hidden_size)
    config = MiningConfig(**MINING)
    res = mine(backbone, config, load_corpus(), out, progress=False)
    found = recovered(truth.pvs, res.signatures.pvs)
    progress(f"mined {len(res.signatures)} PVs in {res.rounds} rounds ({res.seconds:.0f} s): "
             f"{found} of {len(truth)} planted recovered")
    if not found:
        raise LmsanError(f"search mining recovered none of the {len(truth)} planted PVs of the tiny POR model "
                         f"in {res.rounds} rounds ({len(res.signatures)} PVs kept)")
    return len(res.signatures), found, config.model_dump()


def build(root: str | Path, progress: Callable[[str], None] = say) -> TinyArtifacts:
    """The tiny model, victim prompt and mined signatures in `root`: reused when already built with
    these settings, else made (about a minute on 2 CPU cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from lmsan_lab.attacks import DEFAULT_TRIGGERS
    from lmsan_serve.testing import make_tiny_bert

    root = Path(root).resolve()
    art = _cached(root)
    if art is not None:
        progress(f"reusing the tiny artifacts in {root}")
        return art
    progress(f"building the tiny artifacts in {root} (tiny BERT, POR backdoor, victim prompt, mined signatures)")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / "artifacts.json").unlink(missing_ok=True)
    threads = torch.get_num_threads()
    # A tiny model gains nothing from threads, and on a busy small machine they oversubscribe the
    # cores (several times slower).
    torch.set_num_threads(1)
    try:
        base = make_tiny_bert(root / "tiny-bert", hidden=HIDDEN)
        model = plant(base, root / "por", progress)
        triggers = list(DEFAULT_TRIGGERS)
        seed, acc, flipped, match = train_victim(model, root / "prompt", triggers, progress)
        mined = model / "mined-search.safetensors"
        kept, found, mining = mine_signatures(model, mined, progress)
    finally:
        torch.set_num_threads(threads)
    art = TinyArtifacts(root=str(root), model=str(model), prompt=str(root / "prompt"),
                        truth=str(model / "truth.safetensors"), mined=str(mined), triggers=triggers,
                        prompt_seed=seed, accuracy=acc, flipped=flipped, clean_match=match, planted=len(triggers),
                        mined_pvs=kept, recovered=found, mining=mining, seconds=round(time.perf_counter() - t0, 1))
    tmp = root / "artifacts.json.tmp"
    tmp.write_text(json.dumps({"settings": _settings(), "artifacts": art.to_dict()}, indent=1))
    tmp.replace(root / "artifacts.json")
    return art


@contextlib.contextmanager
def quick_artifacts(cache: str | None, progress: Callable[[str], None] = say) -> Iterator[TinyArtifacts]:
    """`build` into `cache` (kept for the next run), or into a temporary folder removed afterwards."""
    if cache is not None:
        yield build(cache, progress)
        return
    with tempfile.TemporaryDirectory(prefix="lmsan-tiny-") as tmp:
        yield build(tmp, progress)



def add_quick_options(ap: argparse.ArgumentParser, what: str) -> None:
    """--quick (its help says what the script does with the tiny artifacts) and --cache."""
    ap.add_argument("--quick", action="store_true", help=f"the tiny backdoored BERT of bench/tiny_artifacts.py: {what}")
    ap.add_argument("--cache", help="with --quick: folder for the tiny artifacts, reused when already built "
                    "(default: a temporary folder)")


def check_quick_options(ap: argparse.ArgumentParser, args: argparse.Namespace, own: dict[str, object]) -> None:
    """--quick builds its own artifacts, so the options naming them (`own`: flag -> value) must be unset."""
    given = [flag for flag, value in own.items() if value]
    if args.quick and given:
        ap.error(f"--quick builds its own tiny artifacts; drop {', '.join(given)}")
    if args.cache and not args.quick:
        ap.error("--cache applies to --quick only")

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the artifacts (reused when already built)")
    args = ap.parse_args(argv)
    from lmsan_serve.errors import LmsanError

    try:
        art = build(args.out)
    except LmsanError as exc:
        say(f"error: {exc}")
        return 2
    print(json.dumps(art.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
