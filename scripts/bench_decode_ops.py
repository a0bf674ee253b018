"""Kernels a decode step dispatches, per layer and in all, and what the step costs on this machine.

On a GPU a small decode batch is bound by the host launching kernels (~5-8 us each), not by the device, until
CUDA graphs replay them; fewer ops per layer is what makes either path faster. Counted here with a
TorchDispatchMode on CPU — the same ops a GPU would launch — on the tiny default checkpoint (or --checkpoint):
ops per decoder layer (a forward with every layer less a forward with one, over the difference), ops outside
the layers, the sampler's, and the median wall time of a whole engine step at each batch size.

`--torch-compile` also times the step with the model's forward (`llama.forward`) compiled by `torch.compile`
(dynamic shapes, inductor; its CPU backend fuses elementwise ops into C++ loops), alternating with the eager
forward in the same process, and reports the compile time, the graphs and graph breaks dynamo made, and the
largest logit difference between the two on the same step. An experiment, not an engine setting (yet).

    python scripts/bench_decode_ops.py
    python scripts/bench_decode_ops.py --batch 1 32 --out ops.json
    python scripts/bench_decode_ops.py --batch 1 32 --prompt-len 700   # decode over ~700 tokens of context
    python scripts/bench_decode_ops.py --batch 1 32 --torch-compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

from serve_app.config import TINY_MODEL_SOURCE, EngineConfig, ModelConfig
from serve_app.engine.engine import Engine, start_engine
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.layers.attention import KVCacheShape
from serve_app.models import llama
from serve_app.models.checkpoint import resolve_checkpoint


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


MAX_MODEL_LEN = 1024


def _decoding_engine(checkpoint: str, batch: int, prompt_len: int = 100) -> Engine:
    """An engine decoding `batch` sequences of `prompt_len` prompt tokens, each with room for the rest of
    `MAX_MODEL_LEN` in its KV cache (the --torch-compile comparison runs ~4 x --steps more steps)."""
    if prompt_len + 64 > MAX_MODEL_LEN:
        raise SystemExit(f"--prompt-len must leave room to decode within {MAX_MODEL_LEN} tokens")
    model = ModelConfig(source=checkpoint, served_model_id="bench", dtype="float32", max_model_len=MAX_MODEL_LEN)
    config = AutoConfig.from_pretrained(resolve_checkpoint(checkpoint))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    bytes_per_token = KVCacheShape(config.num_hidden_layers, 1, 1, kv_heads, head_dim).bytes_per_block(torch.float32)
    engine = start_engine(model, EngineConfig(device="cpu", max_num_seqs=max(batch, 1),
                                              max_num_batched_tokens=max(512, batch),
                                              kv_cache_bytes=max(64 * 2**20, batch * MAX_MODEL_LEN * bytes_per_token)))
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    for index in range(batch):
        prompt = [1] + [(index * 131 + i * 7) % 31000 + 3 for i in range(prompt_len)]
        engine.add_request(EngineRequest(ChoiceId(f"r{index}", 0), prompt, params))
    while len(engine.step()) < batch:  # prefills, until a step samples every sequence
        pass
    engine.step()  # from here on, every step is decode only
    return engine


def _count_forward(engine: Engine, num_layers: int) -> Counter[str]:
    """Ops of one decode forward with the model cut to its first `num_layers` layers."""
    decoder = engine.runner.model.model
    layers = decoder.layers
    decoder.layers = layers[:num_layers]
    calls = []
    forward = llama.forward
    try:
        def counted(*args):
            with OpCounter() as counter:
                out = forward(*args)
            calls.append(counter.ops)
            return out
        llama.forward = counted
        engine.step()
    finally:
        llama.forward = forward
        decoder.layers = layers
    return calls[0]


def _median_step_ms(engine: Engine, steps: int) -> float:
    return _median_steps(engine, steps)[0]


def _median_steps(engine: Engine, steps: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of a step. CPU time moves less than wall time when other work shares
    the cores, so two builds compare on a busy machine."""
    durations, cpu = [], []
    for _ in range(steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        engine.step()
        durations.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(durations) * 1e3, statistics.median(cpu) * 1e3


def _compiled_forward():
    """`llama.forward` through torch.compile. Under no_grad, not inference_mode: a compiled graph cannot write
    the KV cache from inference mode (AOT autograd fails: "Cannot set version_counter for inference tensor")."""
    compiled = torch.compile(llama.forward.__wrapped__, dynamic=True)

    def forward(*args):
        with torch.no_grad():
            return compiled(*args)
    return forward


def compare_compiled(engine: Engine, steps: int, compiled) -> dict:
    """Eager and compiled steps alternating (twice each, `steps` a turn), on the engine's running batch."""
    from torch._dynamo.utils import counters

    eager = llama.forward
    captured = []

    def capture(*args):
        captured.append(args)
        return eager(*args)
    llama.forward = capture
    try:
        engine.step()
        # The same step's forward again: it rewrites the same KV slots with the same values.
        args = captured[0]
        reference = eager(*args)
        started = time.perf_counter()
        difference = (compiled(*args) - reference).abs().max().item()
        compile_s = time.perf_counter() - started
        llama.forward = compiled
        engine.step()  # a decode step of this batch as it will repeat (positions move on)
        turns = []
        for _ in range(2):
            llama.forward = eager
            eager_ms = _median_step_ms(engine, steps)
            llama.forward = compiled
            turns.append({"eager_step_ms": round(eager_ms, 2),
                          "compiled_step_ms": round(_median_step_ms(engine, steps), 2)})
    finally:
        llama.forward = eager
    return {"first_call_s": round(compile_s, 1), "max_logit_difference": difference, "turns": turns,
            "graphs_so_far": counters["stats"]["unique_graphs"],
            "graph_breaks_so_far": dict(counters["graph_break"])}


def measure(checkpoint: str, batch: int, steps: int, compiled=None, prompt_len: int = 100) -> dict:
    engine = _decoding_engine(checkpoint, batch, prompt_len)
    try:
        num_layers = len(engine.runner.model.model.layers)
        full, one = _count_forward(engine, num_layers), _count_forward(engine, 1)
        per_layer = (sum(full.values()) - sum(one.values())) / (num_layers - 1)
        with OpCounter() as counter:
            engine.step()
        step_ms, step_cpu_ms = _median_steps(engine, steps)
        layer_ops = full - one
        figures = {
            "batch": batch,
            "ops_per_decode_layer": per_layer,
            "ops_outside_layers": sum(one.values()) - per_layer,
            "ops_per_step": sum(counter.ops.values()),
            "ops_per_step_outside_forward": sum(counter.ops.values()) - sum(full.values()),
            "context_tokens": prompt_len + 1,
            "step_ms_median": step_ms,
            "step_cpu_ms_median": step_cpu_ms,
            "layer_ops": {name: count / (num_layers - 1) for name, count in layer_ops.most_common()},
        }
        if compiled is not None:
            figures["torch_compile"] = compare_compiled(engine, steps, compiled)
        return figures
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=TINY_MODEL_SOURCE)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=50, help="timed decode steps per batch size")
    parser.add_argument("--prompt-len", type=int, default=100,
                        help="each sequence's prompt: the decode steps attend over about this much context")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time the step with the forward compiled (see above)")
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    compiled = _compiled_forward() if args.torch_compile else None
    figures = {"torch": torch.__version__,
               "results": [measure(args.checkpoint, b, args.steps, compiled, args.prompt_len) for b in args.batch]}
    print(json.dumps(figures, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
