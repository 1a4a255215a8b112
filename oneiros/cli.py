"""The `oneiros` command: generate, serve, bench, simulate, calibrate."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from oneiros.config import EngineConfig
from oneiros.core import OneirosError

# Engine flags default to EngineConfig's own defaults (the policy is chosen per command).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}

DEFAULT_SERVE_MODELS = {"smollm2-a": "smollm2", "smollm2-b": "smollm2"}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every default that means something (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, True, argparse.SUPPRESS) or "%(default)" in text
                or "default" in text):
            return text
        return super()._get_help_string(action) or text


def _model_arg(value: str) -> tuple[str, str]:
    """NAME=SOURCE, or SOURCE alone (the tenant is then named after the source)."""
    name, sep, source = value.partition("=")
    if not sep:
        from oneiros.engine.llm import _tenant_name

        return _tenant_name(value), value
    if not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE, got {value!r}")
    return name, source


def _add_engine_args(p: argparse.ArgumentParser, default_policy: str) -> None:
    p.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        metavar="[NAME=]SOURCE",
        help="a model to serve: built-in name (smollm2), HF directory, .gguf file or "
        "random:CONFIG[@SEED]; repeat for several tenants",
    )
    p.add_argument("--device", default=DEFAULTS["device"], help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=DEFAULTS["dtype"],
                   choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument(
        "--memory-budget",
        default=None,
        help="arena size: bytes (4GiB, 512MiB) or a fraction of free device memory (0.9); "
        "default: the weights plus 1 GiB on CPU, 0.9 of free memory on CUDA",
    )
    p.add_argument("--block-size", type=int, default=DEFAULTS["block_size"],
                   help="tokens per KV block")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not share or keep KV blocks of equal prompt prefixes (on by default)")
    p.add_argument("--page-bytes", type=int, default=None,
                   help="arena page size (default: 2 MiB, or larger for big KV blocks)")
    p.add_argument("--max-num-seqs", type=int, default=DEFAULTS["max_num_seqs"],
                   help="requests per step per model")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULTS["max_num_batched_tokens"],
                   help="tokens per step per model")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context window (default: the model's)")
    p.add_argument(
        "--policy",
        default=default_policy,
        choices=["recompute", "swap", "pie", "static", "oneiros", "offload"],
        help="what to do when KV cache runs out (oneiros: remap parameter memory first; "
        "offload: whole idle models off the device)",
    )
    p.add_argument("--sharing", default=DEFAULTS["sharing"], choices=["temporal", "spatial"],
                   help="one model per step, or every model with work in each step")
    p.add_argument("--turn-steps", type=int, default=DEFAULTS["turn_steps"],
                   help="temporal sharing: steps a model runs before the next model's turn")
    p.add_argument("--turn-max-s", type=float, default=DEFAULTS["turn_max_s"],
                   help="temporal sharing: a turn also ends before a step that would take it past "
                   "this many seconds, unless the model streams lent layers (default: steps only)")
    p.add_argument("--turn-reload", default=DEFAULTS["turn_reload"], choices=["auto", "on", "off"],
                   help="temporal sharing, policy oneiros: models waiting for a later turn lend "
                   "every layer and are copied back during the turn before theirs (auto: when "
                   "the weights do not all fit)")
    p.add_argument("--attention", default=DEFAULTS["attention"],
                   choices=["auto", "torch", "triton"],
                   help="attention backend (auto: Triton on CUDA when installed)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly on CUDA (graphs are captured by default)")
    p.add_argument("--swap-space", default="1GiB", help="host memory for swapped KV (swap policy)")
    p.add_argument("--kv-watermark", type=float, default=DEFAULTS["kv_watermark"], metavar="SHARE",
                   help="share of the KV cache admissions leave free while requests run, as "
                   "vLLM V0's watermark (0.01 there too; 0 turns it off)")
    p.add_argument("--admit-remap-after-s", type=float,
                   default=DEFAULTS["admit_remap_after_s"], metavar="S",
                   help="policy oneiros: a request waiting this long for KV cache, while at most "
                   "half as many requests wait as run, may be admitted with layers of models not "
                   "running "
                   "(default: %(default)s; a negative value: never)")
    p.add_argument("--growth-reserve-tokens", type=int, default=DEFAULTS["growth_reserve_tokens"],
                   metavar="N", help="admissions leave room for every running request to grow "
                   "by N tokens, counting the layers remapping would give them (default: 32 "
                   "under --policy oneiros, 0 otherwise)")
    p.add_argument("--host-memory-budget", default=None, metavar="BYTES",
                   help="host memory for pinned weight copies; models beyond it (in --model order) "
                   "keep theirs in a memory-mapped file, the cold tier (default: no limit; "
                   "simulate: the hardware profile's)")
    p.add_argument("--max-remap-fraction", type=float, default=DEFAULTS["max_remap_fraction"],
                   help="most of a model's layers that may be remapped away")
    p.add_argument("--remap-fallback", default=DEFAULTS["remap_fallback"],
                   choices=["recompute", "swap", "pie"],
                   help="policy oneiros: what to do when remapping cannot cover a shortage")
    p.add_argument("--prefetch-distance", type=int, default=DEFAULTS["prefetch_distance"],
                   choices=[1, 2],
                   help="borrowed slabs per streamed pass")
    p.add_argument("--trace-steps", default=None, metavar="PATH", help="record every step (JSONL)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all)")


def _config(
    args: argparse.Namespace, default_models: dict[str, str], runs_models: bool = True
) -> EngineConfig:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise OneirosError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif args.device == "cpu" and runs_models:
        warn_busy_cpu()
    models = dict(args.model) if args.model else dict(default_models)
    if args.model and len(models) != len(args.model):
        raise OneirosError("two --model arguments use the same name")
    return EngineConfig(
        models=models,
        device=args.device,
        dtype=args.dtype,
        memory_budget=args.memory_budget,
        block_size=args.block_size,
        prefix_caching=args.prefix_caching,
        page_bytes=args.page_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        policy=args.policy,
        sharing=args.sharing,
        turn_steps=args.turn_steps,
        turn_max_s=args.turn_max_s,
        turn_reload=args.turn_reload,
        attention=args.attention,
        cuda_graphs=args.cuda_graphs,
        swap_space=args.swap_space,
        kv_watermark=args.kv_watermark,
        growth_reserve_tokens=args.growth_reserve_tokens,
        admit_remap_after_s=(
            None if (args.admit_remap_after_s or 0) < 0 else args.admit_remap_after_s
        ),
        host_memory_budget=args.host_memory_budget,
        max_remap_fraction=args.max_remap_fraction,
        remap_fallback=args.remap_fallback,
        prefetch_distance=args.prefetch_distance,
        trace_steps=args.trace_steps,
    )


def warn_busy_cpu(load: float | None = None, cores: int | None = None, out: object = None) -> bool:
    """Warn when other processes keep the CPU busy (1-minute load average, by default): torch's
    default of one thread per core then waits on cores it does not get (a decode step measured
    0.7 s against 0.04 s with one thread). Returns whether it warned."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return False
    if load < max(1.0, 0.5 * cores):
        return False
    print(
        f"oneiros: warning: the CPU is busy (load {load:.1f} on {cores} cores); torch's default "
        f"of {cores} threads may be many times slower than --threads 1 here",
        file=out or sys.stderr,
    )
    return True


