"""Layer 0, files: reading and writing what users hand in and get back. Plain Python, Pillow and
safetensors; nothing here knows about models.

- :mod:`~fmconvert.files.atomic`: writes that lose nothing (temporary path, then rename);
- :mod:`~fmconvert.files.images`: the one image reader (every folder input) and writer;
- :mod:`~fmconvert.files.references`: what a data or reference string names (``builtin:``, a
  folder, a statistics file), parsed once.
"""
