# CPU image of lmsan-serve. Build: docker build -t lmsan-serve .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

WORKDIR /app
# CPU wheels of torch first, so the project's torch range is satisfied without a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY lmsan_serve ./lmsan_serve
RUN pip install . && useradd --create-home lmsan
USER lmsan
WORKDIR /home/lmsan

ENTRYPOINT ["lmsan"]
CMD ["--help"]