def _prompt(args: argparse.Namespace) -> tuple[str | list[int] | None, list | None]:
    """(prompt, messages) of `generate`: text, token ids (--token-ids), or a chat message."""
    if args.token_ids is not None:
        if args.prompt is not None:
            raise OneirosError("give a prompt or --token-ids, not both")
        try:
            ids = [int(x) for x in args.token_ids.replace(",", " ").split()]
        except ValueError:
            raise OneirosError(f"--token-ids takes integers, got {args.token_ids!r}") from None
        return ids, None
    if args.prompt is None:
        raise OneirosError("give a prompt (or --token-ids 1,2,3)")
    if args.chat:
        return None, [{"role": "user", "content": args.prompt}]
    return args.prompt, None


def _generate(args: argparse.Namespace) -> int:
    from oneiros.core import SamplingParams

    # Everything about the request is checked before the model loads.
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    prompt, messages = _prompt(args)
    if prompt == "":
        raise OneirosError("the prompt is empty")
    config = _config(args, {"smollm2": "smollm2"})
    from oneiros.engine.engine import LLMEngine

    engine = LLMEngine(config)
    model = args.model[0][0] if args.model else None
    req = engine.add_request(prompt, params, model, messages=messages)
    shown = ""
    while True:
        for out in engine.step():
            if out.request_id != req.request_id:
                continue
            text = out.text
            if args.stream and not out.finished:
                # Streamed text stops short of anything a stop string could still remove.
                safe = max((len(text) - max(len(s) for s in params.stop) + 1
                            if params.stop else len(text)), len(shown))
                text = text[:safe]
            if not args.stream and not out.finished:
                continue
            if text.startswith(shown) and len(text) > len(shown):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
            elif not text.startswith(shown):  # the final text differs (a stop string cut it)
                sys.stdout.write("\r" + text)
                shown = text
            if out.finished:
                if args.token_ids is not None and not text:
                    sys.stdout.write(" ".join(str(t) for t in out.token_ids))
                sys.stdout.write("\n")
                return 0


