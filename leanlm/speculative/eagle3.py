"""EAGLE-3 draft head: the module, its drafter, and its checkpoint (the layout vLLM and SGLang load).

The head (Li et al., "EAGLE-3", 2025) reads three of the target's hidden states (low, mid, high
layers) at position i, fuses them with a linear layer (`fc`), and runs one decoder layer whose
attention input is [norm(embedding of token i+1), norm(fused hidden)] (2 x hidden wide). Its output
predicts the token after i+1 over a reduced draft vocabulary (the target's most frequent tokens;
`d2t` maps draft ids back). Drafting further steps feeds the layer's own output hidden state back in
place of the fused target features.

Checkpoint layout (a folder): ``config.json`` with ``architectures: ["LlamaForCausalLMEagle3"]``,
``draft_vocab_size``, ``target_hidden_size`` and ``eagle_config.eagle_aux_hidden_state_layer_ids``
(indices into the target's hidden states: i is the input of decoder layer i), and
``model.safetensors`` with ``fc.weight``, ``midlayer.{input_layernorm,hidden_norm,
post_attention_layernorm}.weight``, ``midlayer.self_attn.{q,k,v,o}_proj.weight``,
``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight``, ``lm_head.weight``, ``d2t`` (int64,
target id minus draft id) and ``t2d`` (bool over the target vocabulary). No embedding: the head
shares the target's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanLMError

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS = "model.safetensors"


@dataclass
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    aux_layers: list[int]
    target_hidden_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    extra: dict = field(default_factory=dict)  # training metadata, kept in config.json under "leanlm"

    @classmethod
    def for_target(cls, target_config, draft_vocab_size: int) -> "Eagle3Config":
        cfg = target_config.get_text_config(decoder=True) if hasattr(target_config, "get_text_config") else target_config
        n = cfg.num_hidden_layers
        if n < 4:
            aux = [1, n // 2, n]  # tiny models: still three distinct depths
        else:
            aux = [2, n // 2, n - 3]  # the layers vLLM and SGLang read for Llama-family targets
        rope = getattr(cfg, "rope_parameters", None) or {}
        if "full_attention" in rope and isinstance(rope["full_attention"], dict):
            rope = rope["full_attention"]  # Gemma-3: per layer type
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        heads = cfg.num_attention_heads
        return cls(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_attention_heads=heads, num_key_value_heads=getattr(cfg, "num_key_value_heads", heads),
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab_size=cfg.vocab_size,
                   draft_vocab_size=min(draft_vocab_size, cfg.vocab_size), aux_layers=aux,
                   target_hidden_size=cfg.hidden_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=float(theta),
                   max_position_embeddings=cfg.max_position_embeddings)

    def to_json(self) -> dict:
        return {
            "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False, "torch_dtype": "float32",
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layers), "use_aux_hidden_state": True},
            "leanlm": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Eagle3Config":
        try:
            return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                       num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
                       head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                       vocab_size=d["vocab_size"], draft_vocab_size=d.get("draft_vocab_size") or d["vocab_size"],
                       aux_layers=list(d["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),
                       target_hidden_size=d.get("target_hidden_size") or d["hidden_size"],
                       rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=d.get("rope_theta", 10000.0),
                       max_position_embeddings=d.get("max_position_embeddings", 4096), extra=d.get("leanlm") or {})
        except (KeyError, TypeError) as e:
            raise LeanLMError(f"EAGLE-3 config.json lacks {e}: is this an EAGLE-3 head folder?") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split convention, as transformers' Llama); x [..., T, d], positions [T]."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * ang.cos().to(x.dtype) + torch.cat([-x2, x1], -1) * ang.sin().to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)


class Eagle3Head(nn.Module):
    """The draft head. Inputs are batched ``[B, T, ...]``; attention is supplied by the caller
    (a KV cache while drafting, the training-time-test pattern while training)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        c = config
        self.fc = nn.Linear(len(c.aux_layers) * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = _MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        self.set_draft_vocab(torch.arange(c.draft_vocab_size))

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Draft id i predicts target token `target_ids[i]` (sorted ascending, as vLLM expects)."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long).sort().values
        if target_ids.numel() != self.config.draft_vocab_size:
            raise ValueError(f"draft vocabulary needs {self.config.draft_vocab_size} ids, got {target_ids.numel()}")
        self.d2t.copy_(target_ids - torch.arange(target_ids.numel()))
        self.t2d.zero_()
        self.t2d[target_ids] = True

    @property
    def target_ids(self) -> torch.Tensor:
        return torch.arange(self.config.draft_vocab_size) + self.d2t

    def to_draft_ids(self, target_tokens: torch.Tensor) -> torch.Tensor:
        """Target token ids -> draft ids (-100 where the draft vocabulary lacks the token)."""
        lookup = torch.full((self.config.vocab_size,), -100, dtype=torch.long)
        lookup[self.target_ids] = torch.arange(self.config.draft_vocab_size)
        return lookup[target_tokens]

    def qkv(self, hidden: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor):
        """Queries, keys, values ``[B, heads, T, head_dim]`` (rotary applied) and the residual."""
        c, layer = self.config, self.midlayer
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], -1)
        b, t = x.shape[:2]
        q = layer.self_attn.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return _rope(q, positions, c.rope_theta), _rope(k, positions, c.rope_theta), v, hidden

    def finish(self, attn: torch.Tensor, residual: torch.Tensor, logits: bool = True):
        """Attention output ``[B, heads, T, head_dim]`` -> (output hidden [B, T, H], draft logits or None)."""
        layer = self.midlayer
        b, _, t, _ = attn.shape
        h = layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1)) + residual
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, (self.lm_head(self.norm(h)) if logits else None)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


