"""Bad files never break the command line: every file-consuming `lmsan` command fed truncated,
corrupted, empty, wrong-format and wrong-kind inputs (signature files, prompt artifacts, JSONL data,
corpora, model folders, checkpoints and caches).

Each case must end with exit 2 and exactly one stderr line `lmsan COMMAND: error: ...`, no Python
traceback, and every output that existed beforehand byte-for-byte unchanged. Corruptions are drawn
from seeded generators (truncation points, byte flips, random bytes), so the cases are fixed.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmsan_serve.cli import EXIT_USAGE, main

SEEDS = range(6)
CASES = {"count": 0}


# -- harness ---------------------------------------------------------------------------------------
def snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    """Bytes of every file under `paths` (None for a folder entry), to compare after a failed run."""
    state: dict[str, bytes | None] = {}
    for root in paths:
        if root.is_file():
            state[str(root)] = root.read_bytes()
        elif root.is_dir():
            state[str(root)] = None
            for p in sorted(root.rglob("*")):
                state[str(p)] = p.read_bytes() if p.is_file() else None
    return state


def fails_cleanly(command: str, *argv, protect: list[Path] = (), fragment: str = "") -> str:
    """Run `lmsan COMMAND ARGV` in-process: exit 2, one 'lmsan COMMAND: error:' line, no traceback,
    and nothing under `protect` changed."""
    before = snapshot(list(protect))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([command, *[str(a) for a in argv]])
        except SystemExit as exc:  # argparse
            rc = exc.code
        except Exception as exc:  # what would be a traceback on the terminal
            pytest.fail(f"lmsan {command} raised {type(exc).__name__}: {exc}")
    CASES["count"] += 1
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert rc == EXIT_USAGE, (argv, rc, out.getvalue(), err.getvalue())
    assert len(lines) == 1, err.getvalue()
    assert lines[0].startswith(f"lmsan {command}: error: "), lines[0]
    assert "Traceback" not in err.getvalue() + out.getvalue()
    assert fragment in lines[0], lines[0]
    assert out.getvalue() == ""
    assert snapshot(list(protect)) == before, "a failed run changed an existing output"
    return lines[0]


def runs_or_fails_cleanly(command: str, *argv) -> int:
    """For corruptions that may leave a valid file (a flipped byte in a timestamp): exit 0, or a clean exit 2."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([command, *[str(a) for a in argv]])
        except Exception as exc:
            pytest.fail(f"lmsan {command} raised {type(exc).__name__}: {exc}")
    CASES["count"] += 1
    if rc != 0:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert rc == EXIT_USAGE and len(lines) == 1 and lines[0].startswith(f"lmsan {command}: error: "), \
            (rc, err.getvalue())
    return rc


# -- corruption generators -------------------------------------------------------------------------
def truncations(data: bytes, seed: int, n: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    cuts = {rng.randrange(1, len(data)) for _ in range(n)}
    if seed == 0:
        cuts |= {0, 1, 7, 8, 9, len(data) - 1}
    return [data[:c] for c in sorted(cuts)]


def flip(data: bytes, seed: int, count: int, lo: int = 0, hi: int | None = None) -> bytes:
    rng = random.Random(seed)
    buf = bytearray(data)
    hi = len(buf) if hi is None else hi
    for _ in range(count):
        i = rng.randrange(lo, hi)
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def random_bytes(seed: int, n: int | None = None) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(n if n is not None else rng.randrange(1, 4096))


def header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_models(tiny_bert, tiny_backbone):
    """Model loads of the valid tiny BERT reuse the session's backbone (bad folders still load for real)."""
    import lmsan_serve.backbone as backbone_module

    real = backbone_module.load_backbone

    def load(name, device=None):
        return tiny_backbone if str(name) == str(tiny_bert) else real(name, device)

    mp = pytest.MonkeyPatch()
    mp.setattr(backbone_module, "load_backbone", load)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory, tiny_backbone) -> Path:
    from lmsan_serve.prompts import PromptConfig, train_prompt

    from .toy import toy

    cfg = PromptConfig(method="prefix", length=4, max_steps=2, batch_size=8)
    return train_prompt(tiny_backbone, cfg, toy(16), None, progress=False).save(
        tmp_path_factory.mktemp("fuzz-prompt") / "prompt")


