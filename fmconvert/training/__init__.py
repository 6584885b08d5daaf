"""Layer 5, training in the converted coordinates: fine-tuning and reflow.

- :mod:`~fmconvert.training.settings`: ``TrainSettings``, a run and its checkpoint's identity (no torch);
- :mod:`~fmconvert.training.data`: what is trained on;
- :mod:`~fmconvert.training.objective`: what one step computes: its times, draws and loss;
- :mod:`~fmconvert.training.checkpoint`: the work folder, and saving, checking and resuming a run;
- :mod:`~fmconvert.training.lora`: LoRA adapters, and merging them into the weights;
- :mod:`~fmconvert.training.loop`: the loop (``train``);
- :mod:`~fmconvert.training.reflow`: couplings from a teacher, then training on them.
"""
