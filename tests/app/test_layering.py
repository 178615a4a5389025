"""The shape the service keeps: a core that knows no web framework, an HTTP layer that knows no
ONNX Runtime, and modules that build nothing when imported."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT

APP = ROOT / "app"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules_under(folder: str) -> list[Path]:
    return sorted((APP / folder).rglob("*.py"))


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("path", modules_under("serving"), ids=lambda p: str(p.relative_to(APP)))
def test_the_core_imports_no_web_framework(path):
    frameworks = {name for name in imported_modules(path) if name.split(".")[0] in {"fastapi", "starlette", "uvicorn"}}
    assert not frameworks, f"{path.name} imports {frameworks}"


@pytest.mark.parametrize("path", modules_under("http"), ids=lambda p: str(p.relative_to(APP)))
def test_the_http_layer_never_reaches_the_runtime(path):
    source = path.read_text()
    assert not any(name.split(".")[0] == "onnxruntime" for name in imported_modules(path))
    assert ".session" not in source and ".batcher" not in source, f"{path.name} reaches into a model"


def test_importing_the_whole_core_loads_no_web_framework():
    loaded = run_python(
        "import sys, app.serving.services, app.serving.service, app.sizing; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'uvicorn', 'torch'}))"
    )
    assert loaded.strip() == "[]"


def test_importing_the_app_module_builds_nothing():
    """``app.main`` builds its app when uvicorn asks for ``app``, not at import."""
    built = run_python(
        "import app.main, app.http.app as factory, app.serving.services as wiring\n"
        "calls = []\n"
        "original = wiring.build\n"
        "wiring.build = lambda *a, **k: calls.append(1) or original(*a, **k)\n"
        "import importlib; importlib.reload(app.main)\n"
        "print(len(calls), app.main._app.cache_info().currsize)\n"
        "app.main.app\n"
        "print(len(calls), app.main._app.cache_info().currsize)\n"
    )
    assert built.split() == ["0", "0", "1", "1"]


@pytest.mark.parametrize(
    "path", [p for p in sorted(APP.rglob("*.py")) if "rayserve" not in p.parts], ids=lambda p: str(p.relative_to(APP))
)
def test_only_the_ray_adapter_imports_ray(path):
    """Ray is an optional extra: the service without it is unchanged."""
    assert not any(name.split(".")[0] == "ray" for name in imported_modules(path)), f"{path.name} imports ray"


def test_serving_and_its_command_line_load_no_ray():
    loaded = run_python(
        "import sys, app.main, app.cli, app.process.server; app.cli.parse_args(['ray', '--replicas', '2']); "
        "print('ray' in {m.split('.')[0] for m in sys.modules})"
    )
    assert loaded.strip() == "False"
