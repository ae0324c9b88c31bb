"""`k2 qat`: short quantization-aware training, exported in Kimi K2-Thinking's INT4 format.

K2-Thinking's INT4 loses nothing because Moonshot trained the weights on the grid. Here the weights `k2 quantize
--int4` would quantize (the scope's, chosen by the quantizer's own `Roles`) become trainable float32 latents that the
model sees through the grid: the forward computes with `fake_quant_int4(latent)`, the packer's own scales and
rounding, and the gradient passes straight through. Everything else is frozen. The loss is KL(teacher || student) at
every position, the teacher being the model with its original weights: the same modules, their grid
parametrization switched to the frozen originals, so the teacher costs one copy of the trained weights, not a second
model. Adam keeps two float32 states per trained weight and nothing for the rest. Its step size is in units of each
tensor's mean quantization step, so one setting suits any model's weight scale, and it decays on a cosine to zero.

The export writes the latents' grid values (float32, exactly q * scale) with the frozen tensors as a plain checkpoint
in OUT/.k2-qat-export, which `k2 quantize`'s round-to-nearest turns into OUT. On the k2 grid each group's absmax
lands on +-7, so it finds exactly the scales and integers training used, and quantizing OUT again gives them back bit
for bit, as K2-Thinking's weights do.

Resumable: the latents, Adam's state and the step go to OUT/.k2-qat-state.pt every `save_every` steps and at Ctrl-C.
A step's batch is a function of the seed and the step alone, so a resumed run computes what an uninterrupted one does.
"""
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from quant import int4
from runtime.checkpoint import INDEX_FILE
from runtime.convert.quantize import (SCOPES, QuantizeConfig, Roles, fingerprint, make_output_folder, model_files,
                                      plan_shards, quantize_checkpoint)
from runtime.convert.sources import collect_sources
from runtime.errors import K2Error
from runtime.eval import read_text
from runtime.files import copy_atomic, write_json_atomic, writing_to
from runtime.loader import load
from runtime.models.family import hf_layer_of
from runtime.safetensors_io import MappedShards

STATE = ".k2-qat-state.pt"
EXPORT = ".k2-qat-export"
GRID = "k2"  # the grid whose round trip is exact (absmax / 7 with levels -7..7): what makes the export lossless
RUNNING = 10  # steps the running KL averages


