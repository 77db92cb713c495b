"""Command line: `tokenloom generate | chat | serve | models | eval | plugins | run`.

Engine flags are generated from the config dataclasses (`--kv-cache-gib` ↔ `kv_cache_gib`), so the
CLI, `LLM(...)` keyword arguments and `EngineConfig` stay one to one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tokenloom.config import CONFIG_GROUPS, DEFAULT_MODEL

_SAMPLING_FLAGS: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int, "min_tokens": int,
    "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
}
_TYPES = {"int": int, "float": float, "str": str}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per engine option, with the option's default."""
    for group_class in CONFIG_GROUPS:
        group = parser.add_argument_group(group_class.__name__)
        for f in dataclasses.fields(group_class):
            flag = "--" + f.name.replace("_", "-")
            names = [flag, "-m"] if f.name == "model" else [flag]
            kind = str(f.type).split("|")[0].strip()
            if kind == "bool":
                group.add_argument(*names, dest=f.name, default=f.default, action=argparse.BooleanOptionalAction)
            else:
                group.add_argument(*names, dest=f.name, default=f.default, type=_TYPES[kind],
                                   help=f"(default: {f.default})")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed engine options, ready for `EngineConfig.from_kwargs` or `LLM(**kwargs)`."""
    return {f.name: getattr(args, f.name) for g in CONFIG_GROUPS for f in dataclasses.fields(g)}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the common sampling parameters."""
    group = parser.add_argument_group("sampling")
    for name, kind in _SAMPLING_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", default=None)


def sampling_params(args: argparse.Namespace, **defaults: Any):
    """SamplingParams from the sampling flags that were given, over `defaults`."""
    from tokenloom.sampling_params import SamplingParams

    given = {k: getattr(args, k) for k in [*_SAMPLING_FLAGS, "stop", "ignore_eos"] if getattr(args, k) is not None}
    return SamplingParams(**{**defaults, **given, "output_kind": "delta"})


def _build_llm(args: argparse.Namespace):
    from tokenloom.llm import LLM

    return LLM(**engine_kwargs(args))


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to the terminal."""
    llm = _build_llm(args)
    params = sampling_params(args, max_tokens=128)
    start, pieces = time.perf_counter(), 0
    sys.stdout.write(args.prompt)
    for out in llm.stream(args.prompt, params):
        sys.stdout.write(out.outputs[0].text)
        sys.stdout.flush()
        pieces += 1
    elapsed = time.perf_counter() - start
    print(f"\n[{pieces} chunks in {elapsed:.2f}s; model loaded in {llm.engine.loaded.load_seconds:.1f}s]",
          file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat session; an empty line, EOF or Ctrl-C ends it. Input that is not UTF-8 is read with
    U+FFFD in place of the bytes it cannot decode (a terminal in another encoding must not crash the chat)."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    llm = _build_llm(args)
    params = sampling_params(args, max_tokens=512, temperature=0.7)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        sys.stdout.write("assistant> ")
        reply = []
        for out in llm.stream(llm.engine.inputs.chat_token_ids(messages), params):
            reply.append(out.outputs[0].text)
            sys.stdout.write(reply[-1])
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field, with its default."""
    from tokenloom.server.config import ServerConfig

    group = parser.add_argument_group("server")
    for f in dataclasses.fields(ServerConfig):
        kind = str(f.type).split("|")[0].strip()
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, type=_TYPES[kind],
                           help=f"(default: {f.default})")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI API until SIGTERM or Ctrl-C: the command line's model (the default one unless a
    models folder or catalog is given), loaded now, plus the catalogs' models on demand."""
    from tokenloom.manager import ModelLoadError
    from tokenloom.server.app import ListenError, bind_server_socket, build_state, run_server, server_specs
    from tokenloom.server.config import ServerConfig

    config = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format="%(levelname)s:     %(name)s: %(message)s")
    options = engine_kwargs(args)
    flag_model = options.pop("model")
    model = args.model_ref or flag_model
    if args.model_ref is None and (config.models_dir or config.models_config) and model == DEFAULT_MODEL:
        model = None  # a catalog serves its own models; the default one stays available on demand
    try:
        sock = bind_server_socket(config.host, config.port)
    except ListenError as exc:
        print(f"tokenloom: error: {exc}", file=sys.stderr)
        return 1
    if config.replicas > 1 or config.ray_address:
        from tokenloom.distributed.front import serve_replicas

        return serve_replicas(config, model, options, sock)
    state = build_state(config, server_specs(config, model, options), config.served_model_name or model)
    if state.models.default_model is not None:
        try:
            state.manager.get(state.models.default_model)  # fail at start-up, not on the first request
        except ModelLoadError as exc:
            sock.close()
            print(f"tokenloom: error: {exc}", file=sys.stderr)
            return 1
    return run_server(state, sock)


