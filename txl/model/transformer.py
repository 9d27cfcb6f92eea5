"""TransformerXL: adaptive embedding -> blocks over [memory + segment] -> adaptive softmax.

Batch-first: input_ids (B, T); mems: a memory.Memory (HiddenMemory: one (B, M, D) tensor per layer,
or, for inference, KVMemory: one (B, M, 2NH) tensor of keys / values per layer) or a plain list of
(B, M, D) tensors; labels (B, T) where labels[b, t] is the target of position t (already shifted),
IGNORE (-100) = not scored.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn

from .adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax, tie_adaptive
from .attention import causal_mask
from .block import Block
from .compressive import Compressor
from .config import SeqConfig, TXLConfig
from .memory import CompressiveMemory, HiddenMemory, KVMemory, Memory, as_memory
from .positions import relative_distances, sinusoid

IGNORE = -100  # labels of positions that are not scored (the one definition; txl imports it from here)


@dataclass
class TXLOutput:
    mems: Memory  # per layer (B, M', X), detached; the kind of the memory passed in
    hidden: torch.Tensor  # (B, T, D) last layer output (after dropout)
    nll: Optional[torch.Tensor] = None  # (B, T) per-token NLL in position order (0 where ignored)
    loss: Optional[torch.Tensor] = None  # mean NLL over scored tokens
    log_probs: Optional[torch.Tensor] = None  # (B, T, V) when asked for
    attn: Optional[list] = None  # per layer (B, N, T, K) attention probabilities when asked for
    recon_loss: Optional[torch.Tensor] = None  # memory=compressive, training: attention-reconstruction loss
    aux_loss: Optional[torch.Tensor] = None  # what training adds to loss: recon_loss_weight * recon_loss


class TransformerXL(nn.Module):
    def __init__(self, cfg: TXLConfig):
        super().__init__()
        # A private copy shared by every submodule: set_lengths must not reach the caller's
        # config or another model built from it.
        cfg = self.cfg = copy.deepcopy(cfg)
        D = cfg.d_model
        self.embed = AdaptiveEmbedding(cfg.vocab_size, cfg.d_embed, D, cfg.cutoffs, cfg.div_val)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        if cfg.kind == "relative" and not cfg.untie_r:  # u, v shared by all layers
            self.u = nn.Parameter(torch.zeros(cfg.n_head, cfg.d_head))
            self.v = nn.Parameter(torch.zeros(cfg.n_head, cfg.d_head))
        self.head = AdaptiveLogSoftmax(cfg.vocab_size, cfg.d_embed, D, cfg.cutoffs, cfg.div_val)
        self.compressor = Compressor(cfg) if cfg.memory.compressive else None
        self.reset_parameters()
        tie_adaptive(self.embed, self.head, cfg.tie_weight, cfg.tie_projs)

    # ---- initialisation: the released scripts' scheme --------------------------------------
    @torch.no_grad()
    def reset_parameters(self):
        std, pstd = self.cfg.init_std, self.cfg.proj_init_std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ".ln." in f".{name}":
                p.normal_(1.0, std) if leaf == "weight" else p.zero_()
            elif name.startswith(("embed.projs", "head.projs")):
                p.normal_(0.0, pstd)
            elif leaf == "bias" or name == "head.cluster_bias":
                p.zero_()
            else:
                p.normal_(0.0, std)
        if self.compressor is not None:
            self.compressor.reset_parameters()

    # ---- lengths: changeable without touching weights ---------------------------------------
    @property
    def seq(self) -> SeqConfig:
        return self.cfg.seq

    def set_lengths(self, **kw) -> None:
        """e.g. model.set_lengths(tgt_len=64, mem_len=640, clamp_len=400, same_length=True)."""
        unknown = set(kw) - {f.name for f in fields(SeqConfig)}
        if unknown:
            raise ValueError(f"unknown length field(s) {sorted(unknown)}; valid: {[f.name for f in fields(SeqConfig)]}")
        self.cfg.seq = replace(self.cfg.seq, **kw)  # re-validates

    @property
    def cmem_len(self) -> Optional[int]:
        """Compressed slots kept (memory=compressive), None for any other memory."""
        return self.compressor.cmem_len if self.compressor is not None else None

    def set_cmem_len(self, n: int, where: str = "cmem_len") -> None:
        """The number of compressed slots kept from now on (an evaluation setting: the trained
        compression is unchanged; 0: none, the model is then a Transformer-XL with its mem_len).
        memory=compressive only; `where` names the setting in the error."""
        if self.compressor is None:
            raise ValueError(f"{where}: this model has memory kind {self.cfg.memory.kind!r}, not compressive "
                             "(it has no compressed memory to size)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{where}: an integer >= 0 (compressed slots), got {n!r}")
        self.compressor.cmem_len = n

    @torch.compiler.disable  # eager under torch.compile: dynamo cannot trace the layer-at-a-time generator
    def init_mems(self, batch_size: int, projected: bool = False, store: str = "auto",
                  rolling: bool = False) -> Memory:
        """The first segment's memory, the one place its kind is chosen: hidden states, or with
        projected=True keys / values (inference only); store: its storage dtype (memory.STORES);
        rolling: forward updates it in place, a layer at a time (memory.py; the memory passed in is
        consumed). memory=compressive: a CompressiveMemory, also when projected (its slots are
        compressed hidden states: no key / value form), stored as computed, never rolling."""
        p = next(self.parameters())
        if self.compressor is not None:
            return CompressiveMemory.init(self.cfg.n_layer, batch_size, self.cfg.d_model, self.seq.mem_len,
                                          self.cfg.mem_init, p.device, p.dtype, store=store)
        if projected:  # keys / values of the initial rows, a layer at a time: no hidden-state memory is
            # ever held beside them (it was the high-water mark: the whole hidden memory + the K/V memory)
            mems = KVMemory(self._initial_kv(batch_size), store)
        else:
            mems = HiddenMemory.init(self.cfg.n_layer, batch_size, self.cfg.d_model, self.seq.mem_len,
                                     self.cfg.mem_init, p.device, p.dtype, store)
        mems.rolling = rolling
        return mems

    @torch.no_grad()
    def _initial_kv(self, batch_size: int):
        """Per layer the keys / values of the initial memory rows (B, M, 2NH): every row of `zeros` is
        the same zero vector, so one row is projected and copied (pre-LayerNorm: LN(0) is its bias)."""
        p = next(self.parameters())
        M = self.seq.mem_len if self.cfg.mem_init == "zeros" else 0
        for block in self.blocks:
            row = block.attn.project_kv(torch.zeros(1, 1, self.cfg.d_model, device=p.device, dtype=p.dtype))
            yield row.expand(batch_size, M, row.size(-1)).clone()

    def project_mems(self, mems) -> KVMemory:
        """A memory (or a list of (B, M, D) hidden states) -> its keys / values (B, M, 2NH) per layer."""
        if self.compressor is not None:
            return CompressiveMemory.projected(mems, self.blocks)  # refuses in one line: no key / value form
        return as_memory(mems).projected(self.blocks)

    # ---- forward ---------------------------------------------------------------------------
    def _check(self, input_ids, mems, labels):
        cfg = self.cfg
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {got}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids must have B > 0 and T > 0, got {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")
        if labels is not None:
            if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32):
                got = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
                raise ValueError(f"labels must be an integer tensor [B, T], got {got}")
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            scored = labels[labels != IGNORE]
            if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= cfg.vocab_size):
                raise ValueError(f"labels must lie in [0, {cfg.vocab_size}) or be {IGNORE}, "
                                 f"got values in [{int(scored.min())}, {int(scored.max())}]")
        if mems is not None:
            # a stacked (L, B, M, D) tensor would iterate like a list: insist on the documented type
            listlike = isinstance(mems, (list, tuple, Memory))
            if not listlike or len(mems) != cfg.n_layer:
                got = len(mems) if listlike else type(mems).__name__
                raise ValueError(f"mems must be a list with one tensor per layer ({cfg.n_layer}), got {got}")
            mems = as_memory(mems)
            width, what = mems.width(cfg)
            for i, m in enumerate(mems.layers):  # as stored (an int8 layer is not dequantized to check it)
                if (not torch.is_tensor(m) or m.dim() != 3 or m.size(0) != B or m.size(2) != width
                        or m.size(1) != mems.layers[0].size(1)):
                    got = tuple(m.shape) if torch.is_tensor(m) else type(m).__name__
                    raise ValueError(f"mems[{i}] must be a tensor [B={B}, M, {what}={width}] with the same M "
                                     f"in every layer, got {got}")
            if mems.inference_only and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                raise ValueError("mems: projected (key / value) memories are for inference only; run under "
                                 "torch.no_grad() or torch.inference_mode() (training needs W_k, W_v's gradient "
                                 "on the memory rows)")

    def forward(self, input_ids: torch.Tensor, mems: Optional[list] = None, labels: Optional[torch.Tensor] = None,
                return_log_probs: bool = False, need_weights: bool = False,
                blocked: Optional[torch.Tensor] = None) -> TXLOutput:
        """blocked: optional (B, T, K) bool, K = memory rows + T, True = the query may not see the key,
        on top of the causal mask; per stream (txl.evaluate hides an earlier document's keys with it)."""
        self._check(input_ids, mems, labels)
        cfg, seq = self.cfg, self.seq
        B, T = input_ids.shape
        # Stop-gradient on the memory (Dai et al. 2019 eq. 1), also for memories handed in that
        # still carry a graph or require grad: no gradient may ever reach them.
        mems = self.init_mems(B) if mems is None else as_memory(mems).detach()
        if self.compressor is not None and not isinstance(mems, CompressiveMemory):
            if mems.inference_only:
                CompressiveMemory.projected(mems, self.blocks)  # keys / values cannot be compressed: refuses
            mems = CompressiveMemory(mems.layers, 0)  # plain hidden states: no compressed slots yet
        M = mems.layers[0].size(1)
        K = M + T
        C = getattr(mems, "n_cmem", 0)  # compressed slots in front of the memory (own distances)
        x = self.embed(input_ids)  # (B, T, D)
        pos_emb = cpos = None
        if cfg.kind == "relative":
            pos_emb = self.drop(sinusoid(relative_distances(K - C, seq.clamp_len, x.device), cfg.d_model).to(x.dtype))
            if C:
                cpos = self.compressor.positions(T, M - C, C, seq.clamp_len, cfg.d_model, x.device, x.dtype)
                cpos.emb = self.drop(cpos.emb)
        elif cfg.kind == "absolute":  # positions continue after the memory (window coordinates)
            pos = torch.arange(M, K, device=x.device)
            if seq.clamp_len > 0:
                pos = pos.clamp(max=seq.clamp_len)
            x = x + sinusoid(pos, cfg.d_model).to(x.dtype)
        causal = causal_mask(T, M, seq.same_length, seq.mem_len + C, x.device)  # (T, K)
        if blocked is None:
            blocked = causal
        elif blocked.shape != (B, T, K) or blocked.dtype != torch.bool:
            raise ValueError(f"blocked must be a bool tensor [B={B}, T={T}, K={K}], got {tuple(blocked.shape)} {blocked.dtype}")
        else:
            blocked = causal | blocked.to(x.device)[:, None]  # (B, 1, T, K): broadcast over heads
        u, v = (getattr(self, "u", None), getattr(self, "v", None))
        h = self.drop(x)
        new, probs = [], []
        for i, block in enumerate(self.blocks):  # the memory turns its rows into keys / values
            h, p, keep = block(h, mems[i], blocked, pos_emb, u, v, need_weights, mems.keys_values, cpos)
            if mems.rolling:  # this layer's old rows are read: replace them now (memory.py: rolling)
                mems.update_layer(i, keep, seq.mem_len, seq.ext_len)
            else:
                new.append(keep)  # what the next segment's memory keeps: layer input or its keys / values
            probs.append(p)
        h = self.drop(h)
        out = TXLOutput(mems=None, hidden=h, attn=probs if need_weights else None)
        if self.compressor is not None:
            out.mems, out.recon_loss = self.compressor.update(mems, new, seq.mem_len, seq.ext_len, self.blocks)
            if out.recon_loss is not None:
                out.aux_loss = self.compressor.weight * out.recon_loss
        else:
            out.mems = mems if mems.rolling else mems.update(new, seq.mem_len, seq.ext_len)
        flat = h.reshape(B * T, -1)
        if labels is not None:
            keep = labels != IGNORE
            nll = self.head.nll(flat, labels.clamp(min=0).reshape(-1)).view(B, T)
            out.nll = nll.masked_fill(~keep, 0.0)
            out.loss = out.nll.sum() / keep.sum().clamp(min=1)
        if return_log_probs:
            out.log_probs = self.head.log_prob(flat).view(B, T, -1)
        return out
