"""tierserve_tools.reach: the modules a handler can import, which is what its artifact ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierserve_tools.reach import ReachError, reachable, template_functions

ROOT = Path(__file__).resolve().parents[3]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def pkg(tmp_path) -> Path:
    return _tree(tmp_path, {
        "tierserve/__init__.py": "",
        "tierserve/handlers/__init__.py": "",
        "tierserve/handlers/fn.py": (
            "from __future__ import annotations\n"
            "from typing import TYPE_CHECKING\n"
            "import numpy\n"
            "from tierserve import core\n"
            "from ..errors import Oops\n"
            "if TYPE_CHECKING:\n"
            "    from tierserve import typing_only\n"
            "else:\n"
            "    from tierserve import runtime_else\n"
            "def handler(event, context):\n"
            "    from tierserve.backends import lazy\n"
            "    return lazy\n"),
        "tierserve/core.py": "import importlib\nX = importlib.import_module('tierserve.plugins.dyn')\n",
        "tierserve/errors.py": "class Oops(Exception):\n    pass\n",
        "tierserve/runtime_else.py": "",
        "tierserve/typing_only.py": "import heavy_thing\n",
        "tierserve/backends/__init__.py": "from . import base\n",
        "tierserve/backends/base.py": "",
        "tierserve/backends/lazy.py": "def gen():\n    import onnxruntime_genai\n    import json\n",
        "tierserve/plugins/__init__.py": "",
        "tierserve/plugins/dyn.py": "__import__('jinja2')\n",
        "tierserve/unreached.py": "import tierserve.core\n",
        "tierserve/edge/__init__.py": "",
    })


def test_a_handler_reaches_lazy_imports_importlib_literals_and_package_inits(pkg):
    found = reachable(pkg, "tierserve.handlers.fn.handler")
    assert set(found.modules) == {
        "tierserve", "tierserve.handlers", "tierserve.handlers.fn", "tierserve.core", "tierserve.errors",
        "tierserve.runtime_else",  # the `else:` of TYPE_CHECKING runs
        "tierserve.backends", "tierserve.backends.base",  # the package's __init__ and what it imports
        "tierserve.backends.lazy",  # imported inside a function
        "tierserve.plugins", "tierserve.plugins.dyn",  # importlib.import_module("literal")
    }
    assert "tierserve.typing_only" not in found.modules  # never runs
    assert found.third_party == {"numpy", "onnxruntime_genai", "jinja2"}  # lazy ones too; json is stdlib
    assert found.why("tierserve.plugins.dyn") == ["tierserve.handlers.fn", "tierserve.core", "tierserve.plugins.dyn"]
    assert Path("tierserve/backends/lazy.py") in found.files()


def test_a_name_imported_from_a_module_is_not_a_module_but_a_missing_module_is_an_error(pkg):
    (pkg / "tierserve" / "handlers" / "broken.py").write_text("import tierserve.nowhere\n")
    with pytest.raises(ReachError, match=r"tierserve\.nowhere"):
        reachable(pkg, "tierserve.handlers.broken.handler")
    with pytest.raises(ReachError, match=r"no module tierserve\.handlers\.absent"):
        reachable(pkg, "tierserve.handlers.absent.handler")


def test_template_functions_reads_every_function_and_its_handler():
    text = (
        "Globals:\n  Function:\n    Runtime: python3.12\n"
        "Resources:\n"
        "  Bucket:\n    Type: AWS::S3::Bucket\n"
        "  RouterFunction:\n    Type: AWS::Serverless::Function\n    Metadata:\n      BuildMethod: makefile\n"
        "    Properties:\n      Handler: tierserve.handlers.router.lambda_handler # the API\n"
        "  CpuFn3538:  # a memory class\n    Type: AWS::Serverless::Function\n    Condition: HasIt\n"
        "    Properties:\n      Environment:\n        Variables:\n          X: !Ref Y\n"
        "      Handler: 'tierserve.handlers.cpu.lambda_handler'\n"
        "Outputs:\n  Api:\n    Value: x\n"
    )
    assert template_functions(text) == {"RouterFunction": "tierserve.handlers.router.lambda_handler",
                                        "CpuFn3538": "tierserve.handlers.cpu.lambda_handler"}
    with pytest.raises(ReachError, match="no literal Handler"):
        template_functions("Resources:\n  F:\n    Type: AWS::Serverless::Function\n")


def test_an_exec_wrapper_belongs_to_the_resource_it_is_under():
    from tierserve_tools.reach import exec_wrappers

    text = ("Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      Handler: a.b\n"
            "      Environment:\n        Variables:\n          AWS_LAMBDA_EXEC_WRAPPER: '/var/task/w.sh' # loop\n"
            "  G:  # none\n    Type: AWS::Serverless::Function\n    Properties:\n      Handler: a.c\n"
            "Outputs:\n  H:\n    Value: x\n    AWS_LAMBDA_EXEC_WRAPPER: /var/task/not-a-resource.sh\n")
    assert exec_wrappers(text) == {"F": "/var/task/w.sh"}
    assert template_functions(text) == {"F": "a.b", "G": "a.c"}


def test_the_real_handlers_reach_no_emulation_and_no_edge_runtime():
    functions = template_functions((ROOT / "template.yaml").read_text())
    assert "CpuInferenceFunction3538" in functions
    for handler in set(functions.values()):
        found = reachable(ROOT / "functions", handler)
        edge = [m for m in found.modules if m.startswith("tierserve.edge")]
        assert not edge, f"{handler} reaches the edge runtime: {found.why(edge[0])}"
        assert not found.third_party & {"tierserve_tools", "tierserve_compiler", "benchmarks"}


def test_the_streaming_functions_name_the_exec_wrapper_that_ships_in_their_artifact(tmp_path):
    from tierserve_tools.reach import exec_wrappers, wrapper_file

    # Given the template: RouterFunction and every CPU class function start the streaming runtime loop
    wrappers = exec_wrappers((ROOT / "template.yaml").read_text())
    assert set(wrappers) == {"RouterFunction", "CpuInferenceFunction", "CpuInferenceFunction3538",
                             "CpuInferenceFunction5307", "CpuInferenceFunction10240"}
    assert set(wrappers.values()) == {"/var/task/tierserve/streaming/wrapper.sh"}
    # Then the file each names is the artifact's (relative to functions/), and it exists
    rel = wrapper_file(ROOT / "template.yaml", "RouterFunction", ROOT / "functions")
    assert rel is not None and rel.as_posix() == "tierserve/streaming/wrapper.sh"
    assert wrapper_file(ROOT / "template.yaml", "BatchInferenceFunction", ROOT / "functions") is None
    # And a wrapper outside /var/task, or missing, is a build error naming it
    bad = tmp_path / "t.yaml"
    bad.write_text("Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      Handler: a.b\n"
                   "      Environment:\n        Variables:\n          AWS_LAMBDA_EXEC_WRAPPER: /opt/w.sh\n"
                   "  G:\n    Type: AWS::Serverless::Function\n    Properties:\n      Handler: a.b\n"
                   "      Environment:\n        Variables:\n          AWS_LAMBDA_EXEC_WRAPPER: /var/task/nope.sh\n")
    with pytest.raises(ReachError, match=r"/opt/w\.sh is not in the artifact"):
        wrapper_file(bad, "F", tmp_path)
    with pytest.raises(ReachError, match=r"no nope\.sh under"):
        wrapper_file(bad, "G", tmp_path)
