"""Model folders from untrusted sources: a broken safetensors header (the safetensors library refuses the same file)
or an index naming a shard outside the folder is one error line naming the shard and tensor, never a crash."""
import json
import os
import shutil
import struct

import pytest
from safetensors import safe_open

from runtime.checkpoint import INDEX_FILE, Checkpoint
from runtime.errors import K2Error
from runtime.loading import load_model
from tests.helpers import assert_one_line_error, copy_checkpoint, run_k2_here

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only stalls

SHARD = "model-00001-of-00003.safetensors"


def read_header(shard) -> tuple[dict, bytes]:
    """A shard's JSON header and its tensor data, as the safetensors format lays them out."""
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def edit_header(shard, change):
    """Rewrite a shard's JSON header with `change(header)`, its tensor data left as it was."""
    header, data = read_header(shard)
    text = json.dumps(change(header)).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data)


def by_offset(header: dict) -> list[str]:
    return sorted((name for name in header if name != "__metadata__"), key=lambda name: header[name]["data_offsets"])


def first_tensor(header: dict) -> str:
    return by_offset(header)[0]


def without(key):
    def change(header):
        del header[first_tensor(header)][key]
        return header
    return change


def moved(by):
    def change(header):
        name = first_tensor(header)
        header[name]["data_offsets"] = [offset + by for offset in header[name]["data_offsets"]]
        return header
    return change


def overlapping(header):
    """The second tensor's range starts inside the first's."""
    first, second = by_offset(header)[:2]
    start, end = header[second]["data_offsets"]
    shift = header[first]["data_offsets"][1] - 2 - start
    header[second]["data_offsets"] = [start + shift, end + shift]
    return header


BROKEN_HEADERS = {
    "a JSON list": (lambda header: [header], "safetensors header: expected an object"),
    "no data_offsets": (without("data_offsets"), "data_offsets: missing"),
    "no dtype": (without("dtype"), "dtype: missing"),
    "no shape": (without("shape"), "shape: missing"),
    "a shape of text": (lambda h: (h[first_tensor(h)].update(shape="16"), h)[1], "shape: expected a list, got '16'"),
    "offsets past the file": (moved(1 << 30), "is truncated"),
    "overlapping tensors": (overlapping, "share bytes of the file"),
}


@pytest.mark.parametrize("case", BROKEN_HEADERS)
def test_a_broken_header_names_the_shard_and_tensor(demo_dir, tmp_path, case):
    change, message = BROKEN_HEADERS[case]
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    header, _ = read_header(folder / SHARD)
    named = {"a JSON list": [], "overlapping tensors": by_offset(header)[:2]}.get(case, [first_tensor(header)])
    edit_header(folder / SHARD, change)
    with pytest.raises(Exception):  # the safetensors library refuses the file too
        with safe_open(folder / SHARD, framework="pt") as f:
            [f.get_tensor(name) for name in f.keys()]
    with pytest.raises(K2Error) as error:
        Checkpoint.open(folder)
    assert str(error.value).startswith(SHARD) and message in str(error.value), str(error.value)
    assert all(name in str(error.value) for name in named), str(error.value)


def test_the_cli_refuses_a_broken_header_in_one_line(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    edit_header(folder / SHARD, without("data_offsets"))
    assert_one_line_error(run_k2_here("info", folder), SHARD, "data_offsets: missing")


def point_index(folder, name: str, shard: str):
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"][name] = shard
    (folder / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["../other/{shard}", "{outside}/{shard}", "sub/../../other/{shard}"])
def test_an_index_naming_a_shard_outside_the_folder(demo_dir, tmp_path, where):
    """A real shard lies there, holding the tensor: a loader that followed the path would read it."""
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    outside = tmp_path / "other"
    outside.mkdir()
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    shutil.copy(folder / shard, outside / shard)
    named = where.format(shard=shard, outside=outside)
    point_index(folder, "model.norm.weight", named)
    with pytest.raises(K2Error, match="is not a file name inside the model folder"):
        Checkpoint.open(folder)
    assert_one_line_error(run_k2_here("info", folder), str(folder / INDEX_FILE), "model.norm.weight", repr(named))


def test_shards_linked_into_a_hub_cache_snapshot_load(demo_dir, tmp_path):
    """The Hugging Face cache stores a snapshot's files as links to ../../blobs: what the index names is a plain
    file name in the folder, wherever the link points."""
    blobs, snapshot = tmp_path / "models--k2" / "blobs", tmp_path / "models--k2" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(demo_dir.iterdir())):
        shutil.copy(path, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / path.name)
    model = load_model(snapshot)
    assert not model.model.norm.weight.is_meta