def _served_names(args: argparse.Namespace, models: list[str]) -> dict[str, str]:
    """--served-model-name: with one model, every name is an alias of it (the first is the one
    responses report); with several, one name per model, in --model order."""
    names = args.served_model_name or []
    if not names:
        return {}
    if len(models) == 1:
        return dict.fromkeys(names, models[0])
    if len(names) != len(models):
        raise OneirosError(
            f"--served-model-name: {len(models)} models are served, so give {len(models)} "
            f"names (one per --model, in order), got {len(names)}"
        )
    return dict(zip(names, models, strict=True))


def _serve(args: argparse.Namespace) -> int:
    from oneiros.engine import faults
    from oneiros.server.app import ServerSettings, serve

    if args.cluster:
        return _serve_cluster(args)
    if args.dry_run:
        raise OneirosError("--dry-run goes with --cluster (it prints the cluster's placement)")
    faults.parse(args.faults or os.environ.get("ONEIROS_FAULTS", ""))  # a bad spec fails early
    config = _config(args, DEFAULT_SERVE_MODELS)
    settings = ServerSettings(
        api_key=args.api_key or os.environ.get("ONEIROS_API_KEY") or None,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        public_metrics=args.public_metrics,
        served_names=_served_names(args, list(config.models)),
    )
    return serve(config, host=args.host, port=args.port, settings=settings, faults=args.faults)


def _serve_cluster(args: argparse.Namespace) -> int:
    from oneiros.cluster.config import load_cluster, plan
    from oneiros.cluster.report import plan_text
    from oneiros.server.app import ServerSettings

    if args.model or args.served_model_name:
        raise OneirosError("with --cluster the models and their names come from the cluster "
                           "file, not --model / --served-model-name")
    if args.faults:
        raise OneirosError("with --cluster, fault drills are set in the cluster file (faults:)")
    cluster = load_cluster(args.cluster)
    placement, demands = plan(cluster)
    predictions = None
    if cluster.hardware and any(d.rate > 0 for d in demands):
        from oneiros.cluster.predict import predict

        predictions = predict(cluster, placement, demands)
    print(plan_text(cluster, placement, demands, predictions))
    if args.dry_run:
        return 0
    from oneiros.cluster.app import run_cluster

    settings = ServerSettings(
        api_key=args.api_key or os.environ.get("ONEIROS_API_KEY") or None,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        public_metrics=args.public_metrics,
    )
    return run_cluster(cluster, placement, settings, args.host, args.port, args.address)


def _bench(args: argparse.Namespace) -> int:
    from oneiros.bench.commands import run_bench

    return run_bench(args, None if args.url else _config(args, {}))


def _simulate(args: argparse.Namespace) -> int:
    from oneiros.bench.commands import run_simulate, sim_models

    args.model = list(sim_models(args.model, args.models).items())
    if args.mix is None and args.models:
        args.mix = args.models
    return run_simulate(args, _config(args, {}, runs_models=False))


def _calibrate(args: argparse.Namespace) -> int:
    from oneiros.bench.commands import run_calibrate

    return run_calibrate(args)


