"""Layer 1, the math: pure torch, importing nothing from diffusers or the rest of fmconvert (a
test imports it with diffusers blocked, and tests/test_layers.py checks every import).

- :mod:`~fmconvert.math.paths`: Gaussian paths x = α(s)·x0 + σ(s)·ε, s ∈ [0, 1], s = 1 noise;
- :mod:`~fmconvert.math.descriptions`: paths as plain data (what a converted folder records);
- :mod:`~fmconvert.math.predictions`: every prediction type as coefficients on (x̂0, ε̂);
- :mod:`~fmconvert.math.conversion`: a model on one path as a model on another;
- :mod:`~fmconvert.math.grids`: time grids s_0 = 1 > … > s_N = 0;
- :mod:`~fmconvert.math.solvers`: ODE solvers on a velocity field.
"""