def cmd_models(args: argparse.Namespace) -> int:
    """`tokenloom models list` / `tokenloom models show NAME`."""
    from tokenloom.catalog import catalog_specs, describe_model

    specs = {s.name: s for s in catalog_specs(args.models_dir, args.models_config)}
    if args.action == "list":
        from tokenloom.loader.sources import resolve_model

        width = max(len(name) for name in specs)
        for name, spec in specs.items():
            try:
                found = resolve_model(spec.source)
                where = f"{found.kind:<4}  {found.path}"
            except (OSError, ValueError) as exc:
                where = f"?     {spec.source}: {str(exc).splitlines()[0]}"
            print(f"{name:<{width}}  {where}")
        return 0
    spec = specs.get(args.name)
    info = describe_model(spec.source if spec else args.name, spec.chat_template if spec else None)
    template = info.pop("chat template")
    for key, value in info.items():
        print(f"{key + ':':<16}{value}")
    print(f"chat template:\n{template}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`tokenloom eval pipeline.yaml --data labeled.jsonl --metrics ...`: a pipeline scored on labelled rows;
    `tokenloom eval --perplexity -m MODEL --text FILE`: perplexity over a text with a sliding window."""
    import json

    if args.perplexity:
        return _eval_perplexity(args)
    if args.pipeline is None or args.data is None:
        raise ValueError("give a pipeline YAML and --data labeled.jsonl (or --perplexity -m MODEL --text FILE)")
    from tokenloom.evaluation import evaluate_pipeline, format_table
    from tokenloom.pipelines import load_pipeline
    from tokenloom.pipelines.batch import read_rows

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    rows = [row.data for row in read_rows(args.data)]
    bad = [i for i, row in enumerate(rows) if not isinstance(row, dict) or args.reference_field not in row]
    if bad:  # before the model loads
        raise ValueError(f"--data {args.data}: rows {bad[:5]} are not JSON objects with a "
                         f"{args.reference_field!r} field (the expected output)")
    report = evaluate_pipeline(load_pipeline(args.pipeline), rows, metrics, args.reference_field,
                               args.prediction_field)
    print(format_table(report))
    output = args.output or args.data.with_suffix(".scores.json")
    output.write_text(json.dumps({"pipeline": str(args.pipeline), "data": str(args.data), "scores": report.scores,
                                  "rows": report.num_rows, "failed": report.num_failed}, indent=2) + "\n")
    print(f"scores written to {output}")
    return 0


def _eval_perplexity(args: argparse.Namespace) -> int:
    import json

    from tokenloom.evaluation import perplexity
    from tokenloom.llm import LLM

    if args.text is None:
        raise ValueError("--perplexity needs --text FILE")
    try:
        text = args.text.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--text {args.text}: {exc.strerror or exc}") from exc
    result = perplexity(LLM(**engine_kwargs(args)), text, window=args.window, stride=args.stride)
    print(json.dumps({"model": args.model, "text": str(args.text), "perplexity": round(result.perplexity, 4),
                      "mean_nll": round(result.mean_nll, 6), "tokens_scored": result.num_tokens,
                      "windows": result.num_windows}))
    return 0


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, and `--config FILE.yaml` holding any of them (flags win); model,
    data and output must come from one or the other."""
    from tokenloom.adapters.train import TrainConfig

    parser.add_argument("--config", help="a YAML file of these options (method, model, data, task, ...)")
    for f in dataclasses.fields(TrainConfig):
        names = ["--" + f.name.replace("_", "-")] + (["-m"] if f.name == "model" else [])
        kind = str(f.type).split("|")[0].strip()
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
        if kind == "bool":
            parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, type=_TYPES[kind], help=default)