@pytest.fixture(scope="module")
def sig_file(tmp_path_factory, tiny_backbone) -> Path:
    from lmsan_serve.signatures import PVRecord, SignatureSet

    pvs = torch.sign(torch.randn(2, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0)))
    sig = SignatureSet.create(pvs, [PVRecord(origin="planted", trigger="cf"), PVRecord(origin="mined", seed=3)],
                              backbone_name="tiny", fingerprint=tiny_backbone.fingerprint, model_type="bert",
                              position="cls", verdict="backdoored")
    return sig.save(tmp_path_factory.mktemp("fuzz-sig") / "sig.safetensors")


@pytest.fixture()
def outputs(tmp_path, sig_file) -> dict[str, Path]:
    """Outputs that exist before a run: a finished model folder, a prompt folder, a signature file."""
    folder = tmp_path / "existing-out"
    write(folder / "config.json", '{"kept": true}\n')
    write(folder / "notes.txt", "must survive a failed run\n")
    sig = tmp_path / "existing-sig.safetensors"
    shutil.copy(sig_file, sig)
    write(sig.with_name(sig.name + ".cls.ckpt.json"), '{"candidates": []}\n')
    return {"folder": folder, "sig": sig, "ckpt": sig.with_name(sig.name + ".cls.ckpt.json")}


# -- signature files --------------------------------------------------------------------------------
def sig_with(tmp_path: Path, name: str, tensors: dict, metadata: dict | None) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def bad_signature_files(tmp_path: Path, sig_file: Path) -> list[tuple[str, Path]]:
    """Signature files that must all be refused."""
    good = sig_file.read_bytes()
    meta = json.loads(json.loads(good[8:header_len(good)])["__metadata__"]["lmsan"])
    pvs = torch.sign(torch.randn(2, meta["backbone"]["hidden_size"], generator=torch.Generator().manual_seed(0)))
    cases: list[tuple[str, bytes | Path]] = [("empty", b""), ("text", b"not a safetensors file\n")]
    for seed in SEEDS:
        cases += [(f"truncated-{seed}-{len(t)}", t) for t in truncations(good, seed)]
        cases.append((f"random-{seed}", random_bytes(seed)))
        cases.append((f"header-length-{seed}", random_bytes(seed, 8) + good[8:]))
        cases.append((f"header-garbage-{seed}", good[:8] + random_bytes(seed, header_len(good) - 8)
                      + good[header_len(good):]))
        cases.append((f"data-flipped-{seed}", flip(good, seed, 1 + seed, lo=header_len(good))))
    cases.append(("huge-header-length", struct.pack("<Q", 2**63) + good[8:]))
    cases.append(("nested-header", struct.pack("<Q", 20_000) + b"[" * 20_000))

    def crafted(name: str, tensors: dict | None = None, **fields) -> None:
        md = {"lmsan": json.dumps({**meta, **fields})} if fields.get("_raw") is None else {"lmsan": fields["_raw"]}
        if fields.get("_drop"):
            md = {}
        cases.append((name, sig_with(tmp_path, name, tensors if tensors is not None else {"pvs": pvs}, md)))

    crafted("no-metadata", _drop=True)
    crafted("metadata-not-json", _raw="{not json")
    crafted("metadata-a-list", _raw="[1, 2, 3]")
    crafted("metadata-null", _raw="null")
    crafted("metadata-nested-deep", _raw="[" * 100_000 + "]" * 100_000)
    crafted("metadata-huge-int", _raw='{"format_version": ' + "9" * 10_000 + "}")
    crafted("metadata-nan", _raw=json.dumps({**meta, "threshold": float("nan")}))
    crafted("no-pvs-tensor", tensors={"other": pvs})
    crafted("pvs-float64", tensors={"pvs": pvs.double()})
    crafted("pvs-int", tensors={"pvs": pvs.int()})
    crafted("pvs-bf16", tensors={"pvs": pvs.bfloat16()})
    crafted("pvs-1d", tensors={"pvs": pvs[0].contiguous()})
    crafted("pvs-3d", tensors={"pvs": pvs[None].contiguous()})
    crafted("pvs-empty", tensors={"pvs": torch.zeros(0, pvs.shape[1])})
    crafted("pvs-nan", tensors={"pvs": torch.full_like(pvs, float("nan"))})
    crafted("pvs-one-row-short", tensors={"pvs": pvs[:1].contiguous()})
    crafted("pvs-narrower", tensors={"pvs": pvs[:, :8].contiguous()})
    crafted("checksum-mismatch", tensors={"pvs": -pvs})
    for key, value in [("format_version", 99), ("format_version", "one"), ("backbone", None), ("backbone", []),
                       ("backbone", {"name": "x"}), ("position", "everywhere"), ("metric", 3), ("threshold", 7),
                       ("threshold", -1), ("verdict", "maybe"), ("pvs", {}), ("pvs", [None, None]),
                       ("pvs", [{"origin": "mined", "threshold": 2}] * 2), ("tensor_sha256", "00"),
                       ("created", None), ("mining", []), ("unknown_field", 1)]:
        crafted(f"meta-{key}-{json.dumps(value)[:12]}", **{key: value})
    crafted("meta-missing-pvs", _raw=json.dumps({k: v for k, v in meta.items() if k != "pvs"}))
    out = []
    for name, data in cases:
        out.append((name, data if isinstance(data, Path) else write(tmp_path / f"{name}.safetensors", data)))
    return out


