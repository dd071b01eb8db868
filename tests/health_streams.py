"""Helpers and recorded streams for the training-health detector tests: a seeded log-normal
stream, the steps a detector fires on, and streams recorded in the failure corpus and the demo
(benchmarks/failure_corpus.py; inversion-monitor demo)."""

from __future__ import annotations

import math
import random

from inversion_monitor.server.detectors import (
    EntropyCollapse,
    EntropySurge,
    GradNormSpike,
    KLSurge,
    LengthDrift,
    LossSpike,
    Observation,
    RewardCollapse,
)

Detector = LossSpike | GradNormSpike | KLSurge | RewardCollapse | EntropySurge | LengthDrift


def lognormal(level: float, sd: float, steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [level * math.exp(rng.gauss(0.0, sd)) for _ in range(steps)]


def firings(det: Detector | EntropyCollapse, field: str, values: list[float]) -> list[int]:
    out = []
    for step, v in enumerate(values):
        t = det.update(Observation(step, float(step), **{field: v}))  # type: ignore[arg-type]
        if t is not None and t.firing:
            out.append(step)
    return out


# KL of the failure corpus' rl-lr_jump-s0, steps 1-29: the learning rate jumps 300x at step 25;
# KL 4.92 (6.1 x its level, robust z +4.5: CUSUM 2.5, under the threshold) then 18.7
GRPO_KL_JUMP = [
    0.0, 0.2039, 0.1389, 0.2582, 0.3794, 0.3866, 0.4049, 0.7921, 0.5734, 0.7904, 0.7101,
    0.7082, 0.7305, 0.6191, 0.8092, 0.8772, 1.151, 0.8512, 0.9289, 0.9247, 1.152, 0.9026,
    1.192, 1.301, 1.079, 4.922, 18.7, 6.934, 9.265,
]  # fmt: skip


# Two healthy GRPO-loop runs of the failure corpus (build/failure_corpus.json), as recorded: a
# reward dip of three records while the completions grew 1.8x (rl-healthy-s19, steps 60-112),
# and a length wander to 1.5-1.8x for ~14 records (rl-healthy-s23, steps 40-100)
GRPO_REWARD_DIP = [
    0.2456, 0.2498, 0.2214, 0.2072, 0.223, 0.2207, 0.2234, 0.232, 0.1978, 0.2346, 0.2135,
    0.2162, 0.2247, 0.2103, 0.1984, 0.175, 0.2292, 0.2268, 0.2073, 0.1948, 0.2347, 0.2116,
    0.2386, 0.2427, 0.2251, 0.2823, 0.2204, 0.2536, 0.2417, 0.2243, 0.2344, 0.2476, 0.2295,
    0.2193, 0.2198, 0.2196, 0.2573, 0.2261, 0.23, 0.2268, 0.2049, 0.2636, 0.2311, 0.2248,
    0.2072, 0.196, 0.1927, 0.1627, 0.1516, 0.1692, 0.1995, 0.199, 0.216,
]  # fmt: skip


GRPO_LENGTH_WANDER = [
    26.25, 26.62, 28.5, 27.94, 27.5, 28.69, 30.88, 30.19, 29.06, 34.19, 30.94, 27.69, 28.12,
    29.5, 31.38, 29.5, 34.19, 38.62, 32.25, 28.31, 27.19, 26.25, 25.81, 25.19, 27.12, 28.31,
    26.94, 26.25, 26.44, 29.38, 25.75, 29.31, 25.19, 31.19, 28.81, 32.88, 28.19, 33.62, 39.0,
    42.19, 50.75, 49.5, 43.0, 50.88, 42.12, 33.62, 45.31, 39.31, 37.56, 32.25, 36.44, 29.31,
    31.75, 30.81, 27.25, 28.5, 25.44, 26.38, 22.69, 21.44, 22.94,
]  # fmt: skip


# Healthy GRPO-loop runs of the failure corpus (build/failure_corpus.json), as recorded (4
# significant digits), each up to a few records past where a detector used to fire on it.
# KL of rl-healthy-s33, steps 1-100: a steady climb 0.45 -> 1.7 nats over steps 78-94 that a
# 64-record median lags, then a lone record at 3.1 x that level (KLSurge fired at step 94)
GRPO_KL_CLIMB = [
    0.0, 0.1125, 0.1892, 0.391, 0.5272, 0.5276, 0.8786, 0.6439, 0.8403, 0.7125, 0.9216, 0.8848,
    0.6361, 0.8702, 0.6529, 2.335, 1.287, 0.4333, 0.448, 0.47, 0.4676, 0.3687, 0.3401, 0.4661,
    0.3589, 0.3746, 0.3215, 0.4785, 0.6956, 0.6599, 0.4981, 0.6147, 0.5033, 0.4993, 0.5565,
    0.5102, 0.4436, 0.4929, 0.587, 0.5301, 0.4565, 0.5097, 0.5912, 0.5074, 0.3956, 0.4614,
    0.3593, 0.3838, 0.5909, 0.4077, 0.4309, 0.4227, 0.4587, 0.3861, 0.3735, 0.3568, 0.3717,
    0.4996, 1.274, 0.5499, 0.7216, 0.6619, 0.787, 0.7032, 0.7039, 0.5092, 0.6173, 0.5483,
    0.5584, 0.3639, 0.4583, 0.4524, 0.4006, 0.7627, 0.4873, 0.6316, 0.5878, 0.4963, 0.4507,
    0.5559, 0.5472, 0.5791, 0.6102, 0.7626, 0.8079, 0.8802, 0.9135, 1.049, 1.046, 0.9283,
    1.336, 1.294, 1.497, 1.739, 1.551, 1.727, 1.587, 1.823, 1.561, 1.664,
]  # fmt: skip


# policy entropy of rl-healthy-s54, steps 1-46: a rise by a third over fifteen steps, then a
# lone record at 1.47 x the level (EntropySurge fired at step 40)
GRPO_ENTROPY_RISE = [
    1.34, 1.332, 1.309, 1.287, 1.275, 1.291, 1.232, 1.202, 1.123, 1.194, 1.238, 1.239, 1.155,
    1.133, 1.242, 1.195, 1.278, 1.259, 1.316, 1.276, 1.349, 1.358, 1.442, 1.321, 1.316, 1.373,
    1.489, 1.275, 1.636, 1.472, 1.482, 1.412, 1.539, 1.693, 1.776, 1.795, 1.681, 1.689, 1.687,
    1.947, 1.684, 1.565, 1.529, 1.568, 1.473, 1.427,
]  # fmt: skip


# policy entropy of rl-healthy-s49, steps 1-88: a slow fall of a tenth, then a lone record at
# 0.74 x the level (EntropyCollapse fired at step 82)
GRPO_ENTROPY_SAG = [
    1.411, 1.538, 1.749, 1.602, 1.478, 1.414, 1.346, 1.356, 1.346, 1.32, 1.331, 1.291, 1.333,
    1.337, 1.349, 1.325, 1.284, 1.344, 1.294, 1.365, 1.412, 1.435, 1.424, 1.435, 1.513, 1.377,
    1.416, 1.342, 1.343, 1.453, 1.362, 1.42, 1.388, 1.339, 1.383, 1.307, 1.328, 1.327, 1.265,
    1.229, 1.251, 1.238, 1.232, 1.276, 1.208, 1.245, 1.35, 1.267, 1.429, 1.376, 1.349, 1.342,
    1.322, 1.333, 1.386, 1.4, 1.334, 1.354, 1.405, 1.334, 1.258, 1.292, 1.321, 1.23, 1.274,
    1.328, 1.343, 1.278, 1.291, 1.268, 1.252, 1.16, 1.139, 1.234, 1.231, 1.21, 1.182, 1.138,
    1.288, 1.151, 1.122, 0.9866, 1.02, 1.098, 1.148, 1.165, 1.175, 1.175,
]  # fmt: skip


# the GRPO policy loss of rl-healthy-s34, steps 1-30: signed, around 0
GRPO_SIGNED_LOSS = [
    -0.04095, 0.1004, -0.02544, -0.04976, -0.04377, -0.08065, 0.002468, 0.06188, -0.03559,
    -0.04739, -0.04025, 0.03822, -0.05605, 0.05824, -0.05551, 0.04758, -0.06203, -0.2515,
    -0.03355, -0.04485, 0.1865, 0.06787, 0.1209, -0.1206, -0.0194, -0.03177, 0.05947, -0.1168,
    0.2287, 0.03268,
]  # fmt: skip


# The demo's destabilised GRPO loop (`inversion-monitor demo`, seed 0, default steps), as the
# server stored it: mean reward per step; the learning rate is 1000x from step 21, the reward
# ~0 from step 22. Its healthy twin (demo-rl) is the same until step 21.
DEMO_UNSTABLE_REWARD = [
    0.2537, 0.1097, 0.2236, 0.1661, 0.135, 0.2791, 0.2255, 0.169, 0.1691, 0.4272, 0.2544,
    0.2823, 0.1698, 0.2797, 0.2546, 0.309, 0.3705, 0.1958, 0.3109, 0.1373, 0.2791, 0.0005,
    0.0079, 0.0027, 0.0074, 0.004, 0.0095, 0.009, 0.0051, 0.0027, 0.0027, 0.0053, 0.0013,
    0.0092, 0.0026, 0.004, 0.0039, 0.0067, 0.0, 0.0, 0.0078, 0.0013, 0.0026, 0.0, 0.0026,
    0.004, 0.0026, 0.0039, 0.0, 0.0,
]  # fmt: skip


DEMO_HEALTHY_REWARD = [
    0.2537, 0.1097, 0.2236, 0.1661, 0.135, 0.2791, 0.2255, 0.169, 0.1691, 0.4272, 0.2544,
    0.2823, 0.1698, 0.2797, 0.2546, 0.309, 0.3705, 0.1958, 0.3109, 0.1373, 0.2791, 0.4278,
    0.2275, 0.3124, 0.1387, 0.3117, 0.3127, 0.3973, 0.1959, 0.2808, 0.256, 0.1939, 0.3389,
    0.2821, 0.1968, 0.2809, 0.2568, 0.196, 0.4258, 0.2812, 0.3111, 0.283, 0.3696, 0.3126,
    0.1674, 0.2531, 0.2831, 0.1964, 0.5429, 0.3989, 0.1657, 0.5114, 0.3938, 0.484, 0.3956,
    0.3378, 0.2252, 0.1957, 0.4264, 0.2568, 0.428, 0.4844, 0.2845, 0.4819, 0.3109, 0.3105,
    0.2536, 0.3987, 0.57, 0.3388, 0.4271, 0.6554, 0.2546, 0.2834, 0.6277, 0.6251, 0.2813,
    0.5403, 0.4837, 0.4836,
]  # fmt: skip
