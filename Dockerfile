# One image for Dataflow: the Beam SDK worker container (entrypoint: Beam's boot) and the Flex
# Template launcher (its launcher binary, FLEX_TEMPLATE_PYTHON_PY_FILE). The package and all its
# dependencies, JAX for TPU included, are installed at build time, so nothing is installed when a
# job launches or a worker starts.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/beam-extract:TAG .
#   (or: make template IMAGE=... TEMPLATE=gs://...; see README "Running on Dataflow")

ARG BEAM_VERSION=2.77.0
ARG LAUNCHER_TAG=flex_templates_base_image_release_20251103_RC00

FROM gcr.io/dataflow-templates-base/python311-template-launcher-base:${LAUNCHER_TAG} AS launcher

FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

COPY --from=launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher

WORKDIR /template
COPY setup.py README.md ./
COPY beam_extract ./beam_extract
RUN pip install --no-cache-dir ".[tpu]" && pip check

# The launcher runs this file to build and submit the pipeline; the image is complete, so no
# requirements or setup file is installed at launch.
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/beam_extract/__main__.py
ENV PIP_NO_DEPS=True

ENTRYPOINT ["/opt/apache/beam/boot"]
