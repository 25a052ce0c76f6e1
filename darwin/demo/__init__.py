"""The demo's parents: two synthetic skills in ARC format, a character tokenizer and three tiny Qwen3.5 models
(base, father = full fine-tune on skill A, mother = LoRA fine-tune on skill B), all built locally."""
