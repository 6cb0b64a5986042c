# The project's image. Every Ray node runs it (head, GPU workers, KubeRay's job submitter), so the
# pipeline's driver and its workers import the same code. Build and push: cluster/README.md.
#
# Ray and Python come from the base image and must match pyproject.toml (the ray pin and
# requires-python); tests/test_cluster_configs.py checks both. The GPU variant also runs on CPU-only
# nodes, so one image serves the head and the workers. It runs as the base image's `ray` user.
FROM rayproject/ray:2.60.0-py311-gpu

# Torch first, pinned within pyproject's bounds, then DeepSpeed built against it: DeepSpeed's setup
# imports torch, so it cannot build in pip's isolated environment (the Makefile does the same).
# The torch wheel brings its own CUDA libraries; a node needs only a recent enough NVIDIA driver.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir --no-build-isolation "deepspeed>=0.19,<0.20"

# Ray starts in the working directory, so jobs run in /app and a spec's relative paths (the demo's
# examples/...) resolve there.
USER root
RUN mkdir /app && chown ray:users /app
USER ray
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator/ orchestrator/
COPY jobs/ jobs/
RUN pip install --no-cache-dir . && rm -rf build ./*.egg-info
COPY examples/ examples/
