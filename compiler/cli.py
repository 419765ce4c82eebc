"""``tierserve compile``: registered on the top-level CLI with :func:`register`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tierserve_compiler.config import CALIBRATION_METHODS, PRESETS, make_config
from tierserve_compiler.errors import CompilerError
from tierserve_compiler.variants import QUANTIZE_MODES


def _axis(text: str) -> tuple[str, int]:
    name, sep, axis = text.rpartition(":")
    if not sep or not name or not axis.isdigit() or int(axis) == 0:
        raise argparse.ArgumentTypeError(
            f"--dynamic-axis {text!r}: use INPUT:AXIS with AXIS >= 1, e.g. input_ids:1 "
            "(axis 0, the batch, is always dynamic)"
        )
    return name, int(axis)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "compile",
        help="compile a model into served artifacts",
        description="Export SOURCE to ONNX (with an accuracy gate), build fp32/int8/fp16 variants, measure them, "
        "place the model on Lambda (cpu) and/or Triton (gpu), and write DIR/NAME/VERSION, "
        "DIR/triton/NAME and DIR/manifest.json.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="path to .onnx, or package.module:attr (fitted sklearn estimator/pipeline, torch nn.Module, "
        "or a zero-argument factory returning one), or a causal LM folder: Hugging Face layout (config.json with a "
        "*ForCausalLM architecture, safetensors, tokenizer.json) or built for onnxruntime-genai (genai_config.json)",
    )
    p.add_argument("--name", required=True, help="model name in the manifest")
    p.add_argument("--version", help="version (positive integer); default: next after the highest existing one")
    p.add_argument(
        "--validation",
        type=Path,
        metavar="FILE",
        help="FILE.npz: arrays keyed by input name (one array for single-input models), optional _labels; for a "
        "causal LM, FILE.txt (prompts separated by blank lines) or FILE.jsonl ({\"prompt\": ...} per line), "
        "default: a text shipped with the compiler",
    )
    p.add_argument("--calibration", type=Path, metavar="FILE.npz", help="inputs for static int8 calibration")
    p.add_argument("--example-inputs", type=Path, metavar="FILE.npz", help="example inputs for the torch exporter")
    p.add_argument(
        "--dynamic-axis",
        type=_axis,
        action="append",
        default=[],
        metavar="INPUT:AXIS",
        help="extra dynamic axis besides the batch axis, e.g. input_ids:1 (repeatable)",
    )
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="variant choice (default auto); dynamic|static|fp16 for ONNX models, int4|int8 for causal LMs")
    p.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_true",
        default=None,
        help="per-channel int8 weights (the default for int8 variants; refused with none/fp16)",
    )
    p.add_argument("--per-tensor", dest="per_channel", action="store_false", help="per-tensor int8 weights")
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, help="static calibration (default minmax)")
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        help="accuracy metric(s) overriding the task default: label_agreement, accuracy, max_abs, mean_rel, cosine",
    )
    p.add_argument("--slo-ms", type=float, help="p95 latency objective at batch 1 in milliseconds")
    p.add_argument("--slo-ttft-ms", type=float,
                   help="causal LMs: time to first token objective (ms) at a 128-token prompt")
    p.add_argument("--slo-tokens-per-s", type=float, help="causal LMs: decode tokens/s objective at batch 1")
    p.add_argument("--slo-total-ms", type=float,
                   help="causal LMs: time-to-complete objective (ms) that token-aware routing holds each tier to")
    p.add_argument("--target", choices=("cpu", "gpu", "both", "edge"),
                   help="force the placement (default: rules decide); edge: also on devices, beside the cloud tier")
    p.add_argument("--edge-profile", metavar="NAME|FILE.json",
                   help="device profile for edge placement: rpi4 (default with --target edge), rpi5, x86-small, "
                        "or a JSON file with memory_mb, cores and speed")
    p.add_argument(
        "--prices",
        type=Path,
        metavar="FILE.json",
        help="prices for the cost model (default: tierserve_compiler/prices.json)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="named option presets")
    p.add_argument("--out", type=Path, default=Path("build/models"), help="model store folder (default build/models)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_compile)


def run_compile(args: argparse.Namespace) -> int:
    from tierserve_compiler.pipeline import compile_model

    axes: dict[str, list[int]] = {}
    for name, axis in args.dynamic_axis:
        axes.setdefault(name, []).append(axis)
    try:
        cfg = make_config(
            args.source,
            args.name,
            preset=args.preset,
            version=args.version,
            out_dir=args.out,
            validation=args.validation,
            calibration=args.calibration,
            example_inputs=args.example_inputs,
            dynamic_axes=axes or None,
            quantize=args.quantize,
            per_channel=args.per_channel,
            calibration_method=args.calibration_method,
            metrics=tuple(args.metric) or None,
            slo_ms=args.slo_ms,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tokens_per_s=args.slo_tokens_per_s,
            slo_total_ms=args.slo_total_ms,
            target=args.target,
            edge_profile=args.edge_profile,
            prices=args.prices,
            progress=False if args.quiet else None,
        )
        res = compile_model(cfg)
    except CompilerError as exc:
        print(f"tierserve compile: error: {exc.message}", file=sys.stderr)
        return 2
    state = "unchanged (same content)" if res.noop else "written"
    mv = res.model_version
    print(
        f"{res.name} v{res.version} {state}: selected {mv.selected_variant}, targets {list(mv.targets)}, "
        f"report {res.version_dir / 'report.md'}"
    )
    print(res.next_steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m tierserve_compiler.cli compile ...``."""
    parser = argparse.ArgumentParser(prog="tierserve")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
