"""Roofline performance model: the step time of one engine iteration from hardware specs and a model config.

Every operator costs ``max(FLOPs / (peak · e_compute), bytes / (bandwidth · e_bw), net bytes / (link · e_net))``
(OOCO's model). Per transformer layer:

* four linear layers (QKV, O, gate+up, down): ``2·in·out·T`` FLOPs and ``dtype·(T·in + in·out + T·out)`` bytes,
  ``T`` = tokens in the batch; tensor parallelism splits ``out`` (column-parallel QKV, gate+up) or ``in``
  (row-parallel O, down) by ``tp``;
* attention, prefill and decode as two kernels: ``4·hidden/tp·Σ(query, key) pairs`` FLOPs, causal (a chunk of
  ``q_len`` new tokens after ``kv_len − q_len`` cached ones has ``q_len·(kv_len − q_len) + q_len·(q_len + 1)/2``
  pairs, so a prompt costs the same attention however it is chunked); bytes = Q and O
  (``2·dtype·q_len·hidden/tp``) plus the K and V read (``2·dtype·kv_len·n_kv_heads/tp·head_dim``), with
  GQA entering only through the KV bytes; decode is ``q_len = 1``;
* with ``tp > 1``, two ring all-reduces of ``2·(tp−1)/tp·T·hidden·dtype`` bytes over the tensor-parallel link;

times layers, plus the LM head on the last token of each sequence and a fixed per-step overhead.

Efficiency factors default to the figures the OOCO implementation learns on its hardware (0.68 GEMM
compute, 0.60 attention compute, 0.58 GEMM bandwidth, 0.38 attention bandwidth) and are re-fitted from
profiles with :func:`fit_efficiency`.

Pure: no torch, no clock. ``PerfModel.load(hardware="H100-SXM", model="llama-3.1-8b", tp=1)`` is the
entry point; ``step_time_s(prefill_lens, decode_contexts)`` the general call, and ``step_time_parts`` /
``decode_run_times`` / ``decode_run_cumtimes`` the aggregate forms the simulator uses on its hot path.

Memoised per instance (a ``PerfModel`` is frozen, so a cached figure never goes stale): the terms that
depend only on a token or sequence count, the decode-run constants per batch size, decode-only step times
per (batch, Σ context) and the decode context budget. A memoised call returns exactly the number the
computation would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "float8": 1}


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (one instance = ``tp`` of them). Rates in FLOP/s and bytes/s."""

    name: str
    peak_flops: float  # dense BF16/FP16 tensor-core peak
    mem_bw: float  # HBM bandwidth
    mem_bytes: float  # device memory
    tp_link_bw: float  # per-direction link used by tensor-parallel all-reduce (NVLink / PCIe)
    kv_link_bw: float  # bandwidth between instances for KV transfer (NIC per GPU)
    description: str = ""

    def __post_init__(self) -> None:
        for f in ("peak_flops", "mem_bw", "mem_bytes", "tp_link_bw", "kv_link_bw"):
            if not getattr(self, f) > 0:
                raise ValueError(f"hardware {self.name!r}: field {f!r} must be > 0")

    @classmethod
    def load(cls, name_or_path: str) -> HardwareSpec:
        path = _resolve(name_or_path, "hardware")
        raw = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (float(v) if k not in ("name", "description") else v) for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Hugging Face ``config.json`` the roofline needs."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    dtype_bytes: int = 2
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim", "dtype_bytes"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"model {self.name!r}: field {f!r} must be > 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model {self.name!r}: num_attention_heads not a multiple of num_key_value_heads")

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model") -> ModelConfig:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        dtype = str(cfg.get("torch_dtype", "bfloat16"))
        return cls(
            name=name,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
            vocab_size=int(cfg["vocab_size"]),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )

    @classmethod
    def load(cls, name_or_path: str) -> ModelConfig:
        """A built-in name (``llama-3.1-8b``), a ``config.json`` path, or a model directory holding one."""
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            path = _resolve(name_or_path, "models")
            name = path.stem
        else:
            name = path.parent.name if path.name == "config.json" else path.stem
        return cls.from_hf_config(json.loads(path.read_text()), name=name)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def param_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token (whole model, before tensor parallelism)."""
        return 2 * self.num_hidden_layers * self.kv_dim * self.dtype_bytes


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of the roofline per resource, and a fixed per-step overhead (launches, sampling)."""

    gemm_compute: float = 0.68
    attn_compute: float = 0.60
    gemm_bw: float = 0.58
    attn_bw: float = 0.38
    net: float = 0.70
    step_overhead_s: float = 0.0015

    def __post_init__(self) -> None:
        for f in ("gemm_compute", "attn_compute", "gemm_bw", "attn_bw", "net"):
            v = getattr(self, f)
            if not 0 < v <= 1.5:
                raise ValueError(f"efficiency field {f!r} must be in (0, 1.5], got {v}")
        if self.step_overhead_s < 0:
            raise ValueError("efficiency field 'step_overhead_s' must be >= 0")


