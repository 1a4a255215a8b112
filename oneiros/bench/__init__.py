"""Benchmark harness: workloads, a runner (in process or over HTTP), metrics and reports.

    from oneiros.bench import workload_from_spec, run_policies, write_report, print_table

    workload = workload_from_spec("poisson:rate=2,n=100,lengths=sharegpt,mix=a+b,max_total=512")
    results = run_policies(lambda policy: LLMEngine(replace(config, policy=policy)),
                           ["recompute", "oneiros"], workload)
    write_report(results, "bench.json", "bench.png", config={...}, slo_ttft_s=1.0, slo_tbt_s=0.2)
    print_table(results, slo_ttft_s=1.0, slo_tbt_s=0.2)

Nothing here imports torch; matplotlib, rich, tqdm and httpx are imported when first used.
"""

from oneiros.bench.metrics import RequestRecord, summarize
from oneiros.bench.report import load_results, plot_results, print_table, write_report
from oneiros.bench.runner import RunResult, compare, run_engine, run_http, run_policies
from oneiros.bench.workloads import (
    MIXES,
    WorkItem,
    alpaca_lengths,
    assign_models,
    build_workload,
    gamma_arrivals,
    poisson_arrivals,
    random_sources,
    read_azure_trace,
    rename_models,
    sharegpt_lengths,
    workload_from_spec,
)

__all__ = [
    "MIXES",
    "RequestRecord",
    "RunResult",
    "WorkItem",
    "alpaca_lengths",
    "assign_models",
    "build_workload",
    "compare",
    "gamma_arrivals",
    "load_results",
    "plot_results",
    "poisson_arrivals",
    "print_table",
    "random_sources",
    "read_azure_trace",
    "rename_models",
    "run_engine",
    "run_http",
    "run_policies",
    "sharegpt_lengths",
    "summarize",
    "write_report",
    "workload_from_spec",
]
