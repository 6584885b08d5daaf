#!/usr/bin/env python3.12
"""skrample's samplers for scripts/peers_bench.py: run by a Python >= 3.12 that has skrample (its core needs
numpy alone), while the network stays in fmconvert's process, which answers each model call over a pipe.

    python3.12 -m venv ENV && ENV/bin/pip install skrample==0.7.0 scipy
    python scripts/peers_bench.py --skrample ENV/bin/python

Protocol (both ways on stdin/stdout; an array is a line with its shape as JSON, then its float64 bytes): the
bench sends one JSON line, a job, then the noise; for each model call this program writes ``call TIMESTEP`` and
the sample x (VP or flow coordinates: x = α·x0 + σ·ε), and reads the network's raw output (ε, v or the flow
velocity ε − x0) back; at the end it writes ``done`` and the final sample. A job: ``model`` (epsilon, v_prediction,
flow), ``schedule`` (``scaled``: skrample's continuous beta schedule with ``beta_start``, ``beta_end``,
``beta_scale``; ``fixed``: the diffusers schedule's own (timestep, σ/α) pairs, ``points``, for a beta schedule
skrample has no class for; ``linear``: flow matching), ``subschedule`` (null, karras, exponential),
``sampler`` (a class of skrample.sampling.structured: UniPC, DPM, Adams), ``order`` and ``steps``.
Nothing here is fmconvert's code: it drives skrample as its README does (StructuredFunctionalAdapter). The
bench imports send and receive from here (skrample is imported only where it runs).
"""

import json
import sys

import numpy as np


def send(stream, array) -> None:
    """An array as the protocol has it: its shape (a JSON line), then its float64 bytes."""
    array = np.ascontiguousarray(array, dtype=np.float64)
    stream.write((json.dumps(list(array.shape)) + "\n").encode() + array.tobytes())
    stream.flush()


def receive(stream) -> np.ndarray:
    shape = json.loads(stream.readline())
    return np.frombuffer(stream.read(8 * int(np.prod(shape))), dtype=np.float64).reshape(shape)


def schedule_of(job: dict):
    """The job's skrample schedule."""
    from skrample import scheduling

    if job["schedule"] == "scaled":
        base = scheduling.Scaled(beta_start=job["beta_start"], beta_end=job["beta_end"], beta_scale=job["beta_scale"],
                                 base_timesteps=job["base_timesteps"])
    elif job["schedule"] == "fixed":
        points = np.asarray(job["points"], dtype=np.float64)
        base = scheduling.FixedSchedule.from_regular(points[:, 0], points[:, 1], scheduling.VariancePreserving())
    else:
        base = scheduling.FlowShift(scheduling.Linear(base_timesteps=job["base_timesteps"]), shift=job.get("shift", 1.0))
    if job.get("subschedule"):
        base = {"karras": scheduling.Karras, "exponential": scheduling.Exponential}[job["subschedule"]](base)
    return base


def main() -> None:
    from skrample.sampling import interface, models, structured

    kinds = {"epsilon": models.NoiseModel, "v_prediction": models.VelocityModel, "flow": models.FlowModel}
    read, write = sys.stdin.buffer, sys.stdout.buffer
    while line := read.readline():
        job = json.loads(line)
        noise = receive(read)
        sampler = getattr(structured, job["sampler"])(order=job["order"])

        def call(x, timestep, sigma, alpha):
            write.write(f"call {float(timestep)!r}\n".encode())
            send(write, x)
            return receive(read)

        final = interface.StructuredFunctionalAdapter(sampler).sample_model(
            noise.astype(np.float64), call, kinds[job["model"]](), schedule_of(job), job["steps"])
        write.write(b"done\n")
        send(write, final)


if __name__ == "__main__":
    main()
