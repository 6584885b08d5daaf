"""Layer 2, the diffusers integration: the only layer that imports diffusers at module level.

- :mod:`~fmconvert.integration.configs`: the conversion on configs alone (plain Python: ``wrap``);
- :mod:`~fmconvert.integration.network`: how a diffusers network is called and its output read;
- :mod:`~fmconvert.integration.conditioning`: what a user asks for, classifier-free guidance;
- :mod:`~fmconvert.integration.families`: what each model family needs (its conditioning, decoding);
- :mod:`~fmconvert.integration.adapters`: the converted denoisers (ModelMixin);
- :mod:`~fmconvert.integration.schedulers`: the schedulers a converted folder names;
- :mod:`~fmconvert.integration.source`: reading a source (``Source``); what a converted folder contains, its shims;
- :mod:`~fmconvert.integration.folder`: writing a converted folder, and loading it (``load``);
- :mod:`~fmconvert.integration.hub`, :mod:`~fmconvert.integration.push`: the Hugging Face Hub.
"""
