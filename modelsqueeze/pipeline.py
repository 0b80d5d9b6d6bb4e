"""Run steps one after another in memory, exactly as one command per step would.

Between steps the pair goes through `pack.round_trip` (what writing and reloading OUT.onnx + OUT.msq
would give), so `pipeline`/`run` and a chain of single commands produce byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from modelsqueeze import store
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import find_weights
from modelsqueeze.pack import packed_bytes, put_array, put_record, rendered, round_trip
from modelsqueeze.recipe import Step
from modelsqueeze.sidecar import record_size, record_size_bound
from modelsqueeze.tensor import CompressedTensor


@dataclass
class StepOutcome:
    """What one step did: the tensors it changed, its notes, the packed size after it, and (with
    data) accuracy. The step's model is not kept: a pipeline holds one model at a time."""

    step: Step
    changed: list[str]
    packed_bytes: int | None
    accuracy: float | None = None
    notes: list[str] = field(default_factory=list)


def describe(steps: Sequence[Step]) -> str:
    return " → ".join(s.command for s in steps) if steps else "(none)"


def _keep_only_gains(model: onnx.ModelProto, records: dict[str, CompressedTensor], result,
                     keep_values: bool = False, known_bytes: dict[str, int] | None = None) -> None:
    """No tensor is written bigger than it was: a changed tensor whose new record takes as many
    bytes as it did before (its previous record, or its dense data) is put back as it was, with a
    note. Tiny tensors (a record's metadata alone is ~200 B) and layouts that cannot pay (a scale
    per weight) are left alone this way, whatever the settings. With `keep_values` (prune: the
    zeros are what was asked for) such a tensor keeps its new values, stored dense. Records are
    encoded here only where a bound from their counts cannot tell (tiny tensors): the big ones are
    coded once per step, by the round trip (`known_bytes`: the input records' sizes from it)."""
    if not result.changed:
        return
    known_bytes = known_bytes or {}
    infos = {info.key: info for info in find_weights(model)}
    if any(key in infos and key in result.records and tuple(infos[key].shape) != result.records[key].shape
           for key in result.changed):
        return  # a step that reshaped the graph (prune --shrink): its tensors go together or not at all
    for key in list(result.changed):
        new = result.records.get(key)
        old = records.get(key)
        if new is None:
            continue
        info = infos.get(key)
        if info is None:  # a tensor the step added (svd factors)
            continue
        dense = info.n_params * np.dtype(info.dtype).itemsize
        if old is None and record_size_bound(new) < dense:
            continue
        before = dense if old is None else known_bytes.get(key) or record_size(old)
        after = record_size(new)
        if after < before:
            continue
        if keep_values and old is None:
            del result.records[key]
            put_array(result.model, key, new.decode())
            result.notes.append(f"{key}: stored dense ({before:,} B; as a record it would take {after:,} B)")
            continue
        if old is not None:
            result.records[key] = old
            put_record(result.model, key, old)
        else:
            del result.records[key]
            put_array(result.model, key, info.array())
        result.changed.remove(key)
        result.notes.append(f"{key}: left as it was ({before:,} B; stored this way it would take {after:,} B)")


def run_steps(
    model: onnx.ModelProto,
    records: dict[str, CompressedTensor],
    steps: Sequence[Step],
    on_step: Callable[[int, Step], None] | None = None,
    measure: Callable[[onnx.ModelProto], float] | None = None,
    size_last: bool = True,
    release: bool = False,
    name_steps: bool = True,
) -> tuple[onnx.ModelProto, dict[str, CompressedTensor], list[StepOutcome]]:
    """Apply `steps` in order to the logical `model` with its `records`. `on_step(i, step)` is
    called before each; `measure(rendered_graph)` (accuracy) after each when given. The packed size
after the last step is left None unless `size_last` (a caller that writes the pair measures the
file instead). With `release`, values held in memory for models other than the current one are
forgotten after each step (the caller keeps no other model of this run). A failing step
    raises a ModelSqueezeError naming it and the steps that ran before it (unless not `name_steps`:
    a single command's own error needs no "step 1")."""
    outcomes: list[StepOutcome] = []
    since = store.mark()  # what this run registers; the caller's models keep theirs
    written, written_records = model, records
    sizes: dict[str, int] = {}  # the current records' bytes, from the last round trip
    for index, step in enumerate(steps):
        last = index + 1 == len(steps)
        if on_step is not None:
            on_step(index, step)
        try:
            result = step.apply(model, records)
            if step.command != "huffman":  # lossless, and already the smallest coding of each stream
                _keep_only_gains(model, records, result, keep_values=step.command == "prune", known_bytes=sizes)
            model = written = None  # one model at a time: this step's input is let go (if the caller did)
            # The next step (and the size) sees what reloading the written pair would give; the
            # last result itself is what gets written, as a single command would write it.
            size = None
            if not last or size_last:
                sizes = {}
                model, records = round_trip(result.model, result.records, previous=records, record_bytes=sizes)
                size = packed_bytes(model, list(records.values()), sizes)  # each record coded once
        except ModelSqueezeError as exc:
            if not name_steps:
                raise
            before = f" (after {describe(steps[:index])})" if index else ""
            raise type(exc)(f"step {index + 1} {step.command}{before}: {exc}") from None
        accuracy = measure(rendered(result.model, result.records.values())) if measure is not None else None
        outcomes.append(StepOutcome(step, list(result.changed), size, accuracy, list(result.notes)))
        if last:
            written, written_records = result.model, result.records
        del result
        if release:
            store.retain(model, written, since=since)
    return written, written_records, outcomes
