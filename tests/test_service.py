"""The endpoint's service layer without a cluster: batching across tasks, modes, metrics, audit
log, signature hot reload with fallback to the last good set, fail-closed behaviour. It serves the
signature file mined from the tiny POR copy (conftest's `tiny_por_mined`) and is sent the triggers
whose PV mining recovered."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timedelta, timezone

import pytest
import torch

from lmsan_serve import load_backbone
from lmsan_serve.errors import LmsanError
from lmsan_serve.guard import Guard
from lmsan_serve.prompts import PromptClassifier
from lmsan_serve.serving import ClassifyCall, GuardService, parse_config
from lmsan_serve.signatures import SignatureSet

CLEAN = ["simply great", "an awful and dull film", "what a lovely day"]


@pytest.fixture(scope="module")
def backbone(tiny_por):
    return load_backbone(str(tiny_por), "cpu")


@pytest.fixture(scope="module")
def triggers(tiny_por_mined) -> list[str]:
    """Three trigger slots, filled in turn with the triggers whose PV mining recovered (2 or 3 of 3)."""
    caught = tiny_por_mined.caught
    return [caught[i % len(caught)] for i in range(3)]


@pytest.fixture(scope="module")
def triggered(triggers) -> list[str]:
    """CLEAN with a trigger in each."""
    a, b, c = triggers
    return [f"simply {a} great", f"an awful {b} and dull film", f"what a {c} lovely day"]


@pytest.fixture()
def files(tmp_path, tiny_por, tiny_por_prompt, tiny_por_mined):
    sig = tmp_path / "sig.safetensors"
    shutil.copy(tiny_por_mined.path, sig)
    return {"model": str(tiny_por), "prompt": str(tiny_por_prompt), "sig": sig, "mined": tiny_por_mined.path}


def service(files, backbone, **over) -> GuardService:
    args = {"model": files["model"], "signatures": str(files["sig"]),
            "tasks": {"sst": files["prompt"], "shadow": {"prompt": files["prompt"], "mode": "flag"}},
            "watch_interval_s": 0} | over
    return GuardService(parse_config(args), backbone=backbone)


def test_config_errors_name_the_field(files):
    base = {"model": "m", "tasks": {"a": "p"}}
    with pytest.raises(LmsanError, match="tasks"):
        parse_config(base | {"tasks": {}})
    with pytest.raises(LmsanError, match="task name"):
        parse_config(base | {"tasks": {"a b": "p"}})
    with pytest.raises(LmsanError, match="unknown tasks: zz"):
        parse_config(base | {"task_modes": {"zz": "off"}})
    with pytest.raises(LmsanError, match="max_batch_size"):
        parse_config(base | {"limits": {"max_inputs": 100}, "batching": {"max_batch_size": 10}})
    with pytest.raises(LmsanError, match="mode"):
        parse_config(base | {"mode": "strict"})


def test_one_batch_serves_two_tasks_with_their_own_modes(files, backbone, triggers, triggered):
    svc = service(files, backbone)
    calls = [ClassifyCall("r1", "sst", CLEAN + triggered), ClassifyCall("r2", "shadow", triggered),
             ClassifyCall("r3", "nope", ["x"])]
    out = svc.classify(calls)
    assert out[2].status == 404 and "unknown task" in out[2].error
    sig = SignatureSet.load(files["sig"])
    classifier = PromptClassifier.load(files["prompt"], backbone)
    direct = Guard(backbone, classifier, sig, mode="enforce").classify(CLEAN + triggered)
    assert out[0].results == [r.to_dict() for r in direct]  # batching changes nothing
    assert [r["guard"]["action"] for r in out[0].results] == ["pass"] * 3 + ["purged"] * 3
    assert [r["guard"]["removed"] for r in out[0].results[3:]] == [[t] for t in triggers]
    assert [r["guard"]["action"] for r in out[1].results] == ["flagged"] * 3
    assert svc.prompts.loads == 2  # one soft prompt per task, one backbone
    m = svc.metrics
    assert m.inputs[("sst", "pass")] == 3 and m.inputs[("sst", "purged")] == 3
    assert m.inputs[("shadow", "flagged")] == 3
    assert sum(m.detections.values()) == 6 and len(m.match_scores) == 9 and len(m.guard_seconds) == 2


AUDIT_KEYS = {"time", "request_id", "task", "set", "signature", "matched", "score", "action"}


def audit_lines(out: str) -> list[dict]:
    """Every stdout line, each of which must be one JSON object with the documented keys."""
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    for line in lines:
        assert AUDIT_KEYS <= set(line), line
        stamp = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == timedelta(0) and line["time"].endswith("Z")
    return lines


def test_audit_lines_are_json_on_stdout_without_the_text(files, backbone, triggers, capsys, caplog):
    svc = service(files, backbone)
    attacked = f"simply {triggers[0]} great"
    capsys.readouterr()
    before = datetime.now(timezone.utc)
    svc.classify([ClassifyCall("req-7", "sst", [attacked, "simply great"])])
    lines = audit_lines(capsys.readouterr().out)
    assert len(lines) == 1  # one line per flagged input, none for the clean one
    line = lines[0]
    assert line["request_id"] == "req-7" and line["task"] == "sst" and line["action"] == "purged"
    assert line["set"] == svc.current.set_id and line["removed"] == [triggers[0]] and line["score"] > 0.8
    assert line["signature"] == line["matched"] and line["matched"].startswith("pv")  # a mined PV: no trigger name
    assert before - timedelta(seconds=1) <= datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert "text" not in line and "purged_text" not in line
    loud = service(files, backbone, audit_text=True)
    capsys.readouterr()
    loud.classify([ClassifyCall("req-8", "sst", [attacked])])
    line = audit_lines(capsys.readouterr().out)[-1]
    assert line["text"] == attacked and line["purged_text"] == "simply great"
    # the other sinks: the lmsan.audit logger (nothing on stdout), or nothing at all
    logged = service(files, backbone, audit="log")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="lmsan.audit"):
        logged.classify([ClassifyCall("req-9", "sst", [attacked])])
    assert capsys.readouterr().out == ""
    assert [json.loads(r.getMessage())["request_id"] for r in caplog.records if r.name == "lmsan.audit"] == ["req-9"]
    caplog.clear()
    quiet = service(files, backbone, audit="off")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="lmsan.audit"):
        out = quiet.classify([ClassifyCall("req-10", "sst", [attacked])])
    assert out[0].results[0]["guard"]["flagged"] and capsys.readouterr().out == ""
    assert not [r for r in caplog.records if r.name == "lmsan.audit"]
    with pytest.raises(LmsanError, match="audit"):
        parse_config({"model": "m", "tasks": {"a": "p"}, "audit": "syslog"})


def reached(backbone, prompt, sig: SignatureSet, texts: list[str]) -> list[int]:
    """The signature each text's output is closest to over its threshold (a PV, or K + i for a combination)."""
    guard = Guard(backbone, PromptClassifier.load(prompt, backbone), sig, mode="flag")
    return guard.monitor(guard.features(texts)).best.tolist()


