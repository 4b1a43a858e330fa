"""A reward function as TRL's GRPOTrainer takes one: 1.0 when the last number in a completion
equals the row's `answer` column, else 0.0; None (no reward) for a row without an answer.

Serve it to burnish with trl_reward.py (see that file), or pass it to GRPOTrainer unchanged.
"""

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def text_of(completion):
    # Conversations come as a list holding the one assistant message.
    if isinstance(completion, list):
        return completion[-1]["content"]
    return completion


def exact_answer(completions, answer, **kwargs):
    rewards = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            rewards.append(None)
            continue
        numbers = NUMBER.findall(text_of(completion).replace(",", ""))
        rewards.append(1.0 if numbers and float(numbers[-1]) == float(expected) else 0.0)
    return rewards
