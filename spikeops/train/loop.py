"""The training run: optimizer and schedule, train/eval epochs, checkpoint/resume, logs, summary.

Files written to ``--out`` (by rank 0 only):

* ``last.pt``: model, optimizer, scheduler, grad scaler, position (epochs done, batches done in
  the current epoch, optimizer steps), the partial epoch's running sums, the log history and
  every rank's RNG states. ``--resume`` continues from it, also in the middle of an epoch (runs
  stopped by ``--max-steps``); the continued run equals an uninterrupted one.
* ``log.jsonl`` and ``log.csv``: one row per epoch (rewritten from the history each epoch).
* ``summary.json`` and ``config.json``; ``encoder.pt`` in pretrain mode.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from spikeops.train import UsageError
from spikeops.train import data as data_mod
from spikeops.train import distributed as dist_mod
from spikeops.train import modeling
from spikeops.train.distributed import DistEnv

CHECKPOINT_FORMAT = "spikeops.train/1"
LOG_FIELDS = [
    "epoch", "complete", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images",
    "train_time_s", "images_per_s", "epoch_time_s", "peak_mem_mib", "peak_mem_kind",
]
# settings that must match for --resume to continue a run
RESUME_KEYS = ("model", "mode", "dataset", "batch_size", "img_size", "in_channels", "T", "model_args")


# ------------------------------------------------------------------------------ optimisation
def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and normalisation parameters (1-D tensors), as timm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR factor after ``s`` optimizer steps: linear warm-up to 1 over ``warmup_steps`` steps,
    then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        t = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


# ---------------------------------------------------------------------------------- sampling
class SkipSampler(Sampler):
    """``sampler`` without its first ``skip`` indices (mid-epoch resume)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: evaluation shards without padding or duplicates."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


# ------------------------------------------------------------------------------------- state
def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max_memory_allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0, "cpu_peak_rss_process"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_logs(out: Path, history: List[dict]) -> None:
    _write_text(out / "log.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    tmp = out / "log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_FIELDS})
    os.replace(tmp, out / "log.csv")


def _fmt_mem(mib: float, kind: str) -> str:
    what = "CUDA max allocated" if kind.startswith("cuda") else "CPU peak RSS of the process"
    return f"{mib:.0f} MiB ({what})"