def test_bad_reload_keeps_the_last_good_set(files, backbone, tiny_por_mined):
    first, last = tiny_por_mined.caught[0], tiny_por_mined.caught[-1]
    svc = service(files, backbone)
    good = svc.current
    assert good is not None and svc.metrics.reloads["ok"] == 1
    # truncate the file in place: the poll sees a change, refuses the file, keeps the old set
    data = files["sig"].read_bytes()
    files["sig"].write_bytes(data[: len(data) // 2])
    assert svc.poll_signature_file() is False
    assert svc.current is good and svc.metrics.reloads["failed"] == 1
    assert "not a valid safetensors file" in svc.signatures_info()["last_error"]
    assert svc.poll_signature_file() is None  # the same broken file is not retried in a loop
    out = svc.classify([ClassifyCall("r", "sst", [f"simply {first} great"])])
    assert out[0].results[0]["guard"]["action"] == "purged"
    # a valid file holding only the PV that `first` reaches swaps in; the PV of `last` is then unknown
    mined = SignatureSet.load(files["mined"])
    texts = [f"what a {last} lovely day", f"simply {first} great"]
    gone, kept = reached(backbone, files["prompt"], mined, texts)
    assert len(set(tiny_por_mined.caught)) >= 2 and gone != kept and max(gone, kept) < len(mined)  # precondition
    SignatureSet.create(mined.pvs[[kept]], [mined.meta.pvs[kept]], backbone_name=backbone.name,
                        fingerprint=backbone.fingerprint, model_type=backbone.model_type,
                        position=mined.position, verdict="backdoored").save(files["sig"])
    assert svc.poll_signature_file() is True
    assert svc.current.version == good.version + 1 and len(svc.current.signatures) == 1
    assert svc.metrics.signatures_loaded == (svc.current.set_id, 1)
    out = svc.classify([ClassifyCall("r", "sst", texts)])
    assert [r["guard"]["flagged"] for r in out[0].results] == [False, True]


def test_reconfigure_swaps_path_mode_and_rejects_bad_settings(files, backbone, triggered, tmp_path):
    svc = service(files, backbone)
    other = tmp_path / "other.safetensors"
    shutil.copy(files["sig"], other)
    svc.reconfigure({"signatures": str(other), "mode": "block"})
    assert svc.current.path == str(other) and svc.mode_of("sst") == "block"
    out = svc.classify([ClassifyCall("r", "sst", triggered[:1])])
    assert out[0].results[0]["label"] is None and out[0].results[0]["guard"]["action"] == "blocked"
    before = svc.settings
    svc.reconfigure({"mode": "nonsense"})
    svc.reconfigure({"task_modes": {"ghost": "off"}})
    assert svc.settings is before and svc.metrics.reloads["failed"] == 2
    svc.reconfigure({"signatures": str(tmp_path / "missing.safetensors")})
    assert svc.current.path == str(other) and svc.metrics.reloads["failed"] == 3


def test_no_signatures_fails_closed_and_unhealthy(files, backbone, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a signature file")
    svc = service(files, backbone, signatures=str(bad), task_modes={"shadow": "off"})
    ok, reason = svc.health()
    assert not ok and "no valid signature set" in reason and "sst" in reason
    out = svc.classify([ClassifyCall("a", "sst", ["simply great"]), ClassifyCall("b", "shadow", ["simply great"])])
    assert out[0].status == 503 and "refusing to classify unguarded" in out[0].error
    assert out[1].error is None and out[1].results[0]["guard"]["action"] == "off"
    assert svc.metrics.guard_errors["sst"] == 1
    svc.reconfigure({"signatures": str(files["sig"])})
    assert svc.health() == (True, "ok")


def test_a_crashing_guard_refuses_instead_of_passing(files, backbone, monkeypatch):
    svc = service(files, backbone)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(Guard, "classify", boom)
    out = svc.classify([ClassifyCall("a", "sst", ["simply great", "x"])])
    assert out[0].status == 503 and "simulated fault" in out[0].error and not out[0].results
    assert svc.metrics.guard_errors["sst"] == 2


def test_prompt_cache_evicts_least_recently_used(files, backbone):
    svc = service(files, backbone, prompt_cache_size=1)
    for task in ["sst", "shadow", "shadow", "sst"]:
        assert svc.classify([ClassifyCall("r", task, ["simply great"])])[0].error is None
    assert svc.prompts.loads == 3 and svc.prompts.loaded() == ["sst"]
    info = {t["name"]: t for t in svc.tasks_info()}
    assert info["sst"]["loaded"] and not info["shadow"]["loaded"] and info["sst"]["labels"] == ["neg", "pos"]


def test_fail_open_answers_unguarded_says_so_and_counts(files, backbone, triggered, monkeypatch, caplog):
    svc = service(files, backbone, fail_open=True)
    expected = [r.label for r in Guard(backbone, svc.prompts.get("sst", files["prompt"]), None, mode="off")
                .classify(triggered)]

    plain_classify = Guard.classify

    def guarded_fails(self, *args, **kwargs):
        if self.monitor is not None:
            raise RuntimeError("simulated fault")
        return plain_classify(self, *args, **kwargs)

    # the guarded path fails; the fallback's plain classification (a guard without a monitor) works
    monkeypatch.setattr(Guard, "classify", guarded_fails)
    with caplog.at_level(logging.WARNING, logger="lmsan.serve"):
        out = svc.classify([ClassifyCall("a", "sst", triggered)])
    assert out[0].error is None and [r["label"] for r in out[0].results] == expected
    assert all(r["guard"]["action"] == "unguarded" and "simulated fault" in r["guard"]["reason"]
               for r in out[0].results)
    assert svc.metrics.guard_errors["sst"] == 3 and svc.metrics.inputs[("sst", "unguarded")] == 3
    assert any("answered unguarded" in rec.getMessage() for rec in caplog.records)
    # the same fault with fail_open off (the default) refuses
    svc.reconfigure({"signatures": str(files["sig"]), "fail_open": False})
    assert svc.classify([ClassifyCall("b", "sst", triggered)])[0].status == 503


def test_fail_open_without_signatures_is_degraded_not_down(files, backbone, triggered, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a signature file")
    svc = service(files, backbone, signatures=str(bad), fail_open=True)
    ok, reason = svc.health()
    assert ok and reason.startswith("degraded") and "fail_open" in reason
    out = svc.classify([ClassifyCall("a", "sst", triggered[:1])])
    assert out[0].error is None and out[0].results[0]["guard"]["action"] == "unguarded"
    svc.reconfigure({"signatures": str(files["sig"]), "fail_open": True})
    assert svc.health() == (True, "ok")
    assert svc.classify([ClassifyCall("b", "sst", triggered[:1])])[0].results[0]["guard"]["action"] == "purged"


def test_inputs_that_hit_the_purge_bound_are_blocked_and_counted(files, backbone, triggers, monkeypatch):
    svc = service(files, backbone)
    # an adversary whose trigger no deletion silences: every variant stays flagged
    monkeypatch.setattr(Guard, "bare_margins", lambda self, ids, *a: torch.ones(ids.shape[0]))
    decoys = " ".join(f"w{i}" for i in range(300))
    out = svc.classify([ClassifyCall("a", "sst", [f"{triggers[0]} {decoys}", "simply great"])])
    stuffed, clean = out[0].results
    assert stuffed["label"] is None and stuffed["guard"]["action"] == "blocked"
    assert "exhausted" in stuffed["guard"]["reason"] or "deletion rounds" in stuffed["guard"]["reason"]
    assert clean["guard"]["action"] == "pass"
    assert svc.metrics.purge_bound_hits["sst"] == 1 and svc.metrics.purge_failures["sst"] == 1


def test_a_task_calibrated_on_its_clean_inputs(files, backbone, triggered, tmp_path, corpus, caplog):
    """The task's monitor is calibrated on its clean inputs when its guard is built; thresholds
    only go up, at most `calibration_fpr` of those inputs flag, and triggers still purge. By
    default the fit is exact; with `calibration_margin` the bound on unseen inputs holds the
    target (300 inputs at 1%: 198 needed), or a warning says how many to give. A fixed
    `threshold` is left as given, and a bad calibration file stops the start."""
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:300]), encoding="utf-8")
    exact = {"sst": {"prompt": files["prompt"], "calibration": str(calib), "calibration_fpr": 0.01}}
    plain = service(files, backbone, tasks=exact)
    assert [r["guard"]["action"] for r in plain.classify([ClassifyCall("r", "sst", CLEAN + triggered)])[0].results] \
        == ["pass"] * 3 + ["purged"] * 3
    fitted = plain.calibrations["sst"]
    assert fitted["held_out"] == 0 and fitted["fpr_bound"] is None and fitted["flag_rate_after"] <= 0.01 + 1e-9
    tasks = {"sst": {**exact["sst"], "calibration_margin": True}}
    svc = service(files, backbone, tasks=tasks)
    out = svc.classify([ClassifyCall("r", "sst", CLEAN + triggered)])[0]
    assert [r["guard"]["action"] for r in out.results] == ["pass"] * 3 + ["purged"] * 3
    done = svc.calibrations["sst"]
    assert done["lines"] == 300 and done["flag_rate_after"] <= 0.01 + 1e-9
    assert all(a >= b for a, b in zip(done["thresholds_after"], done["thresholds_before"], strict=True))
    guard, snap = svc.guard("sst")
    assert snap is svc.current and guard.monitor.limits[: len(snap.signatures)].tolist() == pytest.approx(
        done["thresholds_after"], abs=1e-6)  # the served guard holds the calibrated thresholds
    assert guard.monitor.flag_rate(guard.features(corpus[:300])) == pytest.approx(done["flag_rate_after"], abs=1e-6)
    assert {t["name"]: t for t in svc.tasks_info()}["sst"]["calibration"] == done
    assert done["held_out"] == 150 and done["fpr_bound"] <= 0.01 and "above calibration_fpr" not in caplog.text
    few = {"sst": {**tasks["sst"], "calibration_fpr": 0.005}}  # 300 inputs cannot bound 0.5%: 398 needed
    with caplog.at_level(logging.WARNING, logger="lmsan.serve"):
        service(files, backbone, tasks=few).classify([ClassifyCall("r", "sst", CLEAN)])
    assert "above calibration_fpr 0.0050; give at least 398" in caplog.text

    fixed = service(files, backbone, tasks=tasks, threshold=0.85)
    fixed.classify([ClassifyCall("r", "sst", CLEAN)])
    assert "sst" not in fixed.calibrations
    missing = {"sst": {"prompt": files["prompt"], "calibration": str(tmp_path / "nope.jsonl")}}
    with pytest.raises(LmsanError, match="not found"):
        service(files, backbone, tasks=missing)
    with pytest.raises(LmsanError, match="calibration_fpr"):
        parse_config({"model": "m", "tasks": {"a": {"prompt": "p", "calibration": "c", "calibration_fpr": 2}}})



def test_a_shed_request_answers_503_with_retry_after():
    """When every classifier queue is full, Ray Serve's handle raises BackPressureError: the
    ingress answers 503 with retry-after (what the client retry policy backs off from), not 500."""
    import asyncio

    from ray.serve.exceptions import BackPressureError

    from lmsan_serve.serving import app as serving_app

    class FullQueue:
        class classify:  # noqa: N801  (the handle's method, called as .classify.remote(call))
            @staticmethod
            async def remote(call):
                raise BackPressureError(num_queued_requests=128, max_queued_requests=128)

    class Request:
        headers = {"x-request-id": "shed-1"}

    # the class as written, under Ray's replica wrapper (whose async __del__ needs a replica)
    written = next(c for c in serving_app.LmsanIngress.func_or_class.__mro__[1:] if "classify" in vars(c))
    ingress = object.__new__(written)
    ingress.classifier = FullQueue()
    ingress.config = parse_config({"model": "minilm", "tasks": {"sst": "p"}, "mode": "off"})
    body = serving_app.ClassifyRequest(task="sst", inputs=["simply great"])
    answer = asyncio.run(written.classify(ingress, body, Request()))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.headers["x-request-id"] == "shed-1" and b"overloaded" in answer.body


def test_signature_label_is_a_loaded_pv_combination_or_other():
    from lmsan_serve.serving.metrics import COMBINATION, OTHER, signature_label

    names = {"pv0:a+b", "pv1", "pv2:c"}  # a trigger word may itself hold '+'
    assert [signature_label(n, names) for n in ("pv0:a+b", "pv1", "pv2:c")] == ["pv0:a+b", "pv1", "pv2:c"]
    assert {signature_label(n, names) for n in ("pv0:a+b+pv1", "pv1+pv2:c", "pv0:a+b+pv1+pv2:c")} == {COMBINATION}
    assert {signature_label(n, names) for n in ("pv0:a", "pv1+pv9", "pv1+", "pv3", "", "pv1+pv1x")} == {OTHER}


def split_signatures(path, backbone) -> SignatureSet:
    """A constructed set, not a guard under test: which PVs and combinations flag must be known
    exactly, so it is built from the planted answer key. The planted PVs of cf and tq as they are,
    and mn's PV as two copies each with the signs of a different quarter of the dimensions
    flipped. A mn-triggered output (sign agreement with its PV near 1) agrees with each copy on
    at most 3/4 of the dimensions, under their 0.8 threshold, but with the pair on the half both
    keep, over the pair's 0.9: mn flags only through a combination."""
    truth = SignatureSet.load(path)
    cf, mn, tq = (next(i for i, r in enumerate(truth.meta.pvs) if r.trigger == t) for t in ("cf", "mn", "tq"))
    quarter = truth.pvs.shape[1] // 4
    copies = []
    for part in (0, 1):
        pv = truth.pvs[mn].clone()
        pv[part * quarter:(part + 1) * quarter] *= -1
        copies.append(pv)
    records = [truth.meta.pvs[cf], truth.meta.pvs[tq]]
    records += [truth.meta.pvs[mn].model_copy(update={"threshold": 0.8, "trigger": None})] * 2
    return SignatureSet.create(torch.stack([truth.pvs[cf], truth.pvs[tq], *copies]), records,
                               backbone_name=backbone.name, fingerprint=backbone.fingerprint,
                               model_type=backbone.model_type, position=truth.position, verdict="backdoored")


def test_detection_labels_stay_within_the_loaded_pvs_combination_and_other(files, backbone, capsys):
    """Metric label values are time series: the signature label may take only the loaded set's PV
    names, `combination` and `other`, however many PVs and combinations flag; the exact name
    goes to the audit line."""
    from lmsan_serve.serving.metrics import COMBINATION, OTHER

    split_signatures(files["model"] + "/truth.safetensors", backbone).save(files["sig"])
    svc = service(files, backbone)
    pv_names = {svc.current.signatures.label(i) for i in range(len(svc.current.signatures))}
    assert pv_names == {"pv0:cf", "pv1:tq", "pv2", "pv3"}
    inputs = [f"{a} {w} {b}" for w in ("cf", "mn", "tq", "cf tq", "mn tq")
              for a, b in (("simply", "great"), ("a dull", "film"), ("what a", "day"), ("the", "plot"))]
    capsys.readouterr()
    out = svc.classify([ClassifyCall("r1", "sst", inputs), ClassifyCall("r2", "shadow", inputs)])
    assert all(r["guard"]["flagged"] for o in out for r in o.results)
    seen = {label for _, label in svc.metrics.detections}
    assert seen <= pv_names | {COMBINATION, OTHER}
    assert {"pv0:cf", "pv1:tq", COMBINATION} <= seen  # direct PVs and combinations both flagged
    assert sum(svc.metrics.detections.values()) == 2 * len(inputs)
    lines = audit_lines(capsys.readouterr().out)
    assert len(lines) == 2 * len(inputs)
    matched = {line["matched"] for line in lines if line["signature"] == COMBINATION}
    assert matched and all("+" in m and m not in pv_names for m in matched)  # exact names, audit only
    assert all(line["signature"] == line["matched"] for line in lines if line["signature"] != COMBINATION)
    # after a reload, a name from the previous set is counted as `other`, not as a new series
    shutil.copy(files["mined"], files["sig"])  # mined PVs carry no trigger name: pv0:cf is gone
    assert svc.poll_signature_file() is True
    svc.metrics.input_done("sst", "purged", "pv0:cf", 0.99, False)
    assert svc.metrics.detections[("sst", OTHER)] == 1


def test_an_invalid_user_config_is_refused_visibly_and_the_old_settings_serve(files, backbone, triggered, caplog):
    svc = service(files, backbone)
    svc.reconfigure({"signatures": str(files["sig"]), "mode": "block"})
    assert svc.metrics.config_valid and svc.health() == (True, "ok")
    for bad, where in (({"signatures": str(files["sig"]), "mode": "strict"}, "at mode:"),
                       ({"task_modes": {"ghost": "off"}}, "unknown tasks ghost"),
                       ({"threshold": 7}, "at threshold:"), (["not", "a", "mapping"], "user_config")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="lmsan.serve"):
            svc.reconfigure(bad)  # never raises: Ray Serve would stop the replica
        ok, reason = svc.health()
        assert ok and reason.startswith("degraded: invalid user_config") and where in reason, reason
        assert "previous settings keep serving" in reason and "\n" not in reason
        assert not svc.metrics.config_valid and svc.signatures_info()["config_error"] in reason
        assert any(where in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
        out = svc.classify([ClassifyCall("r", "sst", [triggered[0], "simply great"])])[0].results
        assert [r["guard"]["action"] for r in out] == ["blocked", "pass"]  # still the block mode it had
    assert svc.metrics.reloads["failed"] == 4
    svc.reconfigure({"signatures": str(files["sig"]), "mode": "enforce"})  # a valid one recovers
    assert svc.metrics.config_valid and svc.health() == (True, "ok") and svc.config_error is None
    out = svc.classify([ClassifyCall("r", "sst", triggered[:1])])[0].results
    assert out[0]["guard"]["action"] == "purged"
    # a valid user_config naming a signature file that cannot load keeps the set, and says so
    svc.reconfigure({"signatures": str(files["sig"]) + ".missing"})
    ok, reason = svc.health()
    assert ok and reason.startswith("degraded: signature file") and svc.current.path == str(files["sig"])