@dataclass(frozen=True)
class QatConfig:
    steps: int
    # Adam's step size in quantization steps (each tensor's mean group scale), and sequences per step. The student
    # starts a KL of ~1e-3 from its teacher, so one step's gradient is mostly noise. On the trained demo (300 steps,
    # held-out KL against rtn's): lr 0.01 with 4 sequences gave 0.77x, lr 0.003 with 4 gave 0.64x, lr 0.003 with 16
    # gave 0.54x; a larger lr did worse with either batch, a smaller one no better. README has the table.
    lr: float = 0.003
    batch: int = 16
    seq_len: int = 256  # tokens per sequence
    group_size: int = int4.DEFAULT_GROUP_SIZE
    scope: str = "experts"
    seed: int = 0
    save_every: int = 50  # steps between saved states

    def __post_init__(self):
        for value, name in ((self.steps, "--steps"), (self.batch, "--batch"), (self.seq_len, "--seq-len"),
                            (self.save_every, "--save-every")):
            if value <= 0:
                raise K2Error(f"{name} must be positive, not {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise K2Error(f"--lr must be a positive number, not {self.lr}")

    def quantize_config(self, max_shard_bytes: int) -> QuantizeConfig:
        """What the export runs: round to nearest on the k2 grid, over the same scope and groups as training."""
        return QuantizeConfig(method="rtn", grid=GRID, group_size=self.group_size, scope=self.scope,
                              max_shard_bytes=max_shard_bytes)


class OnGrid(nn.Module):
    """A weight's parametrization: its latent on the INT4 grid, with a straight-through gradient (the student), or
    the frozen original (the teacher)."""

    def __init__(self, original: torch.Tensor, group_size: int):
        super().__init__()
        self.original, self.group_size, self.teacher = original.detach().clone(), group_size, False

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return self.original
        rows = latent.reshape(-1, latent.shape[-1])  # stacked experts [E, out, in]: groups run along `in` alike
        return int4.fake_quant_int4(rows, self.group_size, GRID).view(latent.shape)


class Student:
    """The model with the tensors `names` trainable through the grid, and its teacher mode."""

    def __init__(self, model: nn.Module, names: list[str], group_size: int):
        self.model = model
        model.requires_grad_(False)
        self.latents: dict[str, nn.Parameter] = {}
        self.grids: list[OnGrid] = []
        for name in names:
            module_name, leaf = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            latent = getattr(module, leaf)
            latent.requires_grad_(True)
            grid = OnGrid(latent.data, group_size)
            parametrize.register_parametrization(module, leaf, grid)
            self.latents[name] = latent
            self.grids.append(grid)

    @contextmanager
    def as_teacher(self):
        for grid in self.grids:
            grid.teacher = True
        try:
            yield
        finally:
            for grid in self.grids:
                grid.teacher = False

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with parametrize.cached():  # each grid weight computed once per forward, not once per expert it holds
            return self.model(tokens)

    def freeze_on_grid(self):
        """Replace each latent by its grid value and drop the parametrizations: the model the export writes."""
        for name in self.latents:
            module_name, leaf = name.rsplit(".", 1)
            parametrize.remove_parametrizations(self.model.get_submodule(module_name), leaf,
                                                leave_parametrized=True)


def trained_tensors(loaded, roles: Roles) -> list[str]:
    """The model tensors holding the checkpoint weights the scope quantizes (a stacked expert tensor holds a layer's
    experts: all of them or none are in a scope, which is by component)."""
    slices: dict[str, set] = {}
    for name in roles.quantized:
        tensor, expert = loaded.model.locate(name)
        slices.setdefault(tensor, set()).add(expert)
    for tensor, experts in slices.items():
        size = loaded.model.get_parameter(tensor).shape[0]
        if experts != {None} and experts != set(range(size)):
            raise K2Error(f"the scope quantizes {len(experts)} of the {size} experts in {tensor}; qat trains a "
                          "layer's experts together")
    return sorted(slices)


def batch_at(ids: torch.Tensor, step: int, config: QatConfig, bos_id: int | None) -> torch.Tensor:
    """Step `step`'s sequences [batch, seq_len]: windows of the text at starts drawn from (seed, step) alone, each
    begun with BOS when the vocabulary adds one (as `k2 eval` and calibration cut theirs)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - config.seq_len + 1, (config.batch,), generator=generator)
    tokens = torch.stack([ids[s:s + config.seq_len] for s in starts.tolist()])
    if bos_id is not None:
        tokens[:, 0] = bos_id
    return tokens


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), in nats."""
    vocab = teacher_logits.shape[-1]
    target = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    log_p = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(log_p, target, log_target=True, reduction="batchmean")


def new_optimizer(student: Student, config: QatConfig) -> torch.optim.Adam:
    """Adam with one group per tensor, its step size `config.lr` times the tensor's mean quantization step."""
    groups = []
    for latent in student.latents.values():
        rows = latent.detach().reshape(-1, latent.shape[-1])
        step = int4.absmax_scale(int4.grouped(rows, config.group_size), int4.GRIDS[GRID]).float().mean().item()
        groups.append({"params": [latent], "lr": config.lr * step, "base_lr": config.lr * step})
    return torch.optim.Adam(groups, betas=(0.9, 0.999))


def _schedule(step: int, steps: int) -> float:
    """The step size's factor at `step`: a linear warmup over the first tenth, so Adam's first updates (a full step
    for every weight, in the sign of a noisy gradient) stay small until its moments have averaged, then a cosine to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class Run:
    """One `k2 qat` into OUT: training from step 0 or the saved state, then the export."""

    def __init__(self, out: Path, student: Student, config: QatConfig, fingerprint: dict):
        self.out, self.student, self.config, self.fingerprint = out, student, config, fingerprint
        self.optimizer = new_optimizer(student, config)
        self.step, self.kl = 0, []  # steps done; the KL each step measured before its update

    def restore(self, state: dict):
        if set(state["latents"]) != set(self.student.latents):
            raise K2Error(f"{self.out / STATE} holds other tensors than this model trains; --force starts over")
        with torch.no_grad():
            for name, latent in self.student.latents.items():
                latent.copy_(state["latents"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.kl = state["step"], list(state["kl"])

    def save(self):
        path = self.out / STATE
        tmp = path.with_name(f".{path.name}.tmp")
        state = {"fingerprint": self.fingerprint, "step": self.step, "kl": self.kl,
                 "latents": {n: t.detach() for n, t in self.student.latents.items()},
                 "optimizer": self.optimizer.state_dict()}
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def train_step(self, tokens: torch.Tensor) -> float:
        with torch.no_grad(), self.student.as_teacher():
            teacher = self.student.logits(tokens)
        loss = kl_divergence(teacher, self.student.logits(tokens))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * _schedule(self.step, self.config.steps)
        self.optimizer.step()
        return loss.item()

    def train(self, ids: torch.Tensor, bos_id: int | None, progress: bool):
        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, desc="qat", unit="step", disable=not progress,
                   dynamic_ncols=True)
        try:
            while self.step < config.steps:
                tokens = batch_at(ids, self.step, config, bos_id).to(self.student.model.device)
                self.kl.append(self.train_step(tokens))
                self.step += 1
                if self.step % config.save_every == 0 and self.step < config.steps:
                    self.save()
                bar.update()
                bar.set_postfix_str(f"KL {running(self.kl):.3e} (step 1: {self.kl[0]:.3e})", refresh=False)
        except KeyboardInterrupt:
            self.save()  # the steps done so far, so --resume loses none
            raise
        finally:
            bar.close()
        self.save()  # training is complete: an interrupted export resumes at the export


def running(kl: list[float]) -> float:
    """The mean KL of the last RUNNING steps."""
    last = kl[-RUNNING:]
    return sum(last) / len(last)


def _write_export(model, loaded, folder: Path):
    """The trained model as a plain checkpoint (float32, a shard per layer) with the input's other files: what the
    quantizer reads. Expert slices are cloned a layer at a time, since safetensors stores no shared views."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    by_shard: dict[str, dict[str, torch.Tensor]] = {}
    stored = model.stored_shapes()  # a tied head is not stored
    for name, tensor in model.checkpoint_tensors():
        if name not in stored:
            continue
        layer = hf_layer_of(name)
        by_shard.setdefault("model-other.safetensors" if layer is None else f"model-{layer:05d}.safetensors",
                            {})[name] = tensor
    weight_map = {}
    for shard, tensors in by_shard.items():
        save_file({n: t.detach().cpu().clone() for n, t in tensors.items()}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    write_json_atomic(folder / INDEX_FILE, {"metadata": {}, "weight_map": weight_map})
    config = {k: v for k, v in loaded.config.items() if k != "quantization_config"}
    write_json_atomic(folder / "config.json", config, indent=2)
    for item in model_files(loaded.folder):
        copy_atomic(item, folder / item.name)


def _prepare_output(out: Path, model_dir: Path, fingerprint: dict, resume: bool, force: bool) -> dict | None:
    """The saved state to continue from, or None for a fresh run into an empty OUT."""
    make_output_folder(out, model_dir)
    if resume:
        if not (out / STATE).exists():
            raise K2Error(f"{out} has no interrupted qat run to resume (no {STATE}); --force starts over")
        try:
            state = torch.load(out / STATE, weights_only=True)
        except Exception as e:  # a truncated or foreign file: torch raises several kinds
            raise K2Error(f"{out / STATE} cannot be read ({type(e).__name__}); --force starts over") from None
        if state.get("fingerprint") != fingerprint:
            raise K2Error(f"{out} was started from another model, data or settings; use the same ones to --resume, "
                          "or --force to start over")
        return state
    if any(out.iterdir()) and not force:
        raise K2Error(f"{out} is not empty; --resume continues an interrupted run, --force overwrites")
    (out / STATE).unlink(missing_ok=True)
    return None


def qat(model_dir: str | Path, out: str | Path, data: str | Path, config: QatConfig, max_shard_bytes: int,
        device: str = "cpu", resume: bool = False, force: bool = False, workers: int | None = None,
        progress: bool = True) -> dict:
    """Train, export, and say what was done: steps, the KL at the first and last steps, the export's summary."""
    out = Path(out)
    meta = load(model_dir, weights=False, complete=True)  # an architecture and a format we read, or one clear error
    ckpt = meta.checkpoint
    if (ckpt.config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        raise K2Error(f"{ckpt.folder.name} is already INT4; qat trains from the BF16 or FP8 model")
    reader = MappedShards()
    try:
        sources = collect_sources(ckpt, reader)
    finally:
        reader.close()
        ckpt.close()
    export_config = config.quantize_config(max_shard_bytes)  # checks --scope, --group-size and the shard size
    roles = Roles.of(meta, sources, SCOPES[config.scope])
    if not roles.quantized:
        raise K2Error(f"--scope {config.scope} quantizes no weight of {ckpt.folder.name}; --scope all-linear "
                      "quantizes every linear layer but lm_head")
    plan_shards(sources, export_config, roles)  # every trained weight splits into whole groups
    if not meta.has_tokenizer:
        raise K2Error(f"{ckpt.folder} has no tokenizer to read the training text with")
    text = read_text(Path(data))
    ids = torch.tensor(meta.tokenizer.encode_document(text))
    if len(ids) < config.seq_len:
        raise K2Error(f"{data} has {len(ids)} tokens; --seq-len {config.seq_len} needs at least that many")

    run_fingerprint = fingerprint(ckpt, config, text)
    state = _prepare_output(out, ckpt.folder, run_fingerprint, resume, force)
    loaded = load(model_dir, device=device, dtype="float32", progress=progress)
    student = Student(loaded.model, trained_tensors(loaded, roles), config.group_size)
    run = Run(out, student, config, run_fingerprint)
    if state is not None:
        run.restore(state)
    resumed_at = run.step
    started = time.perf_counter()
    with writing_to(out, "the saved training state is kept; free space, then --resume continues"):
        run.train(ids, meta.tokenizer.bos_id, progress)
        trained = time.perf_counter() - started
        student.freeze_on_grid()
        _write_export(loaded.model, loaded, out / EXPORT)
        exported = quantize_checkpoint(out / EXPORT, out, export_config, force=True, workers=workers,
                                       progress=progress)
    shutil.rmtree(out / EXPORT)
    (out / STATE).unlink()
    return {"output": str(out), "steps": config.steps, "resumed_at_step": resumed_at,
            "trained_tensors": len(student.latents),
            "trained_weights": sum(t.numel() for t in student.latents.values()),
            "tokens_per_step": config.batch * config.seq_len, "train_seconds": trained,
            "kl_first_step": run.kl[0], "kl_last_steps": running(run.kl), "kl": run.kl,
            "quantized_tensors": exported["quantized_tensors"], "shards": exported["shards"],
            "output_bytes": exported["output_bytes"]}

