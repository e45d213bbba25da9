# Image for cluster nodes: Ray 2.60 on Python 3.11 with this project installed.
# Build: docker build -t REGISTRY/lcsc-checkfree-ray:0.1.0 .   (see README "Docker image")
FROM rayproject/ray:2.60.0-py311-cpu

WORKDIR /home/ray/lcsc-checkfree-ray
# The CPU build of torch first; a GPU image swaps the base for rayproject/ray:2.60.0-py311-gpu and drops the index.
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users schemas ./schemas
COPY --chown=ray:users rayops ./rayops
COPY --chown=ray:users lcsc_ray ./lcsc_ray
COPY --chown=ray:users checkfree_ray ./checkfree_ray
COPY --chown=ray:users examples ./examples
RUN pip install --no-cache-dir .
