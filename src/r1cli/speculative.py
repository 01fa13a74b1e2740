"""Speculative decoding: a cheap draft proposes up to k tokens, the target checks them all in one cached forward of
k+1 tokens, and both caches roll back to the accepted prefix. The output is the target's own: greedy decoding
gives the same tokens as `Decoder`, sampling follows the target's distribution (the accept/resample rule of
Leviathan et al. 2023 and Chen et al. 2023). `SpeculativeDecoder` yields token ids exactly as `Decoder` does,
so `engine.stream_events` and run, chat, serve and bench consume it unchanged.

Two drafts: `ModelDraft` (another model with the same tokenizer, e.g. deepseek-r1:1.5b for :7b) and `MTPDraft`
(DeepSeek-V3/R1's multi-token-prediction layer, `models.deepseek.MTPLayer`, fed the target's hidden states).

Rollback needs no copy: the cache is static, a forward at `start_pos` attends over slots before it plus its own,
so moving the position back is enough and the stale slots are overwritten by the next forward.

Fixed shapes (the target's decode mode 'static', 'graph' or 'compile', unsharded): the verify runs through the
target Decoder's `StaticDecoder` as a step of k+1 tokens (its own shape per (k+1, bucket), captured as a CUDA graph
in the same pool as the decode step on a GPU), and the drafts' short steps through their own StaticDecoder. A
prompt's prefill stays eager. 'eager' and 'aot' (a CPU's default) verify eagerly.

Tensor parallel (the target has a `shard`): every rank runs the same loop; rank 0 decides (each draft token, the
verify's outcome, whether the next round runs) and broadcasts each decision, which the other ranks take instead of
their own, so every forward (the target's, the MTP layer's, sharded like the target) is collective in the same
order. A `ModelDraft` is loaded whole on every rank (replicated, not sharded): a small draft's sizes need not
divide across the ranks (the 1.5B's 12 heads do not over 8), and its k latency-bound steps pay no all-reduce."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .cpu import one_token_step
from .generate import STOP, Decoder, GenerationStats, SamplingParams, Turns, common_prefix, draw, sampling_probs
from .models import CausalLM
from .quant_formats import uses_onednn

MAX_DRAFT = 8  # most tokens proposed per step (MLA's absorbed decode form covers up to 16 new tokens)
STATIC_MODES = ("static", "graph", "compile")  # a target Decoder's modes whose verify takes the fixed-shape step


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (int8/int4 codes are buffers of a QuantWeight submodule): about what a
    batch-1 step reads."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _draft_tokens(logits: torch.Tensor, k: int, params: SamplingParams, generator,
                  step, decide=None) -> tuple[list[int], torch.Tensor | None]:
    """Up to k draft tokens from a draft's first logits: greedy, or drawn with the target's sampling settings (their
    probabilities kept for the accept/resample rule); `step(token, j)` gives the logits after draft token j.
    `decide(token)`: rank 0's token in place of this rank's (tensor parallel)."""
    drafts, qs = [], []
    for j in range(k):
        if params.temperature <= 0:
            token = logits.argmax(dim=-1)
        else:
            q = sampling_probs(logits, params)
            qs.append(q)
            token = draw(q, generator)
        if decide is not None:
            token = decide(token)
        drafts.append(int(token))
        if j + 1 < k:
            logits = step(token, j)
    return drafts, (torch.cat(qs) if qs else None)


class ModelDraft:
    """A smaller model with the target's tokenizer, with its own cache. It holds the committed tokens'
    keys and values up to `self.n`; each proposal feeds what it lacks, then one token per further draft."""

    def __init__(self, model: CausalLM, max_len: int, prefill_chunk: int = 2048):
        self.model, self.max_len, self.prefill_chunk = model, max_len, prefill_chunk
        self.device = model.model.embed_tokens.weight.device
        self.cache = None
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds (between turns)
        self.n = 0
        self.mode: str | None = None  # a StaticDecoder mode for the short steps (use_static), else eager
        self.step = None
        self.uses_onednn = uses_onednn(model)  # (cpu.one_token_step)

    def use_static(self, mode: str) -> None:
        self.mode = mode

    def _forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [1, vocab] after tokens [1, T] at slots pos..: a few tokens through the fixed-shape step when
        there is one, a prompt (or eager mode) through the plain forward in chunks."""
        if self.step is not None and tokens.shape[1] <= MAX_DRAFT + 1:
            return self.step(tokens, pos)[-1:]
        for i in range(0, tokens.shape[1], self.prefill_chunk):
            logits = self.model(tokens[:, i : i + self.prefill_chunk], start_pos=pos + i, cache=self.cache,
                                last_only=True)[:, -1]
        return logits

    def cost(self, target: CausalLM) -> float:
        """A draft step's cost in target decode steps: batch-1 decode reads every weight once."""
        return weight_bytes(self.model) / max(weight_bytes(target), 1)

    def start(self, tokens: list[int], reuse: int) -> int:
        if self.cache is None:
            self.cache = self.model.new_cache(1, self.max_len)
            self.model.ensure_rope(self.max_len)
        if self.mode is not None and self.step is None:
            from .generate import StaticDecoder

            self.step = StaticDecoder(self.model, self.cache, self.mode)
        self.n = common_prefix(self.ids, tokens[:-1])
        return reuse

    def target_hidden(self, hidden, start: int) -> None:
        pass

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator,
                decide=None) -> tuple[list[int], torch.Tensor | None]:
        logits = self._forward(torch.tensor([tokens[self.n:]], device=self.device), self.n)
        self.n = len(tokens)
        with one_token_step(self.uses_onednn, self.device):
            return _draft_tokens(logits, k, params, generator,
                                 lambda token, j: self._forward(token.view(1, 1), self.n + j), decide)

    def accepted(self, base: int, n: int, k: int) -> None:
        """`base` committed tokens before the proposal, `n` of the k drafts accepted: the draft fed the first k-1."""
        self.n = base + min(n, k - 1)

    def finish(self, tokens: list[int]) -> None:
        self.ids = tokens[: self.n]