def test_inspect_refuses_every_broken_signature_file(tmp_path, sig_file):
    cases = bad_signature_files(tmp_path, sig_file)
    assert len(cases) >= 60
    for _, path in cases:
        fails_cleanly("inspect", path, fragment=str(path))
    fails_cleanly("inspect", tmp_path, fragment="not found")  # a folder
    fails_cleanly("inspect", tmp_path / "missing.safetensors", fragment="not found")


def test_inspect_survives_random_header_flips(tmp_path, sig_file):
    """A flipped bit in the JSON header may still leave a valid file (inside a timestamp): then the file
    loads; otherwise a clean error. Never a traceback."""
    good = sig_file.read_bytes()
    outcomes = []
    for seed in range(40):
        path = write(tmp_path / f"flip-{seed}.safetensors", flip(good, seed, 1 + seed % 3, lo=8, hi=header_len(good)))
        outcomes.append(runs_or_fails_cleanly("inspect", path, "--json"))
    assert outcomes.count(EXIT_USAGE) >= 20  # most flips break the file


def test_classify_and_serve_refuse_broken_signature_files(tmp_path, sig_file, tiny_bert, prompt_dir, fast_models,
                                                          monkeypatch):
    import lmsan_serve.serving.run as run_module

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started for a bad signature file")

    monkeypatch.setattr(run_module, "start", no_cluster)
    cases = bad_signature_files(tmp_path, sig_file)
    rng = random.Random(0)
    for _, path in [cases[0], cases[3], *rng.sample(cases[4:], 10)]:
        fails_cleanly("classify", "some text", "--model", tiny_bert, "--prompt", prompt_dir, "--signatures", path,
                      fragment=str(path))
        fails_cleanly("serve", "--model", tiny_bert, "--task", f"sst={prompt_dir}", "--signatures", path,
                      fragment=str(path))
    fails_cleanly("serve", "--model", tiny_bert, "--task", f"sst={prompt_dir}", "--signatures", tmp_path)
    fails_cleanly("serve", "--model", tiny_bert, "--task", f"sst={sig_file}", "--signatures", sig_file,
                  fragment="prompt folder not found")  # a file where a prompt folder belongs
    fails_cleanly("serve", "--model", tiny_bert, "--task", f"sst={prompt_dir}", "--signatures", sig_file,
                  "--calibration", f"other={sig_file}", fragment="no --task gives")
    fails_cleanly("serve", "--model", tiny_bert, "--task", f"sst={prompt_dir}", "--signatures", sig_file,
                  "--calibration", f"sst={tmp_path / 'none.jsonl'}", fragment="not found")
    fails_cleanly("serve", "--model", tiny_bert, "--task", f"sst={prompt_dir}", "--signatures", sig_file,
                  "--calibration", f"sst={sig_file}", fragment=Path(sig_file).name)
    fails_cleanly("serve", "--model", tiny_bert, "--task", f"sst={prompt_dir}", "--signatures", sig_file,
                  "--calibration", "sst", fragment="NAME=FILE")


