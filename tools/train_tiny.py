#!/usr/bin/env python
"""Train the tiny Nemotron-H that ships as nemojax's default model (``nemojax/default_model/``).

What it does, all on CPU in about a quarter of an hour:

1. generates a deterministic synthetic chat corpus (``tools/corpus.py``: step-by-step arithmetic and word
   tasks inside ``<think>``, thinking-off turns, calculator tool calls), rendered with the model's own chat
   template, so training text is exactly what inference prompts look like;
2. trains a byte-level BPE tokenizer on it (digits split into single tokens, ChatML / think / tool special
   tokens as single tokens) and checks that decoding round-trips;
3. builds a small Nemotron-H with all four block types (Mamba2 ``M``, attention ``*``, MoE ``E``, MLP ``-``),
   initialised by ``nemojax.params.init_params_numpy``, and trains every parameter with optax AdamW (warmup +
   cosine decay, time-aware: the schedule reaches its end when ``--max-minutes`` runs out), fp32, a jitted
   ``value_and_grad`` of the next-token cross-entropy on assistant tokens through
   ``nemojax.model.forward(..., experts=DENSE)``; the routers' ``e_score_correction_bias`` is updated
   aux-loss-free (towards equal expert load) from the routing of each batch;
4. writes the Hugging Face layout (config.json, bf16 model.safetensors, tokenizer.json, tokenizer_config.json
   with the chat template, generation_config.json), the held-out problems (heldout.jsonl), training_log.json
   and loss.png, then reloads the folder with ``nemojax.load`` and measures greedy held-out accuracy.

Example::

    python tools/train_tiny.py                      # the bundled model (1500 steps, ~11-15 minutes)
    python tools/train_tiny.py --steps 30 --max-minutes 2 --out OUT_DIR --eval-n 8   # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import corpus  # noqa: E402  (tools/corpus.py)

BUCKETS = (128, 192, 256, 320, 384, 448)  # padded sequence lengths (one compiled train step each)


def model_config_dict(vocab_size: int, ids: dict) -> dict:
    """The default model's config.json (original NVIDIA field names)."""
    return dict(
        model_type="nemotron_h", vocab_size=vocab_size, hidden_size=128,
        hybrid_override_pattern="M*EM*E-ME", num_hidden_layers=9,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=2, conv_kernel=4, chunk_size=32,
        n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=48,
        moe_shared_expert_intermediate_size=128, n_shared_experts=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.0, intermediate_size=384,
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, residual_in_fp32=False,
        max_position_embeddings=1024, bos_token_id=ids["<s>"], eos_token_id=[ids["<|im_end|>"], ids["</s>"]],
        pad_token_id=ids["<pad>"], torch_dtype="bfloat16",
    )


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE; every digit is its own pre-token (optionally with the space before it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=corpus.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, t in enumerate(corpus.SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    for d in "0123456789":
        assert tok.encode(d).ids == [tok.token_to_id(d)] and tok.encode(" " + d).tokens == ["Ġ" + d]
    return tok


def check_round_trip(tok, texts: list[str]) -> None:
    extra = ["What is 4821 + 377?", "héllo wörld ✓ 🙂\ttabs\n\n  spaces  ", "<think>\n</think>\n<tool_call>x",
             "Ünïcödé 12,345.67 -0.5e10"]
    for t in list(texts) + extra:
        ids = tok.encode(t).ids
        back = tok.decode(ids, skip_special_tokens=False)
        if back != t:
            raise SystemExit(f"tokenizer does not round-trip {t!r}: got {back!r}")


def write_tokenizer_files(tok, out: str, ids: dict, max_len: int) -> None:
    tok.save(os.path.join(out, "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len, "padding_side": "left",
        "chat_template": corpus.CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
    gcfg = {"bos_token_id": ids["<s>"], "eos_token_id": [ids["<|im_end|>"], ids["</s>"]],
            "pad_token_id": ids["<pad>"], "do_sample": False, "max_new_tokens": 512}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gcfg, f, indent=2)


# ---------------------------------------------------------------------------------------------- data
def encode_examples(tok, examples: list[dict], digit_weight: float = 1.0):
    """-> list of (ids int32 [n], loss weight float32 [n]): 0 outside the trained assistant spans, 1 inside,
    ``digit_weight`` for digit tokens inside (the arithmetic the model must get right)."""
    import numpy as np

    digit_ids = np.asarray([tok.token_to_id(p + d) for d in "0123456789" for p in ("", "Ġ")])
    rendered = [corpus.render_example(e) for e in examples]
    encs = tok.encode_batch([t for t, _ in rendered])
    out = []
    for (text, spans), enc in zip(rendered, encs):
        ids = np.asarray(enc.ids, np.int32)
        starts = np.asarray([o[0] for o in enc.offsets])
        m = np.zeros(len(ids), bool)
        for s, e in spans:
            m |= (starts >= s) & (starts < e)
        w = m.astype(np.float32)
        w[m & np.isin(ids, digit_ids)] = digit_weight
        out.append((ids, w))
    return out


class Batcher:
    """Length-bucketed, right-padded batches of about ``batch_tokens`` tokens; refills from the generator."""

    def __init__(self, tok, seed: int, batch_tokens: int, digit_weight: float = 1.0, pool: int = 8000):
        self.tok, self.rng, self.batch_tokens, self.pool = tok, random.Random(seed), batch_tokens, pool
        self.digit_weight = digit_weight
        self.queues = {b: [] for b in BUCKETS}
        self.ready: list = []
        self.dropped = 0
        self.seen_examples = 0

    def _refill(self):
        import numpy as np

        exs = [corpus.make_example(self.rng) for _ in range(self.pool)]
        for ids, m in encode_examples(self.tok, exs, self.digit_weight):
            n = len(ids) - 1  # inputs ids[:-1], targets ids[1:]
            b = next((b for b in BUCKETS if b >= n), None)
            if b is None:
                self.dropped += 1
                continue
            self.queues[b].append((ids, m))
        for b, q in self.queues.items():
            bs = max(1, self.batch_tokens // b)
            while len(q) >= bs:
                rows, self.queues[b] = q[:bs], q[bs:]
                q = self.queues[b]
                x = np.zeros((bs, b + 1), np.int32)
                mk = np.zeros((bs, b + 1), np.float32)
                for r, (ids, m) in enumerate(rows):
                    x[r, :len(ids)] = ids
                    mk[r, :len(ids)] = m
                self.ready.append((x, mk))
        self.rng.shuffle(self.ready)

    def next(self):
        while not self.ready:
            self._refill()
        x, m = self.ready.pop()
        self.seen_examples += x.shape[0]
        return x, m


# ---------------------------------------------------------------------------------------------- training
def make_train_step(cfg, tx, bias_rate: float):
    import jax
    import jax.numpy as jnp
    import optax

    from nemojax.blocks.moe import DENSE, route
    from nemojax.model import forward
    from nemojax.ops import rms_norm

    moe_layers = cfg.layer_indices("E")

    def loss_fn(params, x, m):
        inp, tgt, w = x[:, :-1], x[:, 1:], m[:, 1:]
        logits, hs = forward(params, cfg, inp, experts=DENSE, return_hidden_states=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        loss = (ce * w).sum() / jnp.maximum(w.sum(), 1.0)
        # expert load per MoE layer over real (non-pad) tokens, for the aux-loss-free bias update
        valid = (inp != cfg.pad_token_id).reshape(-1).astype(jnp.float32)
        loads = []
        for i in moe_layers:
            lp = params["layers"][i]
            h = jax.lax.stop_gradient(rms_norm(hs[i], lp["norm"], cfg.layer_norm_epsilon))
            _, idx = route(lp["mixer"]["gate"], lp["mixer"]["e_score_correction_bias"], cfg,
                           h.reshape(-1, h.shape[-1]))
            onehot = jax.nn.one_hot(idx, cfg.n_routed_experts).sum(1)  # [N, E]
            loads.append((onehot * valid[:, None]).sum(0))
        return loss, jnp.stack(loads)

    @jax.jit
    def step(params, opt_state, x, m, lr):
        (loss, loads), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, m)
        updates, opt_state = tx.update(grads, opt_state, params)  # adamw at learning rate 1 ...
        updates = jax.tree.map(lambda u: lr * u, updates)  # ... scaled by the scheduled rate
        params = optax.apply_updates(params, updates)
        gnorm = optax.global_norm(grads)
        # aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones
        layers = list(params["layers"])
        for j, i in enumerate(moe_layers):
            load = loads[j]
            delta = bias_rate * jnp.sign(load.mean() - load)
            mixer = dict(layers[i]["mixer"])
            mixer["e_score_correction_bias"] = mixer["e_score_correction_bias"] + delta
            layers[i] = {**layers[i], "mixer": mixer}
        params = {**params, "layers": layers}
        imbalance = (loads.max(-1) / jnp.maximum(loads.mean(-1), 1e-6)).mean()
        return params, opt_state, loss, gnorm, imbalance

    return step


def make_optimizer(params, weight_decay: float, clip: float):
    import jax
    import optax

    decay_mask = jax.tree.map(lambda a: a.ndim >= 2, params)  # no decay on norms, biases, A_log, D, dt_bias
    # learning rate 1: the train step multiplies the updates by the scheduled rate (adamw's decoupled weight
    # decay is scaled by the learning rate too, so this is exactly adamw at that rate)
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(learning_rate=1.0, b1=0.9, b2=0.98, eps=1e-8, weight_decay=weight_decay,
                                   mask=decay_mask))


# ---------------------------------------------------------------------------------------------- outputs
def to_bf16_numpy(params, cfg):
    """numpy tree: bf16 everywhere except the parameters declared fp32 (A_log, D, e_score_correction_bias)."""
    import jax
    import ml_dtypes
    import numpy as np

    from nemojax.params import is_spec, param_specs

    def conv(spec, a):
        a = np.asarray(a, np.float32)
        return a if spec.fp32 else a.astype(ml_dtypes.bfloat16)

    return jax.tree.map(conv, param_specs(cfg), params, is_leaf=is_spec)


_FONT = {  # 3x5 bitmap digits for the plot's tick labels
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "k": "100101110101101",
    "l": "110010010010111", "o": "000111101101111", "s": "000111100001111", "t": "010111010010011",
    "e": "000111111100111", "p": "000111101111100", " ": "000000000000000",
}


def write_png(path: str, losses: list[float], width: int = 720, height: int = 420) -> None:
    """A line plot of the loss (raw in light blue, moving average in dark blue), axes and tick labels,
    written with zlib + struct (no matplotlib needed)."""
    W, H = width, height
    img = bytearray([255] * (W * H * 3))
    L, R, T, B = 60, 20, 20, 40  # margins

    def px(x, y, c):
        if 0 <= x < W and 0 <= y < H:
            o = (y * W + x) * 3
            img[o:o + 3] = bytes(c)

    def line(x0, y0, x1, y1, c, thick=1):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            x = round(x0 + (x1 - x0) * i / n)
            y = round(y0 + (y1 - y0) * i / n)
            for dx in range(thick):
                for dy in range(thick):
                    px(x + dx, y + dy, c)

    def text(x, y, s, c=(0, 0, 0), scale=2):
        for ch in s:
            g = _FONT.get(ch)
            if g:
                for r in range(5):
                    for col in range(3):
                        if g[r * 3 + col] == "1":
                            for a in range(scale):
                                for b in range(scale):
                                    px(x + col * scale + a, y + r * scale + b, c)
            x += 4 * scale

    n = len(losses)
    if n == 0:
        losses, n = [0.0], 1
    # log10 y axis between decades that contain the curve
    lo = math.floor(math.log10(max(min(losses), 1e-4)))
    hi = math.ceil(math.log10(max(max(losses), 10 ** (lo + 1))))
    pw, ph = W - L - R, H - T - B

    def xy(i, v):
        f = (math.log10(max(v, 10 ** lo)) - lo) / (hi - lo)
        return L + round(pw * i / max(1, n - 1)), T + round(ph * (1 - f))

    grey, light = (190, 190, 190), (235, 235, 235)
    for e in range(lo, hi + 1):  # decade grid lines + labels, minor lines at 2..9
        y = xy(0, 10 ** e)[1]
        line(L, y, W - R, y, grey)
        text(4, y - 5, f"{10.0 ** e:g}" if e < 0 else str(10 ** e))
        if e < hi:
            for k in range(2, 10):
                line(L, xy(0, k * 10 ** e)[1], W - R, xy(0, k * 10 ** e)[1], light)
    for k in range(6):  # vertical grid + x labels (steps)
        i = round((n - 1) * k / 5)
        x = L + round(pw * k / 5)
        line(x, T, x, H - B, grey)
        lab = f"{i / 1000:.1f}k" if n > 2000 else str(i)
        text(x - len(lab) * 4, H - B + 8, lab)
    text(W // 2 - 16, H - 14, "step")
    text(L + 8, 4, "loss")
    line(L, T, L, H - B, (0, 0, 0))
    line(L, H - B, W - R, H - B, (0, 0, 0))
    pts = [xy(i, v) for i, v in enumerate(losses)]
    for (a, b), (c, d) in zip(pts, pts[1:]):
        line(a, b, c, d, (150, 190, 240))
    k = max(1, n // 50)
    avg = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(n)]
    pts = [xy(i, v) for i, v in enumerate(avg)]
    for (a, b), (c, d) in zip(pts, pts[1:]):
        line(a, b, c, d, (20, 60, 160), thick=2)

    raw = b"".join(b"\x00" + bytes(img[y * W * 3:(y + 1) * W * 3]) for y in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(folder: str, problems: list[dict], max_new_tokens: int, batch: int = 50, dtype: str = "float32"):
    """Greedy generation on chat-formatted questions; returns (accuracy, per-task accuracy, records)."""
    import nemojax
    from nemojax.tokenizer import Tokenizer

    model = nemojax.load(folder, dtype=dtype, progress=False)
    tok = Tokenizer(folder)
    stops = tok.stop_token_ids
    records = []
    for s in range(0, len(problems), batch):
        chunk = problems[s:s + batch]
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p["question"]}]))
                   for p in chunk]
        out = model.generate(prompts, max_new_tokens, temperature=0.0, stop_token_ids=stops)
        for p, row in zip(chunk, out):
            ids = [int(t) for t in row]
            if any(t in stops for t in ids):
                ids = ids[:min(ids.index(t) for t in stops if t in ids)]
            text = tok.decode(ids)
            got = corpus.parse_answer(text)
            records.append({**p, "output": text, "parsed": got, "correct": got == p["answer"]})
    acc = sum(r["correct"] for r in records) / max(1, len(records))
    per = {}
    for r in records:
        per.setdefault(r["task"], []).append(r["correct"])
        if r["task"] in ("add", "sub"):
            nd = max(len(str(abs(int(a)))) for a in r["args"])
            per.setdefault(f"add+sub, {nd}-digit", []).append(r["correct"])
            per.setdefault("add+sub", []).append(r["correct"])
    return acc, {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}, records


