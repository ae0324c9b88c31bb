"""One size rule for every size flag and one way to print bytes (runtime/units.py), and the commands reading by it."""
import json
import re

import gguf
import pytest

from runtime.errors import K2Error
from runtime.units import UNIT_BYTES, format_bytes, parse_size
from tests.helpers import assert_one_line_error, run_k2_here

SIZES = {
    "80": 80, "3B": 3, "0": 0, " 7 ": 7,
    "1K": 1000, "1KB": 1000, "1.1K": 1100, ".5k": 500, "2KiB": 2048, "2Ki": 2048,
    "1M": 10**6, "1MB": 10**6, "1MiB": 2**20, "1mib": 2**20, "1.5M": 1_500_000, "1.5MiB": 1_572_864,
    "80G": 80 * 10**9, "80 GB": 80 * 10**9, "5GB": 5 * 10**9, "80GiB": 80 * 2**30, "512gib": 512 * 2**30,
    "1.5T": 1_500_000_000_000, "1TiB": 2**40, "1.50 GiB": 3 * 2**29,
}
BAD_SIZES = ["1X", "-1G", "", "G", "GiB", "1iB", "1.2.3G", "1GG", "1e9", "ten", "1 G i B"]


@pytest.mark.parametrize("text", SIZES)
def test_size_rule(text):
    assert parse_size(text, "--gpu") == SIZES[text]


@pytest.mark.parametrize("text", BAD_SIZES)
def test_unreadable_size_is_a_one_line_error_naming_flag_and_value(text):
    with pytest.raises(K2Error) as error:
        parse_size(text, "--split-max-size")
    message = str(error.value)
    assert "\n" not in message and f"--split-max-size {text!r}" in message and "80GiB" in message


def test_bytes_print_in_binary_units_and_read_back_the_same():
    printed = {0: "0 B", 900: "900 B", 1023: "1023 B", 1024: "1.00 KiB", 10**6: "976.56 KiB",
               512 * 2**20: "512.00 MiB", 3 * 2**29: "1.50 GiB", 1917 * 2**30: "1,917.00 GiB"}
    assert {n: format_bytes(n) for n in printed} == printed
    assert format_bytes(75 * 2**30, "GiB") == "75.0GiB" and format_bytes(0, "GiB") == "0.0GiB"
    for nbytes in (900, 3 * 2**29, 512 * 2**20):
        assert parse_size(format_bytes(nbytes), "--gpu") == nbytes


def test_plan_reads_memory_sizes_by_the_rule(demo_dir):
    result = run_k2_here("plan", demo_dir, "--gpu", "1.5G", "--gpu", "2x1.5GiB", "--cpu-mem", "64G", "--json")
    assert result.returncode == 0, result.stderr
    setup = json.loads(result.stdout)["setup"]
    assert setup["gpus"] == [1_500_000_000, 1_610_612_736, 1_610_612_736] and setup["cpu_mem"] == 64 * 10**9


def test_plan_table_prints_each_column_in_a_unit_its_sizes_reach(demo_dir):
    """A 5 MiB model on a 5G GPU: the table's figures read back as the JSON's bytes (to the printed digit), and no
    column of non-zero sizes prints as all zeros (it used to print 0.0GiB for everything)."""
    args = ("plan", demo_dir, "--gpu", "5G", "--cpu-mem", "6G")
    table, plan = run_k2_here(*args), run_k2_here(*args, "--json")
    assert table.returncode == 0 and plan.returncode == 0, table.stderr + plan.stderr
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["device", "budget"])
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:header + 3]}
    devices = json.loads(plan.stdout)["stages"][0]["devices"]
    columns = ("budget", "weights", "experts", "kv_cache", "expert_cache")
    for column in range(len(columns)):
        printed = [rows[d["device"]][column] for d in devices]
        truth = [d[f"{columns[column]}_bytes"] for d in devices]
        unit = re.sub(r"[\d.,]", "", printed[0])
        assert all(abs(parse_size(text.replace(",", ""), "t") - nbytes) <= UNIT_BYTES[unit] * 0.05 + 1
                   for text, nbytes in zip(printed, truth)), (columns[column], printed, truth)
        assert any(parse_size(text.replace(",", ""), "t") > 0 for text in printed) == any(truth), (printed, truth)


def split_limit_bounds(files: list[str]) -> tuple[int, int]:
    """[low, high) that a split limit must lie in to cut these GGUF files where they are cut: gguf-py starts a new
    file when the next tensor would take the current one past the limit."""
    tensor_bytes = [[int(t.n_bytes) for t in gguf.GGUFReader(f).tensors] for f in files]
    sums = [sum(sizes) for sizes in tensor_bytes]
    return max(sums), min(s + after[0] for s, after in zip(sums[:-1], tensor_bytes[1:]))


@pytest.mark.parametrize("text, nbytes, other_reading", [("1.5M", 1_500_000, 1_572_864),
                                                          ("1.5MiB", 1_572_864, 1_500_000)])
def test_quantize_and_convert_read_the_same_size_the_same_way(demo_dir, tmp_path, text, nbytes, other_reading):
    quantized = run_k2_here("quantize", demo_dir, tmp_path / "int4", "--int4", "--max-shard-size", text,
                            "--report", tmp_path / "report.json")
    assert quantized.returncode == 0, quantized.stderr
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["max_shard_bytes"] == nbytes
    converted = run_k2_here("convert", demo_dir, tmp_path / "demo.gguf", "--to", "gguf", "--split-max-size", text,
                            "--json")
    assert converted.returncode == 0, converted.stderr
    low, high = split_limit_bounds(json.loads(converted.stdout)["output"])
    assert low <= nbytes < high and not low <= other_reading < high, (low, high)


def test_every_size_flag_refuses_an_unreadable_size_in_one_line(demo_dir, tmp_path):
    assert_one_line_error(run_k2_here("plan", demo_dir, "--gpu", "1X"), "--gpu '1X'")
    assert_one_line_error(run_k2_here("plan", demo_dir, "--gpu", "80G", "--cpu-mem", "-1G"), "--cpu-mem '-1G'")
    assert_one_line_error(run_k2_here("plan", demo_dir, "--mps", "G"), "--mps 'G'")
    assert_one_line_error(run_k2_here("quantize", demo_dir, tmp_path / "q", "--int4", "--max-shard-size", ""),
                          "--max-shard-size ''")
    assert_one_line_error(run_k2_here("convert", demo_dir, tmp_path / "c.gguf", "--to", "gguf", "--split-max-size", "1X"),
                          "--split-max-size '1X'")