class MTPDraft:
    """DeepSeek's multi-token-prediction layer as the draft (`model.mtp`). Its slot i holds (h_i, token i+1), h_i
    the target's final hidden state at i, and predicts token i+2; after each target forward the new hidden states
    wait in `pending` until the tokens after them are known. A second draft token feeds the layer its own output
    hidden state (vLLM's and SGLang's way with one MTP layer)."""

    def __init__(self, model: CausalLM, max_len: int):
        if getattr(model, "mtp", None) is None:
            raise ValueError("the model was loaded without its MTP layer (load_model(..., mtp=True))")
        self.model, self.max_len = model, max_len
        self.device = model.model.embed_tokens.weight.device
        self.cache = None
        self.n = 0  # slots holding exact inputs
        self.pending: torch.Tensor | None = None  # target hidden states for positions self.n.., [1, T, dim]
        self.mode: str | None = None  # a StaticDecoder mode for the layer's steps (use_static), else eager
        self.step = None

    def use_static(self, mode: str) -> None:
        self.mode = mode

    def _forward(self, tokens: torch.Tensor, hidden: torch.Tensor, pos: int):
        """The layer's logits [T, vocab] and output hidden states [1, T, dim] at slots pos..: through the
        fixed-shape step for up to MAX_DRAFT + 1 tokens when there is one, else eagerly (a prompt)."""
        if self.step is not None and tokens.shape[1] <= MAX_DRAFT + 1:
            logits = self.step(tokens, pos, hidden)
            return logits, self.step.hidden
        logits, h = self.model.mtp_forward(tokens, hidden, pos, self.cache)
        return logits[0], h

    def cost(self, target: CausalLM) -> float:
        # one decoder layer of the target's and its head (MoE: the activated experts only, as in the main layers)
        return 1.0 / (target.args.n_layers + 1) + 0.5 * weight_bytes(target.lm_head) / max(weight_bytes(target), 1)

    def start(self, tokens: list[int], reuse: int) -> int:
        if self.cache is None:
            self.cache = self.model.new_mtp_cache(self.max_len)
        if self.mode is not None and self.step is None:
            from .generate import StaticDecoder

            self.step = StaticDecoder(self.model, self.cache, self.mode, forward=self.model.mtp_forward)
        self.model.keep_hidden = True
        # Slot i holds token i+1: valid while that token is in the reused prefix. The target recomputes every
        # hidden state the layer has not consumed.
        reuse = max(min(reuse - 1, self.n), 0)
        self.n, self.pending = reuse, None
        return reuse

    def target_hidden(self, hidden: torch.Tensor, start: int) -> None:
        """The target's hidden states for positions start.. (exact ones only: the accepted prefix)."""
        if self.pending is None:
            assert start == self.n
            self.pending = hidden
        else:
            assert start == self.n + self.pending.shape[1]
            self.pending = torch.cat([self.pending, hidden], dim=1)

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator,
                decide=None) -> tuple[list[int], torch.Tensor | None]:
        start, T = self.n, self.pending.shape[1]
        assert start + T == len(tokens) - 1, (start, T, len(tokens))
        feed = torch.tensor([tokens[start + 1 :]], device=self.device)
        logits, h = self._forward(feed, self.pending, start)
        logits, h = logits[-1:], h[:, -1:]
        self.n, self.pending = len(tokens) - 1, None
        hidden = [h]  # the layer's own output hidden state feeds its next step

        def step(token, j):
            logits, hidden[0] = self._forward(token.view(1, 1), hidden[0], self.n + j)
            return logits[-1:]

        return _draft_tokens(logits, k, params, generator, step, decide)

    def accepted(self, base: int, n: int, k: int) -> None:
        pass  # the slots past self.n hold drafted inputs; the next proposal overwrites them

    def finish(self, tokens: list[int]) -> None:
        self.model.keep_hidden = False


