"""The addition task: tokenizer round trip, R1's rule-based rewards on well- and ill-formed completions, the
held-out split, fixed-width prompts."""

import torch

from r1kernels.train.task import AdditionTask, Problem, Tokenizer, accuracy_reward, format_reward


def test_tokenizer_round_trip_and_special_tokens():
    tok = Tokenizer()
    text = "<think>12+7</think><answer>19</answer>"
    ids = tok.encode(text)
    assert ids[0] == tok.ids["<think>"] and len(ids) == 2 + 4 + 1 + 2 + 1
    assert tok.decode([*ids, tok.eos, tok.ids["5"]]) == text  # decoding stops at <eos>


def test_rewards():
    good = Problem(12, 7).worked_solution()
    assert format_reward(good) == 1.0 and accuracy_reward(good, 19) == 1.0
    assert accuracy_reward("<answer>18</answer>", 19) == 0.0
    assert format_reward("<answer>19</answer>") == 0.0 and accuracy_reward("<answer>19</answer>", 19) == 1.0
    assert format_reward("<think>x</think><answer>19</answer> trailing") == 0.0
    assert accuracy_reward("19", 19) == 0.0


def test_held_out_problems_never_train_and_prompts_have_one_width():
    task = AdditionTask(max_operand=19, held_out=40, seed=1)
    assert not set(task.eval_problems) & set(task.train_problems)
    assert len(task.eval_problems) + len(task.train_problems) == 400
    drawn = task.sample(200, torch.Generator().manual_seed(0))
    assert all(p in set(task.train_problems) for p in drawn)
    prompts = task.encode_prompts(drawn)
    assert prompts.shape == (200, 6)
    acc, fmt = task.rewards(drawn[:2], [p.worked_solution() for p in drawn[:2]])
    assert acc.tolist() == [1.0, 1.0] and fmt.tolist() == [1.0, 1.0]
