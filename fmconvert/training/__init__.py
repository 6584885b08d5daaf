"""Layer 5, training in the converted coordinates: fine-tuning and reflow.

- :mod:`~fmconvert.training.loop`: settings, data, the objective, checkpoints, LoRA, the loop;
- :mod:`~fmconvert.training.reflow`: couplings from a teacher, then training on them.
"""
