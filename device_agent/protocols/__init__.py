"""Standard inference protocols spoken by the agent's HTTP API, one module per protocol.

* :mod:`~edge_sdk.device_agent.protocols.oip_v2` — Open Inference Protocol v2 REST (KServe / Triton / OpenVINO
  Model Server / MLServer clients), JSON and binary tensors;
* :mod:`~edge_sdk.device_agent.protocols.tf_serving` — TF Serving ``:predict`` (``instances`` / ``inputs``) and
  Vertex AI's ``AIP_*`` routes and port;
* :mod:`~edge_sdk.device_agent.protocols.sagemaker` — SageMaker's ``application/x-npy`` / ``x-image`` content
  types and ``Accept`` on ``/invocations``;
* :mod:`~edge_sdk.device_agent.protocols.base` — what they share (answers, route templates, the served model).

Azure ML's ``POST /score`` needs no module: it takes ``POST /predict``'s bodies. Routing, the bounded inference
queue, body limits, the token and error answers stay in :mod:`edge_sdk.device_agent.server`: a protocol module
only parses a body and runs it on the agent it is given (on the inference worker) and renders the answer.
"""

from __future__ import annotations

__all__: list[str] = []
