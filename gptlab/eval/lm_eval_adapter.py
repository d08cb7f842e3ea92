"""gptlab models inside lm-evaluation-harness, without converting them: the harness model "gptlab".

From Python (importing this module registers the name):

    import lm_eval, gptlab.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="gptlab", model_args="pretrained=out/model,dtype=bfloat16",
                            tasks=["hellaswag"], batch_size=32)
    # or with a model already in memory:
    lm_eval.simple_evaluate(model=GptlabLM(model=gpt, tokenizer=tok), tasks=["lambada_openai"])

From the shell, the harness's own CLI with this module imported first:

    python -m gptlab.eval.lm_eval_adapter run --model gptlab --model_args pretrained=out/model --tasks hellaswag

Scoring goes through `gptlab.eval.scorer.Scorer`, which tokenises and truncates as the harness's `hf` model
does, so a task gives the same numbers as `--model hf` on the same checkpoint (tests/test_eval_parity.py).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (registers the harness's own models; the registry loads them only when empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from gptlab.errors import GptlabError
from gptlab.eval.scorer import Scorer


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """An lm-eval model backed by a gptlab `GPT`.

    Args (model_args):
        pretrained: model directory or hub id (or pass `model` and `tokenizer` objects instead)
        dtype: float32 / bfloat16 / float16 (default: the checkpoint's)
        device: cpu / cuda / ... (default: cpu)
        batch_size: continuations per forward pass ("auto" means the default, 16)
        max_length: context used for scoring (default: the model's context length)
        max_gen_toks: default generation budget for generate_until tasks (256, as HFLM)
    """

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, **unused) -> None:
        super().__init__()
        from gptlab.formats import hf
        from gptlab.tokenizer import load_tokenizer

        unused.pop("max_batch_size", None)  # passed by simple_evaluate for every model
        if unused:
            raise GptlabError(f"unknown gptlab model_args: {', '.join(sorted(unused))}")
        if model is None:
            if pretrained is None:
                raise GptlabError("model_args needs pretrained=<model dir> (or pass model= and tokenizer=)")
            model = hf.load(pretrained, dtype=dtype, device=device)
            tokenizer = tokenizer or load_tokenizer(pretrained)
        elif tokenizer is None:
            raise GptlabError("pass tokenizer= along with model=")
        bs = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.scorer = Scorer(model, tokenizer, batch_size=bs, context_length=max_length, progress=False)
        self._max_gen_toks = max_gen_toks

    # ---- what the harness asks of a model ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_id

    @property
    def max_length(self) -> int:
        return self.scorer.context_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def device(self):
        return self.scorer.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = (self.scorer.encode(string) if add_special_tokens is None
               else self.tokenizer.encode(string, add_special_tokens=add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        self.scorer.progress = not disable_tqdm
        results = self.scorer.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests],
                                                   desc="gptlab loglikelihood")
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Disjoint windows of max_length tokens, as HFLM.loglikelihood_rolling; all documents batched."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            reqs = self.scorer.rolling_requests(self.tok_encode(string))
            windows += reqs
            owner += [i] * len(reqs)
        self.scorer.progress = not disable_tqdm
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self.scorer.loglikelihood_tokens(windows, desc="gptlab rolling")):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate per request until a stop string, EOS or max_gen_toks, post-processed as HFLM does."""
        from gptlab.infer.generate import generate_ids

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        bar = tqdm(total=len(requests), desc="gptlab generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)  # lm_eval.models.utils.handle_stop_sequences
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = {"max_new_tokens": max_new, "eos_id": self.eot_token_id}
            if kwargs.pop("do_sample", False) or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                sampling.update(temperature=float(kwargs.get("temperature", 1.0) or 1.0),
                                top_p=kwargs.get("top_p"), top_k=kwargs.get("top_k"), seed=kwargs.get("seed", 1234))
            room = self.max_length - max_new  # HFLM: left-truncate the context to leave room for the answer
            if room < 1:
                raise GptlabError(f"max_gen_toks={max_new} leaves no room in a context of {self.max_length}")
            # longest first, so a batch's prompts have similar lengths
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for b in range(0, len(indices), self.batch_size):
                chunk = indices[b: b + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in chunk]
                for i, ids in zip(chunk, generate_ids(self.model, prompts, **sampling)):
                    text = self.tok_decode(ids)
                    for term in until:
                        if term:  # lm_eval.models.utils.postprocess_generated_text skips empty separators
                            text = text.split(term)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


if __name__ == "__main__":
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
