# Image for cluster nodes: Ray 2.60 on Python 3.11 with this project installed.
# CPU (default):  docker build -t REGISTRY/lcsc-checkfree-ray:0.1.0 .
# GPU (CUDA):     docker build --build-arg RAY_IMAGE_FLAVOR=gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#                   -t REGISTRY/lcsc-checkfree-ray:0.1.0-gpu .
# The Ray version in the tag must equal the `ray[...]==` pin in pyproject.toml (tests/test_cluster_configs.py).
# Every dependency is installed at the exact version in cluster/constraints.txt (frozen from the environment the
# tests ran in by cluster/freeze_constraints.py), so every node runs the same builds. Deploy the pushed image by
# digest (REGISTRY/lcsc-checkfree-ray:0.1.0@sha256:...; see cluster/README.md), never by a tag that can move.
ARG RAY_IMAGE_FLAVOR=cpu
FROM rayproject/ray:2.60.0-py311-${RAY_IMAGE_FLAVOR}

# The CPU build of torch by default; PyPI's torch is the CUDA build, which the gpu flavour wants.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Created by the image's `ray` user (WORKDIR alone would make it root's, and pip builds in it).
RUN mkdir -p /home/ray/lcsc-checkfree-ray/cluster
COPY --chown=ray:users cluster/constraints.txt /home/ray/lcsc-checkfree-ray/cluster/constraints.txt
RUN pip install --no-cache-dir "torch==2.13.0" -c /home/ray/lcsc-checkfree-ray/cluster/constraints.txt \
    --index-url "${TORCH_INDEX_URL}"

WORKDIR /home/ray/lcsc-checkfree-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users schemas ./schemas
COPY --chown=ray:users rayops ./rayops
COPY --chown=ray:users lcsc_ray ./lcsc_ray
COPY --chown=ray:users checkfree_ray ./checkfree_ray
COPY --chown=ray:users examples ./examples
# The spot notice watcher the AWS workers start (cluster/aws-spot.yaml, worker_setup_commands).
COPY --chown=ray:users cluster/spot_drain.py ./cluster/spot_drain.py
# Ray 2.60 (with its default, tune and train extras) is already in the base image; the pin keeps it there.
RUN pip install --no-cache-dir -c cluster/constraints.txt . \
    && python -c "import ray, lcsc_ray, checkfree_ray, rayops, schemas; assert ray.__version__ == '2.60.0'"
ENV OMP_NUM_THREADS=1
