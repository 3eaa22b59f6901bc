"""`lmsan check-config`: the shipped Serve config passes on the demo's layout of artifacts, and a
config with a wrong path, a bad key or an unknown field fails with one line that names it, before
anything is deployed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmsan_serve.cli import main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "deployments" / "serve-demo.yaml"


@pytest.fixture()
def demo_layout(tmp_path, tiny_por, tiny_por_prompt) -> Path:
    """A folder laid out as `lmsan demo` leaves it, holding the tiny backdoored BERT and its prompt."""
    demo = tmp_path / "lmsan-out" / "demo"
    demo.mkdir(parents=True)
    (demo / "por").symlink_to(tiny_por, target_is_directory=True)
    (demo / "prompt-sst2").symlink_to(tiny_por_prompt, target_is_directory=True)
    # The shipped configs serve the file the demo's mining writes; check-config validates that
    # file (format, checksum, weights), not how it was made, so the planted set stands in here.
    (demo / "mined").mkdir()
    (demo / "mined" / "search.safetensors").symlink_to(tiny_por / "truth.safetensors")
    return tmp_path


def check(config: Path, base: Path, capsys) -> tuple[int, str, str]:
    rc = main(["check-config", str(config), "--base", str(base)])
    out, err = capsys.readouterr()
    return rc, out, err


def edited(tmp_path: Path, change) -> Path:
    data = yaml.safe_load(SHIPPED.read_text())
    change(data["applications"][0])
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_config_passes_on_the_demo_layout(demo_layout, capsys):
    rc = main(["check-config", str(SHIPPED), "--base", str(demo_layout), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (app,) = json.loads(out)["applications"]
    assert app["tasks"] == ["sst2"] and app["pvs"] == 3 and app["verdict"] == "backdoored"


def _set_user_config(key, value):
    def change(app):
        classifier = next(d for d in app["deployments"] if d["name"] == "GuardedClassifier")
        classifier["user_config"][key] = value
    return change


@pytest.mark.parametrize("change, reason", [
    (lambda app: app["args"]["tasks"].update(sst2="lmsan-out/demo/no-such-prompt"), "prompt folder not found"),
    (lambda app: app["args"].update(model="lmsan-out/demo/no-such-model"), "model folder not found"),
    (lambda app: app["args"].update(trusted_keys=["keys/none.pub"]), "none.pub"),
    (lambda app: app["args"].update(batch_size=8), "batch_size"),
    (_set_user_config("signatures", "lmsan-out/demo/por/none.safetensors"), "signature file not found"),
    (_set_user_config("thresold", 0.9), "thresold"),
    (_set_user_config("mode", "loose"), "mode"),
])
def test_a_broken_config_fails_with_one_line_naming_the_problem(demo_layout, tmp_path, capsys, change, reason):
    rc, out, err = check(edited(tmp_path, change), demo_layout, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("lmsan check-config: error: ") and reason in lines[0], lines[0]


def test_a_prompt_for_other_weights_than_the_signatures_is_refused(demo_layout, tmp_path, tiny_phrase_por, capsys):
    """The prompt was trained on the POR copy; the phrase copy's signature file names other weights."""
    config = edited(tmp_path, _set_user_config("signatures", str(tiny_phrase_por / "truth.safetensors")))
    rc, _, err = check(config, demo_layout, capsys)
    assert rc == 2 and "other weights" in err


def test_not_a_serve_config(tmp_path, capsys):
    for text, reason in (("applications: 3\n", "must be a list"), ("- a\n- b\n", "is a mapping"),
                         ("a: [\n", "not valid YAML"), ("applications: []\n", "no application")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        rc, _, err = check(path, tmp_path, capsys)
        assert rc == 2 and reason in err, (text, err)
    missing = tmp_path / "missing.yaml"
    assert check(missing, tmp_path, capsys)[2].endswith(f"config file not found: {missing}\n")


@pytest.mark.parametrize("positions, refused", [(["mask", "mask", "mask"], True), (["cls", "cls", "mask"], False)])
def test_a_file_whose_pvs_are_all_at_mask_is_refused_for_a_prompt_without_one(demo_layout, capsys, positions,
                                                                               refused):
    """Judged on where the PVs are, not on the file's own `position` (the first position mining
    covered, which may hold none): a mined file with [CLS] PVs beside [MASK] ones serves the SST-2
    prefix prompt, one with only [MASK] PVs does not (the guard would have nothing to watch)."""
    from lmsan_serve.signatures import SignatureSet

    sig_path = demo_layout / "lmsan-out" / "demo" / "mined" / "search.safetensors"
    truth = SignatureSet.load(sig_path)
    records = [r.model_copy(update={"position": p}) for r, p in zip(truth.meta.pvs, positions, strict=True)]
    b = truth.meta.backbone
    mined = SignatureSet.create(truth.pvs, records, backbone_name=b.name, fingerprint=b.fingerprint,
                                model_type=b.model_type, position="cls", verdict="backdoored")
    sig_path.unlink()
    mined.save(sig_path)
    rc, _, err = check(SHIPPED, demo_layout, capsys)
    if refused:
        assert rc == 2 and "no cloze template" in err and len(err.strip().splitlines()) == 1, err
    else:
        assert rc == 0, err
