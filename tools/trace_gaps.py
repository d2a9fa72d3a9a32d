"""Where the GPU waits for the host: idle gaps in a profiled run's Chrome trace, by host op.

    python tools/bench_train.py --profile 2 --keep runs --rows fq+compile ...
    python tools/trace_gaps.py runs/fq_compile/profile/trace_rank0.json.gz

A gap is a stretch with no kernel, copy or fill on the GPU. Each is charged to what the host
was doing while the GPU sat idle: the ops open on the host thread that launched the kernel
ending the gap, halfway between the gap's start and that launch (a launch after the gap began
means the host was late). The profile summary's "GPU busy" says how much idle there is; this
says where it comes from (syncs such as `.item()`, optimizer launches, hooks).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json

from train.profiling import union_us

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
HOST_CATS = ("cpu_op", "user_annotation", "python_function")


def load(path: str) -> list[dict]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def gaps(events: list[dict], min_us: float = 20.0) -> dict:
    """GPU idle gaps longer than min_us, each with the host ops it is charged to."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit("no GPU kernels in this trace: profile a run on a GPU")
    launch = {e["args"]["correlation"]: e for e in events
              if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    host = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATS:
            host[e["tid"]].append(e)
    main_tid = max(host, key=lambda t: len(host[t])) if host else None
    found, end = [], gpu[0]["ts"]
    for k in gpu:
        if k["ts"] - end > min_us:
            found.append((end, k["ts"], k))
        end = max(end, k["ts"] + k["dur"])
    busy = union_us([(k["ts"], k["ts"] + k["dur"]) for k in gpu])
    rows = []
    for a, b, k in found:
        lt = launch.get(k.get("args", {}).get("correlation"))
        when = (a + min(lt["ts"], b)) / 2 if lt else (a + b) / 2
        tid = lt["tid"] if lt and lt["tid"] in host else main_tid
        stack = sorted((h for h in host.get(tid, []) if h["ts"] <= when < h["ts"] + h["dur"]),
                       key=lambda h: (h["ts"], -h["dur"]))
        rows.append({"us": b - a, "at_ms": (a - gpu[0]["ts"]) / 1e3, "next_kernel": k["name"],
                     "host": [h["name"] for h in stack]})
    return {"span_ms": (end - gpu[0]["ts"]) / 1e3, "busy_ms": busy / 1e3,
            "idle_ms": sum(r["us"] for r in rows) / 1e3, "gaps": rows}


def by_host_op(rows: list[dict], depth: int = 2) -> list[tuple[str, float]]:
    """Idle ms per host context: the outermost `depth` ops open during each gap."""
    total = collections.Counter()
    for r in rows:
        total[" > ".join(n[:60] for n in r["host"][:depth]) or "(no host op open)"] += r["us"] / 1e3
    return total.most_common()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a profiled run's profile/trace_rank{R}.json.gz")
    ap.add_argument("--min-us", type=float, default=20.0, help="shorter gaps are ignored")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    g = gaps(load(args.trace), args.min_us)
    print(f"GPU span {g['span_ms']:.1f} ms, busy {g['busy_ms']:.1f} ms; {len(g['gaps'])} gaps over "
          f"{args.min_us:g} us, {g['idle_ms']:.1f} ms idle in them")
    print("\nidle ms by host op (outermost two):")
    for name, ms in by_host_op(g["gaps"])[:args.top]:
        print(f"  {ms:8.2f}  {name}")
    print("\nlargest gaps: us, at ms, next kernel, host ops")
    for r in sorted(g["gaps"], key=lambda r: -r["us"])[:args.top]:
        print(f"  {r['us']:8.0f} {r['at_ms']:9.2f}  {r['next_kernel'][:40]:<40} {' > '.join(r['host'][:3])}")


if __name__ == "__main__":
    main()