# -- checkpoint --------------------------------------------------------------------------------------
def save_eagle3(head: Eagle3Head, out: str | Path, overwrite: bool = False) -> Path:
    """Write the head in the EAGLE-3 layout, atomically."""
    from safetensors.torch import save_file

    from ..atomic import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(head.config.to_json(), indent=2) + "\n")
    return Path(out)


def _is_eagle3_config(d: dict) -> bool:
    return any("Eagle3" in a for a in d.get("architectures") or [])


def is_eagle3_dir(path: str | Path) -> bool:
    """Whether `path` is a folder whose config.json names an EAGLE-3 architecture."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and _is_eagle3_config(json.loads(cfg.read_text()))
    except json.JSONDecodeError:
        return False


def load_eagle3(path: str | Path) -> Eagle3Head:
    """Load an EAGLE-3 head folder (ours, or another trainer's in the same layout)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise LeanLMError(f"'{path}' is not an EAGLE-3 head folder (needs config.json and {WEIGHTS}): "
                          "train one with `leanlm speculate train`")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LeanLMError(f"'{cfg_file}' is not valid JSON ({e}): re-export the head") from None
    if not _is_eagle3_config(d):
        raise LeanLMError(f"'{path}' holds {d.get('architectures')}, not an EAGLE-3 head")
    head = Eagle3Head(Eagle3Config.from_json(d))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise LeanLMError(f"'{weights}' is unreadable ({e}): the head is incomplete or corrupt, retrain or re-copy it") from None
    state = {k.removeprefix("model."): v for k, v in state.items() if not k.endswith("embed_tokens.weight")}
    if "t2d" not in state and "d2t" in state:
        ids = torch.arange(state["d2t"].numel()) + state["d2t"]
        state["t2d"] = torch.zeros(head.config.vocab_size, dtype=torch.bool).index_fill_(0, ids, True)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        raise LeanLMError(f"EAGLE-3 head '{path}' does not match its config.json (missing {missing[:3]}, "
                          f"wrong shape {wrong[:3]}): the files are from different heads")
    head.load_state_dict({k: state[k] for k in expected}, strict=True)
    return head.eval()


# -- drafting ----------------------------------------------------------------------------------------
COMMIT_ROWS = (8, 16)  # compiled commit steps (accepted drafts + 1 entries, padded to one of these)


