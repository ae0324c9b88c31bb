"""`k2 plan`: where every layer and expert goes, from config.json and headers, before anything is loaded."""
import json

import typer

from k2cli import options
from runtime import numa
from runtime.numa import format_id_list
from runtime.units import format_bytes, table_unit

GB = 10**9
USE_COLUMNS = ("weights", "experts", "kv_cache", "expert_cache")  # a device's *_bytes, in the table's order


def _layer_summary(entry: dict) -> str:
    parts = [f"{'+'.join(sorted(entry['components']))} on {entry['device']}"]
    if entry["experts"]:
        parts.append("experts " + ", ".join(f"{len(ids)} on {device}" for device, ids in entry["experts"].items()))
    if entry["expert_cache"]:
        parts.append(f"GPU cache of {entry['expert_cache']} streamed experts")
    return "; ".join(parts)


def print_plan(result: dict):
    setup, prediction = result["setup"], result["prediction"]
    typer.echo(f"{result['model']}: {format_bytes(result['model_bytes'])} of weights; ctx {setup['ctx']:,}, "
               f"batch {setup['batch']}, offload {setup['offload']}, {setup['stages']} stage(s)")
    for stage in result["stages"]:
        embeddings = f", embeddings on {stage['embeddings']}" if stage["embeddings"] else ""
        typer.echo(f"stage {stage['stage']}: layers {stage['first_layer']}-{stage['last_layer']}{embeddings}")
        typer.echo(f"  {'device':<8} {'budget':>10} {'weights':>10} {'experts':>10} {'kv':>9} {'cache':>9} {'free':>10}")
        rows = [(d["device"], [d["budget_bytes"], *(d[f"{c}_bytes"] for c in USE_COLUMNS)]) for d in stage["devices"]]
        rows = [(device, [*sizes, sizes[0] - sum(sizes[1:]) if sizes[0] is not None else None]) for device, sizes in rows]
        # Each column in the one unit its largest figure needs: the rows compare at a glance, small models show.
        units = [table_unit(sizes[i] for _, sizes in rows if sizes[i] is not None) for i in range(len(rows[0][1]))]
        for device, sizes in rows:
            budget, weights, experts, kv, cache, free = (format_bytes(n, unit) if n is not None else "-"
                                                         for n, unit in zip(sizes, units))
            typer.echo(f"  {device:<8} {budget:>10} {weights:>10} {experts:>10} {kv:>9} {cache:>9} {free:>10}")
        groups = []  # consecutive layers with the same placement share a line
        for entry in stage["layers"]:
            summary = _layer_summary(entry)
            if groups and groups[-1][1] == summary:
                groups[-1][0].append(entry["layer"])
            else:
                groups.append(([entry["layer"]], summary))
        for layers, summary in groups:
            typer.echo(f"  layers {format_id_list(layers):<8} {summary}")
        if stage["lm_head"]:
            typer.echo(f"  lm_head on {stage['lm_head']}")
    reads = ", ".join(f"{device} {format_bytes(nbytes)}" for device, nbytes in prediction["bytes_read_per_step"].items())
    typer.echo(f"predicted decode: {prediction['tokens_per_s']:,.1f} tok/s at batch {setup['batch']} "
               f"(reads per step: {reads})")
    a = result["assumptions"]
    typer.echo(f"assumed bandwidths: GPU {a['gpu_bandwidth']}; CPU {a['cpu_bandwidth_bytes_per_s'] / GB:g} GB/s, "
               f"MPS {a['mps_bandwidth_bytes_per_s'] / GB:g}, disk {a['disk_bandwidth_bytes_per_s'] / GB:g}, "
               f"PCIe {a['pcie_bandwidth_bytes_per_s'] / GB:g}, network {a['network_bandwidth_bytes_per_s'] / GB:g} "
               "(override with --gpu-bw, --cpu-bw, --mps-bw, --disk-bw)")
    typer.echo(f"this machine: {numa.describe(result['numa_nodes'])}")


def plan(model: str = options.MODEL,
         gpu: list[str] = options.size_option([], "--gpu", "A GPU's memory, repeatable or counted: --gpu 80GiB, "
                                                           "--gpu 8x141G."),
         cpu_mem: str = options.size_option(None, "--cpu-mem", "Host RAM for weights, e.g. 512GiB."),
         mps: str = options.size_option(None, "--mps", "Apple-silicon unified memory, e.g. 512GiB (75% is "
                                                       "GPU-wireable)."),
         ctx: int = typer.Option(4096, "--ctx", min=1, help="Context length the KV cache is sized for."),
         batch: int = options.BATCH,
         stages: int = typer.Option(1, "--stages", min=1, help="Pipeline hosts, each with the devices given."),
         offload: str = typer.Option("auto", "--offload",
                                     help="Routed experts: auto (hottest on GPU, rest CPU), cpu (all on CPU), "
                                          "stream (CPU, copied to a GPU cache on demand), none (all with their layer)."),
         expert_stats: str = typer.Option(None, "--expert-stats", help="Routing counts recorded by a run, to keep the "
                                                                        "most used experts on the GPU."),
         gpu_bw: float = typer.Option(None, "--gpu-bw", help="GPU memory bandwidth in GB/s (default: from its size)."),
         cpu_bw: float = typer.Option(200, "--cpu-bw", help="CPU memory bandwidth in GB/s."),
         mps_bw: float = typer.Option(600, "--mps-bw", help="Apple-silicon memory bandwidth in GB/s."),
         disk_bw: float = typer.Option(5, "--disk-bw", help="Disk read bandwidth in GB/s, for experts left on disk."),
         margin: float = typer.Option(0.05, "--margin", min=0, max=0.9, help="Fraction of every memory kept free."),
         as_json: bool = options.JSON):
    """Plan where every layer and expert goes and predict decode speed, from config.json and headers only."""
    from runtime.loader import load
    from runtime.placement import HostSpec, make_plan, parse_gpus
    from runtime.units import parse_size

    host = HostSpec(gpus=parse_gpus(gpu), cpu_mem=parse_size(cpu_mem, "--cpu-mem") if cpu_mem is not None else 0,
                    mps=parse_size(mps, "--mps") if mps is not None else 0,
                    gpu_bandwidth=gpu_bw * GB if gpu_bw else None, cpu_bandwidth=cpu_bw * GB, mps_bandwidth=mps_bw * GB,
                    disk_bandwidth=disk_bw * GB, margin=margin)
    result = make_plan(load(model, weights=False), host, stages=stages, ctx=ctx, batch=batch, offload=offload,
                       expert_stats=expert_stats)
    result["numa_nodes"] = [n.as_dict() for n in numa.nodes()]  # this machine's, whatever host the plan is for
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        print_plan(result)
