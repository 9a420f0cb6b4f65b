"""HyGen's latency predictor: linear regression of step time (ms) on S_p, S_d, S_p², N_p, N_d.

S_p = prefill tokens in the step, S_d = Σ decode context, N_p / N_d = prefilling / decoding sequences.
Fitted by least squares on profiled steps (from the ``sim`` engine — the roofline model — or the real
vLLM engine via ``duopool profile``); predicts in microseconds; reports MAPE on held-back samples.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duopool.core.perfmodel import PerfModel, ProfileSample

FEATURES = ("1", "S_p", "S_d", "S_p^2", "N_p", "N_d")


def features(s_p: float, s_d: float, n_p: float, n_d: float) -> tuple[float, ...]:
    return (1.0, s_p, s_d, s_p * s_p, n_p, n_d)


def sample_features(s: ProfileSample) -> tuple[float, ...]:
    return features(s.s_p, s.s_d, len(s.prefill), len(s.decode_contexts))


@dataclass(frozen=True)
class LatencyPredictor:
    coef: tuple[float, ...]  # per FEATURES, milliseconds
    train_mape: float = math.nan
    test_mape: float = math.nan
    n_train: int = 0
    n_test: int = 0

    def predict_ms(self, s_p: float, s_d: float, n_p: int, n_d: int) -> float:
        c = self.coef
        return c[0] + c[1] * s_p + c[2] * s_d + c[3] * s_p * s_p + c[4] * n_p + c[5] * n_d

    def predict_sample_ms(self, s: ProfileSample) -> float:
        return self.predict_ms(s.s_p, s.s_d, len(s.prefill), len(s.decode_contexts))

    def max_prefill_tokens(self, budget_ms: float, s_d: float, n_p: int, n_d: int, s_p0: float = 0.0) -> int:
        """Largest extra prefill tokens x with predict(s_p0 + x, …) ≤ budget: closed form of the quadratic."""
        c = self.coef
        rest = budget_ms - (c[0] + c[2] * s_d + c[4] * n_p + c[5] * n_d)
        a, b = c[3], c[1]
        # a·S² + b·S − rest ≤ 0
        if a > 1e-15:
            disc = b * b + 4 * a * rest
            if disc < 0:
                return 0
            smax = (-b + math.sqrt(disc)) / (2 * a)
        elif b > 0:
            smax = rest / b
        else:
            return 1 << 20
        return max(0, int(smax - s_p0))

    def mape(self, samples: Sequence[ProfileSample]) -> float:
        errs = [abs(self.predict_sample_ms(s) - s.step_ms) / s.step_ms for s in samples if s.step_ms > 0]
        return float(np.mean(errs)) if errs else math.nan

    def to_json(self) -> dict:
        return {"features": list(FEATURES), "coef_ms": list(self.coef), "train_mape": self.train_mape,
                "test_mape": self.test_mape, "n_train": self.n_train, "n_test": self.n_test}

    @classmethod
    def from_json(cls, d: dict) -> LatencyPredictor:
        return cls(tuple(float(x) for x in d["coef_ms"]), d.get("train_mape", math.nan), d.get("test_mape", math.nan),
                   int(d.get("n_train", 0)), int(d.get("n_test", 0)))


def fit(samples: Sequence[ProfileSample], holdout: float = 0.2, seed: int = 0,
        relative: bool = True) -> LatencyPredictor:
    """Least squares on a shuffled (1 − holdout) share; MAPE on the rest. ``relative`` weights each
    sample by 1/step so the fit minimises relative error (what MAPE measures)."""
    if len(samples) < len(FEATURES) + 1:
        raise ValueError(f"need at least {len(FEATURES) + 1} profile samples, got {len(samples)}")
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    n_test = int(len(idx) * holdout) if holdout > 0 else 0
    test = [samples[i] for i in idx[:n_test]]
    train = [samples[i] for i in idx[n_test:]]
    x = np.array([sample_features(s) for s in train], dtype=np.float64)
    y = np.array([s.step_ms for s in train], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)  # condition the S_p² column
    coef, *_ = np.linalg.lstsq((x / scale) * w[:, None], y * w, rcond=None)
    coef = coef / scale
    pred = LatencyPredictor(tuple(float(c) for c in coef))
    return LatencyPredictor(pred.coef, pred.mape(train), pred.mape(test) if test else math.nan, len(train), len(test))


# ---------------------------------------------------------------------- profiles
def synthetic_batches(n: int, seed: int = 0, max_prefill_tokens: int = 8192, max_decodes: int = 256,
                      max_context: int = 4096, kind: str = "mixed") -> list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]]:
    """Batches to profile, HyGen-style: a prefill part (0–4 chunks) and a decode part, or one of them.
    ``kind``: mixed | prefill | decode."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = kind if kind != "mixed" else rng.choice(["prefill", "decode", "both", "both"])
        chunks: list[tuple[int, int]] = []
        decs: list[int] = []
        if k in ("prefill", "both"):
            total = rng.randint(16, max_prefill_tokens)
            m = rng.randint(1, 4)
            cuts = sorted(rng.randint(1, total) for _ in range(m - 1))
            parts = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True) if b - a > 0]
            for q in parts:
                cached = rng.choice([0, 0, rng.randint(0, max_context)])
                chunks.append((q, cached + q))
        if k in ("decode", "both"):
            nd = rng.randint(1, max_decodes)
            mean = rng.randint(64, max_context)
            decs = [max(1, int(rng.gauss(mean, mean / 4))) for _ in range(nd)]
        out.append((tuple(chunks), tuple(decs)))
    return out


def profile_sim(pm: PerfModel, n: int = 600, seed: int = 0, noise: float = 0.0, **kw) -> list[ProfileSample]:
    """Profiles from the ``sim`` engine (the roofline model), optionally with multiplicative noise."""
    rng = random.Random(seed + 1)
    out = []
    for chunks, decs in synthetic_batches(n, seed=seed, **kw):
        t = pm.chunked_step_time_s(chunks, len(decs), float(sum(decs))) * 1e3
        if noise:
            t *= max(0.5, 1 + rng.gauss(0, noise))
        out.append(ProfileSample(chunks, decs, t))
    return out


def save_profiles(path: str | Path, samples: Sequence[ProfileSample], meta: dict | None = None) -> None:
    Path(path).write_text(json.dumps({"meta": meta or {}, "samples": [s.to_json() for s in samples]}))


def load_profiles(path: str | Path) -> list[ProfileSample]:
    d = json.loads(Path(path).read_text())
    return [ProfileSample.from_json(x) for x in d["samples"]]


_CACHE: dict = {}


def predictor_for(pm: PerfModel, **kw) -> LatencyPredictor:
    """A predictor fitted on sim-engine profiles of ``pm`` over the regime co-located serving runs in
    (cached per hardware/model/tp/efficiency)."""
    key = (pm.hardware, pm.model, pm.tp, pm.eff, tuple(sorted(kw.items())))
    p = _CACHE.get(key)
    if p is None:
        p = fit(profile_sim(pm, **({"n": 800, "max_prefill_tokens": 4096, "max_decodes": 256} | kw)))
        _CACHE[key] = p
    return p
