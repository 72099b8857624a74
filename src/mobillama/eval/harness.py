"""The lm-evaluation-harness model ``mobillama``: scores project checkpoints directly.

``lm_eval --model mobillama --model_args pretrained=CKPT,batch_size=16`` (after ``import mobillama.eval``,
which the ``mobillama eval`` command does) runs any lm-eval task on a checkpoint directory. Tokenization
follows lm-eval's stock ``hf`` backend exactly (context and continuation are encoded jointly and split at
the context's length; trailing context spaces move to the continuation), so the two give the same
per-sample log-likelihoods. What differs is the work done per request:

* requests that share a context (the choices of a multiple-choice question) run the context through the
  model once; its KV cache is copied to every choice, which then only runs its own tokens;
* one-token continuations (MMLU's " A"/" B"/...) need no second pass at all: the context's last position
  scores every choice;
* the LM head and the softmax run only on the positions that are scored, not the whole sequence;
* contexts are batched by length (longest first, left padded), so little compute goes to padding.

This is hand-written rather than lm-eval's ``HFLM`` because HFLM has no prefix sharing (its logits cache
only helps one-token continuations) and applies the vocabulary projection to every position.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mobillama.config import parse_dtype
from mobillama.errors import MobiLlamaError
from mobillama.eval.loading import load_eval_model, load_eval_tokenizer
from mobillama.infer.generator import Generator
from mobillama.infer.sampling import SamplingParams
from mobillama.model import KVCache
from mobillama.tokenizer import conventions, load_tokenizer

DEFAULT_BATCH_SIZE = 16

# One loglikelihood request as lm-eval's TemplateLM hands it over: (cache key, context ids, continuation ids).
TokenRequest = tuple[object, list[int], list[int]]


def _parse_batch_size(value: int | str | None) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE  # no probing for the largest batch on CPU: a fixed, safe size
    try:
        size = int(value)
    except ValueError:
        raise MobiLlamaError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise MobiLlamaError(f"batch_size must be a positive integer, got {value!r}")
    return size


class SharedPrefixCache:
    """A read-only KV cache for the continuation pass: row r's past is its context's cached keys/values.

    Rows come in runs that share a context (the choices of one question). ``update`` writes each context's
    keys once per run by broadcasting into the joined [rows, heads, past + new, dim] tensor, so the
    prefix is never gathered row by row (``index_select`` on these strided views is ~6x slower on CPU)
    and never concatenated twice.
    """

    def __init__(self, prefix: KVCache, row_groups: list[int]) -> None:
        self.keys, self.values = prefix.keys, prefix.values
        self.past = prefix.get_seq_length()
        self.spans = []  # (group, first row, end row)
        for row, group in enumerate(row_groups):
            if self.spans and self.spans[-1][0] == group and self.spans[-1][2] == row:
                self.spans[-1][2] = row + 1
            else:
                self.spans.append([group, row, row + 1])

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args):
        return self._join(self.keys[layer_idx], key), self._join(self.values[layer_idx], value)

    def _join(self, past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        rows, heads, length, dim = new.shape
        out = new.new_empty(rows, heads, self.past + length, dim)
        for group, start, end in self.spans:
            out[start:end, :, : self.past] = past[group]
        out[:, :, self.past :] = new
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past


@register_model("mobillama")
class MobiLlamaLM(TemplateLM):
    """lm-eval model over a project checkpoint directory (see the module docstring for what it does)."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        **_ignored,
    ) -> None:
        super().__init__()
        compute_dtype = parse_dtype(dtype)
        self.checkpoint = str(pretrained)
        self.tokenizer = load_eval_tokenizer(pretrained)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI defaults to cuda; like its hf backend, run on the CPU when there is none.
            print(f"mobillama: device {device!r} not available, using cpu", file=sys.stderr)
            device = "cpu"
        self._device = torch.device(device or "cpu")
        # A quantized checkpoint is scored as quantized, through the loader generation uses.
        self.model = load_eval_model(pretrained, dtype=compute_dtype, device=self._device)
        self.batch_size_per_gpu = _parse_batch_size(batch_size)
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        # BOS in front of contexts: the tokenizer's own convention (tokenizer_config's add_bos_token, else its
        # post-processor; see mobillama.tokenizer.conventions) unless the caller says otherwise.
        self.add_bos_token = conventions(self.tokenizer).add_bos if add_bos_token is None else add_bos_token
        self._generator = None
        self._bos_text = self.tokenizer.decode(self.prefix_token_id)
        self._encode_cached = functools.lru_cache(maxsize=8192)(self._encode)

    # --- what TemplateLM needs -------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context: BOS (else EOS), as lm-eval's ``hf`` backend does."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **_
    ) -> list[int]:
        """Encode like HFLM: BOS by ``add_bos_token`` (the tokenizer's convention by default) unless the text
        already starts with it; an explicit ``add_special_tokens`` is the tokenizer's own."""
        ids = list(self._encode_cached(string, add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode(self, string: str, add_special_tokens: bool | None) -> tuple[int, ...]:
        # Cached (see __init__): lm-eval encodes each choice's context again, and few-shot contexts are long.
        if add_special_tokens is not None:
            return tuple(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        if (
            self.add_bos_token
            and bos is not None
            and not (self._bos_text and string.startswith(self._bos_text))
        ):
            ids = [bos, *ids]
        return tuple(ids)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring -----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **_
    ) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether greedy decoding would produce it) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pieces: list[tuple[int, list[int], list[int]]] = []  # (request index, context, continuation piece)
        for i, (key, context, continuation) in enumerate(requests):
            if not continuation:
                results[i] = (0.0, True)  # nothing to predict: log 1, trivially greedy
                continue
            if not context:
                raise MobiLlamaError(f"request {key!r}: empty context token list (need at least BOS)")
            pieces.extend((i, ctx, cont) for ctx, cont in self._split_long(list(context), list(continuation)))
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for p, (_, context, continuation) in enumerate(pieces):
            groups.setdefault(tuple(context), []).append((p, continuation))

        ordered = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(c) for _, c in g[1])))
        pbar = tqdm(total=len(pieces), disable=disable_tqdm, desc="mobillama loglikelihood", unit="req")
        piece_scores: list[tuple[float, bool]] = [(0.0, True)] * len(pieces)
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            for index, score in self._score_group_batch(batch):
                piece_scores[index] = score
                pbar.update(1)
        pbar.close()
        for (i, _, _), (logp, greedy) in zip(pieces, piece_scores):
            total, all_greedy = results[i] or (0.0, True)
            results[i] = (total + logp, all_greedy and greedy)
        return results  # type: ignore[return-value]

    def _split_long(self, context: list[int], continuation: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) pieces that each fit the model, left-truncating contexts like HFLM.

        A continuation longer than the model's window (a long PIQA solution on a 256-token model) cannot
        be scored in one pass, and lm-eval's ``hf`` backend then silently mis-slices its logits. Here it is
        scored in chunks of half the window, each conditioned on the tokens just before it, and the
        chunks' log-probs are summed: the same sliding-window approximation as rolling perplexity.
        """
        limit = self.max_length
        if len(continuation) <= limit:
            # Left truncation, identical to HFLM's (context + continuation)[-(max_length + 1):][:-1].
            return [(context[-(limit + 1 - len(continuation)) :], continuation)]
        full, chunk = context + continuation, max(1, limit // 2)
        return [
            (full[:start][-(limit + 1 - len(full[start : start + chunk])) :], full[start : start + chunk])
            for start in range(len(context), len(full), chunk)
        ]

    @torch.inference_mode()
    def _score_group_batch(
        self, batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]
    ) -> Iterable[tuple[int, tuple[float, bool]]]:
        """Prefill each distinct context once (left padded), then run every continuation on a cache copy."""
        contexts = [list(ctx) for ctx, _ in batch]
        ctx_len = max(len(c) for c in contexts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (ctx_len - len(c)) + c for c in contexts], device=self.device)
        mask = torch.tensor([[0] * (ctx_len - len(c)) + [1] * len(c) for c in contexts], device=self.device)
        cache = KVCache()
        hidden = self.model.model(ids, attention_mask=mask if not bool(mask.all()) else None, cache=cache)
        first_logp = F.log_softmax(self.model.lm_head(hidden[:, -1]).float(), dim=-1)  # [G, vocab]

        rows = [(g, index, cont) for g, (_, members) in enumerate(batch) for index, cont in members]
        # Every continuation's first token is scored from its context's last position.
        greedy_first = first_logp.argmax(-1).tolist()
        firsts = {
            index: (float(first_logp[g, cont[0]]), greedy_first[g] == cont[0]) for g, index, cont in rows
        }
        # Longest continuations first, so each chunk pads little; SharedPrefixCache handles any row order.
        multi = sorted((r for r in rows if len(r[2]) > 1), key=lambda r: -len(r[2]))
        for _, index, cont in rows:
            if len(cont) == 1:
                yield index, firsts[index]
        for start in range(0, len(multi), self.batch_size):
            chunk = multi[start : start + self.batch_size]
            for (_, index, _), (logp, greedy) in zip(chunk, self._score_rest(chunk, cache, mask)):
                first, first_greedy = firsts[index]
                yield index, (first + logp, first_greedy and greedy)

    def _score_rest(
        self, chunk: list[tuple[int, int, list[int]]], cache: KVCache, ctx_mask: torch.Tensor
    ) -> list[tuple[float, bool]]:
        """Tokens 2..n of each continuation, fed as cont[:-1] on top of a copy of its context's cache."""
        group_idx = torch.tensor([g for g, _, _ in chunk], device=self.device)
        length = max(len(c) for _, _, c in chunk) - 1
        pad = self.tokenizer.pad_token_id
        inputs = torch.tensor(
            [c[:-1] + [pad] * (length + 1 - len(c)) for _, _, c in chunk], device=self.device
        )
        cont_mask = torch.tensor(
            [[1] * (len(c) - 1) + [0] * (length + 1 - len(c)) for _, _, c in chunk], device=self.device
        )
        rows_cache = SharedPrefixCache(cache, [g for g, _, _ in chunk])
        mask = torch.cat([ctx_mask.index_select(0, group_idx), cont_mask], dim=1)
        hidden = self.model.model(inputs, attention_mask=mask, cache=rows_cache)
        logp = F.log_softmax(self.model.lm_head(hidden).float(), dim=-1)  # [R, length, vocab]
        out = []
        for r, (_, _, cont) in enumerate(chunk):
            target = torch.tensor(cont[1:], device=self.device)
            row = logp[r, : len(target)]
            out.append((float(row.gather(1, target[:, None]).sum()), bool((row.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint max-length windows (lm-eval's window scheme)."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for r, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, scores):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ----------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation per request until a stop string, EOS or ``max_gen_toks``."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        outputs: list[str] = [""] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="mobillama generate", unit="req")
        # Batch only requests with identical generation settings.
        by_kwargs: dict[str, list[int]] = {}
        for i in order:
            by_kwargs.setdefault(repr(sorted(requests[i].args[1].items())), []).append(i)
        for indices in by_kwargs.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if max_new >= self.max_length:
                raise MobiLlamaError(
                    f"max_gen_toks {max_new} must be below the model's maximum length {self.max_length}"
                )
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [
                    self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                    for i in chunk
                ]
                for i, text in zip(chunk, self._generate_greedy(prompts, max_new, until)):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    pbar.update(1)
        pbar.close()
        return outputs

    def _generate_greedy(self, prompts: list[list[int]], max_new_tokens: int, until: list[str]) -> list[str]:
        """Greedy continuations cut at the first stop string, through the project's generation module."""
        if self._generator is None:
            self._generator = Generator(self.model, load_tokenizer(self.checkpoint))
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(s for s in until if s)
        )
        with torch.inference_mode():
            return [c.text for c in self._generator.generate_ids(prompts, params)]