# -- prompt artifacts ------------------------------------------------------------------------------
def broken_prompts(tmp_path: Path, prompt_dir: Path) -> list[Path]:
    manifest = json.loads((prompt_dir / "manifest.json").read_text())
    tensors_raw = (prompt_dir / "prompt.safetensors").read_bytes()
    from safetensors.torch import load_file

    tensors = load_file(str(prompt_dir / "prompt.safetensors"))
    folders: list[Path] = []

    def variant(name: str, manifest_data: bytes | str | None = None, tensor_data: bytes | None = None,
                tensor_dict: dict | None = None) -> None:
        folder = tmp_path / "prompts" / name
        shutil.copytree(prompt_dir, folder)
        if manifest_data is not None:
            write(folder / "manifest.json", manifest_data)
        if tensor_data is not None:
            write(folder / "prompt.safetensors", tensor_data)
        if tensor_dict is not None:
            save_file(tensor_dict, str(folder / "prompt.safetensors"))
        folders.append(folder)

    raw = json.dumps(manifest)
    for seed in SEEDS[:3]:
        for i, t in enumerate(truncations(raw.encode(), seed, 2)):
            variant(f"manifest-truncated-{seed}-{i}", t)
        for i, t in enumerate(truncations(tensors_raw, seed, 2)):
            variant(f"tensors-truncated-{seed}-{i}", tensor_data=t)
        variant(f"manifest-random-{seed}", random_bytes(seed))
        variant(f"tensors-random-{seed}", tensor_data=random_bytes(seed))
        variant(f"tensors-header-garbage-{seed}", tensor_data=tensors_raw[:8] + random_bytes(
            seed, header_len(tensors_raw) - 8) + tensors_raw[header_len(tensors_raw):])
    for name, value in [("empty", ""), ("list", "[]"), ("null", "null"), ("nested", "[" * 100_000),
                        ("huge-int", '{"format_version": ' + "1" * 10_000 + "}")]:
        variant(f"manifest-{name}", value)
    for key, value in [("config", None), ("config", {"length": -1}), ("labels", 3), ("labels", ["only"]),
                       ("labels", ["a", "b", "c"]), ("backbone", None), ("backbone", []), ("backbone", "bert"),
                       ("backbone", {"hidden_size": "128"}), ("format_version", 99), ("format_version", None)]:
        variant(f"manifest-{key}-{json.dumps(value)[:10]}", json.dumps({**manifest, key: value}))
    variant("manifest-missing-labels", json.dumps({k: v for k, v in manifest.items() if k != "labels"}))
    variant("manifest-missing-backbone", json.dumps({k: v for k, v in manifest.items() if k != "backbone"}))
    prompt, weight, bias = tensors["prompt"], tensors["head.weight"], tensors["head.bias"]
    for name, d in [
        ("no-head", {"prompt": prompt}),
        ("no-prompt", {"head.weight": weight, "head.bias": bias}),
        ("bias-wrong-shape", {"prompt": prompt, "head.weight": weight, "head.bias": torch.zeros(5)}),
        ("bias-2d", {"prompt": prompt, "head.weight": weight, "head.bias": bias[None].contiguous()}),
        ("weight-transposed", {"prompt": prompt, "head.weight": weight.T.contiguous(), "head.bias": bias}),
        ("prompt-1d", {"prompt": prompt.flatten().contiguous(), "head.weight": weight, "head.bias": bias}),
        ("prompt-short", {"prompt": prompt[:, :1].contiguous(), "head.weight": weight, "head.bias": bias}),
        ("prompt-nan", {"prompt": torch.full_like(prompt, float("nan")), "head.weight": weight, "head.bias": bias}),
        ("prompt-int", {"prompt": prompt.int(), "head.weight": weight, "head.bias": bias}),
        ("prompt-bool", {"prompt": prompt > 0, "head.weight": weight, "head.bias": bias}),
        ("bias-complex", {"prompt": prompt, "head.weight": weight, "head.bias": bias.to(torch.complex64)}),
    ]:
        variant(f"tensors-{name}", tensor_dict=d)
    missing = tmp_path / "prompts" / "no-tensors"
    shutil.copytree(prompt_dir, missing)
    (missing / "prompt.safetensors").unlink()
    manifest_dir = tmp_path / "prompts" / "manifest-is-a-folder"
    shutil.copytree(prompt_dir, manifest_dir)
    (manifest_dir / "manifest.json").unlink()
    (manifest_dir / "manifest.json").mkdir()
    return folders + [missing, manifest_dir]


