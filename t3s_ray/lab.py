"""The imitation-shock lab: a task, partly competent students trained from scratch offline, and an
oracle teacher whose style is a minority of inserted tokens, so that the paper's regime (a strong
student, a teacher that mostly agrees with it, a wrapper of "thought-lead" phrases around the
content) can be produced and measured on 2 CPU cores through the real pipeline.

The task: add/subtract word problems of 1-4 steps ("Dan has 16 pens . Dan gets 9 more pens . Dan
gives away 7 pens . How many pens does Dan have ?"), each step a digit 2-9, numbers written digit
by digit.

The student's format (style A), terse: ``16 + 9 = 25 . 25 - 7 = 18 . Answer : 18``.

The students (``builtin:lab-student*``, built once into the model cache, deterministically): the
same decoder trained on style-A answers whose *borrowing* subtractions (a − b with a's units digit
< b) are right with a probability that depends on the skill, drawn afresh for every training answer
(so the model learns the probability, not one answer per problem); a wrong borrow writes the
no-borrow result (``25 - 7 = 28``: units right, tens not decremented) and continues from it:

* ``lab-student-pair``: p(b) = 0.9 − 0.1·(b − 2): 0.9 when subtracting 2 ... 0.2 when subtracting 9
  (the issue-25 regime: the student knows most of the content);
* ``lab-student-uniform``: one constant p (``UNIFORM_P``) that gives about the same accuracy;
* ``lab-student``: never borrows (p = 0): the teacher's corrections are content it has never seen.

The teacher is the oracle program (``teacher_solution``): always-correct arithmetic in the
student's own style A with a thought-lead phrase (``Hmm ,``, ``Wait ,``, ``Okay , so`` ...) inserted
at each step boundary (before each step and before ``Answer``) with probability q
(``data.lab_insert_prob``), drawn per (data seed, prompt). ``builtin:lab`` rows carry it as their
``solution`` column, imported by the traces stage (``traces.source: dataset``) as the s1K configs
import R1's traces: verified and written to parquet like generated ones.

Every model is a 0.6M-parameter Llama decoder (hidden 128, 3 layers, 4 heads, SwiGLU 384, untied
head) over a word-level tokenizer (digits are tokens, ``##d`` continues a number) whose vocabulary
holds the prompt words, style A and every word of the phrases, with a chat template
``Q : {prompt} A : {answer} <eos>``, trained on 12,000 problems for 3,000 steps of 16 answers
(batches of similar lengths; ~3 min each on 2 quiet cores, once).
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
         "Answer", ":", "Q", "A"]
# The teacher's thought-lead phrases (the paper's "Wait", "Hmm", connectives), inserted by the oracle.
PHRASES = ("Hmm ,", "Wait ,", "Okay , so", "Let me check .", "Now ,", "Let me see ,", "Then", "Let me think .",
           "Okay right .")
STYLE_WORDS = ["Hmm", "Wait", "Okay", "so", "Let", "me", "check", "Now", "see", "Then", "think", "right"]
SPECIALS = ["[PAD]", "[UNK]", "<eos>"]
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- 'Q : ' + m['content'] + ' A :' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + ' <eos>' -}}{%- endif -%}"
    "{%- endfor -%}"
)
STEPS = (1, 4)
# Bumped whenever the vocabulary or a builder changes: a cached lab model of another version is rebuilt
# (models.materialize_builtin compares it with the cache's .complete marker).
# 1: style B teacher; 2: the thought-lead vocabulary, the pair / uniform students, per-answer skill draws.
LAB_VERSION = 2


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def buggy_sub(a: int, b: int) -> int:
    """Subtraction that never borrows: 25 - 7 = 28 (units 15 - 7 = 8, tens 2 - 0 = 2, not 1)."""
    if a % 10 >= b % 10:
        return a - b
    return (a // 10 - b // 10) * 10 + (10 + a % 10 - b % 10)


def needs_borrow(a: int, b: int) -> bool:
    return a % 10 < b % 10


def borrow_prob(skill: str, b: int) -> float:
    """The probability that a student of ``skill`` borrows correctly in a borrowing ``a - b``:
    ``never`` 0, ``always`` 1, ``pair`` 0.9 − 0.1·(b − 2) (b a digit 2-9), ``uniform:P`` P."""
    if skill == "never":
        return 0.0
    if skill == "always":
        return 1.0
    if skill == "pair":
        return 0.9 - 0.1 * (b - 2)
    if skill.startswith("uniform:"):
        return float(skill.split(":", 1)[1])
    raise ValueError(f"unknown lab skill {skill!r}")


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


def chain(p: dict[str, Any], buggy: bool = False, skill: str | None = None,
          rng: random.Random | None = None) -> list[tuple[int, str, int, int]]:
    """The arithmetic of an answer: (left, op, right, result) per step. ``buggy`` never borrows; a
    ``skill`` (with ``rng``) borrows right with ``borrow_prob(skill, b)``, drawn per borrowing step,
    and a wrong step's result is what the next step starts from."""
    out, value = [], p["start_value"]
    for op, b in p["ops"]:
        if op == "+":
            result = value + b
        elif buggy:
            result = buggy_sub(value, b)
        elif skill is not None and needs_borrow(value, b):
            result = value - b if rng.random() < borrow_prob(skill, b) else buggy_sub(value, b)
        else:
            result = value - b
        out.append((value, op, b, result))
        value = result
    return out


