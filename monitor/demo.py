"""``inversion-monitor demo``: the whole system on a laptop, from one command.

For now it trains a tiny Llama-style model on the synthetic reasoning corpus
with a plain PyTorch loop and prints the loss; later releases attach the
monitor, an embedded server and the HTML report.
"""

from __future__ import annotations


def run_demo(*, steps: int = 200, seed: int = 0, batch_size: int = 8) -> int:
    """Train for ``steps`` steps and print the loss trajectory; returns an exit code."""
    import torch
    from tqdm.auto import tqdm

    from inversion_monitor.toy.corpus import reasoning_corpus
    from inversion_monitor.toy.models import tiny_causal_lm
    from inversion_monitor.toy.tokenizer import char_tokenizer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", seed=seed)
    model.train()
    texts = reasoning_corpus(steps * batch_size, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="demo", unit="step")
    for step in bar:
        batch = tokenizer(
            texts[step * batch_size : (step + 1) * batch_size],
            return_tensors="pt",
            padding=True,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    print(f"loss: first {losses[0]:.3f}  last {losses[-1]:.3f}  ({steps} steps)")
    return 0
