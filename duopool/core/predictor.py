"""HyGen's latency predictor: linear regression of step time (ms) on S_p, S_d, S_p², N_p, N_d.

S_p = prefill tokens in the step, S_d = Σ decode context, N_p / N_d = prefilling / decoding sequences.
Fitted by least squares on profiled steps (from the ``sim`` engine — the roofline model — or the real
vLLM engine via ``duopool profile``); predicts in milliseconds; reports MAPE on held-back samples.

Piecewise by regime: the linear layers turn from memory-bound to compute-bound at the saturation batch
(``PerfModel.saturation_batch()``, ~400 tokens for Llama-3.1-8B on an H100), a kink one set of coefficients
cannot follow. ``fit(..., edges=...)`` therefore fits one coefficient set per range of batch tokens
``S_p + N_d`` (each still linear in the same features), and ``max_prefill_tokens`` inverts the piecewise
prediction regime by regime in closed form.
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duopool.core.perfmodel import PerfModel, ProfileSample

FEATURES = ("1", "S_p", "S_d", "S_p^2", "N_p", "N_d")
MIN_REGIME_SAMPLES = 5 * len(FEATURES)  # a regime with fewer training samples is merged into a neighbour
UNBOUNDED = 1 << 20  # max_prefill_tokens when the prediction never reaches the budget
_bisect_right = bisect.bisect_right


def features(s_p: float, s_d: float, n_p: float, n_d: float) -> tuple[float, ...]:
    return (1.0, s_p, s_d, s_p * s_p, n_p, n_d)


def sample_features(s: ProfileSample) -> tuple[float, ...]:
    return features(s.s_p, s.s_d, len(s.prefill), len(s.decode_contexts))


def batch_tokens(s: ProfileSample) -> int:
    """What selects the regime: tokens through the linear layers, S_p + N_d."""
    return s.s_p + len(s.decode_contexts)


def regime_edges(pm: PerfModel) -> tuple[int, ...]:
    """Regime boundaries in batch tokens for profiles of ``pm``: its saturation batch (where the linear
    layers turn compute-bound) and 4× that, so the range the ``hygen`` budget usually lands in (one to a
    few thousand prefill tokens) gets its own coefficients."""
    sat = pm.saturation_batch()
    return (sat, 4 * sat)


@dataclass(frozen=True)
class LatencyPredictor:
    """``coefs[k]`` (per FEATURES, milliseconds) applies to batches with ``edges[k-1] <= S_p + N_d <
    edges[k]``; one set and no edges is HyGen's plain linear model. A flat tuple of coefficients is
    accepted for that case: ``LatencyPredictor((c0, …, c5))``."""

    coefs: tuple[tuple[float, ...], ...]
    train_mape: float = math.nan
    test_mape: float = math.nan
    n_train: int = 0
    n_test: int = 0
    edges: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        coefs = self.coefs
        if coefs and not isinstance(coefs[0], (tuple, list, np.ndarray)):
            coefs = (coefs,)
        coefs = tuple(tuple(float(c) for c in cs) for cs in coefs)
        edges = tuple(int(e) for e in self.edges)
        if any(len(cs) != len(FEATURES) for cs in coefs) or len(coefs) != len(edges) + 1:
            raise ValueError(f"need len(edges) + 1 coefficient sets of {len(FEATURES)}; "
                             f"got {len(coefs)} sets for {len(edges)} edges")
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or (edges and edges[0] <= 0):
            raise ValueError(f"edges must be positive and increasing, got {edges}")
        object.__setattr__(self, "coefs", coefs)
        object.__setattr__(self, "edges", edges)

    def predict_ms(self, s_p: float, s_d: float, n_p: int, n_d: int) -> float:
        c = self.coefs[_bisect_right(self.edges, s_p + n_d)]
        return c[0] + c[1] * s_p + c[2] * s_d + c[3] * s_p * s_p + c[4] * n_p + c[5] * n_d

    def predict_sample_ms(self, s: ProfileSample) -> float:
        return self.predict_ms(s.s_p, s.s_d, len(s.prefill), len(s.decode_contexts))

    def max_prefill_tokens(self, budget_ms: float, s_d: float, n_p: int, n_d: int, s_p0: float = 0.0) -> int:
        """Largest extra prefill tokens x such that every step of s_p0 + x' prefill tokens, 0 ≤ x' ≤ x, is
        predicted within the budget (so admitting any part of x is safe too, and x never shrinks as the
        budget grows). Closed form of the quadratic in S_p per regime, walking the regimes up from s_p0;
        0 when even s_p0 is over budget."""
        edges, coefs = self.edges, self.coefs
        s0 = int(math.ceil(s_p0))
        s = s0  # first S_p of the part of regime k being solved
        k = _bisect_right(edges, s + n_d)
        while True:
            c = coefs[k]
            a, b = c[3], c[1]
            rest = budget_ms - (c[0] + c[2] * s_d + c[4] * n_p + c[5] * n_d)  # a·S² + b·S ≤ rest
            if a * s * s + b * s > rest:  # over budget where this regime starts: stop just before
                return max(0, s - 1 - s0)
            hi = edges[k] - n_d - 1 if k < len(edges) else math.inf  # last S_p of regime k
            smax = _last_within(a, b, rest, s, hi)
            if smax < hi or k == len(edges):
                break
            s, k = hi + 1, k + 1  # the whole regime fits: carry on in the next one
        if math.isinf(smax):
            return UNBOUNDED
        smax = int(smax)
        while smax >= s and a * smax * smax + b * smax > rest:  # guard against rounding
            smax -= 1
        return max(0, min(smax - s0, UNBOUNDED))

    def mape(self, samples: Sequence[ProfileSample]) -> float:
        errs = [abs(self.predict_sample_ms(s) - s.step_ms) / s.step_ms for s in samples if s.step_ms > 0]
        return float(np.mean(errs)) if errs else math.nan

    def to_json(self) -> dict:
        return {"features": list(FEATURES), "edges_tokens": list(self.edges),
                "coef_ms": [list(cs) for cs in self.coefs], "train_mape": self.train_mape,
                "test_mape": self.test_mape, "n_train": self.n_train, "n_test": self.n_test}

    @classmethod
    def from_json(cls, d: dict) -> LatencyPredictor:
        coefs = d["coef_ms"]  # nested per regime, or one flat set (single-regime files)
        coefs = tuple(tuple(float(x) for x in cs) for cs in coefs) if coefs and isinstance(coefs[0], list) \
            else (tuple(float(x) for x in coefs),)
        return cls(coefs, d.get("train_mape", math.nan), d.get("test_mape", math.nan),
                   int(d.get("n_train", 0)), int(d.get("n_test", 0)), tuple(d.get("edges_tokens", ())))


def _last_within(a: float, b: float, rest: float, lo: float, hi: float) -> float:
    """Largest S in [lo, hi] with a·S² + b·S ≤ rest for every S' in [lo, S], given it holds at lo
    (``hi`` may be inf; so may the answer)."""
    if abs(a) <= 1e-15:
        return min(hi, math.floor(rest / b + 1e-9)) if b > 0 else hi
    disc = b * b + 4 * a * rest
    if a > 0:
        disc = max(disc, 0.0)  # ≥ 0 in exact arithmetic, since the quadratic holds at lo
    elif disc < 0:  # concave and never reaching the budget
        return hi
    # a > 0: the feasible set is [r1, r2] with r2 this root; a < 0: (-inf, r] ∪ [r', inf) with r this root
    r = (-b + math.sqrt(disc)) / (2 * a)
    if a < 0 and lo > r:
        return hi
    return min(hi, math.floor(r + 1e-9))


def _lstsq(train: Sequence[ProfileSample], relative: bool) -> tuple[float, ...]:
    x = np.array([sample_features(s) for s in train], dtype=np.float64)
    y = np.array([s.step_ms for s in train], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)  # condition the S_p² column
    coef, *_ = np.linalg.lstsq((x / scale) * w[:, None], y * w, rcond=None)
    return tuple(float(c) for c in coef / scale)


def _merge_thin(edges: tuple[int, ...], tokens: Sequence[int], min_n: int) -> tuple[int, ...]:
    """Drop edges until every regime holds at least ``min_n`` of the (training) batch sizes."""
    edges = tuple(sorted(set(int(e) for e in edges if e > 0)))
    while edges:
        counts = [0] * (len(edges) + 1)
        for t in tokens:
            counts[bisect.bisect_right(edges, t)] += 1
        k = min(range(len(counts)), key=counts.__getitem__)
        if counts[k] >= min_n:
            break
        if k == 0:
            drop = 0
        elif k == len(edges):
            drop = k - 1
        else:  # merge into the smaller neighbour
            drop = k - 1 if counts[k - 1] <= counts[k + 1] else k
        edges = edges[:drop] + edges[drop + 1:]
    return edges


def fit(samples: Sequence[ProfileSample], holdout: float = 0.2, seed: int = 0,
        relative: bool = True, edges: Sequence[int] = ()) -> LatencyPredictor:
    """Least squares on a shuffled (1 − holdout) share; MAPE on the rest. ``relative`` weights each
    sample by 1/step so the fit minimises relative error (what MAPE measures). ``edges`` (batch tokens
    S_p + N_d, e.g. :func:`regime_edges`) split the fit into regimes, one coefficient set each; an edge
    leaving a regime with fewer than ``MIN_REGIME_SAMPLES`` training samples is dropped."""
    if len(samples) < len(FEATURES) + 1:
        raise ValueError(f"need at least {len(FEATURES) + 1} profile samples, got {len(samples)}")
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    n_test = int(len(idx) * holdout) if holdout > 0 else 0
    test = [samples[i] for i in idx[:n_test]]
    train = [samples[i] for i in idx[n_test:]]
    edges = _merge_thin(tuple(edges), [batch_tokens(s) for s in train], MIN_REGIME_SAMPLES)
    groups: list[list[ProfileSample]] = [[] for _ in range(len(edges) + 1)]
    for s in train:
        groups[bisect.bisect_right(edges, batch_tokens(s))].append(s)
    pred = LatencyPredictor(tuple(_lstsq(g, relative) for g in groups), edges=edges)
    return LatencyPredictor(pred.coefs, pred.mape(train), pred.mape(test) if test else math.nan, len(train),
                            len(test), edges)


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
    """A predictor fitted on sim-engine profiles of ``pm`` over the regime co-located serving runs in,
    piecewise at :func:`regime_edges` (cached per hardware/model/tp/efficiency)."""
    key = (pm.hardware, pm.model, pm.tp, pm.eff, tuple(sorted(kw.items())))
    p = _CACHE.get(key)
    if p is None:
        p = fit(profile_sim(pm, **({"n": 800, "max_prefill_tokens": 4096, "max_decodes": 256} | kw)),
                edges=regime_edges(pm))
        _CACHE[key] = p
    return p
