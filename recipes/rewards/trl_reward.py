#!/usr/bin/env python3
"""Serves a reward function written for TRL's GRPOTrainer to `burnish train` as a reward program.

    [[grpo.reward_functions]]
    kind = "program"
    name = "exact_answer"
    command = ["python3", "rewards/trl_reward.py", "rewards/exact_answer.py:exact_answer"]

burnish writes one JSON object a line: the keyword arguments GRPOTrainer passes a reward
function (`prompts`, `completions`, `completion_ids` and each of the dataset's other columns, one
value per completion; conversations as lists of messages). This calls the function with them and
writes back one JSON array a line, a reward per completion (`None` as null). Whatever the
function prints goes to standard error, so it shows in burnish's output without breaking the
exchange. Needs only the standard library; the function may import what it likes.
"""

import importlib.util
import json
import math
import sys


def load(spec: str):
    path, _, name = spec.rpartition(":")
    if not path or not name:
        sys.exit(f"trl_reward.py: expected FILE.py:FUNCTION, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location("reward_functions", path)
    if module_spec is None:
        sys.exit(f"trl_reward.py: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return getattr(module, name)
    except AttributeError:
        sys.exit(f"trl_reward.py: {path} defines no {name}")


def reward(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: trl_reward.py FILE.py:FUNCTION")
    function = load(sys.argv[1])
    answers, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        rewards = function(**json.loads(line))
        answers.write(json.dumps([reward(r) for r in rewards]) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
