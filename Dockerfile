# prodistill: two images from one file. Neither has been built here (no Docker engine on our machines); CI
# lints this file with hadolint and tests the serving entry point outside Docker.
#   docker build --target train -t prodistill:train .
#   docker run --gpus all -v $PWD/runs:/workspace/runs prodistill:train train --method osv --preset svd-xt --device cuda
#   docker run --gpus all -v /models:/models:ro -v /data:/data:ro -v $PWD/runs:/workspace/runs prodistill:train \
#       train --config osv --teacher /models/svd-xt --dino /models/dinov2-small --data /data/videos
#   docker build --target serve -t prodistill:serve .
#   docker run --gpus all -p 8000:8000 -v $PWD/engines:/engines:ro prodistill:serve

# ---- train: NGC PyTorch, which carries CUDA, Transformer Engine, DALI, apex, Triton and TensorRT, so only
# prodistill and the extras the base lacks are installed (the `dali` extra's wheel would shadow the base's DALI).
FROM nvcr.io/nvidia/pytorch:25.01-py3 AS train

WORKDIR /opt/prodistill
COPY pyproject.toml README.md ./
COPY prodistill ./prodistill
COPY export ./export
COPY ops ./ops
COPY dali_pipelines ./dali_pipelines
COPY configs ./configs
RUN pip install --no-cache-dir -e ".[export,serve,bench]" && python -c "import prodistill.cli"

WORKDIR /workspace
ENTRYPOINT ["prodistill"]
CMD ["--help"]

# ---- serve: a CUDA runtime base with the torch-free runtime, TensorRT's runtime and the HTTP server; no torch
# and no training code (only export/runtime and export/serve are copied, and neither imports torch).
FROM nvcr.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS serve

# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/prodistill PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv && pip install --no-cache-dir \
    "numpy>=1.24" "pillow>=10.0" "av>=17.0" "click>=8.1" \
    "onnxruntime-gpu>=1.18" "tensorrt-cu12>=10.0" "cuda-python>=12.4" \
    "starlette>=0.40" "uvicorn>=0.30" "python-multipart>=0.0.9" "prometheus-client>=0.20"

COPY export/__init__.py /opt/prodistill/export/__init__.py
COPY export/runtime /opt/prodistill/export/runtime
COPY export/serve /opt/prodistill/export/serve
RUN useradd --create-home --uid 10001 --user-group serve
USER 10001:10001
WORKDIR /home/serve

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "-m", "export.serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--engines", "/engines", "--backend", "trt"]
