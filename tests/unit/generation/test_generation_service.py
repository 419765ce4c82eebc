"""The service: prepare (template, tokens, max_tokens, the context window), admission (429 past the cap) and the
metrics emitted after the last event; on a real store and real onnxruntime-genai sessions."""

from __future__ import annotations

import json

import pytest

from tests.support.genai_models import TinyLM
from tierserve.errors import ContextLengthExceededError, InvalidParameterError, TooManyRequestsError
from tierserve.generation import openai, service
from tierserve.protocol.rendering import render_error


def _model(rt, name="tiny"):
    return rt.store.manifest().resolve(name)


def test_prepare_renders_the_template_and_counts_as_transformers(genai_runtime, llama: TinyLM) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Café 🙂"}]
    req = service.prepare(genai_runtime, _model(genai_runtime), openai.parse_chat({"model": "tiny",
                                                                                  "messages": messages}))
    hf = AutoTokenizer.from_pretrained(str(llama.hf))
    assert list(req.prompt_ids) == list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False))
    assert req.params.max_tokens == 16  # the manifest's default_max_tokens


def test_max_tokens_is_capped_and_the_context_window_is_a_400_before_any_work(genai_runtime) -> None:
    model = _model(genai_runtime)
    with pytest.raises(InvalidParameterError, match="cap of 200") as err:
        service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "x",
                                                                       "max_tokens": 201}))
    assert err.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceededError) as ctx:
        service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "word " * 100,
                                                                       "max_tokens": 200}))
    answer = render_error(ctx.value, "openai")
    assert answer.status == 400 and answer.document["error"]["code"] == "context_length_exceeded"
    assert "256" in answer.message
    # Without max_tokens, the default shrinks to what the context leaves
    long = service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": [5] * 250}))
    assert long.params.max_tokens == 6


def test_a_chat_request_to_a_model_without_a_template_is_a_400_that_says_so(genai_runtime) -> None:
    with pytest.raises(InvalidParameterError, match="no chat template") as err:
        service.prepare(genai_runtime, _model(genai_runtime, "plain"),
                        openai.parse_chat({"model": "plain", "messages": [{"role": "user", "content": "x"}]}))
    assert render_error(err.value, "openai").status == 400


def test_past_the_cap_a_generation_is_a_429_until_a_slot_frees(genai_runtime) -> None:
    model = _model(genai_runtime)
    req = service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "x",
                                                                         "temperature": 0}))
    first = service.generate_local(genai_runtime, model, req)
    second = service.generate_local(genai_runtime, model, req)
    with pytest.raises(TooManyRequestsError) as err:  # max_concurrency 2
        service.generate_local(genai_runtime, model, req)
    answer = render_error(err.value, "openai")
    assert answer.status == 429 and answer.headers["retry-after"] == "1"
    list(first)  # one stream ends: its slot is free
    third = service.generate_local(genai_runtime, model, req)
    second.close()  # a client that went away frees its slot too
    third.close()
    assert service.ADMISSION.running(model) == 0


def test_the_cap_follows_the_setting_when_set(genai_runtime, monkeypatch) -> None:
    from dataclasses import replace

    model = _model(genai_runtime)
    monkeypatch.setattr(genai_runtime, "settings", replace(genai_runtime.settings, generation_max_concurrency=1))
    req = service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "x"}))
    held = service.generate_local(genai_runtime, model, req)
    with pytest.raises(TooManyRequestsError):
        service.generate_local(genai_runtime, model, req)
    held.close()


def test_metrics_are_emitted_after_the_last_event_not_before(genai_runtime, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TIERSERVE_METRICS", "true")
    model = _model(genai_runtime)
    req = service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "Hello",
                                                                         "temperature": 0, "max_tokens": 5}))
    stream = service.generate_local(genai_runtime, model, req)
    events = [next(stream) for _ in range(5)]
    assert events[-1].final
    before = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert not any("TimeToFirstToken" in d for d in before)  # the last event is out; the stream is not over
    assert list(stream) == []
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    gen = [d for d in docs if "CompletionTokens" in d]
    assert len(gen) == 1
    d = gen[0]
    assert (d["model"], d["version"], d["tier"], d["PromptTokens"], d["CompletionTokens"]) == (
        "tiny", "1", "cpu", len(req.prompt_ids), 5)
    assert d["TimeToFirstToken"] > 0 and d["InterTokenLatency"] >= 0 and d["TokensPerSecond"] > 0


# --- the router's prepare reads the tokenizer files, never the weights (issue 17/18) ------------------------