def test_classify_refuses_every_broken_prompt_artifact(tmp_path, tiny_bert, prompt_dir, fast_models):
    folders = broken_prompts(tmp_path, prompt_dir)
    assert len(folders) >= 40
    for folder in folders:
        fails_cleanly("classify", "some text", "--model", tiny_bert, "--prompt", folder, "--mode", "off",
                      fragment=str(folder))
    fails_cleanly("classify", "some text", "--model", tiny_bert, "--prompt", prompt_dir / "manifest.json",
                  "--mode", "off", fragment="prompt folder not found")


# -- JSONL data and corpora ------------------------------------------------------------------------
GOOD_ROWS = [{"text": f"{w} film number {i}", "label": "pos" if i % 2 else "neg"}
             for i, w in enumerate(["a fine", "an awful", "a great", "a dull"] * 4)]


def bad_jsonl(tmp_path: Path, require_label: bool = True) -> list[Path]:
    """JSONL example files that load_examples must refuse: each one bad line among good ones, or none.
    Without `require_label` (classify --input), a missing or null label is fine and left out."""
    good = [json.dumps(r) for r in GOOD_ROWS]
    bad_lines = [
        "{not json", "[1, 2]", '"just a string"', "42", "null", "true", '{"text": 5, "label": "pos"}',
        '{"label": "pos"}', '{"text": "", "label": "pos"}', '{"text": "   ", "label": "pos"}',
        '{"text": "ok", "label": ["pos"]}', '{"text": "ok", "label": {"a": 1}}', '{"text": "ok", "label": true}',
        '{"text": "ok", "label": 1.5}', '{"text": "ok", "label": NaN}',
        '{"text": "ok", "text_pair": 7, "label": "pos"}', '{"text": ["ok"], "label": "pos"}',
        '{"text": "ok", "label": ' + "7" * 10_000 + "}", "[" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000,
        '{"text": "ok", "label": "pos"} trailing', '{"text": "ok", "label": "pos"}{"text": "x"}',
    ]
    if require_label:
        bad_lines += ['{"text": "ok", "label": null}', '{"text": "ok"}']
    files = []
    rng = random.Random(0)
    for i, line in enumerate(bad_lines):
        rows = list(good)
        rows.insert(rng.randrange(len(rows) + 1), line)
        files.append(write(tmp_path / f"bad-{i}.jsonl", "\n".join(rows) + "\n"))
    for seed in SEEDS:
        files.append(write(tmp_path / f"binary-{seed}.jsonl", random_bytes(seed)))
        text = "\n".join(good).encode()
        files.append(write(tmp_path / f"latin1-{seed}.jsonl", text + b"\n" + b'{"text": "caf\xe9", "label": "pos"}'))
    files += [write(tmp_path / "empty.jsonl", ""), write(tmp_path / "blank.jsonl", "\n \n\t\n"),
              write(tmp_path / "bom-nul.jsonl", "\x00" * 64)]
    folder = tmp_path / "a-folder.jsonl"
    folder.mkdir()
    return files + [folder, tmp_path / "missing.jsonl"]


