"""Data: seqio tasks and mixtures (T0 and the embedded mini-T0), prompts, few-shot subsets."""