def run_eval(out: str, problems: list[dict], max_new_tokens: int, dtype: str = "float32"):
    t = time.time()
    acc, per_task, recs = evaluate(out, problems, max_new_tokens, dtype=dtype)
    eval_s = time.time() - t
    print(f"held-out accuracy (greedy, bf16 weights as saved, {dtype} compute): {acc:.1%} on {len(recs)} "
          f"questions ({eval_s:.0f}s)", flush=True)
    for k, v in per_task.items():
        print(f"  {k:>22}: {v:.1%}", flush=True)
    for r in recs[:3]:
        print(f"--- {r['question']}\n{r['output']}\n", flush=True)
    return acc, per_task, recs, eval_s


def eval_only(out: str, args) -> int:
    """Re-measure the accuracy of a written model folder on its heldout.jsonl; update training_log.json."""
    problems = []
    with open(os.path.join(out, "heldout.jsonl")) as f:
        for line in f:
            p = json.loads(line)
            p.setdefault("task", "?")
            problems.append(p)
    for p in problems:  # operands for the per-size breakdown (re-derived from the question)
        nums = [int(t) for t in "".join(c if c.isdigit() else " " for c in p["question"]).split()]
        p["args"] = nums or [0]
    acc, per_task, recs, eval_s = run_eval(out, problems[:args.eval_n], args.max_new_tokens, args.eval_dtype)
    log_path = os.path.join(out, "training_log.json")
    if os.path.exists(log_path):
        with open(log_path) as f:
            log = json.load(f)
        log.update(heldout_accuracy=acc, heldout_accuracy_per_task=per_task, heldout_eval_n=len(recs),
                   eval_seconds=eval_s, eval_max_new_tokens=args.max_new_tokens, eval_dtype=args.eval_dtype,
                   samples=[{k: r[k] for k in ("question", "answer", "output", "correct")} for r in recs[:10]])
        with open(log_path, "w") as f:
            json.dump(log, f, indent=1)
    return 0


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "nemojax", "default_model"), help="output folder")
    ap.add_argument("--steps", type=int, default=1500,
                    help="optimizer steps (about 11 minutes on 2 CPU cores; batches of --batch-tokens)")
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="time budget for the training loop, compilation excluded: training stops and saves when "
                         "it runs out; the warmup-cosine LR schedule follows max(step / steps, elapsed / budget), "
                         "so it always ends decayed (0 = no time limit)")
    ap.add_argument("--seed", type=int, default=0, help="seed for data, init and tokenizer corpus")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.04, help="warmup fraction of the schedule")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch-tokens", type=int, default=2560, help="padded tokens per batch")
    ap.add_argument("--digit-weight", type=float, default=2.0,
                    help="loss weight of digit tokens in the assistant turns (other assistant tokens: 1)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--eval-n", type=int, default=200,
                    help="held-out questions for the final accuracy (half of them addition/subtraction)")
    ap.add_argument("--heldout-n", type=int, default=300, help="held-out problems written to heldout.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=448,
                    help="generation budget per eval question (a 4-digit negative subtraction needs ~380)")
    ap.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of the accuracy measurement (the CLI defaults to bfloat16)")
    ap.add_argument("--eval-only", action="store_true",
                    help="train nothing: re-measure the held-out accuracy of the model in --out (its heldout.jsonl) "
                         "and update the accuracy fields of its training_log.json")
    args = ap.parse_args(argv)

    t_start = time.time()
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    from nemojax.config import Config
    from nemojax.params import count_params, init_params_numpy
    from nemojax.checkpoint import save_params

    out = os.path.abspath(args.out)
    if args.eval_only:
        return eval_only(out, args)
    os.makedirs(out, exist_ok=True)

    # 1-2. corpus sample for the tokenizer, tokenizer, round-trip check
    rng = random.Random(args.seed)
    tok_texts = [corpus.render_example(corpus.make_example(rng))[0] for _ in range(20000)]
    tok = train_tokenizer(tok_texts, args.vocab_size)
    check_round_trip(tok, tok_texts[:2000])
    ids = {t: tok.token_to_id(t) for t in corpus.SPECIAL_TOKENS}
    V = tok.get_vocab_size()
    print(f"tokenizer: {V} tokens, round-trip ok ({time.time() - t_start:.0f}s)", flush=True)

    # 3. model
    cfg = Config.from_dict(model_config_dict(V, ids))
    n_params = count_params(cfg)
    print(f"model: pattern {cfg.pattern}, hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts "
          f"(top-{cfg.num_experts_per_tok} + shared), {n_params / 1e6:.2f} M parameters", flush=True)
    params = jax.tree.map(jnp.asarray, init_params_numpy(cfg, seed=args.seed, dtype="float32"))
    tx = make_optimizer(params, args.weight_decay, clip=1.0)
    opt_state = tx.init(params)
    step_fn = make_train_step(cfg, tx, bias_rate=1e-3)
    seen_shapes: set = set()

    batcher = Batcher(tok, seed=args.seed + 1, batch_tokens=args.batch_tokens, digit_weight=args.digit_weight)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup_steps=int(1000 * args.warmup),
                                               decay_steps=1000, end_value=args.lr * 0.05)
    budget = args.max_minutes * 60.0
    losses, lrs, times = [], [], []
    t_train = time.time()
    bar = tqdm(total=args.steps, desc="training", unit="step", dynamic_ncols=True)
    step = 0
    compile_s = 0.0
    for step in range(args.steps):
        elapsed = time.time() - t_train - compile_s
        frac = max(step / args.steps, elapsed / budget if budget else 0.0)
        if frac >= 1.0:
            break
        lr = float(sched(int(frac * 1000)))
        x, m = batcher.next()
        t0 = time.time()
        shape_new = x.shape not in seen_shapes
        params, opt_state, loss, gnorm, imb = step_fn(params, opt_state, jnp.asarray(x), jnp.asarray(m),
                                                      jnp.float32(lr))
        loss = float(loss)
        if shape_new:  # the first call of a new shape compiles: keep that out of the time budget
            seen_shapes.add(x.shape)
            compile_s += time.time() - t0
        if not math.isfinite(loss):
            raise SystemExit(f"loss is {loss} at step {step}")
        losses.append(loss)
        lrs.append(lr)
        times.append(time.time() - t_train)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", gnorm=f"{float(gnorm):.2f}", load=f"{float(imb):.2f}",
                        **({"time": f"{elapsed / budget:.0%}"} if budget else {}))
    bar.close()
    train_s = time.time() - t_train
    n_steps = len(losses)
    final_loss = float(np.mean(losses[-20:])) if losses else float("nan")
    stopped = "" if n_steps == args.steps else " (time budget reached)"
    print(f"trained {n_steps} steps{stopped} in {train_s / 60:.1f} min (compile {compile_s:.0f}s), "
          f"{batcher.seen_examples} conversations, final loss {final_loss:.4f}", flush=True)

    # 4. write the folder
    save_params(to_bf16_numpy(params, cfg), cfg, out, naming="original")
    write_tokenizer_files(tok, out, ids, cfg.max_position_embeddings)
    heldout = corpus.heldout_problems(args.heldout_n, seed=args.seed + 12345)
    with open(os.path.join(out, "heldout.jsonl"), "w") as f:
        for p in heldout:
            f.write(json.dumps({"question": p["question"], "answer": p["answer"], "task": p["task"]}) + "\n")
    write_png(os.path.join(out, "loss.png"), losses)

    # 5. held-out accuracy with the saved (bf16) weights, greedy
    acc, per_task, recs, eval_s = run_eval(out, heldout[:args.eval_n], args.max_new_tokens, args.eval_dtype)

    log = {
        "params": n_params, "config": cfg.to_dict(), "steps": n_steps,
        "args": {**vars(args), "out": os.path.relpath(out, REPO) if out.startswith(REPO + os.sep) else out},
        "train_seconds": train_s, "compile_seconds": compile_s, "eval_seconds": eval_s,
        "wall_seconds": time.time() - t_start, "conversations_seen": batcher.seen_examples,
        "final_loss": final_loss, "heldout_accuracy": acc, "heldout_accuracy_per_task": per_task,
        "heldout_eval_n": len(recs), "eval_max_new_tokens": args.max_new_tokens, "eval_dtype": args.eval_dtype,
        "tokenizer_vocab_size": V,
        "jax_version": jax.__version__,
        "conversations_dropped_too_long": batcher.dropped,
        "loss_note": "per-step mean cross-entropy over assistant tokens, digit tokens weighted by --digit-weight",
        "loss": [round(v, 5) for v in losses], "lr": [float(f"{v:.4g}") for v in lrs],
        "time": [round(t, 2) for t in times],
        "samples": [{k: r[k] for k in ("question", "answer", "output", "correct")} for r in recs[:10]],
    }
    with open(os.path.join(out, "training_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {(time.time() - t_start) / 60:.1f} min total", flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
