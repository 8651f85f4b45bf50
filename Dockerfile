# The edge-sdk device agent as a serving container (also a SageMaker / Vertex AI / Azure ML custom container:
# GET /ping and POST /invocations on port 8080).
#
#   docker build -t edge-sdk-agent .
#   export EDGE_AGENT_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
#   docker run --rm -p 8080:8080 -e EDGE_AGENT_TOKEN -v "$PWD/demo_out/mobilenet_v2:/bundle:ro" edge-sdk-agent
#   curl -s localhost:8080/healthz                                         # /ping and /healthz need no token
#   curl -s -H "Authorization: Bearer $EDGE_AGENT_TOKEN" --data-binary @cat.jpg -H 'Content-Type: image/jpeg' \
#        localhost:8080/predict
#
# The API token: the agent listens on 0.0.0.0 inside the container, and it refuses to serve a non-loopback address
# without a token, so the container reads one from the environment variable EDGE_AGENT_TOKEN (at least 16
# printable characters; pass it with `docker run -e`, a Kubernetes Secret or your orchestrator's secret store, never
# baked into the image). Without it the container exits at once with a one-line error naming the variable. Every
# route but /ping and /healthz (the health checks) then needs `Authorization: Bearer <token>`. To serve an open
# API on a network you control, override the command with `--http-insecure` instead.
# SageMaker ("IMAGE serve") sends no token: the serve script uses EDGE_AGENT_TOKEN when it is set and otherwise
# serves open (--http-insecure), the endpoint being reachable only through SageMaker's authenticated API.
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
    && printf '#!/bin/sh\n# SageMaker runs "docker run IMAGE serve" with the model in /opt/ml/model\nB=/bundle; [ -d /opt/ml/model ] && B=/opt/ml/model\nAUTH=--http-insecure; [ -n "$EDGE_AGENT_TOKEN" ] && AUTH="--http-token-env=EDGE_AGENT_TOKEN"\nexec edge-sdk agent run --bundle "$B" --http 0.0.0.0:8080 "$AUTH"\n' > /usr/local/bin/serve \
    && chmod 755 /usr/local/bin/serve

WORKDIR /
USER agent
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=4).status == 200 else 1)"]

# SageMaker starts the container as "IMAGE serve": /usr/local/bin/serve runs the same command (token optional there)
CMD ["edge-sdk", "agent", "run", "--bundle", "/bundle", "--http", "0.0.0.0:8080", "--http-token-env", "EDGE_AGENT_TOKEN"]
