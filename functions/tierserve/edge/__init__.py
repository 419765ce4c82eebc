"""The edge tier: ``tierserve edge``, the serving runtime on a device, in front of the cloud tiers.

A device (Linux, x86_64 or arm64, Raspberry-Pi class) keeps the models the compiler placed on the edge
(``"edge"`` in a version's targets; ``edge_variant`` names the file) synced from the model store, serves
them offline, and forwards what it should not serve to the cloud gateway. It is the same runtime as the
cloud's, composed differently: the same endpoint table (``tierserve.api``), inference path
(``tierserve.inference``), codec, errors, limits and policy registry (``routing.at_edge``), with

* ``store.EdgeStore``: the store as the device sees it, synced every interval (sha256-verified,
  versions swapped atomically, default and canary followed, disk bounded by LRU), persisted so that a
  device that restarts offline serves what it held;
* ``backend.EdgeBackend``: onnxruntime on the held edge variant, sessions bounded in memory by LRU;
* ``forward.CloudBackend``: the client's body, untouched, to the cloud gateway (``tierserve.client``,
  SigV4 or a JWT), behind a circuit breaker;
* ``dispatch.EdgeDispatcher``: edge or cloud, per request, with the one fallback;
* ``server``: HTTP (the Open Inference Protocol, ``/metrics``, ``/v2/health/edge``) and ``grpc_server``:
  Triton's gRPC service (``tritonclient.grpc`` works against it);
* ``runtime.EdgeRuntime``: builds and runs it all; ``cli``: ``tierserve edge`` and ``tierserve edge package``.

Nothing here imports ``tierserve_tools`` (developer tooling), torch or onnx.
"""
