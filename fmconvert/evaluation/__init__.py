"""Layer 4, evaluation: what the samples are worth.

- :mod:`~fmconvert.evaluation.features`: the feature extractors (registry);
- :mod:`~fmconvert.evaluation.fid`: FID and KID, sweeps over samplers and NFE;
- :mod:`~fmconvert.evaluation.agreement`: field agreement (converted vs source vs other model);
- :mod:`~fmconvert.evaluation.quality`: digits-zoo quality;
- :mod:`~fmconvert.evaluation.report`: the full story for one model, as a folder.
"""