def _files_under(folder) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def test_prepare_fetches_only_the_tokenizer_files_and_never_the_weights(genai_runtime, llama: TinyLM) -> None:
    from transformers import AutoTokenizer

    # Given a store whose weights cannot be read at all (the router must never need them)
    model = _model(genai_runtime)
    root = genai_runtime.store.root
    (root / "tiny/1/fp32/model.onnx.data").unlink()
    (root / "tiny/1/fp32/model.onnx").unlink()
    messages = [{"role": "user", "content": "Café 🙂"}]
    # When the router prepares a chat and a completion
    chat = service.prepare(genai_runtime, model, openai.parse_chat({"model": "tiny", "messages": messages}))
    done = service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "Hello 🙂"}))
    # Then the ids are transformers' (the full folder's tokenizer gives the same: the tokenizer files are the same)
    hf = AutoTokenizer.from_pretrained(str(llama.hf))
    assert list(chat.prompt_ids) == list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False))
    assert list(done.prompt_ids) == list(hf("Hello 🙂")["input_ids"])
    # And the cache holds the tokenizer files only
    cache = genai_runtime.store.cache_dir
    assert _files_under(cache) <= set(service.PREPARE_FILES)
    assert "tokenizer.json" in _files_under(cache) and not _files_under(cache) & {"model.onnx", "model.onnx.data"}


def test_prepare_gives_the_ids_the_full_folder_gives(genai_runtime) -> None:
    from tests.support.causal_lm import MULTIBYTE_TEXT
    from tierserve.generation import chat, engine

    # Given the router's prepare (tokenizer files alone) and the whole verified folder the CPU function runs
    model = _model(genai_runtime)
    full = genai_runtime.store.fetch(model.cpu_artifact).parent
    service.clear()
    tok, template = engine.tokenizer(full), chat.ChatTemplate.from_folder(full)
    assert template is not None
    for text in ("Hello", MULTIBYTE_TEXT, "  spaces\tand\nlines  ", "<|im_start|>user"):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        chat_req = service.prepare(genai_runtime, model, openai.parse_chat({"model": "tiny", "messages": messages}))
        plain = service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": text}))
        # Then the ids are the same token for token
        assert list(chat_req.prompt_ids) == tok.encode(template.render(messages), add_special_tokens=False).ids
        assert list(plain.prompt_ids) == tok.encode(text, add_special_tokens=True).ids


def test_a_tampered_tokenizer_is_refused_before_any_work(genai_runtime) -> None:
    from tierserve.errors import IntegrityError

    model = _model(genai_runtime)
    path = genai_runtime.store.root / "tiny/1/fp32/tokenizer.json"
    path.write_bytes(path.read_bytes().replace(b'"<|im_end|>"', b'"<|im_END|>"', 1))
    with pytest.raises(IntegrityError, match=r"tokenizer\.json.*refusing"):
        service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "x"}))


def test_the_router_prepares_from_s3_without_the_weights(genai_runtime, tmp_path) -> None:
    from types import SimpleNamespace

    import boto3
    from moto import mock_aws

    from tierserve.store import ModelStore

    with mock_aws():
        # Given the store in S3, without its weights
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="tierserve-models-test")
        root = genai_runtime.store.root
        for f in root.rglob("*"):
            if f.is_file() and f.name not in ("model.onnx", "model.onnx.data"):
                s3.upload_file(str(f), "tierserve-models-test", f"models/{f.relative_to(root).as_posix()}")
        store = ModelStore("s3://tierserve-models-test/models", tmp_path / "s3-cache", s3_client=s3)
        rt = SimpleNamespace(store=store, settings=genai_runtime.settings)
        service.clear()
        # When the router prepares a chat
        messages = [{"role": "user", "content": "Café 🙂"}]
        req = service.prepare(rt, store.manifest().resolve("tiny"),
                              openai.parse_chat({"model": "tiny", "messages": messages}))
        # Then its ids are the folder store's, and only the tokenizer files were fetched
        service.clear()
        local = service.prepare(genai_runtime, _model(genai_runtime),
                                openai.parse_chat({"model": "tiny", "messages": messages}))
        assert req.prompt_ids == local.prompt_ids
        names = _files_under(tmp_path / "s3-cache")
        assert "tokenizer.json" in names and names <= set(service.PREPARE_FILES)


def test_an_evicted_version_forgets_its_tokenizer(genai_runtime) -> None:
    store = genai_runtime.store
    model = _model(genai_runtime)
    service.prepare(genai_runtime, model, openai.parse_completion({"model": "tiny", "prompt": "x"}))
    digest = model.cpu_artifact.digest
    assert digest in service._texts
    doc = json.loads((store.root / "manifest.json").read_text())
    del doc["models"]["tiny"]
    (store.root / "manifest.json").write_text(json.dumps(doc))
    store.refresh()
    assert digest not in service._texts
    assert not [p for p in store.cache_dir.iterdir() if p.name.startswith(digest)]
