"""`tierserve models rollout`'s options (tierserve_tools.rollout_driver): a text-generation version's TTFT p99 bound
and tokens/s ratio (issue 18), with their defaults, reach the rollout recorded in DynamoDB (moto)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tests.support.lifecycle import version
from tierserve.lifecycle.objects import FolderObjects
from tierserve.lifecycle.registry import Registry
from tierserve.lifecycle.rollout import DynamoRollouts
from tierserve_tools.rollout_driver import add_arguments, run_rollout


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p.add_subparsers())
    return p.parse_args(["rollout", *argv])


@pytest.fixture
def table(runtime_env):
    import boto3
    from moto import mock_aws

    from tierserve_tools.stack_ops import create_rollout_table

    with mock_aws():
        create_rollout_table(boto3.client("dynamodb", region_name="us-east-1"), "rollouts")
        yield "rollouts"


def registry(tmp_path, generative: bool) -> Registry:
    from tests.support.genai_models import GENAI_INPUTS, GENAI_OUTPUTS
    from tierserve.manifest import ExternalFile, GenerationSpec

    reg = Registry(FolderObjects(tmp_path / "store"), actor="test")
    for v in ("1", "2"):
        mv = version("g", v)
        if generative:
            variant = dataclasses.replace(mv.variants["fp32"], path=f"g/{v}/fp32/model.onnx", external_data=(
                ExternalFile(f"g/{v}/fp32/genai_config.json", "0" * 64, 1),))
            mv = dataclasses.replace(mv, inputs=GENAI_INPUTS, outputs=GENAI_OUTPUTS, task="text-generation",
                                     variants={"fp32": variant},
                                     generation=GenerationSpec(context_length=64, eos_token_ids=(2,)))
        reg.publish(mv)
    return reg


def test_the_generation_thresholds_default_and_are_recorded_with_the_rollout(table, tmp_path, capsys):
    args = parse("g", "2", "--table", table, "--unattended")
    assert (args.max_ttft_p99_ms, args.min_tokens_per_s_ratio) == (2000.0, 0.8)
    reg = registry(tmp_path, generative=True)
    assert run_rollout(parse("g", "2", "--table", table, "--unattended", "--max-ttft-p99-ms", "750",
                             "--min-tokens-per-s-ratio", "0.9"), reg.objects, reg) == 0
    t = DynamoRollouts(table).get("g").thresholds
    assert (t.max_ttft_p99_ms, t.min_tokens_per_s_ratio) == (750.0, 0.9)
    assert "max TTFT p99 750 ms, min tokens/s 0.9x the default's" in capsys.readouterr().out


def test_other_models_print_no_generation_thresholds(table, tmp_path, capsys):
    reg = registry(tmp_path, generative=False)
    assert run_rollout(parse("g", "2", "--table", table, "--unattended"), reg.objects, reg) == 0
    assert "TTFT" not in capsys.readouterr().out


def test_a_ratio_outside_0_to_1_is_refused_before_anything_is_recorded(table, tmp_path):
    from tierserve.errors import LifecycleError

    reg = registry(tmp_path, generative=True)
    with pytest.raises(LifecycleError, match="within \\[0, 1\\]"):
        run_rollout(parse("g", "2", "--table", table, "--unattended", "--min-tokens-per-s-ratio", "80"),
                    reg.objects, reg)
    assert DynamoRollouts(table).get("g") is None and reg.entry("g").canary is None
