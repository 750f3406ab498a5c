"""Training an EAGLE-3 head on the target's own outputs, with training-time test.

1. Prompts (a local file or a built-in corpus' calibration split) are continued greedily by the
   target (batched `generate`): the head learns the text it will actually be asked to draft.
2. One teacher-forced target pass per sequence records the three aux hidden states and the target's
   argmax at every position (the label: greedy verification accepts exactly that token).
3. Training-time test: the head drafts `ttt_steps` steps in parallel over every position, each step
   consuming the previous step's own output hidden state (not the target's), as it will when
   drafting. Step j's query at position i attends to the first step's keys at positions <= i and to
   its own chain's keys (steps 2..j at position i), the attention pattern of drafting from i.

The generated data and periodic checkpoints live in ``OUT.work/``; a killed run resumes from its
last checkpoint with the same data order, so it ends with the same head as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text, save_tensors
from ..errors import LeanLMError
from ..train.loop import autocast, cosine_lr
from ..train.checkpoint import has_checkpoint, load_checkpoint, remove_checkpoint_files, save_checkpoint
from .eagle3 import Eagle3Config, Eagle3Head, repeat_kv, save_eagle3

log = logging.getLogger("leanlm")
DATA_FILE = "data.safetensors"
DATA_FIELDS = ("prompts", "num_prompts", "prompt_words", "max_new_tokens", "chat", "draft_vocab", "corpus_tokens",
               "corpus_seq_len")
CORPUS_FILE = "corpus.safetensors"


@dataclass
class Eagle3TrainConfig:
    prompts: str = "wiki"  # a built-in corpus (its calibration split) or a .txt/.jsonl file of prompts
    num_prompts: int = 512
    prompt_words: int = 40  # corpus paragraphs are cut to their first words to make a prompt
    max_new_tokens: int = 128
    chat: bool = False  # wrap prompts in the target's chat template
    generate_batch_size: int = 32
    draft_vocab: int = 8192
    corpus_tokens: int = 0  # also train on this many tokens of plain text (the prompts' corpus), teacher-forced
    corpus_seq_len: int = 256
    train_lm_head: bool = False  # the head's output layer starts as the target's rows and stays frozen by default
    ttt_steps: int = 4
    epochs: float = 4.0
    batch_size: int = 8
    lr: float = 1e-3
    bf16: bool = True  # autocast the head's matmuls to bfloat16 (2.4x faster on AVX-512 BF16 CPUs)
    warmup_steps: int = 20
    max_minutes: float | None = None  # stop (and save) after this much training time
    checkpoint_every: int = 25
    val_fraction: float = 0.05
    seed: int = 0


def prompts_from(source: str, split: str | None, n: int | None = None, words: int = 40) -> list[str]:
    """Prompts: each document of a user file as is; or, for a built-in corpus, the first `words`
    words of each paragraph of its `split` (calib for training, eval for benchmarks)."""
    from ..data import CORPORA, documents, split_text

    if source in CORPORA:
        paragraphs = split_text(source, split or "calib").split("\n\n")
        out = [" ".join(p.split()[:words]) for p in paragraphs if len(p.split()) >= words]
    else:
        out = list(documents(source))
    if not out:
        raise LeanLMError(f"no prompts in '{source}': pass a file with one prompt per paragraph or JSONL line")
    return out[:n] if n else out


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    from ..engine.text import encode_prompt

    return [encode_prompt(tokenizer, p, chat).tolist() for p in prompts]


@torch.inference_mode()
def generate_responses(target, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                       progress: bool = True) -> list[list[int]]:
    """Greedy continuations by the target, batched (left padding); each returned sequence is prompt +
    response, cut after the first end-of-sequence token."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths, less padding
    results: dict[int, list[int]] = {}
    bar = tqdm(total=len(prompt_ids), desc="target responses", unit="seq", disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            p = prompt_ids[i]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=eos)
        for r, i in enumerate(idx):
            resp = gen[r, width:].tolist()
            if eos is not None and eos in resp:
                resp = resp[:resp.index(eos) + 1]
            results[i] = prompt_ids[i] + resp
        bar.update(len(idx))
    bar.close()
    out = [results[i] for i in range(len(prompt_ids))]
    return out


