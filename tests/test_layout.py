"""The layering rules: quant/ (number formats and methods) imports nothing of runtime/ or k2cli/, and no module imports
another module's private (`_name`) names."""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("k2cli", "quant", "runtime", "tests")
CHECKED_FOLDERS = ("k2cli", "quant", "runtime", "scripts")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str, filename: str) -> list[str]:
    """`filename:line: statement` of every import of a private name, or from a private module, of our packages."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] in OUR_PACKAGES
            dotted = [(node.module or "").split("."), [alias.name for alias in node.names]]
        elif isinstance(node, ast.Import):
            ours = any(alias.name.split(".")[0] in OUR_PACKAGES for alias in node.names)
            dotted = [alias.name.split(".") for alias in node.names if alias.name.split(".")[0] in OUR_PACKAGES]
        else:
            continue
        if ours and any(is_private(part) for parts in dotted for part in parts):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


IMPORT_ALL_OF_QUANT = """
import importlib, json, pkgutil, sys, quant
imported = []
for module in pkgutil.walk_packages(quant.__path__, "quant."):
    importlib.import_module(module.name)
    imported.append(module.name)
above = sorted(name for name in sys.modules if name.split(".")[0] in ("runtime", "k2cli"))
print(json.dumps({"quant": imported, "above": above}))
"""


def test_quant_imports_nothing_of_runtime_or_the_cli():
    # A fresh interpreter: modules this pytest process imported earlier would hide an import quant/ makes.
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL_OF_QUANT], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout)
    assert {"quant.int4", "quant.fp8", "quant.methods", "quant.errors", "quant.gguf.blocks"} <= set(modules["quant"])
    assert modules["above"] == [], f"importing quant/ imported {modules['above']}"


def test_no_module_imports_another_modules_private_names():
    example = ("from runtime.a import _b, c\nimport quant._d\nfrom k2cli import __version__\n"
               "from huggingface_hub import _local_folder\nfrom quant._e import f\n")
    assert private_imports(example, "example.py") == ["example.py:1: from runtime.a import _b, c",
                                                      "example.py:2: import quant._d",
                                                      "example.py:5: from quant._e import f"]
    files = sorted(path for folder in CHECKED_FOLDERS for path in (ROOT / folder).rglob("*.py"))
    assert len(files) > 50
    found = [line for path in files for line in private_imports(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


# The DeepSeek-V3 / Kimi K2 specifics: its config keys, its model_type and class, its MoE block. A second family is
# then one module under runtime/models/, found by model_type; nothing else knows either.
FAMILY_SPECIFICS = ("kv_lora_rank", "qk_rope_head_dim", "deepseek_v3", "DeepseekV3")


def test_model_specifics_stay_in_runtime_models():
    files = sorted(path for folder in ("k2cli", "quant", "runtime") for path in (ROOT / folder).rglob("*.py")
                   if (ROOT / "runtime" / "models") not in path.parents)
    assert len(files) > 40
    found = []
    for path in files:
        source = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {word}" for word in FAMILY_SPECIFICS if word in source]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: MoE" for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Name) and node.id == "MoE" or isinstance(node, ast.Attribute) and
                  node.attr == "MoE" or isinstance(node, ast.alias) and node.name == "MoE"]
    assert found == []
