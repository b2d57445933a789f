"""The data side of stage 2, off the training thread (docs/design.md, "Stage 2"): each micro-batch of the run's
plan read from the store, collated and pinned on a background thread, ahead of the step that needs it.

The plan is deterministic (`StepSampler`), so the thread walks the same (step, micro-batch) sequence the loop
does, `train.prefetch` micro-batches ahead, and hands over host batches in that order: the ids in their int32
width, from pinned memory on a GPU, so the copy to the device (`batches.to_device`, non-blocking) does not
wait on the host. With `train.prefetch: 0` the same function makes each micro-batch when the step asks for it.
Either way the loop times how long it waits for its micro-batches (`data_wait_s` in the metrics).
"""
from __future__ import annotations

import queue
import threading
import time

import torch


def micro_batches(run, step: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a step as (example indices, weight): an empty micro-batch (train.micro_batch_tokens:
    this rank has fewer than another) runs the share's shortest example with weight 0, so that every rank takes
    part in the same collectives and adds nothing."""
    mine = run.sampler.plan(step)[run.rank]
    shortest = min((int(i) for mb in mine if mb is not None for i in mb), key=lambda i: run.lengths.tokens[i])
    return [([shortest], 0.0) if mb is None else ([int(i) for i in mb], 1.0) for mb in mine]


def host_batch(run, indices: list[int]) -> dict:
    """One micro-batch on the host: the examples read, collated in the run's layout, pinned for a GPU."""
    batch = run.source.batch([run.source.examples.example(i) for i in indices], run.tok.pad_token_id, run.layout)
    if run.device.type == "cuda":
        batch = {k: _pin(v) for k, v in batch.items()}
    return batch


def _pin(value):
    if torch.is_tensor(value):
        return value.pin_memory()
    if hasattr(value, "__dataclass_fields__"):  # the loss's teacher object
        import dataclasses
        return dataclasses.replace(value, **{f: _pin(getattr(value, f)) for f in value.__dataclass_fields__})
    return value


class Prefetcher:
    """`get(step)`: the step's [(host batch, weight)] in plan order, made ahead on a thread (depth > 0) or now."""

    def __init__(self, run, start: int, depth: int):
        self.run, self.depth, self.waited = run, depth, 0.0
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.done = threading.Event()
        self.thread = None
        run.source.examples.follow(run.sampler, run.rank, start, run.steps)  # a rank's share on object storage: its downloads
        if depth > 0:
            self.thread = threading.Thread(target=self._work, args=(start,), name="selfaug-prefetch", daemon=True)
            self.thread.start()

    def _work(self, start: int) -> None:
        try:
            for step in range(start, self.run.steps):
                self.run.source.examples.begin_step(step)  # shards the plan has passed are dropped
                for m, (indices, weight) in enumerate(micro_batches(self.run, step)):
                    if not self._put((step, m, host_batch(self.run, indices), weight)):
                        return
        except BaseException as e:  # raised on the training thread, at the micro-batch that needed it
            self._put((None, None, e, None))

    def _put(self, item) -> bool:
        """`item` onto the queue, unless nobody takes it any more (close): whether it went."""
        while not self.done.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int):
        """The step's micro-batches, one at a time: (host batch, weight); the wait is added to `waited`."""
        plan = micro_batches(self.run, step)
        if self.thread is None:
            self.run.source.examples.begin_step(step)
        for m, (indices, weight) in enumerate(plan):
            t0 = time.perf_counter()
            if self.thread is None:
                batch = host_batch(self.run, indices)
            else:
                got_step, got_m, batch, weight = self.queue.get()
                if got_step is None:
                    raise batch
                assert (got_step, got_m) == (step, m), f"prefetched micro-batch {got_step}.{got_m}, wanted {step}.{m}"
            self.waited += time.perf_counter() - t0
            yield batch, weight, m == len(plan) - 1

    def close(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