def cmd_train(args: argparse.Namespace) -> int:
    """Train an adapter and save it in PEFT's format (`tokenloom train -m MODEL --data F --output DIR`)."""
    from tokenloom.adapters.train import TrainConfig, train

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    result = train(args.config, **options)
    for epoch, loss in enumerate(result.losses, 1):
        metric = f", dev {result.metrics[epoch - 1]:.4f}" if epoch <= len(result.metrics) else ""
        print(f"epoch {epoch}: loss {loss:.4f}{metric}")
    print(f"saved {result.output}{' (stopped early)' if result.stopped_early else ''}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """`tokenloom plugins list`: every plugin found, what it adds, or why it was skipped."""
    from tokenloom.plugins import registry

    if not registry.plugins:
        print("no plugins installed (entry-point group 'tokenloom.plugins'; or pass --plugin module.path)")
    for info in registry.plugins.values():
        print(f"{info.name}  ({info.source})")
        if info.error:
            print(f"  FAILED, skipped: {info.error}")
        for kind, names in info.adds.items():
            print(f"  {kind}: {', '.join(names)}")
    print(f"logits processors available: {', '.join(sorted(registry.logits_processors))}")
    return 0


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    """`--plugin module.path` (repeatable): load a local plugin besides the installed ones."""
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="a plugin module (with register(registry)) to load; repeatable")


def cmd_run(args: argparse.Namespace) -> int:
    """`tokenloom run pipeline.yaml --input data.jsonl --output out.jsonl`: a pipeline over a file, resumable."""
    from tokenloom.pipelines.batch import run_yaml

    s = run_yaml(args.pipeline, args.input, args.output, batch_size=args.batch_size,
                 retry_errors=args.retry_errors, progress=not args.quiet,
                 ray_replicas=args.replicas if args.ray else None, ray_address=args.ray_address)
    print(f"{s.total} rows ({s.resumed} done before, {s.processed} run now, {s.failed} failed) -> {s.output}",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `tokenloom` argument parser."""
    parser = argparse.ArgumentParser(prog="tokenloom", description="LLM inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of a prompt")
    gen.add_argument("prompt", help="the prompt text")
    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system message")
    for p, fn in ((gen, cmd_generate), (chat, cmd_chat)):
        add_engine_flags(p)
        add_sampling_flags(p)
        p.set_defaults(func=fn)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model_ref", nargs="?", default=None, metavar="MODEL",
                       help=f"model to serve (default: {DEFAULT_MODEL}; overrides --model)")
    add_server_flags(serve)
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)
    models = sub.add_parser("models", help="list the models known here, or show one")
    models_sub = models.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list", help="every available model and where it comes from")
    show = models_sub.add_parser("show", help="architecture, parameters, context length, weights, chat template")
    show.add_argument("name", help="a model name from `models list`, or any model reference")
    for p in (models, *models_sub.choices.values()):
        p.add_argument("--models-dir", type=Path, default=None, help="a folder of HF model folders and .gguf files")
        p.add_argument("--models-config", type=Path, default=None, help="a models.yaml catalog")
    models.set_defaults(func=cmd_models)
    ev = sub.add_parser("eval", help="score a pipeline on labelled data, or a model's perplexity over a text")
    ev.add_argument("pipeline", nargs="?", type=Path, default=None, help="a pipeline YAML (see tokenloom run)")
    ev.add_argument("--data", type=Path, default=None, help="labelled rows: .jsonl with a reference field")
    ev.add_argument("--metrics", default="accuracy", help="comma-separated: bleu, rouge, accuracy, f1, perplexity")
    ev.add_argument("--reference-field", default="reference", help="the field holding the expected output")
    ev.add_argument("--prediction-field", default=None,
                    help="the result field compared (default: label, answer, entities or text)")
    ev.add_argument("--output", type=Path, default=None, help="JSON scores (default: DATA.scores.json)")
    ev.add_argument("--perplexity", action="store_true", help="perplexity of --model over --text")
    ev.add_argument("--text", type=Path, default=None, help="a UTF-8 text file")
    ev.add_argument("--window", type=int, default=None, help="tokens per window (default: the context length)")
    ev.add_argument("--stride", type=int, default=None, help="tokens between windows (default: half a window)")
    add_engine_flags(ev)
    ev.set_defaults(func=cmd_eval)
    tr = sub.add_parser("train", help="train an adapter (LoRA, prompt tuning, P-tuning, prefix tuning) on a data "
                                      "file; saved in PEFT's format")
    add_train_flags(tr)
    tr.set_defaults(func=cmd_train)
    plugins = sub.add_parser("plugins", help="the installed plugins and what each adds")
    plugins.add_argument("action", choices=["list"])
    plugins.set_defaults(func=cmd_plugins)
    run = sub.add_parser("run", help="run a pipeline YAML over a .jsonl/.csv/.txt file (resumes an interrupted run)")
    run.add_argument("pipeline", type=Path, help="the pipeline YAML")
    run.add_argument("--input", type=Path, required=True, help="data.jsonl, .csv or .txt (one row a line)")
    run.add_argument("--output", type=Path, required=True, help="out.jsonl: one row per input, in input order")
    run.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the YAML's)")
    run.add_argument("--retry-errors", action="store_true", help="on resume, run the failed rows again")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--ray", action="store_true", help="share the batches out over replicas on Ray (tokenloom[ray])")
    run.add_argument("--replicas", type=int, default=2, help="with --ray: pipeline replicas (default: 2)")
    run.add_argument("--ray-address", default=None, help="with --ray: a Ray cluster (default: a local instance)")
    run.set_defaults(func=cmd_run)
    for p in (gen, chat, serve, ev, plugins, run):
        add_plugin_flag(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input is reported in one line, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "plugin"):
            from tokenloom.plugins import load_plugins

            load_plugins(args.plugin)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"tokenloom: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "DEFAULT_MODEL"]
