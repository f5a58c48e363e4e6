"""Chat with a Nemotron-H checkpoint (default: the bundled tiny model) through the Python API.

    python examples/generate.py [--model DIR] [--prompt TEXT] [--expert-cache N]

``--expert-cache N`` runs the routed experts from host memory with N device slots per MoE layer
(``Model.offload``; same tokens as the resident model) and prints the cache's statistics.
"""
import argparse

import nemojax
from nemojax.chat import parse_response
from nemojax.cli import default_model_path
from nemojax.tokenizer import Tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--prompt", default="What is 4821 + 377?")
    ap.add_argument("--expert-cache", type=int, default=None, metavar="N")
    a = ap.parse_args()
    tok = Tokenizer(a.model)
    model = nemojax.load(a.model, dtype="bfloat16")
    if a.expert_cache:
        model = model.offload(a.expert_cache, policy="adaptive")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": a.prompt}]))
    out = model.generate([ids], 512, stop_token_ids=tok.stop_token_ids)[0]
    out = out.tolist()
    stops = [i for i, t in enumerate(out) if t in tok.stop_token_ids]
    text = tok.decode(out[: stops[0]] if stops else out)  # pad ids follow the stop token
    r = parse_response(text, thinking=True)
    print("reasoning:", r["reasoning"])
    print("answer:   ", r["content"])
    if a.expert_cache:
        print("expert cache:", model.experts.stats.summary())


if __name__ == "__main__":
    main()
