"""One batched generation's bookkeeping: the left-padded inputs, and each job's row in it.

model.generate() runs the batch; BatchStreamer receives every step's tokens and routes them to
the jobs' rows, each of which ends on its own eos, stop string or max_tokens and answers its
client at once; StopWhen ends the generation when every row is done.
"""

from __future__ import annotations

import time

import numpy as np

from .jobs import Finished, Job


def collate(batch: list, pad_token_id: int) -> dict:
    """One left-padded batch from the jobs' prompts; image patches concatenated in job order."""
    if len(batch) == 1:
        return dict(batch[0].prompt.arrays)
    width = max(job.prompt.prompt_tokens for job in batch)
    ids = np.full((len(batch), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for i, job in enumerate(batch):
        n = job.prompt.prompt_tokens
        ids[i, width - n:] = job.prompt.arrays["input_ids"][0]
        mask[i, width - n:] = 1
    arrays = {"input_ids": ids, "attention_mask": mask}
    with_images = [job.prompt.arrays for job in batch if "pixel_values" in job.prompt.arrays]
    if with_images:
        arrays["pixel_values"] = np.concatenate([a["pixel_values"] for a in with_images], axis=0)
        arrays["image_grid_thw"] = np.concatenate([a["image_grid_thw"] for a in with_images], axis=0)
    return arrays


class Row:
    """One job's place in a running batch: its text, token count and whether it has finished."""

    def __init__(self, job: Job, text, started: float):  # text: a detokenize.IncrementalText
        self.job, self.text, self.started = job, text, started
        self.count = 0
        self.done = False

    def add(self, token: int, eos_ids: set) -> None:
        if self.done:
            return
        if self.job.cancelled.is_set():
            self.done = True
            return
        self.count += 1
        if token in eos_ids:
            return self.finish("stop")
        delta = self.text.add(token)
        if delta:
            self.job.events.put(delta)
        if self.text.stopped:
            self.finish("stop")
        elif self.count >= self.job.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """Release the held-back text and tell the client now, without waiting for the batch."""
        if self.done:
            return
        self.done = True
        tail = self.text.finish()
        if tail:
            self.job.events.put(tail)
        if self.text.stopped:
            reason = "stop"
        self.job.events.put(Finished(reason, self.job.prompt.prompt_tokens, self.count,
                                     time.perf_counter() - self.started))


class BatchStreamer:
    """Receives each step's token ids from model.generate (in the worker) and routes them per row."""

    def __init__(self, rows: list, eos_ids: set):
        self.rows, self.eos_ids = rows, eos_ids
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        tokens = np.asarray(value).reshape(len(self.rows), -1)[:, -1]
        for row, token in zip(self.rows, tokens.tolist()):
            row.add(int(token), self.eos_ids)

    def end(self) -> None:
        pass

    def all_done(self) -> bool:
        return all(row.done or row.job.cancelled.is_set() for row in self.rows)


class StopWhen:
    """A stopping criterion from a callable. generate() deep-copies its criteria: share, don't copy."""

    def __init__(self, predicate):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return bool(self.predicate())

    def __deepcopy__(self, memo):
        return self
