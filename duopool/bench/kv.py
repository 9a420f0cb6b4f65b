"""`duopool bench kv`: KV data-plane throughput and one-request latency per transport, next to memcpy.

Every transport is measured between two real processes (spawned): the sender owns sealed source segments
(as a prefill worker's connector leaves them), the receiver lands the bytes in preallocated destination
buffers (segments for gloo/gRPC, a buffer for shm). memcpy is single-process in the same run, into a
preallocated buffer. Sizes: 256 KiB, 4 MiB, 64 MiB, and one request's KV: 2,048 tokens of a Llama-3-8B
layer shape (8 KV heads x 128 dim, fp16, 16-token blocks: 64 KiB per block per layer), 32 layers
(256 MiB; ``--quick``: 4 layers, 32 MiB).

Writes ``DIR/kv.json``::

    {"memcpy_gb_s": .., "transports": {"shm": {"256KiB": {"gb_s": .., "median_ms": .., "reps": ..}, ...,
     "request_latency_ms": ..}, ...}, "shm_vs_memcpy_64MiB": .., "notes": [...]}
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time

KIB, MIB = 1 << 10, 1 << 20
BLOCK_BYTES = 64 * KIB  # 16 tokens x 8 KV heads x 128 dim x (K, V) x 2 bytes
SIZES = {"256KiB": 256 * KIB, "4MiB": 4 * MIB, "64MiB": 64 * MIB}
SHM_VARIANTS = ("shm", "shm-fresh")
REQUEST_TOKENS, BLOCK_TOKENS = 2048, 16


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv", help="KV transfer bandwidth and latency per transport (shm, gloo, grpc) vs memcpy")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."), help="directory for kv.json")
    p.add_argument("--quick", action="store_true", help="few repetitions, 4-layer request (CI smoke, ~30 s)")
    p.add_argument("--transports", default="shm,shm-fresh,gloo,grpc",
                   help="comma-separated subset to run (shm-fresh: shm with segment recycling off)")
    p.add_argument("--kv-dir", type=pathlib.Path, default=None,
                   help="where the segments live (default DUOPOOL_KV_DIR or /dev/shm/duopool-kv); a tmpfs mounted "
                        "with huge=within_size shows the huge-page figures (docs/kv-transfer.md)")
    p.set_defaults(func=run)


def _cases(quick: bool) -> list[dict]:
    reps = {"256KiB": 10, "4MiB": 5, "64MiB": 3} if quick else {"256KiB": 40, "4MiB": 15, "64MiB": 9}
    cases = [{"name": n, "tid": f"bench-{n}", "layers": 1, "blocks": b // BLOCK_BYTES, "reps": reps[n]}
             for n, b in SIZES.items()]
    layers = 4 if quick else 32
    cases.append({"name": "request", "tid": "bench-request", "layers": layers,
                  "blocks": REQUEST_TOKENS // BLOCK_TOKENS, "reps": 3 if quick else 5})
    for c in cases:
        c["bytes"] = c["layers"] * c["blocks"] * BLOCK_BYTES
    return cases


# -- memcpy -----------------------------------------------------------------------------------------------
def _memcpy(cases: list[dict]) -> dict[str, float]:
    import numpy as np

    out = {}
    for c in cases:
        a = np.ones(c["bytes"], np.uint8)
        b = np.zeros(c["bytes"], np.uint8)
        times = []
        for _ in range(c["reps"] + 1):
            t = time.perf_counter()
            np.copyto(b, a)
            times.append(time.perf_counter() - t)
        out[c["name"]] = c["bytes"] / statistics.median(times[1:]) / 1e9
    return out


# -- processes --------------------------------------------------------------------------------------------
def _sender(transport: str, src: str, cases: list[dict], init_file: str, conn) -> None:
    """Writes the source segments, then serves them: shm (nothing), grpc (Read server), gloo (pushes)."""
    from duopool.kv.transport.testing import make_segment

    if transport in SHM_VARIANTS:
        _shm_writer(pathlib.Path(src), cases, conn)
        return
    for c in cases:
        make_segment(pathlib.Path(src), c["tid"], c["layers"], c["blocks"], BLOCK_BYTES, seed=1).close()
    if transport == "grpc":
        from duopool.kv.transport.grpc_stream import serve_read

        server, port = serve_read(src, max_workers=2)
        conn.send(port)
        conn.recv()
        server.stop(0).wait()
    elif transport == "gloo":
        from duopool.kv.transport.gloo import GlooTransport

        conn.send("ready")
        t = GlooTransport.connect(0, init_file, src, timeout_s=120)
        try:
            while (msg := conn.recv()) != "stop":
                t.send(msg)
        finally:
            t.close()
    conn.close()


def _shm_writer(src: pathlib.Path, cases: list[dict], conn) -> None:
    """The prefill side of the shm cycle: on each ("write", case name, transfer id) it writes a new segment
    the way the vLLM connector exports a prompt (a layer at a time with ``write_layer``, then seals) and
    answers the seconds that took; "stop" ends it."""
    import numpy as np

    from duopool.kv.segment import KvSegment, segment_path
    from duopool.kv.transport.testing import make_meta

    rng = np.random.default_rng(1)
    data = {c["name"]: rng.integers(0, 256, size=c["blocks"] * BLOCK_BYTES, dtype=np.uint8) for c in cases}
    layers = {c["name"]: c["layers"] for c in cases}
    conn.send("ready")
    while (msg := conn.recv()) != "stop":
        _, name, tid = msg
        t0 = time.perf_counter()
        meta = make_meta(tid, layers[name], data[name].size // BLOCK_BYTES, BLOCK_BYTES)
        with KvSegment.create(segment_path(tid, src), meta) as seg:
            for layer in range(layers[name]):
                seg.write_layer(layer, data[name])
            seg.seal()
            recycled = seg.recycled
        conn.send((time.perf_counter() - t0, recycled))
    conn.close()


def _receiver(transport: str, dst: str, src: str, cases: list[dict], init_file: str, conn, to_sender) -> None:
    """Times each case; reports {case: [seconds, ...]} to the parent through ``conn``."""
    import numpy as np

    from duopool.kv.segment import KvSegment, segment_path

    first = to_sender.recv()
    results: dict[str, list[float]] = {}
    if transport in SHM_VARIANTS:
        from duopool.kv.segment import unlink_segment
        from duopool.kv.transport.shm import ShmTransport

        t = ShmTransport(src)
        for c in cases:
            buf = np.zeros(c["bytes"], np.uint8)  # preallocated and touched
            local = np.ones(c["bytes"], np.uint8)
            times, paired, writes, recycled = [], [], [], 0
            for rep in range(c["reps"] + 1):
                tid = f"{c['tid']}-{rep}"  # a new transfer each time, as in the cluster
                to_sender.send(("write", c["name"], tid))
                wrote, reused = to_sender.recv()
                t0 = time.perf_counter()
                np.copyto(buf, local)  # memcpy of the same size at the same moment (noisy shared host)
                t1 = time.perf_counter()
                t.load_into(tid, buf)  # open + map (or the mapping kept from before) + copy in
                times.append(time.perf_counter() - t1)
                paired.append(t1 - t0)
                writes.append(wrote)
                recycled += bool(rep and reused)
                unlink_segment(segment_path(tid, pathlib.Path(src)), recycle_file=True)  # the decode frees it
            results[c["name"]] = times[1:]
            results[c["name"] + ":memcpy"] = paired[1:]
            results[c["name"] + ":write"] = writes[1:]
            results[c["name"] + ":recycled"] = [recycled]
            del local
    else:
        if transport == "grpc":
            from duopool.kv.transport.grpc_stream import GrpcStreamTransport

            t = GrpcStreamTransport(f"127.0.0.1:{first}", dst)

            def once(tid: str) -> None:
                t.receive(tid, timeout_s=120)
        else:
            from duopool.kv.transport.gloo import GlooTransport

            t = GlooTransport.connect(1, init_file, dst, timeout_s=120)

            def once(tid: str) -> None:
                to_sender.send(tid)  # the control message that triggers the push (a StartTransfer)
                t.receive(tid)

        for c in cases:
            times = []
            for rep in range(c["reps"] + 1):
                if rep:  # reuse the preallocated destination segment: forget what it received
                    with KvSegment.open(segment_path(c["tid"], pathlib.Path(dst)), require_sealed=False,
                                        writable=True) as seg:
                        seg.reset_received()
                t0 = time.perf_counter()
                once(c["tid"])
                times.append(time.perf_counter() - t0)
            results[c["name"]] = times[1:]
        from duopool.kv.transport.testing import digest

        for c in cases:  # byte-exact check, outside the timing
            if digest(segment_path(c["tid"], pathlib.Path(dst))) != digest(segment_path(c["tid"], pathlib.Path(src))):
                results["error"] = [f"{c['tid']} differs"]  # type: ignore[list-item]
        t.close()
    to_sender.send("stop")
    conn.send(results)
    conn.close()


def _measure(transport: str, cases: list[dict], root: pathlib.Path) -> dict[str, list[float]]:
    """One transport's figures; ``shm-fresh`` is shm with recycling off in both processes (every segment a
    new file: the writer allocates its pages, the reader maps it anew)."""
    if transport == "shm-fresh":
        saved = os.environ.get("DUOPOOL_KV_RECYCLE_MIB")
        os.environ["DUOPOOL_KV_RECYCLE_MIB"] = "0"  # the spawned processes inherit it
        try:
            return _measure_pair(transport, cases, root)
        finally:
            if saved is None:
                del os.environ["DUOPOOL_KV_RECYCLE_MIB"]
            else:
                os.environ["DUOPOOL_KV_RECYCLE_MIB"] = saved
    return _measure_pair(transport, cases, root)


def _measure_pair(transport: str, cases: list[dict], root: pathlib.Path) -> dict[str, list[float]]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    src, dst = root / f"{transport}-src", root / f"{transport}-dst"
    src.mkdir()
    dst.mkdir()
    init_file = str(root / f"{transport}.init")
    s_end, r_end = ctx.Pipe()
    out_parent, out_child = ctx.Pipe()
    sender = ctx.Process(target=_sender, args=(transport, str(src), cases, init_file, s_end))
    receiver = ctx.Process(target=_receiver, args=(transport, str(dst), str(src), cases, init_file, out_child, r_end))
    sender.start()
    receiver.start()
    try:
        if not out_parent.poll(600):
            raise RuntimeError(f"{transport}: receiver gave no result")
        results = out_parent.recv()
    finally:
        for p in (receiver, sender):
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    if "error" in results:
        raise RuntimeError(f"{transport}: {results['error']}")
    return results


def _gpu_notes() -> dict[str, str]:
    from duopool.kv.transport import get_transport

    out = {}
    for name in ("nccl", "ucx"):
        try:
            cls = get_transport(name)
            out[name] = "available" if cls.is_available() else getattr(cls, "unavailable_reason", lambda: "")()
        except ImportError as exc:
            out[name] = f"not importable: {exc}"
    return out


def run(args: argparse.Namespace) -> int:
    from duopool.kv.segment import huge_pages, kv_dir

    t_start = time.perf_counter()
    cases = _cases(args.quick)
    names = [n.strip() for n in args.transports.split(",") if n.strip()]
    memcpy = _memcpy(cases)
    base = args.kv_dir or kv_dir()
    base.mkdir(parents=True, exist_ok=True)
    pages = huge_pages(base)
    print(f"segments in {base} ({'tmpfs ' + pages if pages else '4 KiB pages'})", file=sys.stderr)
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    transports: dict[str, dict] = {}
    try:
        for name in names:
            raw = _measure(name, cases, root)
            entry: dict = {}
            for c in cases:
                med = statistics.median(raw[c["name"]])
                fig = {"gb_s": round(c["bytes"] / med / 1e9, 3), "median_ms": round(med * 1e3, 3),
                       "min_ms": round(min(raw[c["name"]]) * 1e3, 3), "reps": len(raw[c["name"]]),
                       "bytes": c["bytes"]}
                if c["name"] + ":memcpy" in raw:
                    pm = statistics.median(raw[c["name"] + ":memcpy"])
                    fig["paired_memcpy_gb_s"] = round(c["bytes"] / pm / 1e9, 3)
                    fig["vs_paired_memcpy"] = round(pm / med, 3)
                if c["name"] + ":write" in raw:  # the prefill side's export into the segment (not in gb_s)
                    fig["write_gb_s"] = round(c["bytes"] / statistics.median(raw[c["name"] + ":write"]) / 1e9, 3)
                    fig["writes_into_recycled_files"] = raw[c["name"] + ":recycled"][0]
                if c["name"] == "request":
                    entry["request_latency_ms"] = fig["median_ms"]
                    entry["request"] = fig
                else:
                    entry[c["name"]] = fig
            transports[name] = entry
    finally:
        shutil.rmtree(root, ignore_errors=True)
    req = next(c for c in cases if c["name"] == "request")
    result = {
        "memcpy_gb_s": round(memcpy["64MiB"], 3),
        "memcpy": {k: round(v, 3) for k, v in memcpy.items()},
        "transports": transports,
        "shm_vs_memcpy_64MiB": round(transports["shm"]["64MiB"]["gb_s"] / memcpy["64MiB"], 3) if "shm" in transports else None,
        "request_shape": {"tokens": REQUEST_TOKENS, "block_tokens": BLOCK_TOKENS, "layers": req["layers"],
                          "blocks": req["blocks"], "block_bytes": BLOCK_BYTES, "bytes": req["bytes"],
                          "model": "Llama-3-8B layer shape (8 KV heads x 128, fp16)"
                                   + ("; 4 of 32 layers (--quick)" if args.quick else "; all 32 layers")},
        "kv_dir": str(base), "kv_dir_pages": pages or "4KiB",
        "quick": bool(args.quick),
        "unavailable": _gpu_notes(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "seconds": None,
        "notes": [
            "each transport between two spawned processes; medians after one warm-up repetition",
            "shm: per repetition the sender writes a new sealed segment as the vLLM connector does (a layer "
            "at a time, pwrite; write_gb_s, not counted in gb_s), the receiver opens it and copies it into a "
            "preallocated buffer (the decode connector's single copy-in; gb_s) and frees it (recycled when "
            "recycling is on); shm-fresh: the same with DUOPOOL_KV_RECYCLE_MIB=0 (every segment a new file)",
            "gloo: long-lived 2-rank pair group on 127.0.0.1; offer/reply/pieces (4 MiB, window 4)/ack; "
            "includes the control message (a pipe) that triggers the push",
            "grpc: KvTransfer.Read stream, 1 MiB chunks, sync grpcio, into a preallocated destination segment",
            "memcpy: numpy copyto into a preallocated buffer, one thread; memcpy_gb_s is measured first in "
            "the parent; shm entries also carry paired_memcpy_gb_s, a memcpy of the same size timed in the "
            "receiver just before each shm repetition (same moment, same process), and their ratio",
            "kv_dir_pages: 4KiB = a reader's first touch of each 4 KiB page of a fresh segment faults (the "
            "shm ceiling is then ~55-60% of memcpy); huge=... = a tmpfs with transparent huge pages",
            "2 shared vCPUs: figures are noisy",
        ],
    }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    print(f"wrote {args.out / 'kv.json'} in {result['seconds']} s")
    return 0


def _print_table(r: dict) -> None:
    head = f"{'transport':<10}" + "".join(f"{s:>12}" for s in SIZES) + f"{'request ms':>14}"
    print(head + "   (GB/s)")
    print(f"{'memcpy':<10}" + "".join(f"{r['memcpy'][s]:>12.2f}" for s in SIZES)
          + f"{r['request_shape']['bytes'] / r['memcpy']['request'] / 1e6:>14.2f}")
    for name, t in r["transports"].items():
        print(f"{name:<10}" + "".join(f"{t[s]['gb_s']:>12.2f}" for s in SIZES) + f"{t['request_latency_ms']:>14.2f}")
    if r.get("shm_vs_memcpy_64MiB") is not None:
        paired = r["transports"]["shm"]["64MiB"].get("vs_paired_memcpy")
        print(f"shm / memcpy at 64 MiB: {r['shm_vs_memcpy_64MiB']:.0%} (vs a memcpy timed alongside: {paired:.0%})")
    for name in SHM_VARIANTS:
        if name in r["transports"] and "write_gb_s" in r["transports"][name]["64MiB"]:
            f = r["transports"][name]["64MiB"]
            print(f"{name}: the writer's export at 64 MiB {f['write_gb_s']:.2f} GB/s "
                  f"({f['writes_into_recycled_files']} of {f['reps']} into recycled files)")
    print(f"request: {r['request_shape']['bytes'] / MIB:.0f} MiB ({r['request_shape']['model']}); "
          f"segments in {r['kv_dir']} ({r['kv_dir_pages']})")
