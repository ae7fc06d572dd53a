#!/usr/bin/env python3
"""Medians over reps of the concurrency sweep (concurrency.sh), with ratios within the run."""
import json
import statistics
import sys

runs = json.load(open(sys.argv[1]))
targets = [t for t in ["conduit", "conduit-base", "nginx", "haproxy"] if any(r["target"] == t for r in runs)]
levels = sorted({r["connections"] for r in runs})


def med(target, proto, level, f):
    values = [f(r) for r in runs
              if r["target"] == target and r["proto"] == proto and r["connections"] == level]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def us_per_req(r):
    return r["cpu_s"] * 1e6 / r["requests"] if r["requests"] else None


noisy = [r for r in runs if r["loadavg"] > 1.5]
print(f"reps: {max(r['rep'] for r in runs)}; runs above load average 1.5: {len(noisy)} of {len(runs)}")
for proto in ("h1", "h2"):
    print()
    print(f"{'HTTP/1.1 (wrk)' if proto == 'h1' else 'h2 (h2load -m1)'}: per target, CPU us per "
          "request (x its own 50-connection figure), requests/s, resident memory at the end of "
          "the first rep's step (later reps start from the high-water mark of the largest "
          "steps: freed memory is not given back to the system)")
    print()
    print("| connections | " + " | ".join(targets) + " | conduit / haproxy CPU |")
    print("|---|" + "---|" * (len(targets) + 1))
    base = {t: med(t, proto, levels[0], us_per_req) for t in targets}
    for level in levels:
        cells = []
        for t in targets:
            us = med(t, proto, level, us_per_req)
            rps = med(t, proto, level, lambda r: r["rps"])
            rss = med(t, proto, level, lambda r: r["rss_kb"] if r["rep"] == 1 else None)
            if us is None:
                cells.append("-")
                continue
            ratio = f" (x{us / base[t]:.2f})" if base[t] else ""
            cells.append(f"{us:.1f}{ratio}, {rps:.0f}/s, {rss / 1024:.1f} MB")
        c = med("conduit", proto, level, us_per_req)
        h = med("haproxy", proto, level, us_per_req)
        vs = f"{c / h:.2f}" if c and h else "-"
        print(f"| {level} | " + " | ".join(cells) + f" | {vs} |")