def build_parser() -> argparse.ArgumentParser:
    import oneiros

    parser = argparse.ArgumentParser(prog="oneiros", description=__doc__)
    parser.add_argument("--version", action="version", version=f"oneiros {oneiros.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = _Help

    g = sub.add_parser("generate", help="complete one prompt and print the text (streamed)",
                       formatter_class=fmt)
    _add_engine_args(g, "recompute")
    g.add_argument("prompt", nargs="?", help="the prompt text")
    g.add_argument("--token-ids", default=None, metavar="IDS",
                   help="a prompt of token ids (1,2,3) instead of text; for models without a "
                   "tokenizer the output is printed as ids too")
    g.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print the text once it is complete")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k")
    g.add_argument("--seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="run the OpenAI-compatible server", formatter_class=fmt)
    _add_engine_args(s, "oneiros")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and "
                   "/ping (default: $ONEIROS_API_KEY)")
    s.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (for scrapers that cannot send one)")
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="API names: aliases of the one model, or one name per --model")
    s.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")
    s.add_argument("--max-body-bytes", type=int, default=32 << 20,
                   help="request bodies larger than this get 413")
    s.add_argument("--faults", default=None, metavar="SPEC",
                   help="inject faults for drills, e.g. step:0.01,copy:0.01,slow:0.05@0.2 "
                   "(default: $ONEIROS_FAULTS; see oneiros.engine.faults)")
    s.add_argument("--cluster", default=None, metavar="CLUSTER.yaml",
                   help="serve the cluster file's models on Ray Serve replicas; the engine "
                   "settings come from the file too (see docs/cluster.md)")
    s.add_argument("--dry-run", action="store_true",
                   help="with --cluster: print the placement and memory plan, start nothing")
    s.add_argument("--address", default=None,
                   help="with --cluster: the Ray cluster to join (default: a local one, or "
                   "$RAY_ADDRESS)")
    s.set_defaults(func=_serve)

    from oneiros.bench.commands import add_report_args

    b = sub.add_parser("bench", help="run one workload against several policies; report ratios",
                       formatter_class=fmt)
    _add_engine_args(b, "recompute")
    b.add_argument("--workload", required=True,
                   help="e.g. poisson:rate=2,n=100,lengths=sharegpt,mix=a+b,seed=0 "
                   "(see docs/workloads.md)")
    b.add_argument("--url", default=None, help="an OpenAI-compatible server to measure instead")
    b.add_argument("--api-key", default=None)
    add_report_args(b)
    b.set_defaults(func=_bench)

    m = sub.add_parser("simulate", help="the same report from the simulator on a hardware profile",
                       formatter_class=fmt)
    _add_engine_args(m, "oneiros")
    m.set_defaults(memory_budget="0.9")
    m.add_argument("--hardware", required=True,
                   help="gh200, h100-sxm, h100-pcie, h200, a100-80g, cpu "
                   "or a profile .json from `oneiros calibrate`")
    m.add_argument("--models", default=None, help="a paper mix (c1, c2); or use --model")
    m.add_argument("--trace", default=None, help="an Azure LLM inference trace CSV to replay")
    m.add_argument("--time-scale", type=float, default=1.0, help="trace time divided by this")
    m.add_argument("--max-requests", type=int, default=None)
    m.add_argument("--mix", default=None, help="model mix for the trace (default: --models)")
    m.add_argument("--workload", default=None, help="a workload spec instead of --trace")
    m.add_argument("--noise", type=float, default=0.0,
                   help="sigma of a log-normal factor on each step's compute time (a machine's "
                   "step-to-step noise, e.g. the noise_rms_relative `calibrate` reports); repeat "
                   "i draws from seed i, so --repeats shows how far the metrics move with it")
    add_report_args(m)
    m.set_defaults(func=_simulate, policies=["swap", "oneiros"])

    c = sub.add_parser("calibrate", help="fit a hardware profile to a measured step trace",
                       formatter_class=fmt)
    c.add_argument("--trace", required=True, help="a JSONL step trace (--trace-steps of a run)")
    c.add_argument("--model", action="append", type=_model_arg, metavar="NAME=SOURCE",
                   help="the traced models (geometry only)")
    c.add_argument("--base", default="cpu", help="the profile whose peaks are kept")
    c.add_argument("--name", default=None)
    c.add_argument("--out", default="results/profile.json")
    c.set_defaults(func=_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OneirosError as e:
        print(f"oneiros: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
