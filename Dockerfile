# prodistill training image: CUDA PyTorch base + prodistill with its GPU extras.
#   docker build -t prodistill .
#   docker run --gpus all -v $PWD/runs:/workspace/runs prodistill train --method osv --preset svd-xt --device cuda
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /opt/prodistill
COPY pyproject.toml README.md ./
COPY prodistill ./prodistill
COPY export ./export
COPY ops ./ops
COPY dali_pipelines ./dali_pipelines
RUN pip install --no-cache-dir -e . && python -c "import prodistill.cli"

WORKDIR /workspace
ENTRYPOINT ["prodistill"]
CMD ["--help"]
