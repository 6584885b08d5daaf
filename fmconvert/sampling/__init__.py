"""Layer 3, sampling: a loaded model, its noise, the run records and the samples they make.

- :mod:`~fmconvert.sampling.model`: a model loaded once as a velocity field, its grids and shapes;
- :mod:`~fmconvert.sampling.noise`: the noise, by image index;
- :mod:`~fmconvert.sampling.generate`: integrate (or drive a scheduler), batch by batch, in shards;
- :mod:`~fmconvert.sampling.runs`: :class:`~fmconvert.sampling.runs.Run`, one record of what ran;
- :mod:`~fmconvert.sampling.baselines`: diffusers' own schedulers on the unconverted network;
- :mod:`~fmconvert.sampling.shards`: resumable sample shards;
- :mod:`~fmconvert.sampling.distributed`: one process group for torchrun.
"""
