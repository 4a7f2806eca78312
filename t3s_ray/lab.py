"""The imitation-shock lab: a task, two answer styles, and students and a teacher trained from scratch,
offline, so that the paper's bottleneck can be produced and measured on 2 CPU cores.

The task: add/subtract word problems of 1-4 steps ("Dan has 16 pens . Dan gets 9 more pens . Dan
gives away 7 pens . How many pens does Dan have ?"), each step a digit 2-9, numbers written digit
by digit.

Two answer styles:

* **style A**, terse: ``16 + 9 = 25 . 25 - 7 = 18 . Answer : 18``;
* **style B**, a wrapper around the same arithmetic: ``Dan starts with 16 pens . After getting 9
  more , Dan has 16 + 9 = 25 pens . After giving away 7 , Dan has 25 - 7 = 18 pens . So the answer
  is 18 .``

The models (``builtin:lab-*``, built once into the model cache, deterministically):

* ``lab-student``: answers in style A, with a systematic bug: it never borrows when subtracting
  (``25 - 7 = 28``: the units are right, the tens are not decremented), so it fails every problem
  with a borrowing subtraction on its chain;
* ``lab-student-familiar``: the same student, but 10 % of its training answers were in style B:
  the teacher's wrapper is familiar to it;
* ``lab-teacher``: answers in style B with correct arithmetic: stronger on held-out problems.

Distilling the teacher's traces into ``lab-student`` is the *format shock*: correct content inside
an unfamiliar wrapper. Into ``lab-student-familiar`` it is the *familiar format*: what the student
must learn first is the teacher's content. ``configs/lab.yaml`` and ``configs/lab-familiar.yaml``
run the real pipeline on them.

All three are 0.6M-parameter Llama decoders (hidden 128, 3 layers, 4 heads) over a word-level
tokenizer of 63 tokens (digits are tokens, ``##d`` continues a number), with a chat template
``Q : {prompt} A : {answer} <eos>``, trained on 12,000 problems in steps of 16 answers (batches
of similar lengths): 3,000 steps for the students, 1,500 for the teacher (~3 minutes each on 2
cores, once). Small batches matter: 600
steps of 64 answers (a longer build, 261 s) left the teacher at 20 % held-out accuracy (it had not
yet learned to copy the operands from the prompt), 1,500 steps of 16 (192 s) at 99.8 %.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

NAMES = ["Dan", "Ana", "Ben", "Eva", "Sam", "Mia"]
ITEMS = ["pens", "apples", "books", "coins", "cards", "shells"]
WORDS = ["has", "gets", "more", "gives", "away", "How", "many", "does", "have", "?", ".", ",", "+", "-", "=",
         "Answer", ":", "starts", "with", "After", "getting", "giving", "So", "the", "answer", "is", "Q", "A"]
SPECIALS = ["[PAD]", "[UNK]", "<eos>"]
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'Q : ' + m['content'] + ' A :' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + ' <eos>' -}}{%- endif -%}"
    "{%- endfor -%}"
)
STEPS = (1, 4)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def buggy_sub(a: int, b: int) -> int:
    """Subtraction that never borrows: 25 - 7 = 28 (units 15 - 7 = 8, tens 2 - 0 = 2, not 1)."""
    if a % 10 >= b % 10:
        return a - b
    return (a // 10 - b // 10) * 10 + (10 + a % 10 - b % 10)


def make_problem(rng: random.Random) -> dict[str, Any]:
    """One problem: a start in 10..60 and 1-4 steps, each + or - a digit 2..9 (so that a tiny model
    learns the arithmetic in minutes), every result staying in 10..99."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(10, 60)
    ops = []
    for _ in range(rng.randint(*STEPS)):
        b = rng.randint(2, 9)
        if value + b > 99 or (value - b >= 10 and rng.random() < 0.5):
            value -= b
            ops.append(("-", b))
        else:
            value += b
            ops.append(("+", b))
    return {"name": name, "item": item, "start_value": start, "ops": ops}


