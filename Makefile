# Two quick-start targets: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, so that the project's torch range is already satisfied when pip
# resolves the rest. The build comes from TORCH_INDEX: PyPI's Linux wheel of torch is the CUDA
# build (several GB of nvidia-* wheels), PyTorch's CPU index has the CPU build. Where TORCH_INDEX
# cannot be reached (a machine that reaches only PyPI) torch comes from pip's own configured
# indexes, and the install says so: on plain PyPI that is the CUDA build; a machine whose pip
# config adds a local CPU wheel (find-links) gets that one. For a GPU machine:
#   make TORCH_INDEX=https://pypi.org/simple        (PyPI's default CUDA build)
# TORCH_SPEC equals the torch pin of constraints/image.txt (tests/test_packaging.py checks it).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# `make test-lowest`: a second venv with the lowest supported versions (constraints/lowest.txt)
# and a fast subset of the suite, enough to import and exercise what those versions provide,
# serving on a local Ray with a real Prometheus scrape included.
# Inside $(VENV), so ruff and git ignore it and `make clean-venv` removes it.
LOWEST_VENV ?= $(VENV)/lowest
LOWEST_TESTS ?= tests/test_architectures.py tests/test_encoding.py tests/test_service.py tests/test_cli.py \
	tests/test_check_config.py tests/test_client.py tests/test_peft_import.py tests/test_packaging.py \
	tests/test_deployments.py::test_serve_demo_config_validates_and_serves_the_demo_output \
	tests/test_deployments.py::test_import_path_resolves_to_the_app_builder \
	tests/test_deployments.py::test_rayservice_manifest \
	tests/test_serve_live.py
# Left out: the two tests that train a model of their own (about a minute together; the rest share
# the session's fixtures), and the live dashboard and alert checks, which need the full suite's traffic.
LOWEST_SKIP ?= not test_attack_writes_a_backdoored_model and not test_a_prompt_for_other_weights_than_the_signatures_is_refused \
	and not test_every_dashboard_query_returns_data and not test_every_alert_rule_returns_data

.PHONY: demo test test-lowest lint bench bench-quick clean-venv

# $(1): the python of the venv to install torch into
define install_torch
	if [ -n "$(TORCH_INDEX)" ] && $(1) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" \
	    >/dev/null 2>&1; then \
	  $(1) -m pip install -q --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"; \
	else \
	  echo "note: torch index '$(TORCH_INDEX)' not reachable; $(TORCH_SPEC) from pip's configured indexes"; \
	  $(1) -m pip install -q "$(TORCH_SPEC)"; \
	fi
endef

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(call install_torch,$(PY))
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(LOWEST_VENV)/.installed: pyproject.toml constraints/lowest.txt
	python3 -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	@$(call install_torch,$(LOWEST_VENV)/bin/python)
	$(LOWEST_VENV)/bin/python -m pip install -q -c constraints/lowest.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lmsan demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-lowest: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -c "from importlib.metadata import version; \
	  pins = [ln.split('==')[0] for ln in open('constraints/lowest.txt') if '==' in ln and ln[0] != '#']; \
	  print('lowest supported versions:', ', '.join(p + ' ' + version(p) for p in pins))"
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(LOWEST_TESTS) -k "$(LOWEST_SKIP)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# `make bench`: every benchmark in one run, one JSON line (bench/README.md; the mining part is long,
# BENCH_ARGS='--skip mining' leaves it out); `make bench-quick`: the same chain on tiny artifacts.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(PY) bench/bench_all.py $(BENCH_ARGS)

bench-quick: $(VENV)/.installed
	$(PY) bench/bench_all.py --quick $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