class AdaptiveK:
    """How many tokens to draft next: the k that maximises expected tokens per unit of cost, from the acceptance
    rate seen so far (a per-token rate, decayed so it follows the text) and the draft's cost relative to a target
    step. With acceptance rate a, k drafts yield (1 - a^(k+1)) / (1 - a) tokens for k draft steps and one verify
    of k+1 tokens (cost 1 + verify_slope * k)."""

    def __init__(self, draft_cost: float, max_k: int = MAX_DRAFT, verify_slope: float = 0.05, decay: float = 0.9):
        self.draft_cost, self.max_k, self.verify_slope, self.decay = draft_cost, max_k, verify_slope, decay
        self.accepted, self.rejected = 3.0, 1.0  # a prior of 75%

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, n: int, k: int) -> None:
        self.accepted = self.decay * self.accepted + n
        self.rejected = self.decay * self.rejected + (1 if n < k else 0)

    def choose(self) -> int:
        a = min(self.rate, 0.999)
        best, best_k = 0.0, 1
        for k in range(1, self.max_k + 1):
            value = (1 - a ** (k + 1)) / (1 - a) / (1 + self.verify_slope * k + self.draft_cost * k)
            if value > best:
                best, best_k = value, k
        return best_k


def accept(target_logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, int]:
    """The verify rule. target_logits [k+1, V] at the last committed token and each draft; q [k, Vd] the
    distributions the drafts were drawn from (None: greedy). Returns (n accepted, the token after them): the
    target's choice at the first rejection, or a bonus token when all k are accepted."""
    k = len(drafts)
    if params.temperature <= 0:
        best = target_logits.argmax(dim=-1).tolist()
        n = 0
        while n < k and drafts[n] == best[n]:
            n += 1
        return n, best[n]
    p = sampling_probs(target_logits, params)
    p = p / p.sum(dim=-1, keepdim=True)
    if k:
        q = q / q.sum(dim=-1, keepdim=True)
        # embedding sizes differ by padding rows (ids no text has): compare over the wider of the two
        width = max(p.shape[-1], q.shape[-1])
        p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
        q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
        idx = torch.tensor(drafts, device=p.device)
        rows = torch.arange(k, device=p.device)
        ratio = (p[rows, idx] / q[rows, idx]).tolist()
        u = torch.rand(k, generator=generator, device=p.device).tolist()
    for j in range(k):
        if u[j] < ratio[j]:  # accept with probability min(1, p/q)
            continue
        residual = (p[j] - q[j]).clamp(min=0)  # rejected: draw from the normalised max(0, p - q)
        return j, int(draw(residual.unsqueeze(0), generator))
    return k, int(draw(p[k : k + 1], generator))


def _repeat_masks(seen: torch.Tensor, drafts: list[int]) -> torch.Tensor:
    """[k+1, V] masks of the tokens before each verified position: the committed ones, then each draft in turn."""
    masks = seen.expand(len(drafts) + 1, -1).clone()
    for j, d in enumerate(drafts):
        if d < masks.shape[1]:
            masks[j + 1 :, d] = True
    return masks


