"""A character-level tokenizer built from scratch: one token per printable ASCII character, plus pad and eos."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ALPHABET = string.printable[:95] + "\n"  # letters, digits, punctuation, space; then newline


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE with no merges is a character tokenizer; `Fuse` joins characters back without spaces."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *ALPHABET])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)
