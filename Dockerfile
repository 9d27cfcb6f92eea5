# GPU image: a slim Python base; the torch wheel from PyPI (Linux x86_64) brings its own CUDA libraries,
# so only the host's NVIDIA driver is needed (docker run --gpus all, NVIDIA Container Toolkit).
#   docker build -t txl .
#   docker run --gpus all --ipc=host -v $PWD/outputs:/opt/txl/outputs -v $HOME/.cache:/root/.cache \
#       txl txl-train experiment=wt103_base trainer=gpu
# Python 3.11: the version the lock files were compiled for.
FROM python:3.11-slim

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/txl

# dependencies first (cached layer): torch (the CUDA build on PyPI), then the exact versions of the lock
ARG TORCH="torch==2.13.0"
COPY requirements.lock ./
RUN python -m venv /opt/venv && pip install --no-cache-dir $TORCH && pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY txl ./txl
COPY conf ./conf
COPY scripts ./scripts
RUN pip install --no-cache-dir --no-deps -e .

CMD ["txl-train", "--help"]
