"""`python tests/scripted_k2.py ARGS...`: the `k2` command with the scripted test model's family registered, so a test
runs a real `k2 serve` or `k2 chat` process on a folder tests/scripted_model.py `write_scripted` wrote. Run from
anywhere, PYTHONPATH unset: the repository root is put on sys.path from this file's place."""
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
FAMILY_MODULE = "tests.scripted_model"


def command(*args) -> list[str]:
    """The argv of a `k2 ARGS...` process on the scripted family, for subprocess."""
    return [sys.executable, str(SCRIPT), *map(str, args)]


def main(args: list[str] | None = None):
    from k2cli.main import main as k2_main
    from runtime.models import register_family

    register_family(FAMILY_MODULE)
    k2_main(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a file, sys.path starts at tests/, where neither k2cli nor tests is found
    main()