def prompt_text(p: dict[str, Any]) -> str:
    name, item = p["name"], p["item"]
    parts = [f"{name} has {p['start_value']} {item} ."]
    for op, b in p["ops"]:
        parts.append(f"{name} gets {b} more {item} ." if op == "+" else f"{name} gives away {b} {item} .")
    parts.append(f"How many {item} does {name} have ?")
    return " ".join(parts)


def chain(p: dict[str, Any], buggy: bool = False) -> list[tuple[int, str, int, int]]:
    """The arithmetic of the answer: (left, op, right, result) per step; ``buggy`` never borrows."""
    out, value = [], p["start_value"]
    for op, b in p["ops"]:
        result = value + b if op == "+" else (buggy_sub(value, b) if buggy else value - b)
        out.append((value, op, b, result))
        value = result
    return out


def answer(p: dict[str, Any], buggy: bool = False) -> int:
    return chain(p, buggy)[-1][3]


def style_a(p: dict[str, Any], buggy: bool = False) -> str:
    steps = chain(p, buggy)
    return " ".join(f"{x} {op} {y} = {r} ." for x, op, y, r in steps) + f" Answer : {steps[-1][3]}"


def style_b(p: dict[str, Any], buggy: bool = False) -> str:
    name, item = p["name"], p["item"]
    parts = [f"{name} starts with {p['start_value']} {item} ."]
    for x, op, y, r in chain(p, buggy):
        verb = f"After getting {y} more ," if op == "+" else f"After giving away {y} ,"
        parts.append(f"{verb} {name} has {x} {op} {y} = {r} {item} .")
    parts.append(f"So the answer is {chain(p, buggy)[-1][3]} .")
    return " ".join(parts)


def split_of(text: str) -> str:
    """``test`` for a fixed 20 % of all problem texts (by hash), else ``train``: the held-out problems
    are never in any training data."""
    return "test" if hashlib.sha256(text.encode()).digest()[0] < 51 else "train"


