"""The engine on real onnxruntime-genai sessions: greedy equals transformers, seeds reproduce, stop sequences,
EOS, max tokens, incremental text that never breaks a character, and a disconnect that stops within one token."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.causal_lm import MULTIBYTE_TEXT, hf_greedy
from tests.support.genai_models import TinyLM
from tierserve.generation import engine
from tierserve.generation.engine import StopMatcher, TextStream
from tierserve.generation.events import FINISH_LENGTH, FINISH_STOP
from tierserve.generation.requests import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
NO_EOS = (10_000,)  # an id the model never produces: only max_new_tokens ends it


def _run(lm: TinyLM, prompt: str, params: SamplingParams = GREEDY, n: int = 24, eos=NO_EOS, cancelled=lambda: False):
    model = engine.load(lm.genai, 1)
    events = list(model.generate(model.encode(prompt), params, eos, n, cancelled))
    return model, events


def _ids(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_transformers_token_for_token(tiny_lms: dict[str, TinyLM], family: str) -> None:
    lm = tiny_lms[family]
    model = engine.load(lm.genai, 1)
    prompt = model.encode("The with statement")
    events = list(model.generate(prompt, GREEDY, (lm.eos_id,), 24))
    assert _ids(events) == hf_greedy(lm.hf, prompt, 24)[:len(_ids(events))]
    assert len(_ids(events)) == len(hf_greedy(lm.hf, prompt, 24))
    final = events[-1]
    assert final.usage is not None and (final.usage.prompt_tokens, final.usage.completion_tokens) == (
        len(prompt), len(_ids(events)))


def test_the_streamed_text_is_the_decoded_text_and_max_tokens_ends_with_length(llama: TinyLM) -> None:
    model, events = _run(llama, MULTIBYTE_TEXT, n=40)
    assert "".join(e.text for e in events) == model.decode(_ids(events))
    assert [e.finish_reason for e in events] == [None] * 39 + [FINISH_LENGTH]
    assert all(e.ttft_ms is None for e in events[1:]) and events[0].ttft_ms is not None


def test_text_stream_never_breaks_a_multibyte_character(llama: TinyLM) -> None:
    # Given ids whose byte-level tokens split multi-byte characters (é, €, 🙂 across tokens)
    model = engine.load(llama.genai, 1)
    ids = model.encode(MULTIBYTE_TEXT)
    assert any("\ufffd" in model.decode([t]) for t in ids), "the test needs a token that splits a character"
    stream = TextStream(model.decode)
    deltas = []
    for t in ids:
        stream.add(t)
        deltas.append(stream.step())
    deltas.append(stream.flush())
    # Then no delta holds a broken character and together they are the text
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE_TEXT


def test_text_stream_releases_invalid_bytes_as_decode_renders_them(llama: TinyLM) -> None:
    model = engine.load(llama.genai, 1)
    ids = model.encode("ab🙂")
    cut = next(i for i in range(1, len(ids) + 1) if model.decode(ids[:i]).endswith("\ufffd"))
    broken = ids[:cut] + model.encode("z")  # a character cut short, then more text
    for seq in (broken, ids[:cut]):
        stream = TextStream(model.decode)
        out = []
        for t in seq:
            stream.add(t)
            out.append(stream.step())
        out.append(stream.flush())
        assert "".join(out) == model.decode(seq)


def test_a_seed_makes_sampling_reproducible(llama: TinyLM) -> None:
    def sample(seed):
        return _ids(_run(llama, "Hello", SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=seed))[1])

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = _ids(_run(llama, "Hello")[1])
    assert sample(7) != greedy


def test_a_stop_sequence_ends_the_text_before_it(llama: TinyLM) -> None:
    # Given the greedy text of a prompt, and a stop string from its middle
    _, events = _run(llama, "The with statement", n=30)
    full = "".join(e.text for e in events)
    stop = full[10:13]
    assert stop.strip() and full.find(stop) >= 1
    # When the same request has that stop string
    _, stopped = _run(llama, "The with statement", SamplingParams(temperature=0.0, stop=(stop, "\x00never")), n=30)
    # Then the text is everything before it, never the stop string, and it ends with stop
    assert "".join(e.text for e in stopped) == full[:full.find(stop)]
    assert stopped[-1].finish_reason == FINISH_STOP
    assert len(_ids(stopped)) < 30


def test_an_eos_id_ends_with_stop_and_counts_the_eos_token(llama: TinyLM) -> None:
    model, events = _run(llama, "Hello", n=20)
    ids = _ids(events)
    eos = ids[3]
    assert eos not in ids[:3]
    _, ended = _run(llama, "Hello", n=20, eos=(eos,))
    assert _ids(ended) == ids[:4]
    assert ended[-1].finish_reason == FINISH_STOP and ended[-1].usage.completion_tokens == 4
    assert "".join(e.text for e in ended) == model.decode(ids[:3])


def test_ignore_eos_goes_on_past_eos_to_max_tokens_as_transformers_generates(llama: TinyLM, tmp_path: Path) -> None:
    # Given the tiny Llama with genai_config.json's EOS set to the 4th token greedy generates after the prompt, so
    # onnxruntime-genai's generator itself stops there (and would pad after it), and that id as the manifest's EOS
    model = engine.load(llama.genai, 1)
    prompt = model.encode("Hello there")
    reference = hf_greedy(llama.hf, prompt, 20)  # transformers' generate, which never meets its own EOS here
    assert len(reference) == 20 and llama.eos_id not in reference
    eos = reference[3]
    assert eos not in reference[:3]
    folder = tmp_path / "eos-at-4"
    shutil.copytree(llama.genai, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = eos
    (folder / "genai_config.json").write_text(json.dumps(config))
    forced = engine.load(folder, 1)
    try:
        stopped = list(forced.generate(prompt, GREEDY, (eos,), 20))
        assert _ids(stopped) == reference[:4] and stopped[-1].finish_reason == FINISH_STOP
        # When ignore_eos is asked (vLLM's extension)
        going = list(forced.generate(prompt, replace(GREEDY, ignore_eos=True), (eos,), 20))
        # Then exactly max_tokens tokens come, the EOS among them, each the token transformers generates
        assert _ids(going) == reference
        assert going[-1].finish_reason == FINISH_LENGTH and going[-1].usage.completion_tokens == 20
        assert "".join(e.text for e in going) == forced.decode(reference)
        # And batched, each row is what it is alone (a batched row would be padded after its EOS)
        other = model.encode("The with statement")
        rows = engine.generate_batch(forced, [prompt, other], replace(GREEDY, ignore_eos=True), (eos,), [20, 12])
        assert _ids(rows[0]) == reference and _ids(rows[1]) == hf_greedy(llama.hf, other, 12)
        assert [r[-1].finish_reason for r in rows] == [FINISH_LENGTH, FINISH_LENGTH]
        # And a seeded sampled generation goes on to max_tokens too, the same twice
        sampled = SamplingParams(temperature=1.0, seed=7, ignore_eos=True)
        first, again = (_ids(list(forced.generate(prompt, sampled, (eos,), 30))) for _ in range(2))
        assert first == again and len(first) == 30
    finally:
        engine.evict({folder.name})


def test_a_disconnect_stops_the_generation_within_one_token(llama: TinyLM) -> None:
    gone = False
    model = engine.load(llama.genai, 1)
    stream = model.generate(model.encode("Hello"), GREEDY, NO_EOS, 50, lambda: gone)
    got = [next(stream), next(stream), next(stream)]
    gone = True  # the client went away after three tokens
    assert list(stream) == []  # not one more token
    assert len(_ids(got)) == 3
    # And a request cancelled before it starts runs nothing
    assert list(model.generate(model.encode("Hello"), GREEDY, NO_EOS, 5, lambda: True)) == []


def test_models_are_cached_per_folder_and_threads(llama: TinyLM) -> None:
    a = engine.load(llama.genai, 1)
    assert engine.load(llama.genai, 1) is a
    assert engine.load(llama.genai, 2) is not a
    overlay = json.loads(engine.genai_overlay(3))["model"]["decoder"]["session_options"]
    assert overlay["intra_op_num_threads"] == 3 and overlay["session.intra_op.allow_spinning"] == "0"
    engine.evict({llama.genai.name})
    assert not engine.is_loaded(llama.genai, 1)


@pytest.mark.parametrize(("deltas", "stop", "released"), [
    (["ab", "cd", "ef"], ["cde"], "ab"),         # found across deltas
    (["ab", "c"], ["cx"], "ab"),                 # 'c' held back: it may start 'cx'
    (["abc"], ["zz"], "abc"),                    # nothing to hold
    (["ab<", "|en", "d|>x"], ["<|end|>"], "ab"),
])
def test_stop_matcher_holds_back_what_could_start_a_stop_string(deltas, stop, released) -> None:
    m = StopMatcher(stop)
    out = "".join(m.feed(d)[0] for d in deltas)
    assert out == released


def test_stop_matcher_releases_what_was_held_at_the_end() -> None:
    m = StopMatcher(["cx"])
    assert m.feed("abc") == ("ab", False)
    assert m.finish("") == ("c", False)
    m = StopMatcher(["cx"])
    m.feed("abc")
    assert m.finish("x") == ("", True)
