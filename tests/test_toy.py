"""The offline fixtures behave: tokenizer round trip, corpus, all four models."""

from __future__ import annotations

import torch

from inversion_monitor.toy.corpus import arithmetic_problems, fact_problems, task_problems
from inversion_monitor.toy.tokenizer import VOCAB_SIZE


def test_tokenizer_round_trip_and_special_ids(tokenizer, corpus):
    text = corpus[0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.pad_token_id == 0
    assert tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.unk_token_id not in ids


def test_tokenizer_pads_on_the_right(tokenizer):
    batch = tokenizer(["Q: 1", "Q: 12+3"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch["input_ids"][0, -1].item() == tokenizer.pad_token_id


def test_corpus_is_correct_arithmetic():
    for problem in arithmetic_problems(200, seed=7):
        steps = problem.completion.strip().splitlines()
        assert steps[-1] == f"A: {problem.answer}"
        for line in steps[:-1]:
            lhs, rhs = line.rstrip(".").split("=")
            assert eval(lhs) == int(rhs)  # only digits and + - * from our own generator


def test_fact_problems_are_one_correct_operation_on_operands_up_to_twelve():
    problems = fact_problems(300, seed=7)
    assert problems == fact_problems(300, seed=7) == task_problems("facts", 300, seed=7)
    assert {next(c for c in p.completion if c in "+-*") for p in problems} == set("+-*")
    for problem in problems:
        work, answer = problem.completion.strip().splitlines()
        lhs, rhs = work.rstrip(".").split("=")
        assert problem.prompt == f"Q: {lhs}=?\n" and answer == f"A: {problem.answer}"
        assert eval(lhs) == int(rhs) == problem.answer  # only digits and + - * from our generator
        assert all(2 <= int(x) <= 12 for x in lhs.replace("*", "+").replace("-", "+").split("+"))
    assert len({p.prompt for p in problems}) > 150  # of 11 x 11 x 3 = 363 distinct problems


def test_every_architecture_runs_forward_and_backward(tiny_model, tokenizer, corpus):
    batch = tokenizer(corpus[:3], padding=True, return_tensors="pt")
    tiny_model.train()
    out = tiny_model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, VOCAB_SIZE)
    out.loss.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_model_build_is_deterministic_and_leaves_global_rng_alone(make_model):
    state = torch.random.get_rng_state()
    a = make_model("llama", seed=5)
    b = make_model("llama", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
