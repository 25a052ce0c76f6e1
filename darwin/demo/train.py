"""Training and scoring of the demo's tiny models: plain torch loops, sized for a few CPU minutes."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import transformers as tf

from darwin.demo.skills import answer_text, prompt


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


def encode_batch(tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels that score only the answer and the eos after it (the
    question's entity names are random, so learning to predict them is wasted capacity)."""
    rows = []
    for context, answer in pairs:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((ctx + ans, [-100] * len(ctx) + ans))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, mask, labels


def train(model, tokenizer, examples: Sequence[tuple[str, str]], steps: int, lr: float, seed: int,
          batch_size: int = 64, warmup: int = 20, replay: Sequence[tuple[str, str]] = (),
          replay_share: float = 0.0) -> list[float]:
    """AdamW with warmup and cosine decay over (question, answer) pairs; a `replay_share` of each batch is drawn
    from `replay` (the base's mix) so that a fine-tune keeps what it does not train. Returns the loss per step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    n_replay = round(batch_size * replay_share) if replay else 0
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.choices(examples, k=batch_size - n_replay) + rng.choices(replay, k=n_replay)
        ids, mask, labels = encode_batch(tokenizer, [qa_text(q, a) for q, a in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
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

