"""Medians of benches/e2e.sh's per-run results, as a Markdown table."""
import csv
import statistics
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
groups = defaultdict(list)
for r in rows:
    groups[(r["workload"], r["transport"])].append(r)

print("| workload | transport | runs | rows | pg_recvlogical s | worker s | ratio b/a | worker rows/s | peak RSS MB | pg_recvlogical CPU s | worker CPU s | Redis CPU s | fallbacks |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for (wl, tr), rs in groups.items():
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    recv, worker = med("recv_s"), med("worker_s")
    ratios = statistics.median(float(r["worker_s"]) / float(r["recv_s"]) for r in rs)
    n = int(rs[0]["rows"])
    fb = ",".join(sorted({r["fallbacks"] for r in rs}))
    print(f"| {wl.upper()} | {tr} | {len(rs)} | {n} | {recv:.2f} | {worker:.2f} | {ratios:.2f} | {n / worker:,.0f} | {med('rss_kb') / 1024:.1f} | {med('recv_cpu_s'):.2f} | {med('worker_cpu_s'):.2f} | {med('redis_cpu_s'):.2f} | {fb} |")
