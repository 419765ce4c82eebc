"""The Open Inference Protocol (KServe v2), and the operations on it, apart from any transport.

Why a subpackage: these modules are what every transport shares (the router's HTTP API, the CPU
function's Invoke, the edge's HTTP and gRPC servers, batch). Each name says what the module does:

- ``dataplane``: the operations (live, ready, metadata, config, statistics, the index, infer; generate),
  taking parsed requests and returning documents or raising the project's errors;
- ``rendering``: the one error wrapper (status table, KServe and OpenAI error shapes, gRPC codes);
- ``header``: a request body's JSON header (names, datatypes, shapes, sizes) and its checks, numpy-free;
- ``tensors``: tensors materialised from a header, responses encoded (JSON, binary extension), numpy;
- ``http_api``: API Gateway events and responses, content codings;
- ``messages``: the protocol's value types (tensors, requests, responses);
- ``calls``: one inference call (header | body | arrays, each derived once) and its reply;
- ``datatypes``: the datatype table; ``model_config``: Triton's model configuration and repository index;
- ``statistics``: Triton's statistics format.
"""
