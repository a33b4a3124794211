"""A verifiable task for R1-Zero-style GRPO in miniature: add two numbers, reasoning inside ``<think> ...
</think>`` and answering inside ``<answer> ... </answer>``, scored by DeepSeek-R1's rule-based rewards.

Prompts are ``"12+07="`` (operands zero-padded to two digits, so every prompt has the same length and a
batch needs no attention mask); a well-formed completion is ``<think> ... </think><answer>19</answer><eos>``. The
accuracy reward checks the answer by rule (the integer inside the answer tags equals the sum); the format
reward checks the template. A fixed held-out set of problems (never drawn for training) gives pass@1.
"""

from __future__ import annotations

import dataclasses
import re

import torch

SPECIAL = ("<pad>", "<eos>", "<think>", "</think>", "<answer>", "</answer>")
CHARS = "0123456789+= "


class Tokenizer:
    """Characters of ``CHARS`` plus the special tokens, one id each (``<pad>`` is 0, ``<eos>`` 1)."""

    def __init__(self):
        self.vocab = list(SPECIAL) + list(CHARS)
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad, self.eos = self.ids["<pad>"], self.ids["<eos>"]
        self._split = re.compile("|".join(re.escape(t) for t in SPECIAL[2:]) + "|.")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids[t] for t in self._split.findall(text)]

    def decode(self, ids) -> str:
        """Text up to the first ``<eos>`` (padding dropped)."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i != self.pad:
                out.append(self.vocab[i])
        return "".join(out)


_FORMAT = re.compile(r"^<think>[^<]*</think><answer>[^<]*</answer>$")
_ANSWER = re.compile(r"<answer>\s*(\d+)\s*</answer>")


def format_reward(completion: str) -> float:
    """1 when the completion is exactly ``<think>...</think><answer>...</answer>`` (R1's format reward)."""
    return 1.0 if _FORMAT.match(completion) else 0.0


def accuracy_reward(completion: str, answer: int) -> float:
    """1 when the first ``<answer>`` holds the right integer (R1's rule-checked accuracy reward)."""
    found = _ANSWER.search(completion)
    return 1.0 if found is not None and int(found.group(1)) == answer else 0.0


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a:02d}+{self.b:02d}="

    @property
    def answer(self) -> int:
        return self.a + self.b

    def worked_solution(self) -> str:
        """A reference completion for the supervised warm-up (R1's cold start)."""
        return f"<think>{self.a}+{self.b}</think><answer>{self.answer}</answer>"


class AdditionTask:
    """Problems with operands in [0, max_operand]; ``held_out`` of them are kept out of training."""

    def __init__(self, max_operand: int = 19, held_out: int = 40, seed: int = 0):
        if not 0 < max_operand <= 99:
            raise ValueError(f"max_operand must be in [1, 99] (two-digit prompts), got {max_operand}")
        everything = [Problem(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed)).tolist()
        self.eval_problems = [everything[i] for i in order[:held_out]]
        self.train_problems = [everything[i] for i in order[held_out:]]
        self.tokenizer = Tokenizer()

    def sample(self, n: int, generator: torch.Generator) -> list[Problem]:
        idx = torch.randint(len(self.train_problems), (n,), generator=generator).tolist()
        return [self.train_problems[i] for i in idx]

    def rewards(self, problems: list[Problem], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(accuracy [n], format [n]) rewards."""
        acc = torch.tensor([accuracy_reward(c, p.answer) for p, c in zip(problems, completions, strict=True)])
        fmt = torch.tensor([format_reward(c) for c in completions])
        return acc, fmt

    def encode_prompts(self, problems: list[Problem]) -> torch.Tensor:
        """``[n, 6]`` prompt ids (every prompt is six characters)."""
        return torch.tensor([self.tokenizer.encode(p.prompt) for p in problems])
