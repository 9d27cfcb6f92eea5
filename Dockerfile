# CUDA image for GPU runs:
#   docker build -t txl .
#   docker run --gpus all --ipc=host -v $PWD/outputs:/opt/txl/outputs -v $HOME/.cache:/root/.cache \
#       txl txl-train experiment=wt103_base trainer=gpu
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv make git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /opt/txl

# dependencies first (cached layer); the CUDA build of torch comes from PyPI on Linux x86_64
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/venv && pip install --no-cache-dir torch==2.13.0
COPY txl ./txl
COPY conf ./conf
COPY scripts ./scripts
RUN pip install --no-cache-dir -e .

CMD ["txl-train", "--help"]
