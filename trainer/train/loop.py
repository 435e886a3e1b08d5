"""The training / evaluation loop on Accelerate. It never reads YAML: it gets typed objects from `run.py`.

One *step* is one optimizer step = `grad_accum` micro-batches on every rank. Each epoch is trimmed to a
whole number of steps (the sampler drops the tail), so a checkpoint always falls on an accumulation
boundary and resuming skips exactly the micro-batches already consumed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import Sampler

from trainer.config import RunConfig
from trainer.train.checkpoint import Progress, StopRequest
from trainer.train.report import PER_CLASS

log = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), trimmed to `length` indices.

    Resume-exact by construction: no generator state to save, the epoch number says it all.
    """

    def __init__(self, n: int, length: int, seed: int, shuffle: bool = True):
        self.n, self.length, self.seed, self.shuffle, self.epoch = n, length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[: self.length])

    def __len__(self) -> int:
        return self.length


def epoch_loader(loader, sampler: EpochSampler, dataset, epoch: int, skip: int = 0):
    """The prepared train loader positioned at `epoch`, its first `skip` micro-batches skipped (a resume).

    Accelerate's prepared loader calls `set_epoch(self.iteration)` on its sampler and dataset at every
    `__iter__`, and `iteration` only advances when a loader is exhausted (this loop stops one batch short of
    that): an epoch set on the sampler alone is overwritten, and every epoch would replay epoch 0's order and
    flips. Setting it through the loader sets `iteration`; `skip_first_batches` copies `iteration` into the
    loader it builds. The sampler and dataset are also set directly, because Accelerate reaches the dataset
    only when it did not find the sampler (an `elif`), and the same value is set either way.
    """
    from accelerate.data_loader import skip_first_batches

    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if skip:
        loader = skip_first_batches(loader, skip)
    sampler.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return loader


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    return n_samples // (batch_size * world_size * grad_accum)


def total_steps(run: RunConfig, per_epoch: int) -> int:
    by_epochs = run.max_epochs * per_epoch if run.max_epochs else math.inf
    by_steps = run.max_steps or math.inf
    return int(min(by_epochs, by_steps))


@dataclass
class LoopParts:
    """Everything the loop touches, already prepared by Accelerate."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    sampler: EpochSampler
    train_dataset: Any
    metrics: Any  # trainer.model.terratorch_task.TaskMetrics: the task's validation metrics
    # the TerraTorch task's steps (trainer.model.terratorch_task.TaskSteps): the loss of a batch, and (loss, pred,
    # target) in evaluation, computed by the task's own loss handler
    batch_loss: Callable[[Any, dict], torch.Tensor]
    eval_batch: Callable[[Any, dict], tuple]
    run: RunConfig
    per_epoch: int
    total: int
    on_log: Callable[[dict], None]
    on_checkpoint: Callable[[Progress], None]
    stop: StopRequest = field(default_factory=StopRequest)
    primary_metric: str = "loss"
    final_eval: bool = True  # evaluate (and checkpoint) at the last step, whatever the intervals


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Memory telemetry for the logs: the device allocator's peak on a GPU, the process's peak RSS on CPU."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def evaluate(parts: LoopParts) -> dict[str, float]:
    """All ranks run it (ZeRO-3 gathers parameters collectively); metrics see the gathered predictions."""
    acc, model = parts.accelerator, parts.model
    model.eval()
    parts.metrics.reset()
    loss_sum, n = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in parts.val_loader:
            loss, pred, target = parts.eval_batch(model, batch)
            loss_sum += acc.reduce(loss.detach().float(), reduction="mean").double().cpu()
            n += 1
            pred, target = acc.gather_for_metrics((pred, target))
            parts.metrics.update(pred.cpu(), target.cpu())
    model.train()
    out = {"loss": float(loss_sum / max(n, 1))}
    out.update(parts.metrics.compute())
    return out


def train(parts: LoopParts, progress: Progress) -> tuple[Progress, bool]:
    """Run until `parts.total` steps or a stop request. Returns (progress, stopped_early)."""
    from tqdm.auto import tqdm

    acc, run = parts.accelerator, parts.run
    gas = run.grad_accum
    bar = tqdm(total=parts.total, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (acc.is_main_process and run.progress))
    parts.model.train()
    stopped = False
    t_last, samples_last = time.perf_counter(), progress.samples_seen
    while progress.step < parts.total and not stopped:
        batches = iter(epoch_loader(parts.train_loader, parts.sampler, parts.train_dataset, progress.epoch,
                                    skip=progress.batch_in_epoch))
        while progress.batch_in_epoch < parts.per_epoch * gas and progress.step < parts.total:
            step_loss = torch.zeros(())
            for _ in range(gas):
                batch = next(batches)
                with acc.accumulate(parts.model):
                    loss = parts.batch_loss(parts.model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and run.grad_clip:  # under DeepSpeed its engine clips (Accelerate knows)
                        acc.clip_grad_norm_(parts.model.parameters(), run.grad_clip)
                    parts.optimizer.step()
                    parts.optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float().cpu() / gas
            parts.scheduler.step()  # a scheduler from the DeepSpeed JSON: Accelerate's wrapper, its engine steps it
            progress.step += 1
            progress.batch_in_epoch += gas
            # mask, not image: a multimodal batch's image is a dict of modalities
            progress.samples_seen += gas * batch["mask"].shape[0] * acc.num_processes
            bar.update(1)

            if progress.step % run.log_every == 0 or progress.step == parts.total:
                mean_loss = acc.reduce(step_loss.to(acc.device), reduction="mean").item()
                now = time.perf_counter()
                record = {"split": "train", "step": progress.step, "epoch": progress.epoch, "loss": mean_loss,
                          "lr": parts.optimizer.param_groups[0]["lr"],
                          "samples_per_s": (progress.samples_seen - samples_last) / max(now - t_last, 1e-9),
                          **peak_memory_mb(acc.device)}
                t_last, samples_last = now, progress.samples_seen
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                parts.on_log(record)
            last = progress.step == parts.total and parts.final_eval
            if progress.step % run.eval_every == 0 or last:
                metrics = evaluate(parts)
                parts.on_log({"split": "val", "step": progress.step, "epoch": progress.epoch, **metrics})
                bar.write(f"step {progress.step}: val " + ", ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if not k.startswith(PER_CLASS)))
            stopped = parts.stop.agreed(acc) or (run.stop_at_step is not None and progress.step >= run.stop_at_step
                                                  and progress.step < parts.total)
            if progress.step % run.checkpoint_every == 0 or last or stopped:
                parts.on_checkpoint(progress)
            if stopped:
                break
        if progress.batch_in_epoch >= parts.per_epoch * gas:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    return progress, stopped