@torch.inference_mode()
def teacher_features(target, sequences: list[list[int]], aux_layers: list[int], batch_size: int = 4,
                     progress: bool = True):
    """Per sequence: (aux hidden states [T, 3H] bf16, target argmax labels [T])."""
    from tqdm.auto import tqdm

    feats = []
    for b in tqdm(range(0, len(sequences), batch_size), desc="target features", disable=not progress):
        chunk = sequences[b:b + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        out = target(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i] for i in aux_layers], -1)
        labels = out.logits.argmax(-1)
        for r, s in enumerate(chunk):
            feats.append((aux[r, :len(s)].to(torch.bfloat16), labels[r, :len(s)]))
    return feats


def corpus_sequences(tokenizer, source: str, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Plain text of `source` (a corpus' calibration split, or a file) cut into `seq_len`-token pieces."""
    from ..data import CORPORA, documents, split_text

    text = split_text(source, "calib") if source in CORPORA else "\n\n".join(documents(source))
    ids = tokenizer(text).input_ids[:max_tokens]
    return [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len) if len(ids[i:i + seq_len]) > 1]


def choose_draft_vocab(labels: list[torch.Tensor], vocab_size: int, size: int) -> torch.Tensor:
    """The `size` target tokens the target predicts most often (ties and unseen tokens by id)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for lab in labels:
        counts += torch.bincount(lab, minlength=vocab_size)
    # Stable sort on -count keeps ascending ids among equal counts.
    return torch.sort(-counts, stable=True).indices[:size].sort().values


# -- training-time test ------------------------------------------------------------------------------
def _shift(x: torch.Tensor, j: int, fill: int) -> torch.Tensor:
    """x[:, i + j] at position i (fill past the end)."""
    if j == 0:
        return x
    return torch.cat([x[:, j:], torch.full_like(x[:, :j], fill)], 1)


def ttt_attention(q, keys: list[torch.Tensor], values: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Step len(keys)'s attention: causal over step 1's keys, plus each later step's key at the same
    position (the query's own draft chain)."""
    t = q.shape[2]
    scale = q.shape[-1] ** -0.5
    k1, v1 = repeat_kv(keys[0], groups), repeat_kv(values[0], groups)
    scores = [(q @ k1.transpose(-1, -2)) * scale
              + torch.full((t, t), float("-inf"), dtype=q.dtype).triu(1)]
    chain_v = []
    for k, v in zip(keys[1:], values[1:]):
        scores.append((q * repeat_kv(k, groups)).sum(-1, keepdim=True) * scale)
        chain_v.append(repeat_kv(v, groups))
    p = torch.softmax(torch.cat(scores, -1), -1)
    out = p[..., :t] @ v1
    for s, v in enumerate(chain_v):
        out = out + p[..., t + s:t + s + 1] * v
    return out


def ttt_forward(head: Eagle3Head, embed, ids: torch.Tensor, aux: torch.Tensor, labels: torch.Tensor, steps: int):
    """Per-step (loss, correct, count) of `steps` unrolled drafting steps over a batch.

    ids [B, T] tokens; aux [B, T, 3H]; labels [B, T] draft ids of the target's argmax (-1: a token
    outside the draft vocabulary, which counts as a miss; -100: no label).
    """
    b, t = ids.shape
    c = head.config
    groups = c.num_attention_heads // c.num_key_value_heads
    hidden = head.fc(aux.to(head.fc.weight.dtype))
    pos = torch.arange(t)
    keys, values, results = [], [], []
    for j in range(1, steps + 1):
        with torch.no_grad():
            emb = embed(_shift(ids, j, 0)).to(hidden.dtype)
        q, k, v, residual = head.qkv(hidden, emb, pos + j - 1)
        keys.append(k)
        values.append(v)
        hidden, logits = head.finish(ttt_attention(q, keys, values, groups), residual)
        target = _shift(labels, j, -100)
        known = target >= 0
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               torch.where(known, target, -100).reshape(-1), ignore_index=-100)
        correct = ((logits.argmax(-1) == target) & known).sum()
        results.append((loss, int(correct), int((target != -100).sum())))
    return results


def step_weights(steps: int) -> list[float]:
    return [0.8 ** j for j in range(steps)]  # EAGLE-3's decay: later steps matter less


# -- data cache and checkpoints ----------------------------------------------------------------------
def _save_data(path: Path, sequences, feats, draft_ids, prompt_lengths: list[int] | None = None) -> None:
    lengths = torch.tensor([len(s) for s in sequences])
    tensors = {"ids": torch.tensor([t for s in sequences for t in s]), "lengths": lengths,
               "aux": torch.cat([f[0] for f in feats]), "labels": torch.cat([f[1] for f in feats]),
               "draft_ids": draft_ids,
               "prompt_lengths": torch.tensor(prompt_lengths or [0] * len(sequences), dtype=torch.long)}
    save_tensors(path, tensors)


