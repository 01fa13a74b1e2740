"""One rank of a tensor-parallel test run (started by test_distributed.py with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, as torchrun would): loads each case's checkpoint sharded, writes its logits (every rank) and rank
0's greedy tokens (32, then a turn stopped early and one more) to OUT for the test to compare with the
single-process model and transformers.

usage: python dist_worker.py SPEC.json OUT
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from r1cli.batch import BatchEngine
from r1cli.generate import Decoder, SamplingParams
from r1cli.loader import load_model
from r1cli.parallel import init
from r1cli.speculative import ModelDraft, MTPDraft, SpeculativeDecoder


def stop_early_then_continue(gen: Decoder, prompt: list[int]) -> list[int]:
    """A reader that stops after 3 tokens (every rank must end that turn together), then a turn on the warm cache;
    test_distributed.py runs the same on one process."""
    it = gen.generate(prompt, SamplingParams(temperature=0, max_tokens=32))
    first = [next(it) for _ in range(3)]
    it.close()
    return first + list(gen.generate(prompt + first + [7], SamplingParams(temperature=0, max_tokens=8)))


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    shard, device = init("cpu")
    with torch.inference_mode():
        for case in spec["cases"]:
            model = load_model(case["folder"], dtype="float32", fp8=case.get("fp8", "dequant"), shard=shard,
                               quant=case.get("quant", "none"), cache=False)
            if case.get("quant", "none") != "none":  # this rank's slices really are packed
                assert model.model.layers[0].self_attn.o_proj.qweight is not None
            tokens = torch.tensor(spec["tokens"])
            logits = model(tokens)
            # the cached forward too: a prefill, then one decode step (absorbed MLA on DeepSeek)
            cache = model.new_cache(1, 64)
            model(tokens[:1, :-1], cache=cache)
            step = model(tokens[:1, -1:], start_pos=tokens.shape[1] - 1, cache=cache)
            save_file({"logits": logits.contiguous(), "step": step.contiguous()}, str(out / f"{case['name']}-{shard.rank}.safetensors"))
            gen = Decoder(model, max_len=128)
            if shard.leader:
                got = list(gen.generate(spec["prompt"], SamplingParams(temperature=0, max_tokens=32)))
                got += stop_early_then_continue(gen, spec["prompt"][:3])
                shard.command(("exit", 0))
                (out / f"{case['name']}.json").write_text(json.dumps(got))
            else:
                gen.follow()
            if case.get("batch"):
                batch_in_step(model, shard, spec["batch"], out / f"{case['name']}-batch.json")
        for case in spec.get("speculative", []):
            speculate(case, shard, spec["prompt"], out / f"{case['name']}-speculative.json")
    torch.distributed.destroy_process_group()


def speculate(case: dict, shard, prompt: list[int], path: Path) -> None:
    """Speculative decoding with the target sharded: a draft model whole on every rank, or the target's own MTP
    layer (sharded with it). Rank 0 writes its greedy tokens (as in main) and the first turn's drafted and accepted counts."""
    model = load_model(case["target"], dtype="float32", shard=shard, mtp=case["mtp"], cache=False)
    draft = MTPDraft(model, 128) if case["mtp"] else ModelDraft(load_model(case["draft"], dtype="float32", cache=False), 128)
    # adaptive k: chosen from each rank's own shard sizes, so rank 0's choice must be every rank's
    spec = SpeculativeDecoder(Decoder(model, max_len=128), draft, max_k=4, adaptive=case.get("adaptive", False))
    if not shard.leader:
        spec.follow()
        return
    got = list(spec.generate(prompt, SamplingParams(temperature=0, max_tokens=32)))
    drafted = [spec.stats.draft_tokens, spec.stats.accepted_tokens]
    got += stop_early_then_continue(spec, prompt[:3])
    spec.reset()  # on rank 0 only (as /clear): the next turn must reuse nothing on every rank
    got += list(spec.generate(prompt + got[:4], SamplingParams(temperature=0, max_tokens=8)))
    shard.command(("exit", 0))
    path.write_text(json.dumps({"tokens": got, "drafted": drafted}))


def batch_in_step(model, shard, batch: dict, path: Path) -> None:
    """The batched engine on every rank: rank 0 steps sequences of different lengths through 3 rows (joining and
    leaving mid-way, prompts prefilled in chunks, two copies of one prompt sharing its prefill), the others follow."""
    engine = BatchEngine(model, max_batch=3, max_len=128, prefill_chunk=batch["chunk"])
    if not shard.leader:
        engine.follow()
        return
    seqs = [engine.submit(p, SamplingParams(temperature=0, max_tokens=n)) for p, n in zip(batch["prompts"], batch["max_tokens"])]
    while not engine.idle:
        engine.step()
    shard.command(("exit", 0))
    path.write_text(json.dumps([s.tokens for s in seqs]))


if __name__ == "__main__":
    main()
