# The edge-sdk device agent as a serving container (also a SageMaker / Vertex AI / Azure ML custom container:
# GET /ping and POST /invocations on port 8080).
#
#   docker build -t edge-sdk-agent .
#   docker run --rm -p 8080:8080 -v "$PWD/demo_out/mobilenet_v2:/bundle:ro" edge-sdk-agent
#   curl -s localhost:8080/healthz
#
# Only the device side is installed: no tensorflow, torch, coremltools or nncf.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# only what the wheel needs (keeps the build context small and the layer cacheable)
COPY pyproject.toml README.md ./
COPY edge_sdk ./edge_sdk
COPY converters ./converters
COPY device_agent ./device_agent
COPY targets ./targets
RUN pip install ".[agent,onnxruntime]" \
    && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin agent \
    && printf '#!/bin/sh\n# SageMaker runs "docker run IMAGE serve" with the model in /opt/ml/model\nB=/bundle; [ -d /opt/ml/model ] && B=/opt/ml/model\nexec edge-sdk agent run --bundle "$B" --http 0.0.0.0:8080\n' > /usr/local/bin/serve \
    && chmod 755 /usr/local/bin/serve

WORKDIR /
USER agent
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=4).status == 200 else 1)"]

# SageMaker starts the container as "IMAGE serve": /usr/local/bin/serve runs the same command
CMD ["edge-sdk", "agent", "run", "--bundle", "/bundle", "--http", "0.0.0.0:8080"]