class Eagle3Drafter:
    """Drafts with an EAGLE-3 head over the target engine's hidden states.

    The engine must keep the head's aux layers (``Engine(..., hidden_layers=head.config.aux_layers)``).
    The head keeps its own KV cache: entries for committed positions (fed the target's features)
    and, beyond them, the current draft's entries (overwritten next cycle). Chains draft the argmax
    step by step; trees (`propose_tree`) keep the `width` best branches by cumulative probability
    at every depth, drafting each depth's branches in one batched step.
    """

    def __init__(self, head: Eagle3Head, embeddings: nn.Module, max_len: int = 2048, width: int = 2,
                 compile: bool = False):
        self.head = head.eval()
        self.compile = compile
        self._compiled = None
        if compile:  # the compiled steps read each weight in one fused pass (eager results unchanged)
            from ..kernels import use_fused_linears

            use_fused_linears(self.head)
        self.embed = embeddings
        self.width = width
        c = head.config
        self.groups = c.num_attention_heads // c.num_key_value_heads
        dtype = head.fc.weight.dtype
        self.keys = torch.zeros(1, c.num_key_value_heads, max_len, c.head_dim, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0  # committed entries
        self.max_len = max_len
        self.target_ids = head.target_ids
        self._out = None  # (output hidden [1, H], draft logits [draft_vocab]) of the last committed entry

    def _run(self, hidden: torch.Tensor, tokens: list[int], start: int, positions: torch.Tensor | None = None,
             draft_mask: torch.Tensor | None = None):
        """Write entries for `tokens` at cache slots start.. and return (output hidden, logits) per entry.

        Each entry attends to every committed slot, and to the draft slots [self.length, start + t)
        that `draft_mask` ([t, start + t - self.length]) allows (default: all earlier ones and itself).
        """
        head = self.head
        t = len(tokens)
        if start + t > self.max_len:
            raise ValueError(f"EAGLE-3 drafter cache of {self.max_len} positions is full")
        pos = torch.arange(start, start + t) if positions is None else positions
        embeds = self.embed(torch.tensor([tokens])).to(hidden.dtype)
        q, k, v, residual = head.qkv(hidden[None], embeds, pos)
        self.keys[:, :, start:start + t] = k
        self.values[:, :, start:start + t] = v
        region = start + t - self.length
        if draft_mask is None:
            draft_mask = torch.ones(t, region, dtype=torch.bool).tril(region - t)
        mask = torch.cat([torch.ones(t, self.length, dtype=torch.bool), draft_mask], 1)
        end = start + t
        attn = F.scaled_dot_product_attention(q, self.keys[:, :, :end], self.values[:, :, :end], attn_mask=mask,
                                              enable_gqa=self.groups > 1)
        out, logits = head.finish(attn, residual)
        return out[0], logits[0]

    def _append(self, hidden: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor, last: torch.Tensor,
                features: bool):
        """Entries for `tokens` at cache slots start.., each attending every slot up to its own; returns
        row `last`'s output hidden and logits. `features`: `hidden` holds the target's aux features
        (committed entries), else the head's own output (a chain draft step). Fixed shapes, so each
        row count compiles to one graph (eagerly, ~60 small ops are most of a draft step). Rows past
        the real ones may be padding: later entries overwrite them and real rows never see them."""
        if features:
            hidden = self.head.fc(hidden.to(self.head.fc.weight.dtype))
        slots = start + torch.arange(tokens.shape[0])
        q, k, v, residual = self.head.qkv(hidden[None], self.embed(tokens[None]).to(hidden.dtype), slots)
        self.keys.index_copy_(2, slots, k)
        self.values.index_copy_(2, slots, v)
        mask = torch.arange(self.max_len)[None] <= slots[:, None]
        attn = F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=mask, enable_gqa=self.groups > 1)
        out = self.head.finish(attn, residual, logits=False)[0][0].index_select(0, last)
        return out, self.head.lm_head(self.head.norm(out))[0]

    def _fixed_step(self, *args):
        if self.compile:
            if self._compiled is None:
                from ..engine.engine import compile_private

                self._compiled = compile_private(Eagle3Drafter._append, self)
            try:
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same step, eagerly
                import warnings

                warnings.warn(f"torch.compile of the EAGLE-3 draft step failed ({type(e).__name__}); drafting eagerly",
                              stacklevel=3)
                self.compile = False
        return self._append(*args)

    @torch.inference_mode()
    def _commit_features(self, features: torch.Tensor, tokens: list[int]) -> None:
        n = len(tokens)
        rows = next((r for r in COMMIT_ROWS if n <= r), None)
        if self.compile and rows and self.length + rows <= self.max_len:
            feats = torch.zeros(rows, features.shape[-1], dtype=features.dtype)
            feats[:n] = features
            ids = torch.zeros(rows, dtype=torch.long)
            ids[:n] = torch.tensor(tokens)
            self._out = self._fixed_step(feats, ids, torch.tensor(self.length), torch.tensor([n - 1]), True)
        else:
            hidden = self.head.fc(features.to(self.head.fc.weight.dtype))
            out, logits = self._run(hidden, tokens, self.length)
            self._out = (out[-1:], logits[-1])
        self.length += n

    def start(self, engine, seq) -> None:
        if engine.hidden is None:
            raise LeanLMError("the target engine keeps no hidden states: build it with hidden_layers=aux_layers")
        self.length = 0
        self._commit_features(engine.hidden, seq[1:])

    @torch.inference_mode()
    def propose(self, seq: list[int], k: int, temperature=0.0, top_p=1.0, generator=None):
        out, logits = self._out
        tokens, rows = [], []
        for i in range(k):
            if temperature <= 0:
                tok = int(self.target_ids[int(logits.argmax())])
            else:
                q_draft = torch.softmax(logits.float() / temperature, -1)
                q = torch.zeros(self.head.config.vocab_size).index_copy_(0, self.target_ids, q_draft)
                tok = int(torch.multinomial(q, 1, generator=generator))
                rows.append(q)
            tokens.append(tok)
            if i + 1 < k:  # attends the committed entries and this draft's earlier ones
                slot = self.length + i
                if slot + 1 > self.max_len:
                    raise ValueError(f"EAGLE-3 drafter cache of {self.max_len} positions is full")
                out, logits = self._fixed_step(out, torch.tensor([tok]), torch.tensor(slot), torch.tensor([0]),
                                               False)
        return tokens, (torch.stack(rows) if rows else None)

    @torch.inference_mode()
    def propose_tree(self, seq: list[int], k: int) -> tuple[list[int], list[int]]:
        out0, logits0 = self._out
        lp = torch.log_softmax(logits0.float(), -1)
        top = lp.topk(min(self.width, k))
        draft_ids = top.indices.tolist()  # draft-vocabulary ids of the nodes
        parents = [-1] * len(draft_ids)
        scores = top.values.tolist()
        depth = [1] * len(draft_ids)
        ancestors = [[i] for i in range(len(draft_ids))]
        outs = {-1: out0}
        frontier = list(range(len(draft_ids)))
        while len(draft_ids) < k:
            first = frontier[0]
            t = len(frontier)
            region = first + t
            mask = torch.zeros(t, region, dtype=torch.bool)
            for r, node in enumerate(frontier):
                mask[r, ancestors[node]] = True
            hidden = torch.cat([outs[parents[n]] for n in frontier])
            tokens = [int(self.target_ids[draft_ids[n]]) for n in frontier]
            pos = torch.tensor([self.length + depth[n] - 1 for n in frontier])
            h, lg = self._run(hidden, tokens, self.length + first, positions=pos, draft_mask=mask)
            for r, node in enumerate(frontier):
                outs[node] = h[r:r + 1]
            cand = torch.log_softmax(lg.float(), -1) + torch.tensor([scores[n] for n in frontier])[:, None]
            best = cand.flatten().topk(min(self.width, k - len(draft_ids), cand.numel()))
            frontier = []
            for score, flat in zip(best.values.tolist(), best.indices.tolist()):
                row, tok = divmod(flat, cand.shape[1])
                node_parent = first + row
                frontier.append(len(draft_ids))
                draft_ids.append(tok)
                parents.append(node_parent)
                scores.append(score)
                depth.append(depth[node_parent] + 1)
                ancestors.append(ancestors[node_parent] + [len(draft_ids) - 1])
        return [int(self.target_ids[d]) for d in draft_ids], parents

    def commit(self, seq, new, hidden) -> None:
        self._commit_features(hidden, new)
