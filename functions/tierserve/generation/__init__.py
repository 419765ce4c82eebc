"""Generative models (causal LMs), served token by token: the runtime half of issue 17.

Why a subpackage: generation has its own request shapes (OpenAI's chat and completions, Triton's generate
extension), its own engine (onnxruntime-genai, loaded lazily: importing this package loads no heavy
library), and answers as a stream of events instead of one document. Everything here knows no transport:
``tierserve.protocol.dataplane.DataPlane.generate`` returns an iterator of :class:`events.GenerationEvent`, and the
HTTP API, the CPU function's streamed Invoke and the edge's servers render it.
"""
