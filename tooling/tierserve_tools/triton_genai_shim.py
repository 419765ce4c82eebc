"""Decoupled Triton Python-backend ``model.py`` that stands in for Triton's vLLM backend on this machine's CPU.

LOCAL DEVELOPMENT ONLY. In production a GPU-placed generative model is served by Triton's vLLM backend
(``backend: "vllm"``, decoupled, ``model.json`` with the engine arguments and the Hugging Face weights). The
local ``tritonserver`` (nvidia-pytriton wheel) has neither vLLM nor a GPU, so ``tierserve_tools.triton`` writes
a repository entry whose version folder holds the model's onnxruntime-genai variant (the CPU tier's, the same
files and the same engine, ``tierserve.generation.engine``) with this file as ``model.py``, and a config that
declares the vLLM backend's inputs and outputs with the decoupled transaction policy.

What it keeps of the vLLM backend (triton-inference-server/vllm_backend, ``src/model.py`` and
``src/utils/request.py``):

- inputs ``text_input`` (BYTES [1], the prompt's text, tokenized here as vLLM tokenizes a text prompt: with the
  tokenizer's special tokens), ``stream`` (BOOL, default false), ``sampling_parameters`` (BYTES [1], a JSON
  object of vLLM ``SamplingParams`` fields; without it the request's parameters are read, as the vLLM backend
  does), ``exclude_input_in_output`` (BOOL: absent means the prompt is prepended to a non-streamed answer and
  not to a streamed one; false while streaming is refused), and the extra outputs' switches
  ``return_finish_reason``, ``return_logprobs``, ``return_num_input_tokens``, ``return_num_output_tokens``;
- outputs ``text_output`` (each streamed response carries the text new since the previous one, possibly empty),
  ``finish_reason`` (``str(None)`` until the last response, then ``stop`` or ``length``), ``logprobs`` (a JSON
  list per response, one ``{token_id: {"logprob", "rank", "decoded_token"}}`` per new token),
  ``num_input_tokens``, ``num_output_tokens`` (new tokens in this response);
- decoupled sending: ``execute`` returns None at once; each request's responses go through its response sender
  from a worker thread, the last one with ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``; an error is one final
  response with the error (and ``text_output`` "N/A"); a request the client cancelled
  (``response_sender.is_cancelled()``, checked before every token) ends with a CANCELLED error.

What differs (docs/architecture.md): onnxruntime-genai on the CPU, not vLLM on a GPU (no paged attention, no
continuous batching: each request generates on its own thread); the sampling parameters implemented are those
tierserve's engine has (``max_tokens`` (vLLM's default 16), ``temperature``, ``top_p``, ``top_k`` (-1 or 0: off),
``seed``, ``stop``, ``n`` 1, ``logprobs`` 0 or null, ``skip_special_tokens`` true); any other is refused by
name rather than ignored. ``logprobs`` carries the sampled token's id exactly, but its ``logprob`` and ``rank``
are null: the engine does not expose the logits. The router reads only the ids (its mid-stream failover
continues from them), which real vLLM sends the same way when asked for ``logprobs: 0``.

This file runs inside Triton's Python-backend stub, not the tierserve process: ``initialize`` adds the
``tierserve_site_packages`` folders (``os.pathsep``-separated) with ``site.addsitedir`` (which also runs their
``.pth`` files, so an editable tierserve is importable) before importing numpy and tierserve.
"""

from __future__ import annotations

import contextlib
import json
import os
import site
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SITE_PACKAGES_PARAM = "tierserve_site_packages"
THREADS_PARAM = "tierserve_ort_threads"
CONCURRENCY_PARAM = "tierserve_max_concurrency"

#: vLLM SamplingParams fields this stand-in implements, and the value each must keep when not implemented.
_IMPLEMENTED = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "skip_special_tokens"}
_FLAGS = ("return_finish_reason", "return_logprobs", "return_num_input_tokens", "return_num_output_tokens")
#: vLLM's SamplingParams default for max_tokens.
VLLM_DEFAULT_MAX_TOKENS = 16

pb_utils: Any = None
np: Any = None


