"""What every `lmsan` command shares: output conventions, flags, checks made before slow work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def say(args: argparse.Namespace, msg: str) -> None:
    """Human progress lines go to stderr so that --json output on stdout stays machine-readable."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def emit(args: argparse.Namespace, human: str, data: dict) -> None:
    if args.json:
        print(json.dumps(data))
    else:
        print(human)


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def writable_dir(path: str, what: str) -> Path:
    """An output folder proved writable now (`storage.output_folder`), before any slow work."""
    from ..storage import output_folder

    return output_folder(path, what)


def trusted_keys(args: argparse.Namespace) -> list | None:
    """The --trusted-key public keys, loaded up front so that a bad key fails before any slow work."""
    from ..signing import load_public_keys

    return load_public_keys(args.trusted_key) if getattr(args, "trusted_key", None) else None


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="local folder, hub id, or 'minilm' (embedded default)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_trusted_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trusted-key", action="append", metavar="PUB.pem",
                   help="accept only signature files signed by this Ed25519 public key (repeat for more keys)")
