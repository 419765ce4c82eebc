"""Generation on the GPU tier against the real local tritonserver: the decoupled stand-in for the vLLM backend
(tierserve_tools.triton_genai_shim) loaded from a store by TritonSync, read by TritonBackend.generate (HTTP
generate_stream and gRPC streaming) and by SageMakerBackend.generate through the local
InvokeEndpointWithResponseStream; greedy output equals the CPU engine's and transformers'."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.genai_store import genai_store, genai_validation, tiny_llama_hf  # noqa: F401
from tierserve import errors
from tierserve.backends import generate_stream as gs
from tierserve.backends.triton import TritonBackend
from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams
from tierserve.manifest import Manifest

pytestmark = pytest.mark.integration

NAME = "tiny-llama"
PROMPT = "The with statement is used to wrap the execution"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def gpu_store(genai_store, tmp_path_factory) -> Path:  # noqa: F811
    """The compiled store, with the model placed on the GPU too and its CPU tier on the fp32 variant (so that
    transformers' greedy output is the reference on both tiers)."""
    from tierserve_tools.triton import pytriton_available

    if not pytriton_available():
        pytest.skip("nvidia-pytriton is not installed")
    store = tmp_path_factory.mktemp("gpu-genai-store") / "store"
    shutil.copytree(genai_store, store)
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    version = doc["models"][NAME]["versions"]["1"]
    version["targets"], version["cpu_variant"] = ["cpu", "gpu"], "fp32"
    path.write_text(json.dumps(doc))
    return store


def _start(store: Path, work: Path) -> tuple[Any, Any]:
    from tierserve.lifecycle.objects import open_objects
    from tierserve_tools.triton import TritonServer
    from tierserve_tools.triton_sync import TritonSync

    repo = work / "repo"
    repo.mkdir(parents=True)
    server = TritonServer(repo, log_path=work / "triton.log", extra_args=("--model-control-mode=explicit",)).start()
    sync = TritonSync(server.http_url, repo, open_objects(str(store)), genai_threads=1)
    assert sync.sync() == {NAME: ["1"]}
    return server, sync


@pytest.fixture(scope="module")
def genai_triton(gpu_store, tmp_path_factory):
    server, _ = _start(gpu_store, tmp_path_factory.mktemp("genai-triton"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(gpu_store):
    return Manifest.loads((gpu_store / "manifest.json").read_bytes()).resolve(NAME, "1")


@pytest.fixture(scope="module")
def folder(gpu_store, model, tmp_path_factory) -> Path:
    from tierserve.store import ModelStore

    return ModelStore(str(gpu_store), cache_dir=tmp_path_factory.mktemp("genai-cache")).fetch(model.cpu_artifact).parent


def _request(folder: Path, max_tokens: int = MAX_TOKENS) -> GenerationRequest:
    from tierserve.generation import engine

    ids = engine.tokenizer(folder).encode(PROMPT, add_special_tokens=True).ids
    return GenerationRequest(model=NAME, version="1", kind=KIND_COMPLETION, prompt=PROMPT, prompt_ids=tuple(ids),
                             params=SamplingParams(max_tokens=max_tokens, temperature=0.0))


def _engine_ids(folder: Path, request: GenerationRequest, model) -> list[int]:
    from tierserve.generation import engine

    loaded = engine.load(folder, 1)
    assert request.prompt_ids is not None and request.params.max_tokens is not None
    return [t for e in loaded.generate(request.prompt_ids, request.params, model.generation.eos_token_ids,
                                       request.params.max_tokens) for t in e.token_ids]


def test_the_sync_writes_a_decoupled_python_entry_with_the_vllm_backends_names(genai_triton):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (genai_triton.model_repository / NAME / "config.pbtxt").read_text()
    assert text.startswith("# LOCAL DEVELOPMENT COPY") and "vLLM backend" in text
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled and cfg.max_batch_size == 0
    assert [i.name for i in cfg.input][:4] == ["text_input", "stream", "sampling_parameters",
                                                "exclude_input_in_output"]
    assert "text_output" in [o.name for o in cfg.output]
    vdir = genai_triton.model_repository / NAME / "1"
    assert (vdir / "model.py").is_file() and (vdir / "genai_config.json").is_file()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_greedy_through_generate_stream_equals_the_cpu_engine_and_transformers(genai_triton, model, folder,
                                                                                tiny_llama_hf, protocol):  # noqa: F811
    from tests.support.causal_lm import hf_greedy
    from tierserve.generation import engine

    request = _request(folder)
    url = genai_triton.http_url if protocol == "http" else genai_triton.grpc_url
    backend = TritonBackend(url, protocol, timeout_s=30)
    text_input = gs.prompt_text(engine.tokenizer(folder), request.prompt_ids)
    assert text_input == PROMPT
    events = list(backend.generate(model, request, text_input=text_input))
    ids = [t for e in events for t in e.token_ids]
    assert ids == _engine_ids(folder, request, model)
    assert ids[:len(ids)] == hf_greedy(tiny_llama_hf, list(request.prompt_ids), len(ids))
    final = events[-1]
    assert final.finish_reason in ("stop", "length") and all(e.served_by == "gpu" for e in events)
    assert final.usage is not None and final.usage.completion_tokens == len(ids)
    assert "".join(e.text for e in events) == engine.load(folder, 1).decode(ids)


def test_generate_stream_speaks_the_vllm_backends_outputs_and_generate_prepends_the_prompt(genai_triton):
    body = {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 4}}
    req = urllib.request.Request(f"http://{genai_triton.http_url}/v2/models/{NAME}/generate",
                                 data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    assert answer["text_output"].startswith(PROMPT)  # vLLM: a non-streamed answer starts with the prompt


def test_a_refused_sampling_parameter_is_an_input_error_not_a_tier_failure(genai_triton, model, folder):
    request = _request(folder)
    backend = TritonBackend(genai_triton.http_url, "http", timeout_s=30)
    bad = replace(request, params=SamplingParams(max_tokens=2000, temperature=0.0))
    with pytest.raises(errors.InvalidRequestError, match="maximum context length"):
        next(backend.generate(model, bad))


def test_the_sagemaker_response_stream_gives_the_same_greedy_output(genai_triton, model, folder):
    import boto3

    from tierserve.backends.sagemaker import SageMakerBackend
    from tierserve_tools.sagemaker import LocalEndpoint, SageMakerRuntime

    request = _request(folder)
    endpoint = LocalEndpoint("tierserve-gpu", "http://127.0.0.1:9", NAME, generate_url=f"http://{genai_triton.http_url}")
    with SageMakerRuntime([endpoint]) as runtime:
        client = boto3.client("sagemaker-runtime", endpoint_url=runtime.url, region_name="us-east-1",
                              aws_access_key_id="x", aws_secret_access_key="x")
        events = list(SageMakerBackend("tierserve-gpu", model=NAME, client=client).generate(model, request))
    assert [t for e in events for t in e.token_ids] == _engine_ids(folder, request, model)
    assert events[-1].finish_reason in ("stop", "length")


def test_a_triton_killed_mid_stream_is_a_tier_failure_after_the_tokens_already_sent(gpu_store, model, folder,
                                                                                      tmp_path):
    server, _ = _start(gpu_store, tmp_path)
    try:
        request = _request(folder, max_tokens=1000)
        backend = TritonBackend(server.http_url, "http", timeout_s=30)
        it = backend.generate(model, request)
        got = list(next(it).token_ids)
        server.kill()
        with pytest.raises((errors.BackendUnavailableError, errors.BackendTimeoutError)):
            for event in it:
                got.extend(event.token_ids)
                assert not event.final, "the stream finished before the kill: give it more tokens"
        expected = _engine_ids(folder, request, model)
        assert 0 < len(got) < len(expected) and got == expected[:len(got)]  # a prefix: nothing lost or repeated
    finally:
        server.stop()
        time.sleep(0.1)
