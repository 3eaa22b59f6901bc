"""Version bounds and the image agree with each other: pyproject.toml's lower bounds are the
versions CI's lowest-versions run installs (constraints/lowest.txt), the image's pins
(constraints/image.txt) lie inside pyproject's ranges, the KubeRay manifests run the image's Ray,
and the Dockerfile installs torch from its TORCH_INDEX_URL argument with those pins before it
copies the source. Docker is not needed: the Dockerfile is read as text."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .deploy_files import DEPLOYMENTS, REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _requirements(extras: bool = False) -> dict[str, Requirement]:
    """pyproject.toml's runtime dependencies, by package; with `extras`, its optional ones too."""
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    deps = list(project["dependencies"])
    if extras:
        deps += [d for group in project["optional-dependencies"].values() for d in group]
    reqs = [r for r in map(Requirement, deps) if canonicalize_name(r.name) != canonicalize_name(project["name"])]
    return {canonicalize_name(r.name): r for r in reqs}


def _pins(name: str) -> dict[str, Version]:
    """A constraints file as {package: pinned version}; every entry must be a plain `name==version`
    (pip refuses extras in a constraints file, and a range would not be a pin)."""
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints" / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert not req.extras and len(specs) == 1 and specs[0].operator == "==", f"{name}: not a pin: {line!r}"
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def _lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(bounds) if bounds else None


def test_lower_bounds_are_the_versions_ci_installs_as_lowest():
    reqs, lowest = _requirements(extras=True), _pins("lowest.txt")
    # the two whose APIs the app leans on hardest must be among them
    assert {"ray", "transformers"} <= set(lowest), sorted(lowest)
    for name, version in lowest.items():
        assert name in reqs, f"constraints/lowest.txt pins {name}, which pyproject.toml does not require"
        assert _lower_bound(reqs[name]) == version, (
            f"pyproject.toml's lower bound of {name} is {_lower_bound(reqs[name])}, "
            f"but CI tests the lowest as {version} (constraints/lowest.txt)")


def test_image_pins_lie_inside_pyproject_ranges():
    reqs, image = _requirements(), _pins("image.txt")
    # every runtime dependency is pinned, so that a rebuild of the image gets the same stack
    assert set(reqs) <= set(image), f"not pinned in constraints/image.txt: {sorted(set(reqs) - set(image))}"
    for name, req in reqs.items():
        assert req.specifier.contains(image[name], prereleases=True), \
            f"constraints/image.txt pins {name}=={image[name]}, outside pyproject's {req}"
    lowest = _pins("lowest.txt")
    assert all(lowest[n] <= image[n] for n in lowest if n in image)


def test_makefile_installs_the_images_torch_and_tests_the_lowest_versions():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M)
    assert spec, "Makefile: no `TORCH_SPEC ?= torch==VERSION`"
    assert Version(spec.group(1)) == _pins("image.txt")["torch"], "Makefile and image pin different torch"
    assert re.search(rf"^TORCH_INDEX \?= {re.escape(CPU_INDEX)}$", makefile, re.M), "the CPU index is the default"
    # the lowest-versions venv installs the project under the lowest constraints, and CI runs it
    assert "-c constraints/lowest.txt -e '.[dev]'" in makefile
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test-lowest\b", ci, re.M), ".ci/run does not run the lowest-versions tests"


def test_kuberay_manifests_run_the_images_ray():
    ray = str(_pins("image.txt")["ray"])
    service = yaml.safe_load((DEPLOYMENTS / "kuberay" / "rayservice.yaml").read_text(encoding="utf-8"))
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray
    job = yaml.safe_load((REPO / "mining" / "rayjob.yaml").read_text(encoding="utf-8"))
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray


# -- Dockerfile -----------------------------------------------------------------------------------
def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped, spaces collapsed."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [" ".join(ln.split()) for ln in lines]


def _index(lines: list[str], pattern: str) -> int:
    found = [i for i, ln in enumerate(lines) if re.search(pattern, ln)]
    assert found, f"Dockerfile: no instruction matches {pattern!r}"
    return found[0]


def _args(lines: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for ln in lines:
        if ln.startswith("ARG "):
            name, _, default = ln[4:].partition("=")
            out[name.strip()] = default.strip().strip('"') if default else None
    return out


def test_dockerfile_installs_torch_from_its_index_argument_with_the_image_pins():
    lines = _dockerfile()
    assert _args(lines).get("TORCH_INDEX_URL") == CPU_INDEX, "TORCH_INDEX_URL must default to the CPU index"
    torch_at = _index(lines, r"^RUN pip install .*\btorch$")
    argv = shlex.split(lines[torch_at])
    assert argv[argv.index("--index-url") + 1] in ("$TORCH_INDEX_URL", "${TORCH_INDEX_URL}")
    assert argv[argv.index("-c") + 1] == "constraints/image.txt"
    deps_at = _index(lines, r"pip install .*-r /tmp/requirements.txt")
    assert "-c constraints/image.txt" in lines[deps_at]
    copy_constraints = _index(lines, r"^COPY constraints")
    project_at = _index(lines, r"pip install (\S+ )*\.( |$)")
    first_source = _index(lines, r"^COPY lmsan_(serve|lab)")
    # the pins, torch and the dependencies come before any source, so a source edit keeps those layers
    assert copy_constraints < torch_at < deps_at < first_source < project_at
    assert "--no-deps" in lines[project_at]
    # both packages are in the image before it installs the project: the CLI's lab commands
    # (`lmsan demo`, which docker-compose runs) come from lmsan_lab through its entry point
    copied = [ln.split()[1] for ln in lines[:project_at] if ln.startswith("COPY ")]
    assert {"lmsan_serve", "lmsan_lab"} <= set(copied), copied
    assert any(ln.startswith("COPY deployments") for ln in lines)
    exposed = {int(p.split("/")[0]) for ln in lines if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert 8000 in exposed
    assert not any("HF_HUB_OFFLINE" in ln for ln in lines), "hub access is the user's choice"
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK "))
    assert "127.0.0.1:8000/healthz" in health


@pytest.mark.parametrize("doc", ["Dockerfile", "deployments/README.md", "mining/README.md"])
def test_documented_build_arguments_exist(doc):
    """A documented `docker build --build-arg NAME=...` names an ARG the Dockerfile has, and the
    CUDA image's line builds `lmsan-serve:cuda` (the tag mining/rayjob.yaml runs) or a registry's."""
    text = (REPO / doc).read_text(encoding="utf-8")
    builds = [ln for ln in text.splitlines() if "docker build" in ln and "--build-arg" in ln]
    assert builds, f"{doc}: no `docker build --build-arg` line"
    known = set(_args(_dockerfile()))
    for line in builds:
        names = set(re.findall(r"--build-arg (\w+)=", line))
        assert names and names <= known, f"{doc}: build argument(s) {sorted(names - known)} not in the Dockerfile"
        assert re.search(r"-t \S*lmsan-serve:cuda\b", line), f"{doc}: {line.strip()}"