def test_train_prompt_refuses_bad_train_and_eval_files(tmp_path, tiny_bert, outputs):
    good = write(tmp_path / "good.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_ROWS))
    files = bad_jsonl(tmp_path / "data")
    for path in files:
        fails_cleanly("train-prompt", "--model", tiny_bert, "--train", path, "--out", outputs["folder"],
                      "--quiet", protect=[outputs["folder"]], fragment=str(path))
    for path in files[::4]:
        fails_cleanly("train-prompt", "--model", tiny_bert, "--train", good, "--eval", path,
                      "--out", outputs["folder"], "--quiet", protect=[outputs["folder"]], fragment=str(path))


def test_classify_refuses_bad_input_files(tmp_path, tiny_bert, prompt_dir):
    for path in bad_jsonl(tmp_path / "data", require_label=False):
        fails_cleanly("classify", "--input", path, "--model", tiny_bert, "--prompt", prompt_dir, "--mode", "off",
                      fragment=str(path))


def bad_corpora(tmp_path: Path) -> list[Path]:
    files = [write(tmp_path / "empty.txt", ""), write(tmp_path / "short-lines.txt", "one two\nthree\n" * 50),
             write(tmp_path / "headings.txt", "= = a heading line here = =\n" * 50),
             write(tmp_path / "json-no-text.jsonl", '{"title": "four words right here"}\n' * 50),
             write(tmp_path / "json-text-int.jsonl", '{"text": 12345}\n' * 50),
             write(tmp_path / "json-text-list.jsonl", '{"text": ["four", "words", "in", "list"]}\n' * 50),
             write(tmp_path / "nested.jsonl", '{"a":' * 50_000 + "1" + "}" * 50_000 + "\n"),
             write(tmp_path / "huge-int.jsonl", '{"text": ' + "9" * 10_000 + "}\n")]
    for seed in SEEDS:
        files.append(write(tmp_path / f"binary-{seed}.txt", random_bytes(seed) + b"\xff\xfe"))
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    return files + [folder, tmp_path / "missing.txt"]


def test_attack_and_mine_refuse_bad_corpora(tmp_path, tiny_bert, outputs):
    for path in bad_corpora(tmp_path / "corpora"):
        fails_cleanly("attack", "por", "--model", tiny_bert, "--out", outputs["folder"], "--corpus", path,
                      "--quiet", protect=[outputs["folder"]], fragment=str(path))
        fails_cleanly("mine", "--model", tiny_bert, "--out", outputs["sig"], "--corpus", path, "--quiet",
                      protect=[outputs["sig"], outputs["ckpt"]], fragment=str(path))


def test_mine_refuses_corrupt_checkpoints(tmp_path, tiny_bert, tiny_backbone, outputs, fast_models):
    from lmsan_serve.mining import MiningConfig

    config = MiningConfig(mode="detect", position="cls", lines=64, first_seed=0, wave=4)
    head = {"fingerprint": tiny_backbone.fingerprint, "config": config.identity()}
    states = [b"", b"{trunc", random_bytes(1, 300), b"[]", b"null", b'"x"', json.dumps(head).encode(),
              json.dumps({**head, "candidates": 5}).encode(), json.dumps({**head, "candidates": [1, 2]}).encode(),
              json.dumps({**head, "candidates": [{"pv": [0.0]}]}).encode(),
              json.dumps({**head, "candidates": [{"seed": "x"}]}).encode(),
              json.dumps({**head, "candidates": {"0": {}}}).encode(), b"[" * 100_000]
    for state in states:
        write(outputs["ckpt"], state)
        fails_cleanly("mine", "--model", tiny_bert, "--out", outputs["sig"], "--lines", 64, "--resume", "--quiet",
                      protect=[outputs["sig"], outputs["ckpt"]], fragment="checkpoint")


# -- model folders ---------------------------------------------------------------------------------
def broken_models(tmp_path: Path, tiny_bert: Path) -> list[Path]:
    config = json.loads((tiny_bert / "config.json").read_text())
    weights = (tiny_bert / "model.safetensors").read_bytes()
    folders: list[Path] = []

    def variant(name: str, files: dict[str, bytes | str | None]) -> None:
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        for f in tiny_bert.iterdir():  # links, not copies: the weights are megabytes
            if f.name not in files:
                (folder / f.name).symlink_to(f)
        for rel, data in files.items():
            if data is not None:
                write(folder / rel, data)
        folders.append(folder)

    variant("no-config", {"config.json": None})
    variant("config-empty", {"config.json": ""})
    variant("config-random", {"config.json": random_bytes(0)})
    variant("config-truncated", {"config.json": json.dumps(config)[:40]})
    variant("config-list", {"config.json": "[1, 2]"})
    variant("config-null", {"config.json": "null"})
    variant("config-object-empty", {"config.json": "{}"})
    variant("config-unknown-type", {"config.json": json.dumps({**config, "model_type": "nonsense"})})
    variant("config-hidden-string", {"config.json": json.dumps({**config, "hidden_size": "wide"})})
    variant("config-hidden-mismatch", {"config.json": json.dumps({**config, "hidden_size": 64})})
    variant("config-heads-indivisible", {"config.json": json.dumps({**config, "num_attention_heads": 3})})
    variant("config-layers-negative", {"config.json": json.dumps({**config, "num_hidden_layers": -1})})
    variant("config-vocab-zero", {"config.json": json.dumps({**config, "vocab_size": 0})})
    variant("no-weights", {"model.safetensors": None})
    variant("weights-empty", {"model.safetensors": b""})
    variant("weights-random", {"model.safetensors": random_bytes(2, 10_000)})
    for seed in SEEDS[:3]:
        variant(f"weights-truncated-{seed}", {"model.safetensors": truncations(weights, seed, 1)[-1]})
        variant(f"weights-header-garbage-{seed}", {"model.safetensors": weights[:8] + random_bytes(
            seed, header_len(weights) - 8) + weights[header_len(weights):]})
    variant("tokenizer-garbage", {"tokenizer.json": random_bytes(3), "vocab.txt": None})
    variant("no-tokenizer", {"tokenizer.json": None, "vocab.txt": None, "tokenizer_config.json": None})
    variant("tokenizer-config-garbage", {"tokenizer_config.json": "{not json"})
    small = tmp_path / "models" / "tokenizer-bigger-than-embeddings"  # another model's tokenizer
    from transformers import AutoTokenizer, BertConfig, BertModel

    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(small))
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(str(small))
    folders.append(small)
    empty = tmp_path / "models" / "empty"
    empty.mkdir(parents=True)
    return folders + [empty, write(tmp_path / "models" / "a-file", "not a folder")]