# ---------------------------------------------------------------------------------- the run
class Trainer:
    """One training run (``cfg`` is the resolved argparse namespace of :mod:`spikeops.train.cli`)."""

    def __init__(self, cfg, env: DistEnv):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.out = Path(cfg.out)
        self.pretrain = cfg.mode == "pretrain"
        if cfg.batch_size % env.world_size:
            raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {env.world_size} processes")
        self.local_batch = cfg.batch_size // env.world_size

        if self.pretrain:
            modeling.check_pretrain_model(cfg.model)
        self.data = data_mod.build(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.in_channels)
        cfg.img_size = self.data.img_size

        seed_everything(cfg.seed)  # the same initial weights on every rank
        model, self.info = modeling.build(cfg, self.data.num_classes, self.data.img_size, self.data.in_channels)
        model.to(self.device)
        self.sync_bn_check = None
        if cfg.sync_bn:
            if env.distributed:
                model, self.sync_bn_check = modeling.convert_sync_bn(model, self.device)
            else:
                self.print("--sync-bn: single process, nothing to synchronise")
        self.model = model
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        # from here on each rank has its own random stream (e.g. the pre-trainer's masks)
        seed_everything(cfg.seed + 1 + env.rank)

        self.train_sampler = DistributedSampler(self.data.train, num_replicas=env.world_size, rank=env.rank,
                                                shuffle=True, seed=cfg.seed, drop_last=True)
        self.steps_per_epoch = len(self.train_sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise UsageError(f"{len(self.train_sampler)} training images per process, fewer than one batch "
                             f"of {self.local_batch}: lower --batch-size")
        total = cfg.epochs * self.steps_per_epoch
        warmup = min(int(round(cfg.warmup_epochs * self.steps_per_epoch)), total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, warmup, min(1.0, cfg.min_lr / cfg.lr) if cfg.lr > 0 else 0.0))
        self.amp_dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.amp]
        self.scaler = torch.amp.GradScaler("cuda", enabled=(cfg.amp == "fp16" and self.device.type == "cuda"))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        # position and bookkeeping
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.partial: Optional[List[float]] = None  # running sums of an interrupted epoch
        self.history: List[dict] = []
        self.partial_row: Optional[dict] = None  # the log row of an epoch stopped by --max-steps
        self.resumed_from: Optional[str] = None
        if cfg.resume:
            self._resume()
        elif (self.out / "last.pt").exists():
            self.print(f"note: {self.out / 'last.pt'} exists and will be overwritten (pass --resume to continue it)")

        if env.distributed:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = DDP(self.model, find_unused_parameters=cfg.find_unused_parameters or self.pretrain, **ddp_kwargs)
        self.n_params = sum(p.numel() for p in unwrap(self.model).parameters())

    # -------------------------------------------------------------------------------- output
    def print(self, *args) -> None:
        if self.env.is_main:
            print(*args, flush=True)

    def _progress(self, total: int, initial: int, desc: str):
        show = self.env.is_main and not self.cfg.no_progress and sys.stderr.isatty()
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency of the CLI
            return None
        return tqdm(total=total, initial=initial, desc=desc, disable=not show, leave=False, dynamic_ncols=True,
                    unit="batch", file=sys.stderr)

    # ----------------------------------------------------------------------------- checkpoint
    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise UsageError(f"--resume: no checkpoint at {path}")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"--resume: {path} is not a checkpoint of this CLI")
        saved = ck["config"]
        diff = [f"{k}: {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_KEYS if saved.get(k) != getattr(self.cfg, k)]
        if diff:
            raise UsageError(f"--resume: {path} was written with other settings ({'; '.join(diff)})")
        changed = [k for k in ("epochs", "lr", "weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "seed", "amp")
                   if saved.get(k) != getattr(self.cfg, k)]
        if changed:
            self.print(f"note: resuming with changed {', '.join(changed)} (the run will not equal an uninterrupted one)")
        unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.batch_in_epoch, self.global_step = ck["epoch"], ck["batch_in_epoch"], ck["global_step"]
        self.partial = ck.get("partial")
        self.history = [row for row in ck["history"] if row.get("complete")]
        rngs = ck.get("rng") or []
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank], self.device)
        else:
            self.print(f"note: checkpoint has RNG states for {len(rngs)} processes, running {self.env.world_size}: reseeding")
            seed_everything(self.cfg.seed + 1000 * self.epoch + self.env.rank)
        self.resumed_from = str(path)
        self.print(f"resumed from {path}: epoch {self.epoch} done, +{self.batch_in_epoch} batches, step {self.global_step}")

    def _save(self, extra_row: Optional[dict]) -> None:
        rngs = dist_mod.all_gather_object(rng_state(self.device))
        if not self.env.is_main:
            return
        history = self.history + ([extra_row] if extra_row else [])
        ck = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config_dict(),
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "partial": self.partial,
            "history": history,
            "rng": rngs,
            "world_size": self.env.world_size,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_save(ck, self.out / "last.pt")
        if self.pretrain:
            _atomic_save(unwrap(self.model).encoder_state_dict(), self.out / "encoder.pt")
        write_logs(self.out, history)

    def config_dict(self) -> dict:
        return {k: v for k, v in vars(self.cfg).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}

    # ---------------------------------------------------------------------------- steps
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """(loss, number of correct predictions or None)."""
        with self._autocast():
            out = model(x)
        if self.pretrain:
            loss = out[0] if isinstance(out, (tuple, list)) else out
            return loss.float(), None
        logits = out.float()
        if logits.dim() == 3:  # [T, B, classes]: average over time
            logits = logits.mean(0)
        return self.criterion(logits, y), (logits.argmax(-1) == y).sum()

    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        workers = self.cfg.workers
        if workers is None:
            workers = min(4, os.cpu_count() or 1) if isinstance(dataset, data_mod.ImageFolderDataset) else 0
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))

    def train_epoch(self) -> dict:
        cfg, env = self.cfg, self.env
        model = self.model
        model.train()
        self.train_sampler.set_epoch(self.epoch)
        start = self.batch_in_epoch
        loader = self._loader(self.data.train, SkipSampler(self.train_sampler, start * self.local_batch),
                              self.local_batch, drop_last=True)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # this process: loss * n, correct, n
        bar = self._progress(self.steps_per_epoch, start, f"epoch {self.epoch + 1}/{cfg.epochs}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        last_shown = 0.0
        stopped = False
        for x, y, ids in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            x = self.data.train_transform(x, ids, seed=cfg.seed, epoch=self.epoch)
            try:
                loss, correct = self._forward(model, x, y)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
            except RuntimeError as exc:  # DDP reports parameters without gradients at the next step
                if "find_unused_parameters" in str(exc):
                    raise RuntimeError(f"{exc}\n\nspikeops.train: rerun with --find-unused-parameters") from exc
                raise
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1
            self.batch_in_epoch += 1
            n = y.shape[0]
            sums[0] += loss.detach().double() * n
            if correct is not None:
                sums[1] += correct.double()
            sums[2] += n
            if self.sync_bn_check is not None:
                self._report_sync_bn()
            if bar is not None and not bar.disable:
                bar.update(1)
                now = time.perf_counter()
                if self.batch_in_epoch == self.steps_per_epoch or now - last_shown > 0.5:
                    last_shown = now
                    s = sums.tolist()
                    if not math.isfinite(s[0]):
                        raise FloatingPointError(f"training loss is not finite at step {self.global_step}")
                    post = {"loss": f"{s[0] / max(s[2], 1):.4f}"}
                    if not self.pretrain:
                        post["acc"] = f"{100 * s[1] / max(s[2], 1):.1f}%"
                    post["img/s"] = f"{env.world_size * s[2] / max(now - t0, 1e-9):.0f}"
                    bar.set_postfix(post, refresh=False)
            if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                stopped = self.batch_in_epoch < self.steps_per_epoch
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        dist_mod.all_reduce(sums)
        elapsed = float(dist_mod.all_reduce(torch.tensor([elapsed], dtype=torch.float64, device=self.device), "max").item())
        totals = sums.tolist() + [elapsed]
        if self.partial is not None and start > 0:  # the part of this epoch run before a --resume
            totals = [a + b for a, b in zip(totals, self.partial)]
        loss_sum, correct_sum, n, train_time = totals
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss is not finite (epoch {self.epoch + 1}, step {self.global_step})")
        # global running sums, kept in a mid-epoch checkpoint
        self.partial = totals if stopped else None
        return {
            "complete": not stopped,
            "train_loss": loss_sum / max(n, 1.0),
            "train_acc": None if self.pretrain else 100.0 * correct_sum / max(n, 1.0),
            "images": int(n),
            "train_time_s": train_time,
            "images_per_s": n / max(train_time, 1e-9),
        }

    def _report_sync_bn(self) -> None:
        unsynced = self.sync_bn_check.finish()
        self.sync_bn_check = None
        if unsynced:
            self.print(f"warning: --sync-bn: {len(unsynced)} SyncBatchNorm layers were never called as modules (e.g. "
                       f"{unsynced[0]}): their parents apply BatchNorm functionally (spikeops' fused BatchNorm+LIF), "
                       f"so they keep per-process statistics")

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = unwrap(self.model)  # no DDP hooks: evaluation shards may differ in size
        model.eval()
        env = self.env
        # BatchNorm running statistics: rank 0's (the checkpointed ones) on every rank; each rank
        # updated its own copy in the last training step
        dist_mod.broadcast_([b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long])
        sampler = ShardSampler(len(self.data.test), env.rank, env.world_size)
        loader = self._loader(self.data.test, sampler, self.local_batch, drop_last=False)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y, _ in loader:
            x = self.data.test_transform(x.to(self.device, non_blocking=True))
            y = y.to(self.device, non_blocking=True)
            loss, correct = self._forward(model, x, y)
            sums[0] += loss.double() * y.shape[0]
            sums[1] += 0 if correct is None else correct.double()
            sums[2] += y.shape[0]
        dist_mod.all_reduce(sums)
        s = sums.tolist()
        n = max(s[2], 1.0)
        return {"test_loss": s[0] / n, "test_acc": None if self.pretrain else 100.0 * s[1] / n}

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        wall0 = time.perf_counter()
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_text(self.out / "config.json", json.dumps(self.config_dict(), indent=2) + "\n")
        what = f"{cfg.mode} {cfg.model} ({self.n_params / 1e6:.2f}M parameters) on {cfg.dataset}"
        self.print(f"{what}: {len(self.data.train)} train / {len(self.data.test)} test images at "
                   f"{self.data.img_size}x{self.data.img_size}x{self.data.in_channels}, T={cfg.T}, batch {cfg.batch_size} "
                   f"({env.world_size} x {self.local_batch}), {self.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, "
                   f"device {self.device}, amp {cfg.amp}")
        if "finetune" in self.info:
            fi = self.info["finetune"]
            self.print(f"finetune: loaded {fi['loaded']} tensors from {fi['checkpoint']}; "
                       f"missing keys (new): {fi['missing_keys']}; unexpected keys: {fi['unexpected_keys']}"
                       + (f"; skipped (shape mismatch): {fi['shape_mismatch_keys']}" if fi["shape_mismatch_keys"] else ""))
        while self.epoch < cfg.epochs and (cfg.max_steps is None or self.global_step < cfg.max_steps):
            t_epoch = time.perf_counter()
            row = {"epoch": self.epoch + 1}
            row.update(self.train_epoch())
            # evaluation leaves the training RNG streams alone (the pre-trainer draws masks) and
            # sees the same random draws every epoch
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(cfg.seed + 7919 + self.env.rank)
                row.update(self.evaluate())
            mem = dist_mod.all_reduce(torch.tensor([peak_memory(self.device)[0]], dtype=torch.float64,
                                                   device=self.device), "max")
            row.update({"step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
                        "epoch_time_s": time.perf_counter() - t_epoch, "peak_mem_mib": float(mem.item()),
                        "peak_mem_kind": peak_memory(self.device)[1]})
            row = {k: row.get(k) for k in LOG_FIELDS}
            if row["complete"]:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.history.append(row)
                self.partial_row = None
                self._save(None)
            else:
                self.partial_row = row
                self._save(row)
            self.print(self._epoch_line(row))
        if self.global_step == 0 and not self.history:
            self.print("nothing to train")
        summary = self.summary(time.perf_counter() - wall0)
        if env.is_main:
            _write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            self.print(self._summary_text(summary))
        return summary

    def _epoch_line(self, row: dict) -> str:
        part = "" if row["complete"] else f" (stopped by --max-steps after {self.batch_in_epoch}/{self.steps_per_epoch} batches)"
        acc = "" if row["train_acc"] is None else f" acc {row['train_acc']:.2f}%"
        tacc = "" if row["test_acc"] is None else f" acc {row['test_acc']:.2f}%"
        return (f"epoch {row['epoch']}/{self.cfg.epochs}{part}: train loss {row['train_loss']:.4f}{acc} | "
                f"test loss {row['test_loss']:.4f}{tacc} | {row['images_per_s']:.1f} images/s | lr {row['lr']:.3g} | "
                f"peak memory {_fmt_mem(row['peak_mem_mib'], row['peak_mem_kind'])}")

    def summary(self, wall_time: float) -> dict:
        rows = self.history + ([self.partial_row] if self.partial_row else [])
        images = sum(r["images"] for r in rows)
        train_time = sum(r["train_time_s"] for r in rows)
        mib, kind = peak_memory(self.device)
        mem = float(dist_mod.all_reduce(torch.tensor([mib], dtype=torch.float64, device=self.device), "max").item())
        final = rows[-1] if rows else {}
        accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
        out = {
            "model": self.cfg.model, "mode": self.cfg.mode, "dataset": self.cfg.dataset,
            "parameters": self.n_params,
            "epochs_done": self.epoch, "steps": self.global_step, "world_size": self.env.world_size,
            "final_test_acc": final.get("test_acc"),
            "final_test_loss": final.get("test_loss"),
            "best_test_acc": max(accs) if accs else None,
            "best_test_loss": min((r["test_loss"] for r in rows), default=None),
            "train_time_s": train_time, "wall_time_s": wall_time,
            "images_per_s": images / train_time if train_time > 0 else None,
            "peak_mem_mib": mem, "peak_mem_kind": kind,
            "out": str(self.out), "resumed_from": self.resumed_from,
        }
        if "finetune" in self.info:
            out["finetune"] = self.info["finetune"]
        return out

    def _summary_text(self, s: dict) -> str:
        def pct(v):
            return "-" if v is None else f"{v:.2f}%"

        lines = [f"done: {s['epochs_done']} full epochs, {s['steps']} steps in {s['train_time_s']:.1f} s of training "
                 f"({s['wall_time_s']:.1f} s wall)"]
        if self.pretrain:
            lines.append(f"  test loss: final {s['final_test_loss']}, best {s['best_test_loss']}")
        else:
            lines.append(f"  test accuracy: final {pct(s['final_test_acc'])}, best {pct(s['best_test_acc'])}")
        if s["images_per_s"]:
            lines.append(f"  throughput: {s['images_per_s']:.1f} images/s (training, all processes)")
        lines.append(f"  peak memory: {_fmt_mem(s['peak_mem_mib'], s['peak_mem_kind'])}")
        lines.append(f"  files: {self.out}/last.pt, log.jsonl, log.csv, summary.json"
                     + (", encoder.pt" if self.pretrain else ""))
        return "\n".join(lines)
