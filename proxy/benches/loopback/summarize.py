#!/usr/bin/env python3
"""Medians over reps of the loopback benchmark (run.sh), as ratios within the run."""
import json
import statistics
import sys

runs = json.load(open(sys.argv[1]))
targets = [t for t in ["direct", "nginx", "proxy", "proxy-routes", "proxy-retries", "proxy-base"]
           if any(r["target"] == t for r in runs)]


def med(target, f):
    values = [f(r) for r in runs if r["target"] == target]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def us_per_req(r):
    return r["server_cpu_s"] * 1e6 / r["requests"] if r["requests"] else None


noisy = [r for r in runs if r["loadavg"] > 1.5]
print(f"reps: {max(r['rep'] for r in runs)}; runs above load average 1.5: {len(noisy)} of {len(runs)}")
print()
print("| target | closed-loop req/s | vs direct | vs nginx | server CPU us/req | hello CPU us/req |")
print("|---|---|---|---|---|---|")
rps = {t: med(t, lambda r: r["rps"]) for t in targets}
for t in targets:
    hello = med(t, lambda r: r["hello_cpu_s"] * 1e6 / r["requests"])
    server = med(t, us_per_req) if t != "direct" else None
    print(f"| {t} | {rps[t]:.0f} | {rps[t] / rps['direct']:.2f} | {rps[t] / rps['nginx']:.2f} | "
          f"{'-' if server is None else f'{server:.1f}'} | {hello:.1f} |")
print()
for rate in ("open_1000", "open_5000"):
    print(f"Open loop {rate[5:]} req/s (50 connections, latency from intended send time), medians in us:")
    print()
    print("| target | p50 | p90 | p99 | p99.9 | added p50 | errors |")
    print("|---|---|---|---|---|---|---|")
    base = med("direct", lambda r: r[rate]["p50_us"])
    for t in targets:
        q = {k: med(t, lambda r, k=k: r[rate][k]) for k in ("p50_us", "p90_us", "p99_us", "p999_us")}
        errors = med(t, lambda r: sum(r[rate]["errors"].values()))
        added = "-" if t == "direct" else f"{q['p50_us'] - base:+.0f}"
        print(f"| {t} | {q['p50_us']:.0f} | {q['p90_us']:.0f} | {q['p99_us']:.0f} | {q['p999_us']:.0f} | {added} | {errors:.0f} |")
    print()
for t in targets:
    if not t.startswith("proxy"):
        continue
    rss = med(t, lambda r: r["rss_kb"])
    hwm = med(t, lambda r: r["hwm_kb"])
    print(f"{t} memory after each rep (50 connections): RSS {rss / 1024:.1f} MB, high-water {hwm / 1024:.1f} MB")
nginx_us = med("nginx", us_per_req)
print()
for t in targets:
    if t.startswith("proxy"):
        print(f"{t}: CPU per request {med(t, us_per_req) / nginx_us:.2f}x nginx's")
# h2 (prior knowledge) open loop: not nginx, which cannot proxy h2 upstream.
h2_targets = [t for t in targets if t != "nginx"]


def us(v):
    return "-" if v is None else f"{v:.0f}"


for rate in ("h2_open_1000", "h2_open_5000"):
    if not any(r.get(rate) for r in runs):
        continue
    print()
    print(f"h2 open loop {rate[8:]} req/s (50 connections, requests multiplexed on them, "
          "latency from intended send time), medians in us:")
    print()
    print("| target | p50 | p90 | p99 | p99.9 | added p50 | errors |")
    print("|---|---|---|---|---|---|---|")
    base = med("direct", lambda r: r[rate]["p50_us"] if r.get(rate) else None)
    for t in h2_targets:
        q = {k: med(t, lambda r, k=k: r[rate][k] if r.get(rate) else None)
             for k in ("p50_us", "p90_us", "p99_us", "p999_us")}
        errors = med(t, lambda r: sum(r[rate]["errors"].values()) if r.get(rate) else None)
        added = "-" if t == "direct" or base is None or q["p50_us"] is None else f"{q['p50_us'] - base:+.0f}"
        print(f"| {t} | {us(q['p50_us'])} | {us(q['p90_us'])} | {us(q['p99_us'])} | {us(q['p999_us'])} | "
              f"{added} | {us(errors)} |")
if any(r.get("h2_open_1000") or r.get("h2_open_5000") for r in runs):
    print()
    print("nginx has no h2 rows: it cannot proxy h2 to its upstream (proxy_pass speaks HTTP/1.x only).")
if "proxy-retries" in targets and "proxy-routes" in targets:
    ratio = med("proxy-retries", us_per_req) / med("proxy-routes", us_per_req)
    print(f"proxy-retries (retries and breaker on, nothing failing): CPU per request "
          f"{ratio:.3f}x proxy-routes' (the same profile without them)")
