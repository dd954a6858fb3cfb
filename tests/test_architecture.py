"""The codebase's shape, checked: every registered family is tested, the runtime and the shared decoder name no
family, the converter and the runtime meet only in the bundle format, and running a bundle never imports the
converter's ONNX dependency. numpy-only: runs without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm import models
from edgellm.modeling.family import TextFamily, VisionLanguageFamily
from helpers import TEXT_MODELS

PACKAGE = Path(models.__file__).parent.parent
TESTS = Path(__file__).parent


def sources(*parts: str) -> list[Path]:
    found = []
    for part in parts:
        path = PACKAGE / part
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return found


def edgellm_imports(path: Path, tree: ast.AST | None = None) -> set[str]:
    """The edgellm modules `path` imports, as dotted names relative to the package (e.g. "convert.graph")."""
    package = ".".join(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("edgellm"):
                module = node.module.removeprefix("edgellm").lstrip(".")
            else:
                continue
            found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("edgellm").lstrip(".") for a in node.names if a.name.startswith("edgellm"))
    return found


def test_every_family_is_registered_typed_and_tested():
    families = models.families()
    assert {f.name for f in families} == set(models.names())
    text = {f.name for f in families if isinstance(f, TextFamily)}
    vision = {f.name for f in families if isinstance(f, VisionLanguageFamily)}
    assert text | vision == set(models.names()) and text and vision
    assert set(TEXT_MODELS) == text  # a tiny model per text family (test_text_models, test_gguf)
    for name in vision:  # a test file per vision-language family, named after it
        assert (TESTS / f"test_{name}.py").is_file(), f"vision-language family {name} has no tests/test_{name}.py"
    architectures = [a for f in families for a in f.architectures]
    assert len(architectures) == len(set(architectures))  # one family per architecture
    for f in families:
        assert models.family_for(f.architectures[0]) is f


def test_an_unknown_family_or_architecture_is_a_clear_error():
    from edgellm.errors import EdgeLLMError

    with pytest.raises(EdgeLLMError, match="unknown model family 'phi9'.*a newer edgellm"):
        models.get("phi9")
    with pytest.raises(EdgeLLMError, match="unknown architecture 'Phi9ForCausalLM'; .*convert --list"):
        models.family_for("Phi9ForCausalLM")
    with pytest.raises(EdgeLLMError, match="nearest supported is Qwen2ForCausalLM \\(family qwen2"):
        models.family_for("Qwen2MoeForCausalLM")
    table = models.family_table()  # `edgellm convert --list`
    for family in models.families():
        assert family.name in table and all(a in table for a in family.architectures)
    with pytest.raises(EdgeLLMError, match="unknown GGUF architecture 'phi9'; edgellm reads: .*llama"):
        models.gguf_family("phi9")


def test_the_runtime_and_the_shared_decoder_name_no_family():
    stems = sorted({re.sub(r"[0-9_].*$", "", name) for name in models.names()})  # llama, qwen, gemma, internvl
    assert {"llama", "qwen", "gemma", "internvl"} <= set(stems)
    pattern = re.compile("|".join(stems), re.IGNORECASE)
    for path in sources("runtime", "format", "vision", "modeling/decoder.py", "modeling/family.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line.replace("llama.cpp", "")), f"{path.relative_to(PACKAGE)}:{number}: {line}"


def imports_at_load(path: Path) -> set[str]:
    """edgellm_imports(path) less those under `if TYPE_CHECKING:` (annotations only: they load nothing)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = [ast.Pass()]
    return edgellm_imports(path, tree)


def test_the_package_parts_import_each_other_without_a_cycle():
    """Between the package's parts (a subpackage or a top-level module), imports run one way: what two parts share
    lives below both (e.g. `checkpoint`, which the families and the converter both read), never in one of them."""
    parts: dict[str, set[str]] = {}
    for path in sources("."):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        parts.setdefault(part, set()).update(m.split(".")[0] or "__init__" for m in imports_at_load(path))
    for part, uses in parts.items():
        uses.discard(part)
    order: list[str] = []  # a topological order, found by peeling off parts that use only placed ones
    while len(order) < len(parts):
        ready = sorted(p for p, uses in parts.items() if p not in order and uses <= set(order))
        left = {p: sorted(u - set(order)) for p, u in parts.items() if p not in order}
        assert ready, f"an import cycle among: {left}"
        order += ready
    assert order.index("models") < order.index("convert") and order.index("checkpoint") < order.index("models")