class SpeculativeDecoder(Turns):
    """`Decoder`'s interface (generate, stats, max_len, reset, cached_ids) over a target and a draft."""

    def __init__(self, target: Decoder, draft, max_k: int = MAX_DRAFT, adaptive: bool = True):
        self.target = target
        self.model = target.model
        self.draft = draft
        self.max_k, self.adaptive = max_k, adaptive
        self.device = target.device
        self.max_len = target.max_len
        self.shard = target.shard  # tensor parallel: rank 0 decides, the others follow (the module docstring)
        self.stats = GenerationStats()
        self.k = AdaptiveK(draft.cost(self.model), max_k)
        # the verify (and the drafts' steps) with fixed shapes where the target decodes so; sharded: eager
        self.static = target.decode_mode in STATIC_MODES and self.shard is None
        if self.static:
            draft.use_static(target.decode_mode)

    @property
    def cached_ids(self) -> list[int]:
        return self.target.cached_ids

    def reset(self) -> None:
        self.target.reset()

    def _share(self, values: list[int]) -> list[int]:
        """Rank 0's values on every rank (tensor parallel); as they are in one process."""
        if self.shard is None:
            return values
        return self.shard.broadcast(torch.tensor(values, dtype=torch.long, device=self.device)).tolist()

    def _decide(self, token: torch.Tensor) -> torch.Tensor:
        """A draft token: rank 0's, in place, on every rank."""
        return self.shard.broadcast(token.to(torch.long).contiguous())

    @torch.inference_mode()
    def _steps(self, prompt_ids: list[int], params: SamplingParams, stop_ids, reuse: int) -> Iterator[int]:
        t = self.target
        model, cache = self.model, t._ensure_cache()
        reuse = self.draft.start(prompt_ids, reuse)
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt_ids), cached_tokens=reuse)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        budget = min(params.max_tokens, self.max_len - len(prompt_ids))
        # Decoder's repetition penalty and loop guard (generate.py), when this version has them: the verify
        # rows are penalised as plain decoding would penalise each position, and the guard sees every token
        penalty = getattr(params, "repetition_penalty", 1.0)
        guard = None
        if getattr(params, "repeat_guard", False):
            from .generate import RepetitionGuard

            guard = RepetitionGuard()
        seen = None
        tokens = list(prompt_ids)  # committed: the prompt and every token yielded or about to be
        leader = self.shard is None or self.shard.leader
        unread = None
        t0 = time.perf_counter()
        stats.finish_reason = "length"
        pos = reuse  # target cache slots holding tokens[:pos]
        try:
            # prefill: the prompt's uncached tail, then the first token
            feed = torch.tensor([prompt_ids[reuse:]], device=self.device)
            hidden = []
            for i in range(0, feed.shape[1], t.prefill_chunk):
                logits = model(feed[:, i : i + t.prefill_chunk], start_pos=pos + i, cache=cache, last_only=True)[:, -1]
                if model.keep_hidden:
                    hidden.append(model.hidden)
            if hidden:
                self.draft.target_hidden(torch.cat(hidden, dim=1), pos)
            pos = len(prompt_ids)
            if penalty != 1.0:
                from .generate import penalize_repeats

                seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
                seen[torch.tensor([t for t in prompt_ids if t < seen.shape[0]], dtype=torch.long, device=self.device)] = True
                logits = penalize_repeats(logits, seen, penalty)
            first = int(draw(sampling_probs(logits, params), generator)) if params.temperature > 0 else int(logits.argmax())
            [first] = self._share([first])
            stats.target_steps += 1
            stats.prefill_s = time.perf_counter() - t0
            new = [first]

            def take(tok: int) -> str | None:
                """Commit a token, or the reason the turn ends before it."""
                if tok in stop_ids:
                    return "stop"
                if guard is not None and guard.add(tok):
                    return "repetition"
                tokens.append(tok)
                if seen is not None and tok < seen.shape[0]:
                    seen[tok] = True
                stats.generated_tokens += 1
                return None

            while True:
                for i, tok in enumerate(new):
                    reason = take(tok)
                    if reason:
                        stats.finish_reason = reason
                        return
                    if leader:
                        unread = new[i + 1 :]  # closed at this yield: what the other ranks go on taking
                        yield tok
                        unread = None
                    if stats.generated_tokens >= budget:
                        return
                # tokens[-1] is not in the target cache yet (pos == len(tokens) - 1)
                room = min(self.max_len - len(tokens), budget - stats.generated_tokens)
                k = min(self.k.choose() if self.adaptive else self.max_k, room - 1 if room > 1 else 0)
                [k] = self._share([k])  # the draft costs (sizes of each rank's shards) may differ by rank
                if k == STOP:
                    stats.finish_reason = "interrupted"
                    return
                decide = self._decide if self.shard is not None else None
                drafts, q = self.draft.propose(tokens, k, params, generator, decide) if k > 0 else ([], None)
                feed = torch.tensor([[tokens[-1], *drafts]], device=self.device)
                if self.static:  # the target Decoder's StaticDecoder: one more shape, (k+1, bucket)
                    logits = t._decode(feed, pos)
                    hidden = t._step.hidden
                else:
                    logits = model(feed, start_pos=pos, cache=cache)[0]
                    hidden = model.hidden if model.keep_hidden else None
                if seen is not None:
                    from .generate import penalize_repeats

                    logits = penalize_repeats(logits, _repeat_masks(seen, drafts), penalty)
                n, nxt = accept(logits, drafts, q, params, generator)
                n, nxt = self._share([n, nxt])
                if hidden is not None:  # a copy: a graph's output buffer is overwritten by its next replay
                    self.draft.target_hidden(hidden[:, : n + 1].clone(), pos)
                stats.target_steps += 1
                if k:
                    self.draft.accepted(len(tokens), n, k)
                    stats.draft_tokens += k
                    stats.accepted_tokens += n
                    self.k.update(n, k)
                pos += n + 1
                new = drafts[:n] + [nxt]
        except GeneratorExit:
            stats.finish_reason = "interrupted"
            raise
        finally:
            if unread is not None and self.shard is not None:
                # Closed (or Ctrl-C) at a yield: the other ranks take the rest of this round's tokens as they would;
                # unless that ends the turn for them too, they wait for the next round: tell them it is none.
                yielded = stats.generated_tokens
                if not (yielded >= budget or any(take(tok) or stats.generated_tokens >= budget for tok in unread)):
                    self._share([STOP])
                stats.generated_tokens = yielded
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            t.cached_ids = tokens[:pos]
            self.draft.finish(tokens)


