"""Workload trace loaders: the three formats under ``../shared/traces/``.

* Azure LLM inference trace (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps as
  ``2023-11-16 18:15:46.6805900`` or plain seconds) — an online stream with arrival times;
* arXiv summarisation lengths (CSV ``num_prefill_tokens,num_decode_tokens,...``) — an offline backlog, no
  arrival times (all ``0``);
* Mooncake (JSONL ``timestamp`` in ms, ``input_length``, ``output_length``, ``hash_ids`` of 512-token blocks).

All return a :class:`Trace` of numpy arrays; arrival times are seconds from the first request.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Trace:
    name: str
    arrival_s: np.ndarray  # float64, non-decreasing, first = 0 (all 0 for a backlog)
    input_tokens: np.ndarray  # int64 >= 1
    output_tokens: np.ndarray  # int64 >= 1
    prefix_hashes: tuple[tuple[int, ...], ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.input_tokens) != n or len(self.output_tokens) != n:
            raise ValueError(f"trace {self.name!r}: column lengths differ")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise ValueError(f"trace {self.name!r}: arrival times must be non-decreasing")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    def scaled(self, rate_scale: float) -> Trace:
        """Multiply the arrival rate by ``rate_scale`` (2.0 = twice as many requests per second)."""
        if rate_scale <= 0:
            raise ValueError("rate_scale must be > 0")
        return Trace(f"{self.name}x{rate_scale:g}", self.arrival_s / rate_scale, self.input_tokens,
                     self.output_tokens, self.prefix_hashes)

    def window(self, start_s: float = 0.0, duration_s: float | None = None) -> Trace:
        """Requests arriving in [start, start + duration), re-based to start at 0."""
        end = np.inf if duration_s is None else start_s + duration_s
        idx = np.nonzero((self.arrival_s >= start_s) & (self.arrival_s < end))[0]
        return self._take(idx, rebase=start_s)

    def head(self, n: int) -> Trace:
        return self._take(np.arange(min(n, len(self))), rebase=0.0)

    def shifted(self, offset_s: float) -> Trace:
        return Trace(self.name, self.arrival_s + offset_s, self.input_tokens, self.output_tokens, self.prefix_hashes)

    def clipped(self, max_input: int | None = None, max_output: int | None = None) -> Trace:
        inp = self.input_tokens if max_input is None else np.minimum(self.input_tokens, max_input)
        out = self.output_tokens if max_output is None else np.minimum(self.output_tokens, max_output)
        return Trace(self.name, self.arrival_s, inp, out, self.prefix_hashes)

    def with_outputs(self, lo: int, hi: int, seed: int = 0) -> Trace:
        """The same arrivals and prompts with output lengths re-sampled uniformly in ``[lo, hi]`` (inclusive,
        from a ``numpy`` Generator seeded with ``seed``): a workload variant, e.g. ``5..20`` tokens for a
        code-completion-like stream of short answers. Deterministic for a seed."""
        for name, v in (("lo", lo), ("hi", hi), ("seed", seed)):
            if int(v) != v:
                raise ValueError(f"with_outputs: {name!r} must be an integer, got {v!r}")
        if lo < 1:
            raise ValueError(f"with_outputs: 'lo' must be >= 1, got {lo}")
        if hi < lo:
            raise ValueError(f"with_outputs: 'hi' must be >= 'lo' ({lo}), got {hi}")
        if seed < 0:
            raise ValueError(f"with_outputs: 'seed' must be >= 0, got {seed}")
        out = np.random.default_rng(int(seed)).integers(int(lo), int(hi) + 1, len(self), dtype=np.int64)
        return Trace(f"{self.name}+out{int(lo)}-{int(hi)}", self.arrival_s, self.input_tokens, out,
                     self.prefix_hashes)

    def bursty(self, period_s: float, on_s: float) -> Trace:
        """Bursty arrivals: within each period ``[k·P, (k+1)·P)`` the arrivals are compressed linearly into
        its first ``on_s`` seconds (``t → k·P + (t − k·P)·on_s/P``), keeping their order. The mean rate over
        whole periods is unchanged; within a burst it is ``P / on_s`` times higher, and the rest of each
        period is silent. ``on_s == period_s`` is the identity."""
        if not period_s > 0:
            raise ValueError(f"bursty: 'period_s' must be > 0, got {period_s}")
        if not 0 < on_s <= period_s:
            raise ValueError(f"bursty: 'on_s' must be in (0, period_s={period_s:g}], got {on_s}")
        a = self.arrival_s
        k = np.floor(a / period_s)
        phase = np.clip(a - k * period_s, 0.0, period_s)
        new = k * period_s + phase * (on_s / period_s)
        if len(new):
            new = np.maximum.accumulate(new)  # guard against float rounding at period boundaries
        return Trace(f"{self.name}+burst{period_s:g}/{on_s:g}", new, self.input_tokens, self.output_tokens,
                     self.prefix_hashes)

    def _take(self, idx: np.ndarray, rebase: float) -> Trace:
        hashes = None if self.prefix_hashes is None else tuple(self.prefix_hashes[i] for i in idx)
        return Trace(self.name, self.arrival_s[idx] - rebase, self.input_tokens[idx], self.output_tokens[idx], hashes)

    @staticmethod
    def concat(traces: list[Trace], gap_s: float = 0.0) -> Trace:
        """Play the traces one after another (each starts ``gap_s`` after the previous one's last arrival)."""
        arr, inp, out = [], [], []
        t0 = 0.0
        for i, t in enumerate(traces):
            if i:
                t0 += gap_s
            arr.append(t.arrival_s - (t.arrival_s[0] if len(t) else 0) + t0)
            inp.append(t.input_tokens)
            out.append(t.output_tokens)
            if len(t):
                t0 = float(arr[-1][-1])
        return Trace("+".join(t.name for t in traces), np.concatenate(arr), np.concatenate(inp), np.concatenate(out))

    def stats(self) -> dict:
        n = len(self)
        return {
            "requests": n,
            "duration_s": self.duration_s,
            "rate_per_s": (n / self.duration_s) if self.duration_s > 0 else None,
            "input_mean": float(self.input_tokens.mean()) if n else 0.0,
            "output_mean": float(self.output_tokens.mean()) if n else 0.0,
        }


def _parse_ts(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    # 7 fractional digits (100 ns) do not parse with %f: cut to microseconds
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
        return datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return datetime.strptime(s, "%Y-%m-%d %H:%M:%S").timestamp()


def _finish(name: str, arr: list[float], inp: list[int], out: list[int], hashes=None) -> Trace:
    a = np.asarray(arr, dtype=np.float64)
    i = np.maximum(np.asarray(inp, dtype=np.int64), 1)
    o = np.maximum(np.asarray(out, dtype=np.int64), 1)
    order = np.argsort(a, kind="stable")
    if len(a):
        a = a - a[order[0]]
    if hashes is not None:
        hashes = tuple(hashes[k] for k in order)
    return Trace(name, a[order], i[order], o[order], hashes)


def load_azure(path: str | Path) -> Trace:
    path = Path(path)
    arr, inp, out = [], [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not reader.fieldnames or not need <= {c.strip() for c in reader.fieldnames}:
            raise ValueError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for row in reader:
            row = {k.strip(): v for k, v in row.items()}
            arr.append(_parse_ts(row["TIMESTAMP"]))
            inp.append(int(row["ContextTokens"]))
            out.append(int(row["GeneratedTokens"]))
    return _finish(path.stem, arr, inp, out)


def load_arxiv(path: str | Path) -> Trace:
    path = Path(path)
    data = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    names = data.dtype.names or ()
    if "num_prefill_tokens" not in names or "num_decode_tokens" not in names:
        raise ValueError(f"{path}: expected columns num_prefill_tokens,num_decode_tokens, got {names}")
    data = np.atleast_1d(data)
    n = len(data)
    return _finish(path.stem, [0.0] * n, data["num_prefill_tokens"].astype(np.int64).tolist(),
                   data["num_decode_tokens"].astype(np.int64).tolist())


def load_mooncake(path: str | Path) -> Trace:
    path = Path(path)
    arr, inp, out, hashes = [], [], [], []
    with path.open() as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                arr.append(float(d["timestamp"]) / 1000.0)
                inp.append(int(d["input_length"]))
                out.append(int(d["output_length"]))
                hashes.append(tuple(int(h) for h in d.get("hash_ids", ())))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{ln}: bad Mooncake record ({exc})") from None
    return _finish(path.stem, arr, inp, out, hashes)


def load_trace(path: str | Path) -> Trace:
    """Detect the format from the file: JSONL → Mooncake; CSV header → Azure or arXiv."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        return load_mooncake(path)
    with path.open() as f:
        header = f.readline()
    if "num_prefill_tokens" in header:
        return load_arxiv(path)
    if "ContextTokens" in header:
        return load_azure(path)
    if header.lstrip().startswith("{"):
        return load_mooncake(path)
    raise ValueError(f"{path}: unknown trace format (header {header.strip()!r})")
