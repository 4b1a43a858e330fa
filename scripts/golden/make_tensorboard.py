#!/usr/bin/env python3
"""A TensorBoard event file written by TensorBoard's own record writer and protobuf classes, to
tests/fixtures/tensorboard/: what burnish's `output.tensorboard` must write byte for byte for the
same events, and what TensorBoard reads back from it (`expected.json`).

The events are those of a run resumed at step 3: the file version (with the writer's name), a
session start at step 3 (TensorBoard drops the earlier file's points from step 3 on), a training
step's scalars, an evaluation's, and a held-out check's, at fixed wall times.

Needs `pip install tensorboard`. Rerunning it rewrites the same bytes.
"""

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tensorboard"
NAME = "events.out.tfevents.golden"


def scalars(wall_time, step, values):
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values])
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    events = [
        event_pb2.Event(
            wall_time=1764374400.25,
            file_version="brain.Event:2",
            source_metadata=event_pb2.SourceMetadata(writer="burnish"),
        ),
        event_pb2.Event(
            wall_time=1764374400.25, step=3, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        ),
        scalars(1764374401.5, 3, [("train/loss", 2.75), ("train/lr", 1e-4), ("train/grad_norm", 0.8125)]),
        scalars(1764374402.125, 3, [("eval/loss", 2.5), ("eval/rewards/judge/mean", -0.375)]),
        scalars(1764374403.0, 4, [("check/exact_match", 0.5)]),
    ]
    with open(OUT / NAME, "wb") as f:
        writer = RecordWriter(f)
        for event in events:
            writer.write(event.SerializeToString())
        writer.flush()
    accumulator = EventAccumulator(str(OUT))
    accumulator.Reload()
    read = {
        tag: [[e.step, e.value] for e in accumulator.Scalars(tag)] for tag in sorted(accumulator.Tags()["scalars"])
    }
    (OUT / "expected.json").write_text(json.dumps(read, indent=1) + "\n")
    print(read)


if __name__ == "__main__":
    main()