def same_vocabulary(a, b) -> str | None:
    """None when two tokenizers map the same strings to the same ids; else what differs, in a few words.
    (Embedding sizes may differ: the 1.5B distill has 151,936 rows, the 7B 152,064, for one tokenizer.)"""
    va, vb = a.backend.get_vocab(with_added_tokens=True), b.backend.get_vocab(with_added_tokens=True)
    if va == vb:
        return None
    diff = next((t for t in sorted(va) if vb.get(t) != va[t]), None) or next(t for t in sorted(vb) if t not in va)
    return f"{len(vb)} tokens against {len(va)}; {diff!r} is {vb.get(diff)} there, {va.get(diff)} here"


def open_speculative(decoder: Decoder, tokenizer, draft: str | None, mtp: bool, find_folder, device, dtype: str,
                     draft_quant: str, group_size: int, announce=None) -> SpeculativeDecoder:
    """The CLI's speculative decoder: `mtp` (the target was loaded with its MTP layer) or a draft model by
    name, refused unless its tokenizer is the target's."""
    from .errors import UsageError

    if mtp:
        return SpeculativeDecoder(decoder, MTPDraft(decoder.model, decoder.max_len))
    from .loader import Checkpoint, pick_dtype, resolve_quant
    from .registry import resolve_name

    ref = resolve_name(draft)
    checkpoint = Checkpoint(find_folder(ref, draft))
    diff = same_vocabulary(tokenizer, checkpoint.tokenizer())
    if diff is not None:
        raise UsageError(f"--draft {draft} has another tokenizer than the model ({diff}): a draft must share the "
                         "model's vocabulary, e.g. deepseek-r1:1.5b for the R1-Distill-Qwen models")
    torch_dtype = pick_dtype(dtype, checkpoint.args, device)
    draft_quant, _why = resolve_quant(draft_quant, dtype, checkpoint, torch.device(device))
    model = checkpoint.load_model(device=device, dtype=torch_dtype, quant=draft_quant, group_size=group_size)
    if announce:
        announce(f"draft {ref.identity}" + (f" · {draft_quant}" if draft_quant != "none" else ""))
    return SpeculativeDecoder(decoder, ModelDraft(model, decoder.max_len))
