"""Counting prompt tokens in the router (issue 18): the calibrated estimate, its error, and the exact count with
the variant's tokenizer.json fetched alone, verified, loaded within a time budget."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.causal_lm import MULTIBYTE_TEXT, train_tokenizer
from tierserve import errors
from tierserve.generation import tokens
from tierserve.generation.requests import GenerationRequest
from tierserve.generation.tokens import Calibration, TokenCounter, calibrate
from tierserve.manifest import ExternalFile, GenerationSpec, ModelVersion, TensorSpec, Variant
from tierserve.store import ModelStore

VALIDATION = json.loads((Path(__file__).parents[3] / "compiler" / "validation_prompts.json").read_text())["prompts"]
#: Held-out texts (none of them in the calibration): prose, code, and multi-byte text of several kinds.
HELD_OUT = {
    "english": "The quick brown fox jumps over the lazy dog. Routing decides which tier serves each request, "
               "and the estimate must be close enough to choose well.",
    "python": "def f(x: int) -> list[str]:\n    return [str(i) for i in range(x) if i % 2 == 0]\n",
    "multibyte": MULTIBYTE_TEXT,
    "german": "Über die Brücke fährt ein großer Lastwagen, und die Kühe schauen müde zu.",
    "chinese": "今天天气很好，我们去公园散步吧。",  # noqa: RUF001 (Chinese punctuation, on purpose)
    "emoji": "🙂🙃😀 launch 🚀 now ✨✨",
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def test_the_estimate_counts_ascii_by_characters_and_the_rest_by_bytes() -> None:
    cal = Calibration(4.0, 0.5)
    assert cal.estimate("") == 0
    assert cal.estimate("a") == 1
    assert cal.estimate("abcdefgh") == 2
    assert cal.estimate("€€") == 3  # 6 UTF-8 bytes x 0.5
    assert cal.estimate("abcd€") == 1 + 2  # ceil(1 + 1.5)


def test_calibration_on_the_validation_text_and_its_error_on_held_out_text(tok) -> None:
    cal = calibrate(lambda t: n_tokens(tok, t), VALIDATION)
    # the error stated is the largest measured on the calibration's own texts
    assert cal.error is not None and 0 < cal.error < 0.3
    errs = {k: cal.estimate(t) / n_tokens(tok, t) - 1 for k, t in HELD_OUT.items()}
    print({k: round(v, 3) for k, v in errs.items()})
    assert all(abs(e) <= 0.3 for e in errs.values()), errs
    # counting non-ASCII text by its bytes is what keeps multi-byte text close: by characters it is far off
    by_chars = len(HELD_OUT["chinese"]) / cal.chars_per_token / n_tokens(tok, HELD_OUT["chinese"]) - 1
    assert abs(by_chars) > 0.7 and abs(errs["chinese"]) < 0.1


def test_calibrate_refuses_no_text() -> None:
    with pytest.raises(ValueError, match="at least one"):
        calibrate(len, ["", ""])


def test_uncalibrated_models_use_the_default() -> None:
    assert Calibration.of(None) is tokens.UNCALIBRATED
    spec = GenerationSpec(64, (2,), chars_per_token=3.0, tokens_per_nonascii_byte=0.25, token_estimate_error=0.1)
    assert Calibration.of(spec) == Calibration(3.0, 0.25, 0.1)


# --- the exact count: tokenizer.json alone from the store --------------------------------------------------


def write_store(root: Path, tok, corrupt: bool = False) -> ModelVersion:
    folder = root / "lm" / "1" / "int4"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"weights that must not be read")
    data = tok.to_str().encode()
    (folder / "tokenizer.json").write_bytes(data + (b" " if corrupt else b""))
    (folder / "genai_config.json").write_bytes(b"{}")

    def entry(name: str, content: bytes) -> ExternalFile:
        return ExternalFile(f"lm/1/int4/{name}", hashlib.sha256(content).hexdigest(), len(content))

    variant = Variant(**vars(entry("model.onnx", b"x" * 64)) | {"external_data": (
        entry("tokenizer.json", data), entry("genai_config.json", b"{}"))})
    spec = GenerationSpec(1024, (2,), chars_per_token=2.0, tokens_per_nonascii_byte=1.0, token_estimate_error=0.2)
    return ModelVersion("lm", "1", (TensorSpec("text_input", "BYTES", (1,)),),
                        (TensorSpec("text_output", "BYTES", (-1,)),), {"int4": variant}, "int4",
                        task="text-generation", generation=spec)


def completion(text: str) -> GenerationRequest:
    return GenerationRequest(model="lm", version=None, kind="completion", prompt=text)


def test_exact_with_the_tokenizer_and_prompt_ids_without_it(tmp_path, tok) -> None:
    model = write_store(tmp_path / "store", tok)
    counter = TokenCounter(ModelStore(str(tmp_path / "store"), tmp_path / "cache"), budget_s=30)
    got = counter.count(model, completion(MULTIBYTE_TEXT))
    assert got == tokens.PromptTokens(len(tok.encode(MULTIBYTE_TEXT).ids), True, "tokenizer")
    ids = GenerationRequest(model="lm", version=None, kind="completion", prompt="x", prompt_ids=(1, 2, 3))
    assert counter.count(model, ids) == tokens.PromptTokens(3, True, "prompt_ids")
    # a chat: its messages by the tokenizer plus the template's tokens, never called exact
    chat = GenerationRequest(model="lm", version=None, kind="chat",
                             messages=({"role": "user", "content": "Hello there"},))
    c = counter.count(model, chat)
    assert (c.exact, c.how) == (False, "tokenizer+template")
    assert c.count == n_tokens(tok, "user\nHello there") + tokens.CHAT_TOKENS_PER_MESSAGE + tokens.CHAT_TOKENS_PRIMER


def test_a_tokenizer_that_does_not_verify_is_never_used(tmp_path, tok) -> None:
    model = write_store(tmp_path / "store", tok, corrupt=True)
    counter = TokenCounter(ModelStore(str(tmp_path / "store"), tmp_path / "cache"), budget_s=30)
    got = counter.count(model, completion("abcdefgh"))
    assert got == tokens.PromptTokens(4, False, "estimate", 0.2)
    assert "IntegrityError" in (counter.failure(model) or "")
    with pytest.raises(errors.IntegrityError, match="sha256"):
        tokens.read_verified(counter.store, model.cpu_artifact, tokens.tokenizer_file(model))


def test_a_slow_tokenizer_load_costs_a_request_only_its_budget(tmp_path, tok) -> None:
    model = write_store(tmp_path / "store", tok)
    release = threading.Event()

    def slow_load(data: bytes):
        release.wait(10)
        return tokens.load_tokenizer(data)

    counter = TokenCounter(ModelStore(str(tmp_path / "store"), tmp_path / "cache"), budget_s=0.05, load=slow_load)
    first = counter.count(model, completion("abcdefgh"))
    assert (first.exact, first.how) == (False, "estimate")
    release.set()
    for _ in range(200):  # the load finishes in its thread; a later request is counted exactly
        got = counter.count(model, completion("abcdefgh"))
        if got.exact:
            break
    assert got == tokens.PromptTokens(n_tokens(tok, "abcdefgh"), True, "tokenizer")


def test_importing_the_module_imports_no_tokenizer_library() -> None:
    code = ("import sys, tierserve.generation.tokens, tierserve.routing; "
            "print(sorted(m for m in ('tokenizers', 'transformers', 'torch', 'jinja2', 'onnxruntime_genai') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_tokenizer_comes_from_s3_alone_verified(tmp_path, tok) -> None:
    import boto3
    from moto import mock_aws

    with mock_aws():
        # Given the store in S3 without the model (the weights are never read)
        model = write_store(tmp_path / "store", tok)
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="tierserve-models-test")
        for f in (tmp_path / "store").rglob("*"):
            if f.is_file() and f.name != "model.onnx":
                s3.upload_file(str(f), "tierserve-models-test", f"m/{f.relative_to(tmp_path / 'store').as_posix()}")
        store = ModelStore("s3://tierserve-models-test/m", tmp_path / "cache", s3_client=s3)
        counter = TokenCounter(store, budget_s=30)
        # When a prompt is counted / Then exactly, and nothing was written to the cache
        assert counter.count(model, completion(MULTIBYTE_TEXT)) == tokens.PromptTokens(
            len(tok.encode(MULTIBYTE_TEXT).ids), True, "tokenizer")
        assert not (tmp_path / "cache").exists()
        # And a tampered object is refused
        s3.put_object(Bucket="tierserve-models-test", Key="m/lm/1/int4/tokenizer.json", Body=b"{}")
        with pytest.raises(errors.IntegrityError, match="sha256"):
            tokens.read_verified(store, model.cpu_artifact, tokens.tokenizer_file(model))