def lab_problems(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct problems of a split, deterministic in (split, seed)."""
    rng = random.Random(f"lab/{split}/{seed}")
    seen, out = set(), []
    while len(out) < n:
        p = make_problem(rng)
        text = prompt_text(p)
        if text in seen or split_of(text) != split:
            continue
        seen.add(text)
        out.append({**p, "text": text})
    return out


def lab_rows(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt rows (id, prompt, answer, solution) like ``data.arith_rows``: the gold answer is the
    correct one; ``solution`` is the teacher's style-B answer."""
    return [{"id": f"lab-{split}-{seed}-{i}", "prompt": p["text"], "answer": str(answer(p)), "solution": style_b(p)}
            for i, p in enumerate(lab_problems(split, n, seed))]


# --------------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------------


def build_lab_tokenizer():
    """Word-level (WordPiece over whole words): every word and digit a token, ``##d`` a later digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    digits = [str(d) for d in range(10)]
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + NAMES + ITEMS + digits + [f"##{d}" for d in digits])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=12))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=256, padding_side="right")


LAB_MODELS = {
    # name: (style-B fraction of the training answers, buggy student arithmetic, seed, steps)
    # The students need twice the teacher's steps: at 1,500 the student was at 23 % (its ceiling, the
    # problems without a borrow, is 49 %), at 3,000 it reaches it; the teacher is at 99.8 % at 1,500.
    "lab-student": (0.0, True, 11, 3000),
    "lab-student-familiar": (0.1, True, 12, 3000),
    "lab-teacher": (1.0, False, 13, 1500),
}
TRAIN_PROBLEMS, BATCH, LR, THREADS = 12000, 16, 3e-3, 2
TRAIN_STEPS: int | None = None  # tests: override every model's steps


def make_lab_model(out: Path, name: str) -> None:
    """Train one lab model from scratch (one CPU thread, seeded: the same weights every time) and
    save it with its tokenizer as a Hugging Face folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    style_b_frac, buggy, seed, steps = LAB_MODELS[name]
    steps = steps if TRAIN_STEPS is None else TRAIN_STEPS
    tok = build_lab_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        problems = lab_problems("train", TRAIN_PROBLEMS, seed=1000 + seed)
        pairs = []
        for p in problems:
            text = style_b(p, buggy) if rng.random() < style_b_frac else style_a(p, buggy)
            prompt = tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False)
            full = tok.apply_chat_template([{"role": "user", "content": p["text"]},
                                            {"role": "assistant", "content": text}], tokenize=False)
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"]
            pairs.append((ids, len(prompt_ids)))
        config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                             max_position_embeddings=256, tie_word_embeddings=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        model = LlamaForCausalLM(config)
        started = time.time()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
        batches: list[list[tuple[list[int], int]]] = []
        for step in range(steps):
            if not batches:  # a new epoch: batches of similar lengths (a quarter less padding), shuffled
                order = list(range(len(pairs)))
                rng.shuffle(order)
                for c in range(0, len(order) - 8 * BATCH + 1, 8 * BATCH):
                    chunk = sorted(order[c:c + 8 * BATCH], key=lambda i: len(pairs[i][0]))
                    batches += [[pairs[i] for i in chunk[j:j + BATCH]] for j in range(0, 8 * BATCH, BATCH)]
                rng.shuffle(batches)
            batch = batches.pop()
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for b, (ids, n_prompt) in enumerate(batch):
                input_ids[b, :len(ids)] = torch.tensor(ids)
                labels[b, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])  # the answer is the target
                attention[b, :len(ids)] = 1
            lr = LR * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % 500 == 0 or step + 1 == steps:
                print(f"[t3s] builtin:{name}: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                      f"{time.time() - started:.0f}s", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Token classes of a trace (which words become anchors)
# --------------------------------------------------------------------------------------------

TOKEN_CLASSES = ("wrapper", "operator", "operand", "result", "borrow-fix", "answer", "end")


def token_classes(tokens: list[str]) -> list[str]:
    """The class of each token of a lab response (word-level tokens as the tokenizer writes them:
    ``16`` is ``1``, ``##6``):

    * ``operand`` / ``result``: the digits of ``x`` and ``y`` / of ``r`` in an equation ``x op y = r``;
    * ``borrow-fix``: a result digit the buggy student would write differently (``25 - 7 = 18``: the
      ``1``, where it writes ``28``): what the teacher has to teach;
    * ``operator``: ``+``, ``-``, ``=``; ``answer``: the digits of the final answer;
    * ``wrapper``: every other word (names, items, ``starts with``, ``After giving away``, ``.``);
    * ``end``: ``<eos>`` and special tokens."""
    words: list[tuple[str, list[int]]] = []  # (word, token positions)
    for i, t in enumerate(tokens):
        if t.startswith("##") and words and words[-1][0].isdigit():
            words[-1] = (words[-1][0] + t[2:], words[-1][1] + [i])
        else:
            words.append((t, [i]))
    out = ["wrapper"] * len(tokens)
    for w, (word, pos) in enumerate(words):
        if word in ("+", "-", "="):
            out[pos[0]] = "operator"
        elif word.startswith(("<", "[")):
            for p in pos:
                out[p] = "end"
        elif word.isdigit():
            out_class = "operand"
            if w >= 4 and words[w - 1][0] == "=" and words[w - 2][0].isdigit() and words[w - 3][0] in "+-" \
                    and words[w - 4][0].isdigit():
                out_class = "result"
                x, op, y = int(words[w - 4][0]), words[w - 3][0], int(words[w - 2][0])
                if op == "-":
                    buggy = str(buggy_sub(x, y))
                    if len(buggy) != len(word):
                        fixes = set(range(len(word)))
                    else:
                        fixes = {k for k in range(len(word)) if buggy[k] != word[k]}
                    for k, p in enumerate(pos):
                        out[p] = "borrow-fix" if k in fixes else "result"
                    continue
            elif w >= 1 and words[w - 1][0] in (":", "is"):
                out_class = "answer"
            for p in pos:
                out[p] = out_class
    return out
