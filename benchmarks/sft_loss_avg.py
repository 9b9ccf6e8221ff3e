"""SFT loss averaging: per-token vs per-sample (``TrainConfig.loss_avg``) on a mixed task.

Under per-token averaging every target token of the global batch weighs the same, so a
one-token answer packed beside a 50-token one gets ~1/50 of its weight; per-sample
averaging gives every packed sample (segment) the same weight. This measures what that does
to a classification task mixed with long answers, with everything else held fixed.

Data (synthetic, offline, Chinese), two kinds of conversations in equal numbers:
- classification: "判断下面这句话的情感（正面/负面）：<sentence>" -> 正面 | 负面. The label is
  set by one sentiment word in a sentence built from subject x topic x frame x word. Test
  sentences use (topic, word) pairs that never occur in training, so a right answer needs
  the word -> label rule, not a memorised sentence. Answer: label + <|im_end|>, ~2 tokens.
- long answer: "请原样复述下面的词语：w1，w2，…" -> the same 30-60 word list (~30-60 tokens).
  Half the samples, but ~95 % of the target tokens: they dominate per-token averaging.
A BPE tokenizer is trained on the training conversations; samples are encoded with
``encode_conversation`` and packed with ``pack_samples`` into one SFT shard set with
segment ids, as the data stage does (``steelworks.data.pack.encode_conversations``).

Runs: the same model size trained from scratch by ``run_training(job, cfg, use_ray=False)``
on the same shards with the same seed and steps, once per mode, for each seed (the seed
sets the initial weights and the data order; the data is fixed). Evaluation of the
exported HF model (``<run>/hf``): classification accuracy by comparing the log-likelihood
of each label's answer span (label + <|im_end|>, the tokens trained on) after the same
prompt; the mean NLL of the correct answer; and the per-token loss on held-out
long-answer samples (fresh word lists).

    .venv/bin/python benchmarks/sft_loss_avg.py             # tiny, 600 steps, 3 seeds: ~7 min
    .venv/bin/python benchmarks/sft_loss_avg.py --seeds 0 --steps 100   # smoke

Budget: ``demo`` for 150 steps (the same wall time) learned neither task in any mode: the
classification NLL stayed at ln 2 and the copy loss at the unigram level. So the defaults
are the 4x faster ``tiny`` model for 600 steps (~2.8 epochs), where the rule is learned.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

Msgs = list[dict[str, str]]
LABELS = ("正面", "负面")
POS = ["喜欢", "满意", "开心", "精彩", "优秀", "舒服", "美味", "温暖", "感动", "出色", "愉快", "放心"]
NEG = ["失望", "糟糕", "难过", "无聊", "讨厌", "后悔", "生气", "难吃", "吵闹", "差劲", "遗憾", "烦躁"]
SUBJECTS = ["我", "朋友", "同事", "妈妈", "老师", "邻居", "他们", "顾客"]
TOPICS = ["这家餐厅", "那部电影", "这本书", "这次旅行", "新手机", "这场比赛", "酒店服务", "这门课"]
FRAMES = ["{s}觉得{t}让人{w}。", "{s}说{t}真的很{w}。", "关于{t}，{s}的感受是{w}。", "{s}提起{t}就{w}。"]
NOUNS = ("苹果 香蕉 桌子 椅子 汽车 飞机 河流 高山 城市 村庄 老虎 熊猫 钢笔 书包 电脑 手机 月亮 "
         "太阳 星星 云朵 花园 森林 沙漠 海洋 面包 牛奶 米饭 茶叶 铁路 桥梁 医生 工人 学生 农民 "
         "歌手 画家 钟表 雨伞 帽子 鞋子 窗户 大门 灯笼 风筝 篮球 足球 小船 火车 草原 湖泊 岛屿 "
         "雪花 蜡烛 镜子 剪刀 地图 邮票 信封 蜜蜂 蝴蝶 骆驼 葡萄 西瓜 橙子").split()


def cls_sample(rng: random.Random, topic: str, word: str) -> Msgs:
    s = FRAMES[rng.randrange(len(FRAMES))].format(s=rng.choice(SUBJECTS), t=topic, w=word)
    return [{"role": "user", "content": f"判断下面这句话的情感（正面/负面）：{s}"},
            {"role": "assistant", "content": LABELS[0] if word in POS else LABELS[1]}]


def long_sample(rng: random.Random) -> Msgs:
    words = "，".join(rng.choice(NOUNS) for _ in range(rng.randint(30, 60)))
    return [{"role": "user", "content": f"请原样复述下面的词语：{words}"},
            {"role": "assistant", "content": words}]


def make_data(n_train: int, n_test: int, seed: int = 1234) -> dict[str, list[Msgs]]:
    rng = random.Random(seed)
    # Hold out a quarter of the (topic, word) pairs, a different quarter of topics per word,
    # so every word and every topic is seen in training with each label.
    held = {(TOPICS[(i + k) % len(TOPICS)], w) for i, w in enumerate(POS + NEG) for k in range(2)}
    train_pairs = [(t, w) for t in TOPICS for w in POS + NEG if (t, w) not in held]
    test_pairs = sorted(held)
    train = [cls_sample(rng, *rng.choice(train_pairs)) for _ in range(n_train)] + \
        [long_sample(rng) for _ in range(n_train)]
    rng.shuffle(train)  # interleaved, so packing puts short and long samples in the same rows
    return {"train": train, "test_cls": [cls_sample(rng, *test_pairs[i % len(test_pairs)])
                                         for i in range(n_test)],
            "test_long": [long_sample(rng) for _ in range(n_test // 2)]}


def build_shards(data: dict[str, list[Msgs]], work: Path, seq_len: int) -> tuple[Path, Path, dict]:
    """Tokenizer + packed SFT shard set, cached under ``work`` (the data never changes)."""
    from steelworks.data.sft import encode_conversation, pack_samples
    from steelworks.data.shards import ShardIndex, token_dtype, write_shard
    from steelworks.data.tokenizer import load_tokenizer, train_tokenizer

    tok_dir, shard_dir = work / "tokenizer", work / f"sft-{seq_len}"
    texts = [m["content"] for conv in data["train"] for m in conv]
    tok = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").exists() else \
        train_tokenizer(texts, vocab_size=2048, out_dir=tok_dir)
    samples = [encode_conversation(tok, conv, seq_len, pad=False) for conv in data["train"]]
    assert not any(tr for _, _, tr in samples), "a sample is longer than seq_len"
    short = [len(conv[-1]["content"]) <= 2 for conv in data["train"]]
    targets = [int(m.sum()) for _, m, _ in samples]
    stats = {"samples": len(samples), "cls_share_of_samples": sum(short) / len(short),
             "cls_share_of_target_tokens": sum(t for t, s in zip(targets, short) if s) / sum(targets),
             "cls_targets_per_sample": statistics.mean(t for t, s in zip(targets, short) if s),
             "long_targets_per_sample": statistics.mean(t for t, s in zip(targets, short) if not s)}
    if not (shard_dir / "index.json").exists():
        tokens, mask, seg = pack_samples([(t, m) for t, m, _ in samples], seq_len, tok.pad_token_id)
        dt = token_dtype(len(tok))
        info = write_shard(shard_dir / "shard_00000.bin", tokens, dt, mask, seg)
        ShardIndex(seq_len, str(dt), len(tok), tok.pad_token_id, "sft", [info]).save(shard_dir)
    stats["rows"] = ShardIndex.load(shard_dir).num_sequences
    stats["samples_per_row"] = stats["samples"] / stats["rows"]
    return tok_dir, shard_dir, stats


def train(args: argparse.Namespace, tok_dir: Path, shard_dir: Path, mode: str, seed: int,
          out: Path) -> dict[str, Any]:
    from steelworks.core.config import from_dict, to_dict
    from steelworks.train.config import TrainConfig
    from steelworks.train.driver import run_training

    shutil.rmtree(out, ignore_errors=True)  # the loop resumes from checkpoints it finds
    cfg = from_dict(TrainConfig, {
        "model": {"size": args.size}, "max_steps": args.steps, "micro_batch_size": args.micro_batch,
        "num_workers": 1, "seed": seed, "loss_avg": mode, "log_every": 25, "tensorboard": False,
        # From scratch: the demo pretraining recipe's lr and cosine decay; no weight decay,
        # as the demo's SFT stage.
        "optim": {"lr": args.lr, "warmup_steps": 20, "schedule": "cosine", "weight_decay": 0.0}})
    job = {"task": f"sft-{mode}-s{seed}", "train": to_dict(cfg), "tokenizer_dir": str(tok_dir),
           "data_dir": str(shard_dir), "out_dir": str(out)}
    t0 = time.perf_counter()
    summary = run_training(job, cfg, use_ray=False)
    return {"train_s": time.perf_counter() - t0, "final_train_loss": summary["loss"]}


@torch.no_grad()
def answer_nll(model, tok, convs: list[Msgs], seq_len: int, batch: int = 64) -> list[tuple[float, int]]:
    """-> per conversation (summed NLL of its target tokens, number of targets), with the
    targets exactly those ``encode_conversation`` marks for training."""
    from steelworks.data.sft import encode_conversation

    out: list[tuple[float, int]] = []
    for i in range(0, len(convs), batch):
        enc = [encode_conversation(tok, c, seq_len, pad=True)[:2] for c in convs[i:i + batch]]
        ids = torch.from_numpy(np.stack([t for t, _ in enc]))
        mask = torch.from_numpy(np.stack([m for _, m in enc])).bool()
        attn = torch.ones_like(ids)  # right padding; causal, so pads never reach targets
        keep = int(mask.any(0).nonzero()[-1]) + 1
        logits = model(input_ids=ids[:, :keep], attention_mask=attn[:, :keep]).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:keep, None])[..., 0]
        tgt = mask[:, 1:keep]
        out += [(float(-(lp[j][tgt[j]]).sum()), int(tgt[j].sum())) for j in range(len(enc))]
    return out


def evaluate(run: Path, data: dict[str, list[Msgs]], seq_len: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32,
                                                 local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(run / "hf"), local_files_only=True)
    tests = data["test_cls"]
    # Every test sentence scored with both labels as the answer; the prompt is identical,
    # so comparing the answers' summed log-likelihoods is a fair two-way choice.
    scored = {lab: answer_nll(model, tok, [[c[0], {"role": "assistant", "content": lab}]
                                           for c in tests], seq_len) for lab in LABELS}
    gold = [LABELS.index(c[1]["content"]) for c in tests]
    nll = np.array([[scored[lab][i][0] for lab in LABELS] for i in range(len(tests))])
    long = answer_nll(model, tok, data["test_long"], seq_len)
    return {"cls_acc": float(np.mean(nll.argmin(1) == np.array(gold))),
            "cls_nll": float(np.mean(nll[np.arange(len(gold)), gold])),
            "long_loss": sum(s for s, _ in long) / sum(n for _, n in long)}


def machine_info() -> dict[str, Any]:
    import transformers

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def _ms(xs: list[float], pct: bool = False) -> str:
    """mean ± sample std over seeds (± 0 for one seed)."""
    f = 100.0 if pct else 1.0
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs) * f:.{1 if pct else 3}f} ± {sd * f:.{1 if pct else 3}f}"


def report(results: dict[str, Any]) -> str:
    runs, seeds = results["runs"], results["args"]["seeds"]
    lines = ["| mode | seed | cls accuracy | cls answer NLL (nats) | long-answer loss (nats/token) | train s |",
             "|---|---|---|---|---|---|"]
    for mode in ("token", "sample"):
        rows = [r for r in runs if r["mode"] == mode]
        lines += [f"| {mode} | {r['seed']} | {r['cls_acc'] * 100:.1f} % | {r['cls_nll']:.3f} | "
                  f"{r['long_loss']:.3f} | {r['train_s']:.0f} |" for r in rows]
        lines.append(f"| **{mode}** | mean ± sd | {_ms([r['cls_acc'] for r in rows], True)} % | "
                     f"{_ms([r['cls_nll'] for r in rows])} | {_ms([r['long_loss'] for r in rows])} | |")
    # Paired by seed (same init, same data order): the difference the mode alone makes.
    pair = {s: {r["mode"]: r for r in runs if r["seed"] == s} for s in seeds}
    diff = {k: [pair[s]["sample"][k] - pair[s]["token"][k] for s in seeds]
            for k in ("cls_acc", "cls_nll", "long_loss")}
    lines.append(f"| sample − token | paired | {_ms(diff['cls_acc'], True)} pt | "
                 f"{_ms(diff['cls_nll'])} | {_ms(diff['long_loss'])} | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--size", default="tiny", help="a size from steelworks.train.models.SIZES")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--micro-batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=256)
    # One thread: on a shared 2-core machine two OpenMP threads slowed a step 5-15x whenever
    # another process was busy (measured: tiny 0.1 s -> 2 s); one thread stays steady.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--train-samples", type=int, default=3000, help="per kind (cls, long)")
    p.add_argument("--test-samples", type=int, default=384, help="classification test sentences")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / ".work" / "sft_loss_avg",
                   help="work directory; results.json is written there")
    args = p.parse_args()
    from steelworks.core.atomic import atomic_write_json

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = make_data(args.train_samples, args.test_samples)
    tok_dir, shard_dir, stats = build_shards(data, args.out, args.seq_len)
    print(f"data: {stats}", file=sys.stderr)
    results: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                               "machine": machine_info(), "data": stats,
                               "args": {k: str(v) if isinstance(v, Path) else v
                                        for k, v in vars(args).items()}, "runs": []}
    for seed in args.seeds:
        for mode in ("token", "sample"):
            run = args.out / "runs" / f"{args.size}-s{seed}-{mode}"
            row = {"mode": mode, "seed": seed, **train(args, tok_dir, shard_dir, mode, seed, run)}
            row.update(evaluate(run, data, args.seq_len))
            results["runs"].append(row)
            print(f"{mode} seed {seed}: {row}", file=sys.stderr)
    results["total_s"] = time.perf_counter() - t0
    results["table"] = report(results)
    atomic_write_json(args.out / "results.json", results)
    m = results["machine"]
    print(f"SFT loss averaging, {args.size} model, {args.steps} steps x {args.micro_batch} rows of "
          f"{args.seq_len}; classification = {stats['cls_share_of_samples']:.0%} of samples, "
          f"{stats['cls_share_of_target_tokens']:.1%} of target tokens; {len(data['test_cls'])} "
          f"held-out sentences (chance 50 %)\n")
    print(results["table"])
    print(f"\n{m['cores']} cores, torch {m['torch']}, {m['date']}; total {results['total_s']:.0f} s; "
          f"{args.out / 'results.json'}")


if __name__ == "__main__":
    main()
