"""CPU ranks of one machine sum their partial products through DeepSpeed's shared-memory all-reduce (gloo's TCP
round trip costs a decode step ~1 ms per layer on these machines), answer exactly what one rank does, and
leave nothing behind in /dev/shm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# A process of its own: DeepSpeed keeps the first shared-memory group of a process for its whole life, so only
# a process's first group takes that path (later ones, as in this test process, use gloo).
GROUP = """
import json, sys
from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import start_engine
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.parallel.sharding import all_reduce_path

def main():
    model = ModelConfig(source=sys.argv[1], served_model_id="t", dtype="float32", tensor_parallel_size=2,
                        max_model_len=256)
    engine = start_engine(model, EngineConfig(device="cpu", kv_cache_bytes=16 * 2**20, cpu_threads_per_rank=1))
    try:
        prompts = json.loads(sys.argv[2])
        for index, prompt in enumerate(prompts):
            engine.add_request(EngineRequest(ChoiceId("tp", index), prompt,
                                             SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
        tokens = {index: [] for index in range(len(prompts))}
        while engine.has_unfinished():
            for output in engine.step():
                tokens[output.choice.index].extend(output.new_token_ids)
        print(json.dumps({"path": all_reduce_path(), "tokens": [tokens[i] for i in range(len(prompts))]}))
    finally:
        engine.shutdown()

if __name__ == "__main__":
    main()
"""


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_a_local_cpu_group_uses_shared_memory_and_answers_as_one_rank(tmp_path, tiny_checkpoint, greedy_reference):
    prompts = [[1, 450, 4996, 17354], [1, 29871, 13, 3492, 526, 263, 8444], [1, 15043]]
    script = tmp_path / "group.py"
    script.write_text(GROUP)
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    run = subprocess.run([sys.executable, str(script), str(tiny_checkpoint), json.dumps(prompts)],
                         check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["path"] == "deepspeed_shared_memory"
    assert result["tokens"] == [greedy_reference(prompt, 12) for prompt in prompts]
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) == before  # the workspace went with it
