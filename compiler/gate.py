"""The accuracy gate: an exported graph must reproduce its source model before anything is written.

``gate`` runs the ONNX graph and the source framework (scikit-learn, PyTorch) on the same inputs,
``compare_outputs`` measures the worst error per output (padding tokens excluded), and
``run_onnx`` is the one place the compiler runs a graph in-process (variants are evaluated with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tierserve_compiler.data import Dataset, synthetic_dataset
from tierserve_compiler.errors import AccuracyGateError, require

if TYPE_CHECKING:
    from tierserve_compiler.sources import Exported


def run_onnx(path: Path, feed: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    ort = require("onnxruntime", "compiler")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed), strict=True))


def mask_for(out: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """Padding mask for [batch, seq, ...] outputs when an input named *mask* has shape [batch, seq]."""
    for name, v in feed.items():
        if "mask" in name and v.ndim == 2 and out.ndim >= 3 and out.shape[:2] == v.shape:
            return v.astype(bool)
    return None


def compare_outputs(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], feed: dict[str, np.ndarray], tol: float
) -> dict[str, dict[str, Any]]:
    """Per output: the worst error (absolute, relative above magnitude 1) and whether it is within ``tol``."""
    res: dict[str, dict[str, Any]] = {}
    for name, r in ref.items():
        g = got[name]
        r = np.asarray(r)
        if g.shape != r.shape:
            res[name] = {"error": float("inf"), "ok": False, "detail": f"shape {list(g.shape)} != {list(r.shape)}"}
            continue
        if not np.issubdtype(r.dtype, np.floating):
            mism = float(np.mean(g != r)) if r.size else 0.0
            res[name] = {"error": mism, "ok": mism == 0.0, "detail": "fraction of differing values"}
            continue
        m = mask_for(g, feed)
        a, b = g.astype(np.float64), r.astype(np.float64)
        if m is not None:
            a, b = a[m], b[m]
        err = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) if b.size else 0.0
        res[name] = {
            "error": err,
            "ok": bool(err <= tol and np.isfinite(err)),
            "detail": "max |onnx - source| / max(1, |source|)" + (" on non-padding tokens" if m is not None else ""),
        }
    return res


def gate(exported: Exported, datasets: list[Dataset], tol: float) -> dict[str, Any]:
    """Step 1b: run the ONNX graph and the source framework on the same inputs; refuse a mismatch."""
    if exported.reference is None:
        exported.gate = {"checked": False, "reason": "no source framework to compare with (ONNX file)"}
        return exported.gate
    worst: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        feed = ds.inputs
        res = compare_outputs(run_onnx(exported.onnx_path, feed), exported.reference(feed), feed, tol)
        for k, v in res.items():
            if k not in worst or v["error"] > worst[k]["error"]:
                worst[k] = {**v, "data": ds.source}
    exported.gate = {"checked": True, "tolerance": tol, "outputs": worst, "rows": int(sum(d.rows for d in datasets))}
    bad = {k: v for k, v in worst.items() if not v["ok"]}
    if bad:
        desc = "; ".join(
            f"output {k!r}: error {v['error']:.3g} > {tol:g} ({v['detail']}, on {v['data']})" for k, v in bad.items()
        )
        raise AccuracyGateError(
            f"the exported ONNX graph runs but does not match the {exported.source_kind} model: "
            f"{desc}. Nothing was written. Check the exporter/opset, or raise the tolerance "
            "only if the difference is expected"
        )
    return exported.gate


def gate_datasets(exported: Exported, validation: Dataset | None, seed: int) -> list[Dataset]:
    sets = [d for d in (exported.example, validation) if d is not None]
    if not sets:
        sets = [synthetic_dataset(exported.inputs, 16, seed)]
    return [d.take(256) for d in sets]


# --- causal LMs (issue 17): token predictions against transformers on PyTorch -----------------------------


def _og_model(folder: Path) -> Any:
    import json as _json

    og = require("onnxruntime_genai", "genai")
    cfg = og.Config(str(folder))
    cfg.overlay(_json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}))
    return og, og.Model(cfg)


def _og_logits(og: Any, model: Any, ids: list[int]) -> np.ndarray:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    return np.asarray(gen.get_output("logits"), dtype=np.float64)[0]


def _og_greedy(og: Any, model: Any, ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    out: list[int] = []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
        if out[-1] in eos:
            break
    return out


def _nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """Negative log-likelihood of each next token (positions 0..n-2 predict ids 1..n-1)."""
    x = logits[:-1]
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def _torch_greedy(torch: Any, model: Any, ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    """Greedy decoding on PyTorch, the whole sequence re-run at each step (what ``generate(do_sample=False)``
    computes, without its per-call overhead: ten times faster on a small model)."""
    seq, out = list(ids), []
    for _ in range(n):
        nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt in eos:
            break
    return out


def gate_causal_lm(src: Any, variants: dict[str, Path], prompts: list[str], *, positions: int = 64,
                   new_tokens: int = 16) -> dict[str, Any]:
    """Each onnxruntime-genai variant folder against transformers on PyTorch (the source model), on ``prompts``:

    * ``top1_agreement``: the share of positions (every position of each prompt's first ``positions`` tokens)
      where the variant's most likely next token is the source model's;
    * ``perplexity_ratio``: the variant's perplexity on the prompts over the source model's;
    * ``greedy_match``: the share of prompts whose greedy continuation (``new_tokens`` tokens after the prompt's
      first half, stopping at EOS) equals the source model's greedy continuation token for token.
    """
    torch = require("torch", "torch")
    transformers = require("transformers", "transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(src.folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32)
    model.eval()
    eos = tuple(src.eos_token_ids)
    cases = []
    with torch.no_grad():
        for text in prompts:
            ids = [int(i) for i in tok(text, add_special_tokens=True)["input_ids"]][:positions]
            if len(ids) < 2:
                continue
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
            head = ids[: max(1, len(ids) // 2)]
            cases.append((ids, logits, head, _torch_greedy(torch, model, head, new_tokens, eos)))
    if not cases:
        raise AccuracyGateError("no validation prompt has two tokens or more; give longer prompts (--validation)")
    ref_nll = np.concatenate([_nll(lg, ids) for ids, lg, _, _ in cases])
    ref_ppl = float(np.exp(ref_nll.mean()))
    result: dict[str, Any] = {"checked": True, "reference": "transformers on PyTorch (fp32)",
                              "positions": int(sum(len(c[0]) for c in cases)), "greedy_tokens": new_tokens,
                              "reference_perplexity": ref_ppl, "variants": {}}
    for key, folder in variants.items():
        og, m = _og_model(folder)
        agree = total = mismatches = 0
        nll = []
        first = None
        for ids, ref_logits, head, ref_cont in cases:
            lg = _og_logits(og, m, ids)
            agree += int((lg.argmax(-1) == ref_logits.argmax(-1)).sum())
            total += len(ids)
            nll.append(_nll(lg, ids))
            got = _og_greedy(og, m, head, new_tokens, eos)
            if got != ref_cont:
                mismatches += 1
                first = first or {"prompt_ids": head[:8], "transformers": ref_cont, "onnxruntime_genai": got}
        ppl = float(np.exp(np.concatenate(nll).mean()))
        result["variants"][key] = {
            "top1_agreement": agree / total, "perplexity": ppl, "perplexity_ratio": ppl / ref_ppl,
            "greedy_match": 1 - mismatches / len(cases), "greedy_mismatches": mismatches, "greedy_prompts": len(cases),
            "first_mismatch": first,
        }
        del m
    return result


#: Conversations the chat template is checked on (a system turn, several turns, multi-byte text).
CHAT_CHECKS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What does the with statement do?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Café, naïve: 5 € 🙂"},
     {"role": "assistant", "content": "It is text."}, {"role": "user", "content": "And a for loop?"}],
)


def render_chat_template(template: str, messages: list[dict[str, str]], special: dict[str, Any],
                         add_generation_prompt: bool = True) -> str:
    """The chat template rendered with jinja2's sandbox as transformers renders it (``ImmutableSandboxedEnvironment``
    with ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``tojson``, ``raise_exception``, ``strftime_now``).

    A local copy: the runtime's renderer (``tierserve.generation.chat``, issue 17's engine) did not exist when this
    check was written; the check compares token ids with transformers either way."""
    import datetime as dt
    import json as _json

    jinja2 = require("jinja2", "genai")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    return str(env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special))


def _special_tokens(folder: Path) -> dict[str, Any]:
    import json as _json

    tc = folder / "tokenizer_config.json"
    data = _json.loads(tc.read_text()) if tc.is_file() else {}
    out = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        v = data.get(k)
        out[k] = v.get("content") if isinstance(v, dict) else v
    return out


def check_chat_template(src: Any, variant_folder: Path) -> dict[str, Any]:
    """The template rendered with jinja2's sandbox and tokenized with the variant's ``tokenizer.json`` must give the
    token ids of transformers' ``apply_chat_template(..., add_generation_prompt=True)`` on the source."""
    if not src.chat_template:
        return {"checked": False, "reason": "the model ships no chat template"}
    if src.kind != "hf-causal-lm":
        return {"checked": False, "reason": "no transformers tokenizer to compare with (a prebuilt folder)"}
    transformers = require("transformers", "transformers")
    tokenizers = require("tokenizers", "genai")
    hf = transformers.AutoTokenizer.from_pretrained(str(src.folder))
    tok = tokenizers.Tokenizer.from_file(str(variant_folder / "tokenizer.json"))
    special = _special_tokens(variant_folder)
    for messages in CHAT_CHECKS:
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(want, dict) or hasattr(want, "keys"):
            want = want["input_ids"]
        want = [int(t) for t in want]
        text = render_chat_template(src.chat_template, messages, special)
        got = tok.encode(text, add_special_tokens=False).ids
        if got != want:
            return {"checked": True, "equal": False, "renderer": "local jinja2 sandbox (compiler/gate.py)",
                    "detail": f"on {len(messages)} message(s): {got[:24]}... != {want[:24]}..."}
    return {"checked": True, "equal": True, "conversations": len(CHAT_CHECKS),
            "renderer": "local jinja2 sandbox (compiler/gate.py); tierserve.generation.chat did not exist yet"}
