"""config.pbtxt: a ModelConfig written with text_format that parses back, every datatype included."""

from __future__ import annotations

from google.protobuf import text_format

from tierserve.manifest import TensorSpec
from tierserve_compiler.triton import config_pbtxt


def parse(text: str):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_config_pbtxt_round_trips_into_model_config():
    # Given a two-input, two-output model with a dynamic sequence axis
    ins = [TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))]
    outs = [TensorSpec("last_hidden_state", "FP32", (-1, -1, 384)), TensorSpec("sentence_embedding", "FP32", (-1, 384))]
    # When the config is rendered with batching, TensorRT fp16 and warm-up
    cfg = parse(config_pbtxt("minilm", ins, outs, 64))
    # Then it parses into ModelConfig with batch-less dims and every section
    assert cfg.name == "minilm" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [list(o.dims) for o in cfg.output] == [[-1, 384], [384]]
    assert cfg.input[0].data_type == 9 and cfg.output[0].data_type == 11  # TYPE_INT64, TYPE_FP32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
    assert cfg.instance_group[0].kind == 1 and cfg.instance_group[0].count == 1  # KIND_GPU
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert cfg.model_warmup[0].inputs["input_ids"].zero_data


def test_config_without_batching_keeps_full_dims():
    cfg = parse(
        config_pbtxt(
            "fixed",
            [TensorSpec("x", "FP32", (1, 3))],
            [TensorSpec("y", "FP32", (1, 2))],
            0,
            tensorrt_fp16=False,
            warmup=False,
        )
    )
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3]
    assert not cfg.HasField("dynamic_batching") and not cfg.HasField("optimization")


def test_every_datatype_round_trips_through_config_text_and_parse():
    # Given one input and one output of every protocol datatype, BYTES included
    from tierserve.manifest import DATATYPES
    from tierserve_compiler.triton import PROTOCOL_DATATYPES, TRITON_DATATYPES

    ins = [TensorSpec(f"in_{d.lower()}", d, (-1, 2)) for d in DATATYPES]
    outs = [TensorSpec(f"out_{d.lower()}", d, (-1, 3)) for d in DATATYPES]
    # When the config is written as text and parsed back into ModelConfig
    cfg = parse(config_pbtxt("every", ins, outs, 8))
    from tritonclient.grpc import model_config_pb2

    def name(v: int) -> str:
        return model_config_pb2.DataType.Name(v)

    # Then each tensor and each warm-up input has Triton's name for its datatype and maps back to it
    assert [PROTOCOL_DATATYPES[name(i.data_type)] for i in cfg.input] == list(DATATYPES)
    assert [PROTOCOL_DATATYPES[name(o.data_type)] for o in cfg.output] == list(DATATYPES)
    warm = cfg.model_warmup[0].inputs
    assert [PROTOCOL_DATATYPES[name(warm[s.name].data_type)] for s in ins] == list(DATATYPES)
    assert name(warm["in_bytes"].data_type) == "TYPE_STRING" == TRITON_DATATYPES["BYTES"]
    assert all(list(warm[s.name].dims) == [2] and warm[s.name].zero_data for s in ins)


def test_the_local_server_parses_and_localizes_the_same_config(tmp_path):
    # Given a production config written by the compiler
    from tierserve_compiler.triton import config_pbtxt as render
    from tierserve_tools.triton import localize_config

    text = render("m", [TensorSpec("text", "BYTES", (-1, 1))], [TensorSpec("y", "FP32", (-1, 2))], 4)
    # When the local tooling rewrites it for the Python backend
    cfg = localize_config(parse(text), "/site")
    # Then the GPU-only parts are gone and the tensors, batching and datatypes are kept
    assert cfg.backend == "python" and not cfg.platform and not cfg.model_warmup and not cfg.HasField("optimization")
    assert cfg.input[0].data_type == parse(text).input[0].data_type and cfg.max_batch_size == 4
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4]