def _param(cfg: dict, key: str) -> str | None:
    value = (cfg.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        return value.get("string_value")
    return None


def _flag(request: Any, name: str) -> bool | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return bool(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        global pb_utils, np
        cfg = json.loads(args["model_config"])
        for path in (_param(cfg, SITE_PACKAGES_PARAM) or "").split(os.pathsep):
            if path and path not in sys.path:
                site.addsitedir(path)
        import numpy
        import triton_python_backend_utils

        pb_utils, np = triton_python_backend_utils, numpy
        if not pb_utils.using_decoupled_model_transaction_policy(cfg):
            raise ValueError("the generation stand-in must use the decoupled transaction policy, as the vLLM backend")
        from tierserve.generation import engine

        self.folder = Path(args["model_repository"]) / args["model_version"]
        threads = int(_param(cfg, THREADS_PARAM) or 0) or (os.cpu_count() or 1)
        self.model = engine.load(self.folder, threads)
        genai = json.loads((self.folder / "genai_config.json").read_text())["model"]
        eos = genai.get("eos_token_id", [])
        self.eos = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        self.context_length = int(genai.get("context_length") or 0)
        self.pool = ThreadPoolExecutor(max_workers=int(_param(cfg, CONCURRENCY_PARAM) or 4),
                                       thread_name_prefix="genai")

    # --- one request --------------------------------------------------------------------------------------

    def _parse(self, request: Any) -> dict:
        from tierserve.generation.requests import SamplingParams

        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        stream = bool(_flag(request, "stream"))
        exclude = _flag(request, "exclude_input_in_output")
        prepend = (not exclude) if exclude is not None else not stream
        if prepend and stream:
            raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
        raw = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
        if raw is not None:
            value = raw.as_numpy().reshape(-1)[0]
            params_text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        else:
            params_text = request.parameters() or "{}"
        params = {k: v for k, v in json.loads(params_text).items() if v is not None}
        unknown = sorted(set(params) - _IMPLEMENTED)
        if unknown:
            raise ValueError(f"sampling parameter(s) {', '.join(unknown)} are not implemented by the local "
                             "stand-in for the vLLM backend (tierserve_tools.triton_genai_shim)")
        if int(params.get("n", 1)) != 1:
            raise ValueError("n must be 1")
        if params.get("logprobs") not in (None, 0):
            raise ValueError("logprobs must be 0 (the sampled token only) or null here")
        if params.get("skip_special_tokens", True) is not True:
            raise ValueError("skip_special_tokens must be true here")
        stop = params.get("stop") or ()
        top_k = int(params.get("top_k", 0))
        sp = SamplingParams(max_tokens=int(params.get("max_tokens", VLLM_DEFAULT_MAX_TOKENS)),
                            temperature=float(params.get("temperature", 1.0)), top_p=float(params.get("top_p", 1.0)),
                            top_k=0 if top_k < 0 else top_k, seed=params.get("seed"),
                            stop=(stop,) if isinstance(stop, str) else tuple(str(s) for s in stop))
        if sp.max_tokens is None or sp.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {sp.max_tokens}")
        ids = self.model.encode(text)  # as vLLM tokenizes a text prompt: with the tokenizer's special tokens
        if self.context_length and len(ids) + sp.max_tokens > self.context_length:
            raise ValueError(f"This model's maximum context length is {self.context_length} tokens. However, you "
                             f"requested {len(ids) + sp.max_tokens} tokens ({len(ids)} in the prompt, "
                             f"{sp.max_tokens} for the completion).")
        flags = {f: bool(_flag(request, f)) for f in _FLAGS}
        return {"text": text, "ids": ids, "stream": stream, "prepend": prepend, "params": sp, "flags": flags,
                "logprobs": params.get("logprobs") is not None}

    def _response(self, job: dict, text: str, ids: list[int], finish: str | None) -> Any:
        flags = job["flags"]
        out = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        if flags["return_finish_reason"]:
            out.append(pb_utils.Tensor("finish_reason", np.array([str(finish).encode()], dtype=np.object_)))
        if flags["return_logprobs"]:
            value = "null" if not job["logprobs"] else json.dumps(
                [{str(t): {"logprob": None, "rank": None, "decoded_token": self.model.decode([t])}} for t in ids])
            out.append(pb_utils.Tensor("logprobs", np.array([value.encode()], dtype=np.object_)))
        if flags["return_num_input_tokens"]:
            out.append(pb_utils.Tensor("num_input_tokens", np.array(len(job["ids"]), dtype=np.uint32)))
        if flags["return_num_output_tokens"]:
            out.append(pb_utils.Tensor("num_output_tokens", np.array([len(ids)], dtype=np.uint32)))
        return pb_utils.InferenceResponse(output_tensors=out)

    def _error(self, message: str, code: Any = None) -> Any:
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        text = pb_utils.Tensor("text_output", np.array([b"N/A"], dtype=np.object_))
        return pb_utils.InferenceResponse(output_tensors=[text], error=error)

    def _run(self, job: dict, sender: Any) -> None:
        final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            events = self.model.generate(job["ids"], job["params"], self.eos, job["params"].max_tokens,
                                         cancelled=sender.is_cancelled)
            texts: list[str] = [job["text"]] if job["prepend"] else []
            ids: list[int] = []
            finish = None
            for event in events:
                finish = event.finish_reason
                if job["stream"]:
                    sender.send(self._response(job, event.text, list(event.token_ids), finish),
                                flags=final_flag if finish else 0)
                else:
                    texts.append(event.text)
                    ids.extend(event.token_ids)
            if finish is None:  # cancelled: the engine stopped before its last token
                code = getattr(pb_utils.TritonError, "CANCELLED", None)
                sender.send(self._error("Request was cancelled", code), flags=final_flag)
            elif not job["stream"]:
                sender.send(self._response(job, "".join(texts), ids, finish), flags=final_flag)
        except Exception as exc:
            with contextlib.suppress(Exception):  # the final response was already sent: nothing more to say
                sender.send(self._error(f"Error generating stream: {exc}"), flags=final_flag)

    # --- Triton entry points -----------------------------------------------------------------------------

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._parse(request)
            except Exception as exc:
                sender.send(self._error(f"Error generating stream: {exc}"),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.pool.submit(self._run, job, sender)
        return None

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