@dataclass(frozen=True)
class StepParts:
    """Time of one step split by operator family (seconds)."""

    linear: float
    attn_prefill: float
    attn_decode: float
    allreduce: float
    lm_head: float
    overhead: float

    @property
    def total(self) -> float:
        return self.linear + self.attn_prefill + self.attn_decode + self.allreduce + self.lm_head + self.overhead


@dataclass(frozen=True)
class PerfModel:
    hardware: HardwareSpec
    model: ModelConfig
    tp: int = 1
    eff: Efficiency = field(default_factory=Efficiency)
    mem_util: float = 0.90  # fraction of device memory the engine may use (vLLM's gpu_memory_utilization)
    activation_reserve_bytes: float = 2e9  # per GPU, for activations and CUDA graphs

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError("field 'tp' must be >= 1")
        if self.model.num_key_value_heads % self.tp and self.tp % self.model.num_key_value_heads:
            raise ValueError("field 'tp' must divide num_key_value_heads (or be a multiple of it)")
        m, tp = self.model, self.tp
        h, i = m.hidden_size, m.intermediate_size
        # (in, out) per GPU of the four linear layers of one transformer layer
        lin = [(h, (m.q_dim + 2 * m.kv_dim) / tp), (m.q_dim / tp, h), (h, 2 * i / tp), (i / tp, h)]
        object.__setattr__(self, "_linears", tuple(lin))
        object.__setattr__(self, "_cache", {})  # count-keyed terms (bounded by the batch sizes seen)
        object.__setattr__(self, "_step_cache", {})  # decode-only step time per (n, Σ context), cleared when full

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, hardware: str = "H100-SXM", model: str = "llama-3.1-8b", tp: int = 1,
             eff: Efficiency | None = None, **kw) -> PerfModel:
        return cls(HardwareSpec.load(hardware), ModelConfig.load(model), tp=tp, eff=eff or Efficiency(), **kw)

    def with_efficiency(self, eff: Efficiency) -> PerfModel:
        return replace(self, eff=eff)

    # ------------------------------------------------------------------ memory
    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token occupies on one GPU of the instance (GQA heads split by tp)."""
        m = self.model
        kv_heads_per_gpu = max(1, m.num_key_value_heads // self.tp)
        return 2 * m.num_hidden_layers * kv_heads_per_gpu * m.head_dim * m.dtype_bytes

    @property
    def weight_bytes_per_gpu(self) -> float:
        return self.model.param_count() * self.model.dtype_bytes / self.tp

    def kv_capacity_tokens(self) -> int:
        free = self.hardware.mem_bytes * self.mem_util - self.weight_bytes_per_gpu - self.activation_reserve_bytes
        if free <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp}x {self.hardware.name}")
        return int(free // self.kv_bytes_per_token)

    def kv_transfer_s(self, tokens: int) -> float:
        """Time to move a request's KV between instances over an idle link (all tp GPUs send in parallel),
        at the network efficiency ``eff.net`` of the NIC's line rate. Contention between transfers is the
        caller's (the simulator queues transfers per NIC)."""
        return tokens * self.kv_bytes_per_token / (self.hardware.kv_link_bw * self.eff.net)

    # ------------------------------------------------------------------ operators
    def _op(self, flops: float, nbytes: float, e_c: float, e_b: float) -> float:
        hw = self.hardware
        return max(flops / (hw.peak_flops * e_c), nbytes / (hw.mem_bw * e_b))

    def linear_time(self, tokens: int) -> float:
        """All linear layers of all transformer layers for a batch of ``tokens`` tokens."""
        if tokens <= 0:
            return 0.0
        c = self._cache
        key = ("lin", tokens)
        v = c.get(key)
        if v is None:
            dt, e = self.model.dtype_bytes, self.eff
            t = 0.0
            for n_in, n_out in self._linears:
                t += self._op(2 * n_in * n_out * tokens, dt * (tokens * n_in + n_in * n_out + tokens * n_out),
                              e.gemm_compute, e.gemm_bw)
            v = t * self.model.num_hidden_layers
            if len(c) < 200_000:
                c[key] = v
        return v

    def lm_head_time(self, seqs: int) -> float:
        if seqs <= 0:
            return 0.0
        c = self._cache
        key = ("lm", seqs)
        v = c.get(key)
        if v is None:
            m, e = self.model, self.eff
            n_out = m.vocab_size / self.tp
            h = m.hidden_size
            v = self._op(2 * h * n_out * seqs, m.dtype_bytes * (seqs * h + h * n_out + seqs * n_out),
                         e.gemm_compute, e.gemm_bw)
            if len(c) < 200_000:
                c[key] = v
        return v

    def attention_time(self, q_kv_sum: float, q_sum: float, kv_sum: float) -> float:
        """One attention kernel over all layers. ``q_kv_sum`` = Σ attended (query, key) pairs (q_len·kv_len for
        a decode, causal for a prefill chunk), ``q_sum`` = Σ q_len,
        ``kv_sum`` = Σ kv_len over the sequences of the kernel."""
        if q_sum <= 0:
            return 0.0
        m, e = self.model, self.eff
        hq = m.q_dim / self.tp
        hkv = max(1, m.num_key_value_heads // self.tp) * m.head_dim
        flops = 4 * hq * q_kv_sum
        nbytes = m.dtype_bytes * (2 * q_sum * hq + 2 * kv_sum * hkv)
        return self._op(flops, nbytes, e.attn_compute, e.attn_bw) * m.num_hidden_layers

    def allreduce_time(self, tokens: int) -> float:
        if self.tp == 1 or tokens <= 0:
            return 0.0
        m = self.model
        nbytes = 2 * (self.tp - 1) / self.tp * tokens * m.hidden_size * m.dtype_bytes
        return 2 * m.num_hidden_layers * nbytes / (self.hardware.tp_link_bw * self.eff.net)

    # ------------------------------------------------------------------ steps
    def step_parts(self, prefill: Iterable[tuple[int, int]], decode_n: int, decode_ctx_sum: float,
                   logits_seqs: int | None = None) -> StepParts:
        """``prefill``: (q_len, kv_len) per prefilling sequence (a chunk: q_len new tokens, kv_len = tokens
        already cached + q_len); decode: count and Σ context."""
        return StepParts(*self._step_terms(prefill, decode_n, decode_ctx_sum, logits_seqs))

    def _step_terms(self, prefill: Iterable[tuple[int, int]], decode_n: int, decode_ctx_sum: float,
                    logits_seqs: int | None = None) -> tuple[float, float, float, float, float, float]:
        """The fields of :meth:`step_parts`, in order (a plain tuple: the hot path needs only their sum)."""
        qkv = q = kv = 0.0
        n_p = 0
        for ql, kl in prefill:
            qkv += ql * (kl - ql) + ql * (ql + 1) / 2  # causal: token i sees the cache and i tokens of its chunk
            q += ql
            kv += kl
            n_p += 1
        tokens = int(q) + decode_n
        if tokens == 0:
            return (0, 0, 0, 0, 0, 0)
        return (self.linear_time(tokens),
                self.attention_time(qkv, q, kv),
                self.attention_time(decode_ctx_sum, decode_n, decode_ctx_sum),
                self.allreduce_time(tokens),
                self.lm_head_time(n_p + decode_n if logits_seqs is None else logits_seqs),
                self.eff.step_overhead_s)

    def step_time_s(self, prefill_lens: Sequence[int] = (), decode_contexts: Sequence[int] = ()) -> float:
        """Step time of a batch of whole prefills (prompt lengths) and decodes (context lengths)."""
        return self.step_parts(((int(x), int(x)) for x in prefill_lens), len(decode_contexts),
                               float(sum(decode_contexts))).total

    def chunked_step_time_s(self, chunks: Sequence[tuple[int, int]], decode_n: int, decode_ctx_sum: float) -> float:
        if chunks:
            lin, attn_p, attn_d, ar, head, over = self._step_terms(chunks, decode_n, decode_ctx_sum)
            return lin + attn_p + attn_d + ar + head + over  # StepParts.total, in the same order
        # decode-only: the policies ask for the same (n, Σ context) several times per step
        c = self._step_cache
        key = (decode_n, decode_ctx_sum)
        v = c.get(key)
        if v is None:
            lin, attn_p, attn_d, ar, head, over = self._step_terms((), decode_n, decode_ctx_sum)
            v = lin + attn_p + attn_d + ar + head + over
            if len(c) >= 65_536:
                c.clear()
            c[key] = v
        return v

    def decode_run_times(self, n: int, ctx_sum: float, k: int) -> np.ndarray:
        """Durations of ``k`` consecutive decode-only steps of ``n`` sequences starting at Σ context
        ``ctx_sum`` (each step adds one token per sequence), vectorised. The simulator uses the running sums,
        :meth:`decode_run_cumtimes`."""
        if n <= 0 or k <= 0:
            return np.zeros(max(k, 0))
        fixed = self.linear_time(n) + self.allreduce_time(n) + self.lm_head_time(n) + self.eff.step_overhead_s
        m, e, hw = self.model, self.eff, self.hardware
        hq = m.q_dim / self.tp
        hkv = max(1, m.num_key_value_heads // self.tp) * m.head_dim
        ctx = ctx_sum + n * np.arange(k, dtype=np.float64)
        flops_t = 4 * hq * ctx / (hw.peak_flops * e.attn_compute)
        bytes_t = m.dtype_bytes * (2 * n * hq + 2 * ctx * hkv) / (hw.mem_bw * e.attn_bw)
        return fixed + np.maximum(flops_t, bytes_t) * m.num_hidden_layers

    def decode_run_cumtimes(self, n: int, ctx_sum: float, k: int) -> list[float]:
        """End of each of the ``k`` steps of :meth:`decode_run_times`, relative to the run's start: exactly
        ``np.cumsum(decode_run_times(n, ctx_sum, k))`` (the same float operations in the same order, one
        step at a time), as a list. Cheaper for the short runs the simulator mostly makes (most end at
        the next sequence's completion, a few steps ahead)."""
        if n <= 0 or k <= 0:
            return [0.0] * max(k, 0)
        key = ("run", n)
        consts = self._cache.get(key)
        if consts is None:
            m, e, hw = self.model, self.eff, self.hardware
            hq = m.q_dim / self.tp
            hkv = max(1, m.num_key_value_heads // self.tp) * m.head_dim
            fixed = self.linear_time(n) + self.allreduce_time(n) + self.lm_head_time(n) + e.step_overhead_s
            consts = (fixed, 4 * hq, hw.peak_flops * e.attn_compute, m.dtype_bytes, 2 * n * hq, hkv,
                      hw.mem_bw * e.attn_bw, m.num_hidden_layers)
            if len(self._cache) < 200_000:
                self._cache[key] = consts
        fixed, flops_per_ctx, flops_rate, dt, q_bytes, hkv, bw_rate, layers = consts
        out = []
        total = 0.0
        for i in range(k):
            ctx = ctx_sum + n * float(i)
            flops_t = flops_per_ctx * ctx / flops_rate
            bytes_t = dt * (q_bytes + 2 * ctx * hkv) / bw_rate
            total += fixed + (flops_t if flops_t >= bytes_t else bytes_t) * layers
            out.append(total)
        return out

    def decode_ctx_budget(self, n: int, budget_s: float, pad_to: int = 0) -> float:
        """Largest Σ context a decode-only step of ``n`` sequences may have and still take at most
        ``budget_s`` (linear layers at ``max(n, pad_to)`` tokens). Closed form of the roofline; -1 if even
        an empty context exceeds the budget."""
        if n <= 0:
            return math.inf
        key = ("budget", n, budget_s, pad_to)
        v = self._cache.get(key)
        if v is not None:
            return v
        m, e, hw = self.model, self.eff, self.hardware
        fixed = (self.linear_time(max(n, pad_to)) + self.allreduce_time(max(n, pad_to)) + self.lm_head_time(n)
                 + e.step_overhead_s)
        left = (budget_s - fixed) / m.num_hidden_layers
        hq = m.q_dim / self.tp
        hkv = max(1, m.num_key_value_heads // self.tp) * m.head_dim
        c_flops = left * hw.peak_flops * e.attn_compute / (4 * hq)
        c_bytes = (left * hw.mem_bw * e.attn_bw / m.dtype_bytes - 2 * n * hq) / (2 * hkv)
        c = min(c_flops, c_bytes)
        v = c if c >= 0 else -1.0
        if len(self._cache) < 200_000:
            self._cache[key] = v
        return v

    def prefill_time_s(self, length: int) -> float:
        key = ("prefill", length)
        v = self._cache.get(key)
        if v is None:
            v = self.step_time_s([length], [])
            if len(self._cache) < 200_000:
                self._cache[key] = v
        return v

    def saturation_batch(self) -> int:
        """Smallest token batch at which the linear layers turn compute-bound (OOCO's linear saturation)."""
        lo, hi = 1, 1 << 16
        tl = self.linear_time

        def compute_bound(b: int) -> bool:
            dt, e, hw = self.model.dtype_bytes, self.eff, self.hardware
            for n_in, n_out in self._linears:
                f = 2 * n_in * n_out * b / (hw.peak_flops * e.gemm_compute)
                by = dt * (b * n_in + n_in * n_out + b * n_out) / (hw.mem_bw * e.gemm_bw)
                if f < by:
                    return False
            return True

        del tl
        if not compute_bound(hi):
            return hi
        while lo < hi:
            mid = (lo + hi) // 2
            if compute_bound(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def max_prefill_tokens_within(self, budget_s: float, decode_n: int, decode_ctx_sum: float,
                                  cached: int = 0, limit: int = 1 << 16) -> int:
        """Largest prefill chunk (one sequence, ``cached`` tokens already in KV) whose step with the given
        decodes stays within ``budget_s``. 0 when even the decodes alone exceed it."""
        def t(c: int) -> float:
            return self.chunked_step_time_s([(c, cached + c)] if c else [], decode_n, decode_ctx_sum)

        if t(1) > budget_s:
            return 0
        lo, hi = 1, limit
        if t(hi) <= budget_s:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if t(mid) <= budget_s:
                lo = mid
            else:
                hi = mid
        return lo


def _resolve(name_or_path: str, kind: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    d = DATA_DIR / kind
    cand = d / f"{name_or_path}.json"
    if cand.is_file():
        return cand
    low = {f.stem.lower(): f for f in d.glob("*.json")}
    key = name_or_path.lower()
    if key in low:
        return low[key]
    raise ValueError(f"unknown {kind} {name_or_path!r}; built-in: {', '.join(sorted(f.stem for f in d.glob('*.json')))}")


def builtin_names(kind: str) -> list[str]:
    return sorted(f.stem for f in (DATA_DIR / kind).glob("*.json"))


# ---------------------------------------------------------------------- fitting from profiles
@dataclass(frozen=True)
class ProfileSample:
    """One measured step: prefill chunks (q_len, kv_len), decode contexts, measured step time (ms)."""

    prefill: tuple[tuple[int, int], ...]
    decode_contexts: tuple[int, ...]
    step_ms: float

    @property
    def s_p(self) -> int:
        return sum(q for q, _ in self.prefill)

    @property
    def s_d(self) -> int:
        return sum(self.decode_contexts)

    def to_json(self) -> dict:
        return {"prefill": [list(p) for p in self.prefill], "decode_contexts": list(self.decode_contexts),
                "step_ms": self.step_ms}

    @classmethod
    def from_json(cls, d: dict) -> ProfileSample:
        return cls(tuple((int(a), int(b)) for a, b in d["prefill"]), tuple(int(x) for x in d["decode_contexts"]),
                   float(d["step_ms"]))


def predict_ms(pm: PerfModel, s: ProfileSample) -> float:
    return pm.chunked_step_time_s(s.prefill, len(s.decode_contexts), float(s.s_d)) * 1e3


def mape(pm: PerfModel, samples: Sequence[ProfileSample]) -> float:
    errs = [abs(predict_ms(pm, s) - s.step_ms) / s.step_ms for s in samples if s.step_ms > 0]
    return float(np.mean(errs)) if errs else math.nan


def fit_efficiency(pm: PerfModel, samples: Sequence[ProfileSample], rounds: int = 6) -> Efficiency:
    """Coordinate search (log-scale) over the efficiency factors and step overhead minimising MAPE."""
    if not samples:
        raise ValueError("fit_efficiency needs at least one profile sample")
    eff = pm.eff
    names = ["gemm_compute", "gemm_bw", "attn_compute", "attn_bw", "step_overhead_s"]
    best = mape(pm.with_efficiency(eff), samples)
    factors = [4.0, 2.0, 1.4, 1.15, 1.05, 1.02]
    for r in range(rounds):
        for f in factors[: 2 + r]:
            for nm in names:
                for mult in (f, 1 / f):
                    v = getattr(eff, nm) * mult
                    if nm == "step_overhead_s":
                        v = v if v > 1e-7 else 1e-4
                    elif not 0 < v <= 1.5:
                        continue
                    cand = replace(eff, **{nm: v})
                    score = mape(pm.with_efficiency(cand), samples)
                    if score < best:
                        best, eff = score, cand
    return eff
