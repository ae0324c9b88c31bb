"""Turn the MODEL argument of every command into a folder or a GGUF file: a path, a repo id already in the HF cache,
or `demo`."""
import os
import sys
from pathlib import Path

from runtime.errors import K2Error

DEMO = "demo"
DEMO_VERSION = 2  # bump when the demo's weights, config or layout change, so stale caches are not reused (2: trained)


def k2_cache_dir() -> Path:
    if os.environ.get("K2_HOME"):
        return Path(os.environ["K2_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "k2"


def demo_dir() -> Path:
    """The demo checkpoint in the user's cache, written on first use."""
    folder = k2_cache_dir() / f"demo-v{DEMO_VERSION}"
    if not (folder / "config.json").exists():
        from runtime.models import write_demo

        print(f"k2: writing the demo checkpoint to {folder} (first use)", file=sys.stderr)
        try:
            write_demo(folder)
        except OSError:
            if not (folder / "config.json").exists():  # another process may have just written it
                raise
    return folder


def resolve_model(spec: str) -> Path:
    if spec == DEMO:
        return demo_dir()
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix != ".gguf":
            raise K2Error(f"{spec} is a file; MODEL is a model folder, a .gguf file, a Hugging Face repo id, or 'demo'")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id=spec, local_files_only=True))
        except (LocalEntryNotFoundError, ValueError, OSError):
            raise K2Error(f"{spec} is not in the Hugging Face cache (download it first: k2 download {spec})") from None
    raise K2Error(f"{spec}: no such folder or file (MODEL is a model folder, a .gguf file, a Hugging Face repo id, or "
                  "'demo')")