def answer(p: dict[str, Any], buggy: bool = False) -> int:
    return chain(p, buggy)[-1][3]


def format_a(steps: list[tuple[int, str, int, int]]) -> str:
    return " ".join(f"{x} {op} {y} = {r} ." for x, op, y, r in steps) + f" Answer : {steps[-1][3]}"


def style_a(p: dict[str, Any], buggy: bool = False) -> str:
    return format_a(chain(p, buggy))


def teacher_solution(p: dict[str, Any], insert_prob: float, phrases=PHRASES, rng: random.Random | None = None) -> str:
    """The oracle teacher: the correct style-A answer with a phrase (uniform over ``phrases``) before
    each step and before ``Answer``, each with probability ``insert_prob``."""
    rng = rng or random.Random(0)
    parts = []
    for x, op, y, r in chain(p):
        if rng.random() < insert_prob:
            parts.append(rng.choice(phrases))
        parts.append(f"{x} {op} {y} = {r} .")
    if rng.random() < insert_prob:
        parts.append(rng.choice(phrases))
    parts.append(f"Answer : {answer(p)}")
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


def lab_rows(split: str, n: int, seed: int = 0, insert_prob: float = 0.0, phrases=PHRASES) -> list[dict[str, Any]]:
    """Prompt rows (id, prompt, answer, solution) like ``data.arith_rows``: the gold answer is the
    correct one; ``solution`` is the oracle teacher's trace, its insertions drawn per (seed, id)."""
    rows = []
    for i, p in enumerate(lab_problems(split, n, seed)):
        rid = f"lab-{split}-{seed}-{i}"
        rows.append({"id": rid, "prompt": p["text"], "answer": str(answer(p)),
                     "solution": teacher_solution(p, insert_prob, tuple(phrases), random.Random(f"lab-insert/{rid}"))})
    return rows


# --------------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    digits = [str(d) for d in range(10)]
    return SPECIALS + WORDS + STYLE_WORDS + NAMES + ITEMS + digits + [f"##{d}" for d in digits]


def phrase_problems(phrases) -> list[str]:
    """What is wrong with a phrase set for the lab (empty: nothing): every word must be in the lab's
    vocabulary, and a phrase must start with a word that is not the task's content (so that
    ``token_classes`` can find it)."""
    vocab, errs = set(vocabulary()), []
    content = set(WORDS) | {str(d) for d in range(10)}
    if not phrases:
        errs.append("must hold at least one phrase")
    for ph in phrases:
        words = ph.split()
        missing = [w for w in words if w not in vocab]
        if not words:
            errs.append("a phrase is empty")
        elif missing:
            errs.append(f"phrase {ph!r}: word(s) {', '.join(missing)} not in the lab tokenizer "
                        f"(allowed: {' '.join(STYLE_WORDS)} and {' '.join(sorted(set(WORDS)))})")
        elif words[0] in content or words[0][:1].isdigit():
            errs.append(f"phrase {ph!r} must start with a style word ({' '.join(STYLE_WORDS)}), not task content")
    return errs