def test_converter_and_runtime_meet_only_in_the_bundle_format():
    for path in sources("runtime"):
        assert not {m for m in edgellm_imports(path) if m.split(".")[0] == "convert"}, path
    for path in sources("convert", "format"):
        assert not {m for m in edgellm_imports(path) if m.split(".")[0] == "runtime"}, path
    for path in sources("format"):  # the format stands alone
        assert {m.split(".")[0] for m in edgellm_imports(path)} <= {"format", "errors"}, path
    for path in sources("kernels"):  # so do the kernels, which the runtime swaps into its sessions
        assert {m.split(".")[0] for m in edgellm_imports(path)} <= {"kernels", "errors"}, path


def test_families_share_behaviour_through_named_blocks_not_borrowed_methods():
    """A family's class never takes a method from another class by assignment (`gate_up = other.Model.gate_up`):
    what families share is a mixin of modeling/blocks.py, named and documented there."""
    for path in sources("models"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.Assign) and isinstance(item.value, ast.Attribute) and \
                            isinstance(item.value.value, ast.Attribute):
                        raise AssertionError(f"{path.relative_to(PACKAGE)}:{item.lineno}: {ast.unparse(item)}")


def test_no_protocol_lookups_by_attribute_name():
    """Families and processors are typed records and base classes: nothing is found with hasattr/getattr (only the
    platform's own features are probed)."""
    for path in sources("."):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr",
                                                                                                    "getattr"):
                probed = node.args[0]
                assert isinstance(probed, ast.Name) and probed.id in ("os", "mmap"), \
                    f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}"


def test_a_family_module_imports_no_onnx():
    """Family code builds graphs through the builder it is handed, so the runtime can import a family for its
    processor without the converter's dependencies."""
    code = ("import sys; import edgellm.models as m; [m.get(n) for n in m.names()]; "
            "bad = [k for k in sys.modules if k == 'onnx' or k.startswith(('onnx.', 'edgellm.convert.graph', 'gguf'))];"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_numpy_only_tests_run_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(TESTS / 'test_format.py')!r}, "
            f"{str(TESTS / 'test_quantize.py')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_the_readme_is_a_manual_that_lists_every_family():
    readme = (PACKAGE.parent / "README.md").read_text()
    in_code = False
    for number, line in enumerate(readme.splitlines(), 1):
        in_code ^= line.startswith("```")
        if not in_code and not line.startswith("|"):  # prose in ordinary line lengths; tables and code as they are
            assert len(line) <= 120, f"README.md:{number} is {len(line)} characters long"
    table = readme[readme.index("## Supported models"):]
    for name in models.names():
        assert f"`{name}`" in table or f"`{name}/`" in table, f"README's models table lacks {name}"


def test_every_package_folder_is_a_regular_package():
    """setuptools' find_packages skips folders without __init__.py: a wheel would ship without them."""
    for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        if any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder.relative_to(PACKAGE.parent)} has no __init__.py"


def test_convert_lists_the_families(capsys):
    from edgellm.cli import main

    assert main(["convert", "--list"]) == 0
    out = capsys.readouterr().out
    assert "MistralForCausalLM" in out and "GGUF `qwen3`" in out and "vision-language" in out
    assert main(["convert", "-o", "somewhere"]) == 2
    assert "edgellm convert -m MODEL -o BUNDLE" in capsys.readouterr().err


def test_the_cli_reference_is_written_from_the_parser():
    from edgellm.cli_reference import reference

    written = (PACKAGE.parent / "docs" / "cli.md").read_text()
    assert written == reference(), "docs/cli.md is stale: python -m edgellm.cli_reference > docs/cli.md"