def _load_data(path: Path):
    from safetensors.torch import load_file

    d = load_file(str(path))
    bounds = [0] + d["lengths"].cumsum(0).tolist()
    seqs = [d["ids"][a:b] for a, b in zip(bounds, bounds[1:])]
    feats = [(d["aux"][a:b], d["labels"][a:b]) for a, b in zip(bounds, bounds[1:])]
    prompt_lengths = d["prompt_lengths"].tolist() if "prompt_lengths" in d else [0] * len(seqs)  # older files
    return seqs, feats, d["draft_ids"], prompt_lengths


def _save_checkpoint(work: Path, head, opt, step: int, history: list) -> None:
    save_checkpoint(work, dict(head.named_parameters()), opt, {"step": step, "history": history})


def _load_checkpoint(work: Path, head, opt):
    state = load_checkpoint(work, dict(head.named_parameters()), opt)
    return state["step"], state["history"]


def _batches(n_train: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [perm[i:i + batch_size] for i in range(0, n_train, batch_size)]


def _collate(seqs, feats, draft_lookup, idx, first_label: list[int] | None = None):
    """Padded batch of sequences `idx`; labels before ``first_label[i]`` are ignored."""
    width = max(len(seqs[i]) for i in idx)
    h = feats[idx[0]][0].shape[-1]
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    aux = torch.zeros(len(idx), width, h)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for r, i in enumerate(idx):
        n = len(seqs[i])
        ids[r, :n] = torch.as_tensor(seqs[i])
        aux[r, :n] = feats[i][0].float()
        lab = draft_lookup[feats[i][1]]
        labels[r, :n] = torch.where(lab < 0, -1, lab)  # outside the draft vocabulary: a sure miss when drafting
        if first_label:
            labels[r, :first_label[i]] = -100
    return ids, aux, labels


@torch.no_grad()
def evaluate_head(head, embed, seqs, feats, draft_lookup, steps: int, batch_size: int = 8,
                  prompt_lengths: list[int] | None = None) -> list[float]:
    """Per-step top-1 accuracy of the head on sequences it was not trained on, over the positions it
    drafts from (the responses: labels from the last prompt token on)."""
    first = [max(p - 1, 0) for p in prompt_lengths] if prompt_lengths else None
    correct, count = [0] * steps, [0] * steps
    for b in range(0, len(seqs), batch_size):
        idx = list(range(b, min(b + batch_size, len(seqs))))
        ids, aux, labels = _collate(seqs, feats, draft_lookup, idx, first)
        for j, (_, c, n) in enumerate(ttt_forward(head, embed, ids, aux, labels, steps)):
            correct[j] += c
            count[j] += n
    return [c / n if n else float("nan") for c, n in zip(correct, count)]


def train_eagle3(target, tokenizer, out: str | Path, config: Eagle3TrainConfig | None = None,
                 overwrite: bool = False, progress: bool = True) -> Eagle3Head:
    """Train an EAGLE-3 head for `target` and save it to `out` (EAGLE-3 layout). Resumable."""
    from tqdm.auto import tqdm

    cfg = config or Eagle3TrainConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise LeanLMError(f"output '{out}' already exists: choose another --out or pass --overwrite")
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k != "max_minutes"}
    cfg_file = work / "train_config.json"
    if cfg_file.is_file():
        before = json.loads(cfg_file.read_text())
        # Generated data can serve other training settings; a checkpoint only the same ones.
        fields = settings if has_checkpoint(work) else DATA_FIELDS
        changed = sorted(f for f in fields if before.get(f) != settings[f])
        if changed:
            raise LeanLMError(f"'{work}' holds a run with other {', '.join(changed)}: resume with the settings in "
                              f"{cfg_file}, or delete the folder to start over")
    atomic_write_text(cfg_file, json.dumps(settings, indent=2))
    torch.manual_seed(cfg.seed)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    head = Eagle3Head(Eagle3Config.for_target(target.config, cfg.draft_vocab))
    embed = target.get_input_embeddings()

    data_path = work / DATA_FILE
    if data_path.is_file():
        log.info(f"reusing generated data in {data_path}")
        seqs, feats, draft_ids, prompt_lengths = _load_data(data_path)
    else:
        prompts = prompts_from(cfg.prompts, "calib", cfg.num_prompts, cfg.prompt_words)
        ids = encode_prompts(tokenizer, prompts, cfg.chat)
        seqs = generate_responses(target, tokenizer, ids, cfg.max_new_tokens, cfg.generate_batch_size, progress)
        feats = teacher_features(target, seqs, head.config.aux_layers, progress=progress)
        draft_ids = choose_draft_vocab([f[1] for f in feats], head.config.vocab_size, head.config.draft_vocab_size)
        prompt_lengths = [len(p) for p in ids]
        _save_data(data_path, seqs, feats, draft_ids, prompt_lengths)
    n_val = max(1, int(len(seqs) * cfg.val_fraction)) if len(seqs) > 1 else 0
    val_seqs, val_feats = seqs[:n_val], feats[:n_val]
    train_idx = list(range(n_val, len(seqs)))
    if cfg.corpus_tokens:
        corpus_path = work / CORPUS_FILE
        if corpus_path.is_file():
            cseqs, cfeats, _, _ = _load_data(corpus_path)
        else:
            cseqs = corpus_sequences(tokenizer, cfg.prompts, cfg.corpus_tokens, cfg.corpus_seq_len)
            cfeats = teacher_features(target, cseqs, head.config.aux_layers, progress=progress)
            _save_data(corpus_path, cseqs, cfeats, torch.zeros(0, dtype=torch.long))
        train_idx += list(range(len(seqs), len(seqs) + len(cseqs)))
        seqs, feats = list(seqs) + list(cseqs), list(feats) + list(cfeats)
    head.set_draft_vocab(draft_ids)
    with torch.no_grad():  # the target's own output embedding for the kept tokens (a quantized one decoded)
        out_emb = target.get_output_embeddings()
        rows = out_emb.weight_rows(head.target_ids) if hasattr(out_emb, "weight_rows") else out_emb.weight[head.target_ids]
        head.lm_head.weight.copy_(rows.float())
    head.lm_head.weight.requires_grad_(cfg.train_lm_head)
    draft_lookup = head.to_draft_ids(torch.arange(head.config.vocab_size))
    if not train_idx:
        raise LeanLMError("too few training sequences: raise --num-prompts")
    per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = max(1, int(per_epoch * cfg.epochs))
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)

    def lr_at(step: int) -> float:
        return cosine_lr(cfg.lr, step, total, cfg.warmup_steps, 0.1)

    step, history = 0, []
    if has_checkpoint(work):
        step, history = _load_checkpoint(work, head, opt)
        log.info(f"resuming EAGLE-3 training at step {step}/{total}")
    weights = step_weights(cfg.ttt_steps)
    head.train()
    t_start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="EAGLE-3 head", unit="step", disable=not progress)
    tokens = 0
    while step < total:
        epoch, pos = divmod(step, per_epoch)
        batch = [train_idx[i] for i in _batches(len(train_idx), cfg.batch_size, epoch, cfg.seed)[pos]]
        ids, aux, labels = _collate(seqs, feats, draft_lookup, batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast(head, cfg.bf16):
            results = ttt_forward(head, embed, ids, aux, labels, cfg.ttt_steps)
            loss = sum(w * r[0] for w, r in zip(weights, results))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int((labels != -100).sum())
        accs = [c / n if n else 0.0 for _, c, n in results]
        history.append({"step": step, "loss": loss.item(), "acc": accs})
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(loss=f"{loss.item():.3f}", acc1=f"{accs[0]:.2f}", tok_s=f"{tokens / elapsed:.0f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == total:
            _save_checkpoint(work, head, opt, step, history)
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
            log.info(f"stopping at step {step}/{total}: --max-minutes {cfg.max_minutes} reached")
            _save_checkpoint(work, head, opt, step, history)
            break
    bar.close()
    head.eval()
    val_acc = evaluate_head(head, embed, val_seqs, val_feats, draft_lookup, cfg.ttt_steps,
                            prompt_lengths=prompt_lengths[:n_val]) if val_seqs else []
    head.config.extra = {"trained_steps": step, "planned_steps": total, "train_sequences": len(train_idx),
                         "train_tokens_per_epoch": sum(len(seqs[i]) for i in train_idx),
                         "val_step_accuracy": [round(a, 4) for a in val_acc],
                         "train_seconds": round(time.perf_counter() - t_start, 1), "config": asdict(cfg)}
    save_eagle3(head, out, overwrite=overwrite)
    remove_checkpoint_files(work)  # done; the generated data and its settings stay for retraining
    return head
