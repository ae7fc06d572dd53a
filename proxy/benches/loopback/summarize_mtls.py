#!/usr/bin/env python3
"""Medians over reps of the mTLS hop benchmark (mtls.sh), as ratios within the run."""
import json
import statistics
import sys

runs = json.load(open(sys.argv[1]))
targets = [t for t in ["direct", "conduit-mtls", "conduit-plain", "nginx-mtls"]
           if any(r["target"] == t for r in runs)]
# The memory target: one proxy with 50 connections at most 25 MB.
RSS_TARGET_MB = 25


def med(target, f):
    values = [f(r) for r in runs if r["target"] == target]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def us_per_req(r):
    return r["proxies_cpu_s"] * 1e6 / r["requests"] if r["requests"] else None


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


noisy = [r for r in runs if r["loadavg"] > 1.5]
print(f"reps: {max(r['rep'] for r in runs)}; runs above load average 1.5: {len(noisy)} of {len(runs)}")
print()
print("Closed loop (wrk -t1 -c50): CPU of the two proxies together (client side + server side) "
      "and of the app, per request:")
print()
print("| target | req/s | vs direct | proxies CPU us/req | app CPU us/req | non-2xx + socket errors |")
print("|---|---|---|---|---|---|")
rps = {t: med(t, lambda r: r["rps"]) for t in targets}
for t in targets:
    hello = med(t, lambda r: r["hello_cpu_s"] * 1e6 / r["requests"] if r["requests"] else None)
    proxies = med(t, us_per_req) if t != "direct" else None
    errors = med(t, lambda r: r["non2xx"] + r["socket_errors"])
    vs = fmt(rps[t] / rps["direct"], ".2f") if "direct" in rps else "-"
    print(f"| {t} | {rps[t]:.0f} | {vs} | {fmt(proxies)} | {fmt(hello)} | {errors:.0f} |")
print()
for rate in ("open_1000", "open_5000"):
    print(f"Open loop {rate[5:]} req/s (50 connections, latency from intended send time), medians in us:")
    print()
    print("| target | p50 | p90 | p99 | p99.9 | added p50 | errors and non-200 |")
    print("|---|---|---|---|---|---|---|")
    base = med("direct", lambda r: r[rate]["p50_us"])
    for t in targets:
        q = {k: med(t, lambda r, k=k: r[rate][k]) for k in ("p50_us", "p90_us", "p99_us", "p999_us")}
        # Failed requests and answers other than 200.
        errors = med(t, lambda r: sum(r[rate]["errors"].values())
                     + sum(n for s, n in r[rate].get("statuses", {}).items() if s != "200"))
        added = "-" if t == "direct" or base is None else f"{q['p50_us'] - base:+.0f}"
        print(f"| {t} | {q['p50_us']:.0f} | {q['p90_us']:.0f} | {q['p99_us']:.0f} | {q['p999_us']:.0f} | {added} | {errors:.0f} |")
    print()
print(f"Memory after each rep's runs (50 connections), medians; the issue's target is at most "
      f"{RSS_TARGET_MB} MB per proxy:")
print()
print("| target | client-side RSS | server-side RSS | client-side high-water | server-side high-water | within target |")
print("|---|---|---|---|---|---|")
for t in targets:
    if t == "direct":
        continue
    mb = {k: med(t, lambda r, k=k: r[k] / 1024) for k in ("rss_a_kb", "rss_b_kb", "hwm_a_kb", "hwm_b_kb")}
    within = "yes" if max(mb["rss_a_kb"], mb["rss_b_kb"]) <= RSS_TARGET_MB else "no"
    print(f"| {t} | {mb['rss_a_kb']:.1f} MB | {mb['rss_b_kb']:.1f} MB | {mb['hwm_a_kb']:.1f} MB | "
          f"{mb['hwm_b_kb']:.1f} MB | {within if t.startswith('conduit') else '-'} |")
print()
if "conduit-mtls" in targets:
    tls = sum(r["server_inbound_tls"] for r in runs if r["target"] == "conduit-mtls")
    plain = sum(r["server_inbound_plain"] for r in runs if r["target"] == "conduit-mtls")
    print(f"conduit-mtls: proxy B counted {tls} inbound requests over mTLS and {plain} in plaintext "
          "during the closed and open loops")
ctrl = max(r["controller_cpu_s"] for r in runs)
print(f"controller (not counted above): at most {ctrl:.2f} s CPU during one closed-loop run")
print()
mtls, plain, nginx = (med(t, us_per_req) if t in targets else None
                      for t in ("conduit-mtls", "conduit-plain", "nginx-mtls"))
if mtls and nginx:
    print(f"conduit-mtls: CPU per request of the two proxies {mtls / nginx:.2f}x nginx-mtls's")
if mtls and plain:
    print(f"mTLS cost: conduit-mtls / conduit-plain CPU per request {mtls / plain:.2f}x "
          f"({mtls - plain:+.1f} us per request for the two proxies)")
