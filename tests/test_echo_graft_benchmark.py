"""`benchmarks/echo_graft.py`: a prefill in pieces through the cache holds what one prefill forward holds."""

import torch
from graft_fixtures import load_benchmark

from graftlm.adapters import attach_adapter
from graftlm.adapters.echo import EchoConfig


def test_prefill_in_pieces_holds_the_same_cache_and_decodes_the_same_token():
    bench = load_benchmark("echo_graft")
    torch.manual_seed(0)
    base = bench.tiny_model()
    replaced = [0, 1, 2]
    model = attach_adapter(base, EchoConfig(mode="replace", target_layers=replaced, window=16, chunk_size=16,
                                            rank=8, sink_tokens=4))
    graft = model.grafts["default"]
    with torch.no_grad():
        for branch in graft.branches.values():
            branch.w_o.weight.normal_(0, 0.02)
    caches = []
    for chunk in (0, 37):  # one forward; pieces of an odd size that do not divide the context
        cache = graft.make_cache()
        bench.decode_run(model, cache, 101, 1, base.config.vocab_size, prefill_chunk=chunk)
        caches.append(cache)
    assert bench.cache_bytes(caches[0], replaced) == bench.cache_bytes(caches[1], replaced)
    token = torch.tensor([[5]])
    with torch.no_grad():
        logits = [model(input_ids=token, cache=c, use_cache=True).logits for c in caches]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
