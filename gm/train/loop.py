"""The one training loop: devices, DDP, AMP, one optimizer per trainable module, gradient
clipping, EMA, and a state dict that continues a run exactly.

Per step, for each phase due: the phase's module is trained (requires grad, called through its
DDP wrapper when distributed); every other module is frozen and called plain, so no DDP reducer
waits for gradients that never come. Nothing outside this file reaches for ``.module``.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from gm.train.protocol import Batch, GenerativeModel


class EMA:
    """Exponential moving average of a module's weights (buffers are copied)."""

    def __init__(self, module: nn.Module, beta: float):
        self.beta = beta
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        for p_ema, p in zip(self.module.parameters(), source.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - self.beta)
        for b_ema, b in zip(self.module.buffers(), source.buffers(), strict=True):
            b_ema.copy_(b)


class Trainer:
    def __init__(
        self,
        model: GenerativeModel,
        device: torch.device | str = "cpu",
        distributed: bool = False,  # wrap each trainable module in DDP (needs a process group)
        amp: bool = False,  # native torch.amp mixed precision; used on CUDA only
        ema_beta: float = 0.0,  # 0 disables EMA; >0 keeps EMA copies of model.ema_modules
        world_size: int = 1,  # workers: images_seen counts every worker's images
        total_steps: int = 0,  # the run's budget, for the family's lr_factor (decay schedules)
        channels_last: bool = False,  # 4-D weights and batches in torch.channels_last (NHWC)
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # NHWC: oneDNN's (CPU) and cuDNN's (tensor cores) fast convolution layout, so no
        # conversion around each convolution; the values of a checkpoint do not depend on it
        self.memory_format = torch.channels_last if channels_last else None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.modules = model.trainable()
        self.nets: dict[str, nn.Module] = {}
        for name, module in self.modules.items():
            if distributed:
                from torch.nn.parallel import DistributedDataParallel as DDP

                ids = [self.device.index] if self.device.type == "cuda" else None
                self.nets[name] = DDP(
                    module, device_ids=ids, find_unused_parameters=model.unused_parameters
                )
            else:
                self.nets[name] = module
        self.optimizers = {}
        self.base_lr: dict[str, float] = {}  # before the family's lr_factor
        for name, module in self.modules.items():
            oc = model.optim_config(name)
            self.base_lr[name] = oc.lr
            self.optimizers[name] = torch.optim.Adam(
                module.parameters(),
                lr=oc.lr,
                betas=tuple(oc.betas),
                eps=oc.eps,
                weight_decay=oc.weight_decay,
            )
        self.amp = amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.ema = (
            {name: EMA(self.modules[name], ema_beta) for name in model.ema_modules}
            if ema_beta > 0
            else {}
        )
        self.world_size = world_size
        self.total_steps = total_steps
        self.step = 0
        self.images_seen = 0  # by all workers
        self.growth_index = -1  # phase of a growing model's schedule (-1: not started)
        self._check_parameter_sets()

    def _check_parameter_sets(self) -> None:
        """Each trainable parameter belongs to exactly one optimizer (CompressAI's check)."""
        seen: dict[int, str] = {}
        for name, module in self.modules.items():
            for p in module.parameters():
                if id(p) in seen:
                    raise ValueError(f"parameter shared by modules {seen[id(p)]!r} and {name!r}")
                seen[id(p)] = name
        missing = [n for n, p in self.model.named_parameters() if id(p) not in seen]
        if missing:
            raise ValueError(f"parameters outside every trainable module: {missing[:3]}")

    def apply_optim_config(self) -> None:
        """Set every optimizer's lr, betas, eps and weight decay from the model's config,
        keeping its moments: a restored state taking new hyperparameters (PBT's mutations)."""
        for name, opt in self.optimizers.items():
            oc = self.model.optim_config(name)
            self.base_lr[name] = oc.lr
            for group in opt.param_groups:
                group.update(betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)

    def _nets_for(self, trained: str) -> Mapping[str, nn.Module]:
        for name, module in self.modules.items():
            module.requires_grad_(name == trained)
        return {n: (self.nets[n] if n == trained else m) for n, m in self.modules.items()}

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One step: every due phase once. Returns the losses and metrics of the phases run."""
        self.model.train()
        self._enter_growth_phase()
        factor = self.model.lr_factor(self.step, self.total_steps)
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self.base_lr[name] * factor
        self.model.on_progress(self.step, self.images_seen)
        batch = Batch(
            self._to_device(batch.images),
            batch.labels.to(self.device, non_blocking=True),
            {r: self._to_device(x) for r, x in batch.levels.items()},
            None if batch.inputs is None else self._to_device(batch.inputs),
        )
        metrics: dict[str, float] = {}
        for phase in self.model.phases():
            if self.step % phase.every:
                continue
            opt = self.optimizers[phase.module]
            nets = self._nets_for(phase.module)
            opt.zero_grad(set_to_none=True)
            # Not a disabled autocast when amp is off: a caller's own autocast still applies
            with torch.autocast(self.device.type) if self.amp else contextlib.nullcontext():
                loss, extra = self.model.loss(phase.name, batch, nets)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss of phase {phase.name!r} is {loss.item()} at step {self.step}"
                )
            self.scaler.scale(loss).backward()
            clip = self.model.optim_config(phase.module).grad_clip
            if clip > 0:
                self.scaler.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(self.modules[phase.module].parameters(), clip)
                metrics[f"grad_norm/{phase.module}"] = float(norm)
            self.scaler.step(opt)
            self.scaler.update()
            if phase.module in self.ema:
                self.ema[phase.module].update(self.modules[phase.module])
            metrics[f"loss/{phase.name}"] = loss.item()
            metrics.update({f"{phase.name}/{k}": v for k, v in extra.items()})
        for module in self.modules.values():
            module.requires_grad_(True)
        self.step += 1
        self.images_seen += int(batch.images.shape[0]) * self.world_size
        return metrics

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.memory_format is not None and images.dim() == 4:
            images = images.contiguous(memory_format=self.memory_format)
        return images

    def _enter_growth_phase(self) -> None:
        """At the first step of a growing model's phase: its learning rate, optimizer reset."""
        g = self.model.growth(self.images_seen)
        if g is None or g.index == self.growth_index:
            return
        for name, opt in self.optimizers.items():
            if g.reset_optimizers and self.growth_index >= 0:
                opt.state.clear()
            self.base_lr[name] = g.lr if g.lr is not None else self.model.optim_config(name).lr
        self.growth_index = g.index

    def sampling_nets(self) -> dict[str, nn.Module]:
        """The modules `sample` should use: EMA copies where kept."""
        return {name: ema.module for name, ema in self.ema.items()}

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            g = torch.Generator().manual_seed(seed)
            return self.model.sample(n, labels, generator=g, nets=self.sampling_nets()).cpu()
        finally:
            self.model.train(was_training)

    # Full state, enough to continue exactly (weights, EMA, optimizers, scaler, counters, RNG).
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": {n: e.module.state_dict() for n, e in self.ema.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "growth_index": self.growth_index,
            "base_lr": dict(self.base_lr),
            "rng": rng_state(),
        }

    def warm_start(self, payload: dict) -> None:
        """Weights and EMA of another run's checkpoint payload; optimizers, step and RNG stay
        fresh (a new run from a trained starting point)."""
        state = payload["trainer"]
        self.model.load_state_dict(state["model"])
        for n, sd in state["ema"].items():
            if n in self.ema:
                self.ema[n].module.load_state_dict(sd)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if set(state["ema"]) != set(self.ema):
            raise ValueError(f"checkpoint EMA modules {sorted(state['ema'])} != {sorted(self.ema)}")
        for n, sd in state["ema"].items():
            self.ema[n].module.load_state_dict(sd)
        for n, sd in state["optimizers"].items():
            self.optimizers[n].load_state_dict(sd)
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.growth_index = int(state.get("growth_index", -1))
        for n, opt in self.optimizers.items():  # checkpoints before base_lr: the stored rate
            self.base_lr[n] = float(state.get("base_lr", {}).get(n, opt.param_groups[0]["lr"]))
        set_rng_state(state["rng"])


def rng_state() -> dict:
    """Every RNG gm's training draws from, as tensors and plain values (weights_only-safe)."""
    # The legacy global numpy RNG is saved because library code may draw from it.
    np_state = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, gauss))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