def test_commands_refuse_broken_model_folders(tmp_path, tiny_bert, prompt_dir, outputs):
    folders = broken_models(tmp_path, tiny_bert)
    for folder in folders:
        fails_cleanly("classify", "some text", "--model", folder, "--prompt", prompt_dir, "--mode", "off",
                      fragment=str(folder.name))
    for folder in folders[::5]:
        fails_cleanly("attack", "por", "--model", folder, "--out", outputs["folder"], "--quiet",
                      protect=[outputs["folder"]], fragment=str(folder.name))
        fails_cleanly("mine", "--model", folder, "--out", outputs["sig"], "--quiet",
                      protect=[outputs["sig"], outputs["ckpt"]], fragment=str(folder.name))
    fails_cleanly("train-prompt", "--model", folders[0], "--train",
                  write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_ROWS)),
                  "--out", outputs["folder"], "--quiet", protect=[outputs["folder"]], fragment=folders[0].name)


# -- demo cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [b"", b"{trunc", b"[]", b"null", b'{"config": 5}', b"\xff\xfe\x00",
                                   b"[" * 100_000])
def test_demo_treats_a_corrupt_cache_as_stale(tmp_path, monkeypatch, cache):
    """A broken OUT/por/attack.json is not a crash: the demo redoes the attack (stopped here at its start)."""
    import lmsan_lab.demo as demo

    def stop_here(*a, **k):
        from lmsan_serve.errors import LmsanError

        raise LmsanError("redoing the attack")

    monkeypatch.setattr(demo, "load_backbone", stop_here)
    out = tmp_path / "demo"
    write(out / "por" / "attack.json", cache)
    write(out / "por" / "truth.safetensors", b"whatever")
    fails_cleanly("demo", "--out", out, "--quiet", fragment="redoing the attack")


def test_demo_out_is_not_a_folder(tmp_path):
    blocker = write(tmp_path / "file", "x")
    fails_cleanly("demo", "--out", blocker, "--quiet", protect=[blocker])
    fails_cleanly("demo", "--out", blocker / "below", "--quiet", protect=[blocker])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no one can create a file")
def test_writers_refuse_an_unwritable_folder_before_any_work(tiny_bert, tmp_path):
    """Root passes every permission check, so only creating a file tells: /proc takes no new
    file even from root, as a read-only volume of a pod does not. Each command fails at once,
    before loading a model or training, with the folder it could not write."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    fails_cleanly("mine", "--model", tiny_bert, "--out", "/proc/lmsan-test.safetensors", fragment="/proc")
    fails_cleanly("train-prompt", "--model", tiny_bert, "--train", train, "--out", "/proc/lmsan-test",
                  fragment="/proc")
    fails_cleanly("attack", "por", "--model", tiny_bert, "--out", "/proc/lmsan-test", fragment="/proc")
    fails_cleanly("demo", "--out", "/proc/lmsan-test", fragment="/proc")


def test_case_count(record_property, capsys):
    """Runs last (file order): the number of bad-input CLI runs above."""
    record_property("loader_fuzz_cases", CASES["count"])
    with capsys.disabled():
        print(f"\n{CASES['count']} bad-file CLI runs, all exit 2 with one line")
    assert CASES["count"] >= 300