def build_lab_tokenizer():
    """Word-level (WordPiece over whole words): every word and digit a token, ``##d`` a later digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=12))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=256, padding_side="right")


# The uniform student's constant borrow probability: the pair student's expected accuracy on the 400
# held-out problems is 70.5 % (the product of p(b) over each problem's borrowing steps); a constant
# 0.45 gives 70.0 % (0.4: 67.5, 0.5: 72.5). The mean of p(b) over b = 2..9 (0.55) would be higher:
# borrowing steps are weighted towards large b, where pair is weak.
# Measured (README, lab-uniform): 66-67 % avg@4 at T = 0.6 and 55.8 % greedy, below pair's 67.5-69.9 and
# 67.2: the benchmarks sample below T = 1, which sharpens a p under 0.5 downwards.
UNIFORM_P = 0.45
LAB_MODELS = {
    # name: (skill, seed, steps)
    "lab-student": ("never", 11, 3000),
    "lab-student-pair": ("pair", 14, 3000),
    "lab-student-uniform": (f"uniform:{UNIFORM_P}", 15, 3000),
}
TRAIN_PROBLEMS, BATCH, LR, THREADS = 12000, 16, 3e-3, 2
TRAIN_STEPS: int | None = None  # tests: override every model's steps


def make_lab_model(out: Path, name: str) -> None:
    """Train one lab model from scratch (seeded: the same weights every time) and save it with its
    tokenizer as a Hugging Face folder. Each epoch draws every answer's borrows afresh."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    skill, seed, steps = LAB_MODELS[name]
    steps = steps if TRAIN_STEPS is None else TRAIN_STEPS
    tok = build_lab_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        problems = lab_problems("train", TRAIN_PROBLEMS, seed=1000 + seed)
        prompt_ids = [tok(tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False),
                          add_special_tokens=False)["input_ids"] for p in problems]
        answer_rng = random.Random(f"{seed}/answers")

        def epoch_pairs() -> list[tuple[list[int], int]]:
            texts = [" " + format_a(chain(p, skill=skill, rng=answer_rng)) + " <eos>" for p in problems]
            answers = tok(texts, add_special_tokens=False)["input_ids"]
            return [(ids + a, len(ids)) for ids, a in zip(prompt_ids, answers)]

        config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                             max_position_embeddings=256, tie_word_embeddings=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        model = LlamaForCausalLM(config)
        started = time.time()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
        batches: list[list[tuple[list[int], int]]] = []
        for step in range(steps):
            if not batches:  # a new epoch: fresh borrow draws, batches of similar lengths, shuffled
                pairs = epoch_pairs()
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

TOKEN_CLASSES = ("style", "wrapper", "operator", "operand", "result", "borrow-fix", "answer", "end")


def token_classes(tokens: list[str], phrases=PHRASES) -> list[str]:
    """The class of each token of a lab response (word-level tokens as the tokenizer writes them:
    ``16`` is ``1``, ``##6``):

    * ``style``: the words of an inserted thought-lead phrase (one of ``phrases``, matched whole,
      longest first);
    * ``operand`` / ``result``: the digits of ``x`` and ``y`` / of ``r`` in an equation ``x op y = r``;
    * ``borrow-fix``: a result digit a student that does not borrow would write differently
      (``25 - 7 = 18``: the ``1``, where it writes ``28``): the teacher's corrections;
    * ``operator``: ``+``, ``-``, ``=``; ``answer``: the digits of the final answer;
    * ``wrapper``: every other word (``.``, ``Answer``, ``:``);
    * ``end``: ``<eos>`` and special tokens."""
    words: list[tuple[str, list[int]]] = []  # (word, token positions)
    for i, t in enumerate(tokens):
        if t.startswith("##") and words and words[-1][0].isdigit():
            words[-1] = (words[-1][0] + t[2:], words[-1][1] + [i])
        else:
            words.append((t, [i]))
    out = ["wrapper"] * len(tokens)
    patterns = sorted({tuple(p.split()) for p in phrases}, key=len, reverse=True)
    style = [False] * len(words)
    w = 0
    while w < len(words):
        match = next((pat for pat in patterns if tuple(x for x, _ in words[w:w + len(pat)]) == pat), None)
        if match:
            for k in range(w, w + len(match)):
                style[k] = True
            w += len(match)
        else:
            w += 1
    # The content words in order, without the phrases: an equation is read across a phrase.
    content = [k for k in range(len(words)) if not style[k]]
    for k, (_word, pos) in enumerate(words):
        if style[k]:
            for p in pos:
                out[p] = "style"
    for j, w in enumerate(content):
        word, pos = words[w]
        prev = [words[content[j - d]][0] if j - d >= 0 else "" for d in (1, 2, 3, 4)]
        if word in ("+", "-", "="):
            out[pos[0]] = "operator"
        elif word.startswith(("<", "[")):
            for p in pos:
                out[p] = "end"
        elif word.isdigit():
            out_class = "operand"
            if prev[0] == "=" and prev[1].isdigit() and prev[2] in ("+", "-") and prev[3].isdigit():
                out_class = "result"
                x, op, y = int(prev[3]), prev[2], int(prev[1])
                if op == "-":
                    buggy = str(buggy_sub(x, y))
                    if len(buggy) != len(word):
                        fixes = set(range(len(word)))
                    else:
                        fixes = {k for k in range(len(word)) if buggy[k] != word[k]}
                    for k, p in enumerate(pos):
                        out[p] = "borrow-fix" if k in fixes else "result"
                    continue
            elif prev[0] == ":":
                out_class = "answer"
            for p in pos:
                out[p] = out_class
    return out
