"""Training and scoring of the demo's tiny models: plain torch loops, sized for a few CPU minutes."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
import transformers as tf

from darwin.demo.skills import answer_text, prompt

PROGRESS_EVERY = 50  # training steps between progress lines


def model_config(vocab_size: int, hidden: int = 128, layers: int = 4) -> tf.Qwen3_5TextConfig:
    """A Qwen3.5 hybrid text model: Gated DeltaNet (linear attention) and full attention layers, 1:1."""
    return tf.Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        layer_types=["linear_attention", "full_attention"] * (layers // 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=hidden // 4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_value_head_dim=hidden // 4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def qa_text(question: str, answer: str) -> tuple[str, str]:
    return prompt(question), f" {answer}"


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, answer ids + eos) per (context, answer)."""
    contexts = tokenizer([context for context, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([answer for _, answer in pairs], add_special_tokens=False)["input_ids"]
    return [(ctx, ans + [tokenizer.eos_token_id]) for ctx, ans in zip(contexts, answers)]


def pad_batch(tokenizer, rows: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels that score only the answer and the eos after it (the
    question's entity names are random, so learning to predict them is wasted capacity)."""
    width = max(len(ctx) + len(ans) for ctx, ans in rows)
    ids, labels, mask = [], [], []
    for ctx, ans in rows:
        pad = width - len(ctx) - len(ans)
        ids.append(ctx + ans + [tokenizer.pad_token_id] * pad)
        labels.append([-100] * len(ctx) + ans + [-100] * pad)
        mask.append([1] * (len(ctx) + len(ans)) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def encode_batch(tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    return pad_batch(tokenizer, tokenize_pairs(tokenizer, pairs))


def train(model, tokenizer, examples: Sequence[tuple[str, str]], steps: int, lr: float, seed: int,
          batch_size: int = 64, warmup: int = 20, replay: Sequence[tuple[str, str]] = (),
          replay_share: float = 0.0, until: int | None = None,
          progress: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with warmup and cosine decay over (question, answer) pairs; a `replay_share` of each batch is drawn
    from `replay` (the base's mix) so that a fine-tune keeps what it does not train. Returns the loss per step;
    `until` stops after that many steps of the same schedule (the check that a recipe still trains as it did);
    `progress(step, loss)` is called every PROGRESS_EVERY steps.
    The batches come from `seed` alone and nothing is drawn from torch's global generator (the models have no
    dropout), so two trainings may run side by side in one process."""
    rng = random.Random(seed)
    # tokenized once: the draws below pick the same rows from these lists as from `examples` and `replay`
    examples, replay = (tokenize_pairs(tokenizer, [qa_text(q, a) for q, a in pairs]) if pairs else []
                        for pairs in (examples, replay))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    n_replay = round(batch_size * replay_share) if replay else 0
    model.train()
    losses = []
    for _ in range(steps if until is None else min(until, steps)):
        batch = rng.choices(examples, k=batch_size - n_replay) + rng.choices(replay, k=n_replay)
        ids, mask, labels = pad_batch(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None and len(losses) % PROGRESS_EVERY == 0:
            progress(len(losses), losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def correct(model, tokenizer, rows: Sequence[dict], batch_size: int = 256) -> list[bool]:
    """Per question, whether the model picks the right choice by acc_norm, as lm-eval scores arc_challenge: the
    choice with the highest log-likelihood per character of the choice text, after `Question: ...\\nAnswer:`."""
    pairs = [(prompt(row["question"]), " " + text) for row in rows for text in row["choices"]["text"]]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask, labels = encode_batch(tokenizer, chunk)
        labels[labels == tokenizer.eos_token_id] = -100  # the choice is scored without the eos that ends it
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (logp * (targets != -100)).sum(-1).tolist()
    picks = []
    for i, row in enumerate(rows):
        texts = row["choices"]["text"]
        norm = [scores[i * len(texts) + j] / len(text) for j, text in enumerate(texts)]
        picks.append(row["choices"]["label"][max(range(len(texts)), key=norm.__getitem__)] == row["answerKey"])
    return picks


def accuracy(model, tokenizer, rows: Sequence[dict]) -> float:
    picks = correct(model, tokenizer, rows)
    return sum(picks) / len(picks)


def qa_pairs(rows: Sequence[dict]) -> list[tuple[str, str]]:
    return [(row["question"], answer_text(row)) for row in rows]

