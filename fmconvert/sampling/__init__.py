"""Layer 3, sampling: a loaded model, its noise, the run records and the samples they make.

- :mod:`~fmconvert.sampling.generate`: load a model once, draw noise, integrate, shard;
- :mod:`~fmconvert.sampling.runs`: :class:`~fmconvert.sampling.runs.Run`, one record of what ran;
- :mod:`~fmconvert.sampling.baselines`: diffusers' own schedulers on the unconverted network;
- :mod:`~fmconvert.sampling.shards`: resumable sample shards;
- :mod:`~fmconvert.sampling.distributed`: one process group for torchrun.
"""
