"""LLM backends behind one small interface: conversations in, answers out, batched.

`OpenAIChat` talks to any OpenAI-compatible endpoint (vLLM, TGI, llama.cpp, `hllm creator
serve-llm`) through the official client, which retries timeouts, 429 and 5xx answers with
exponential back-off; requests run `concurrency` at a time. `LocalChat` generates with
`transformers` in this process (offline default: SmolLM2-135M-Instruct). Both raise `LLMError`
when the model cannot be reached at all; an answer that is empty or malformed is the caller's to
judge, never an exception here.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from hllm.creator_config import LLMConfig
from hllm.errors import UserError

Conversation = list[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": ...}]
RETRY_TEMPERATURE = 0.7
THINKING = re.compile(r"^.*?</think>", re.DOTALL)  # reasoning models put their thoughts first


class LLMError(RuntimeError):
    """The model could not answer at all (unreachable, refused, out of retries); `index` is the
    conversation of the batch that failed, where known."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class ChatModel(Protocol):
    backend: str
    model: str

    def chat(
        self,
        conversations: list[Conversation],
        *,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """One answer per conversation, in order; the keywords override the configured values."""
        ...


def strip_thinking(answer: str) -> str:
    return THINKING.sub("", answer, count=1).strip()


class OpenAIChat:
    """Chat completions from an OpenAI-compatible HTTP endpoint."""

    backend = "openai"

    def __init__(self, config: LLMConfig) -> None:
        import openai

        base_url = config.base_url or os.environ.get("OPENAI_BASE_URL")
        key = os.environ.get(config.api_key_env)
        if not base_url and not key:
            raise UserError(
                f"the openai backend needs base_url (or $OPENAI_BASE_URL) or ${config.api_key_env}",
                where="base_url",
            )
        self.model = config.model
        self.endpoint = base_url or "https://api.openai.com/v1"
        self._config = config
        self._errors = openai
        # A local server accepts any key; the client insists on one.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=key or "none", timeout=config.timeout_s, max_retries=config.max_retries
        )

    def chat(
        self,
        conversations: list[Conversation],
        *,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        chosen = self._config.temperature if temperature is None else temperature
        length = max_new_tokens or self._config.max_new_tokens
        with ThreadPoolExecutor(max_workers=self._config.concurrency) as pool:
            futures = [pool.submit(self._one, c, chosen, length) for c in conversations]
            answers = []
            for index, future in enumerate(futures):
                try:
                    answers.append(future.result())
                except LLMError as error:
                    for pending in futures:
                        pending.cancel()
                    raise LLMError(str(error), index) from None
            return answers

    def _one(self, conversation: Conversation, temperature: float, max_new_tokens: int) -> str:
        errors = self._errors
        try:
            reply = self._client.chat.completions.create(
                model=self.model,
                messages=conversation,
                temperature=temperature,
                max_tokens=max_new_tokens,
            )
        except errors.AuthenticationError:
            raise LLMError(f"{self.endpoint} refused the API key (${self._config.api_key_env})") from None
        except errors.NotFoundError:
            raise LLMError(f"{self.endpoint} has no model {self.model!r} (or no chat endpoint)") from None
        except errors.RateLimitError:
            raise LLMError(
                f"{self.endpoint} kept rate-limiting after {self._config.max_retries} retries"
            ) from None
        except errors.APITimeoutError:
            tries, limit = self._config.max_retries + 1, self._config.timeout_s
            raise LLMError(f"{self.endpoint} timed out after {limit:g} s ({tries} tries)") from None
        except errors.APIConnectionError:
            raise LLMError(
                f"cannot reach {self.endpoint} (after {self._config.max_retries} retries)"
            ) from None
        except errors.APIStatusError as error:
            detail = error.response.text[:200].replace("\n", " ")
            raise LLMError(f"{self.endpoint} answered HTTP {error.status_code}: {detail}") from None
        choices = reply.choices or []
        return strip_thinking(choices[0].message.content or "") if choices else ""


class LocalChat:
    """Batched `transformers` generation in this process (greedy at temperature 0)."""

    backend = "local"

    def __init__(self, config: LLMConfig) -> None:
        from hllm.models.backbone import load_causal_lm

        self.model = config.model
        self._config = config
        self._lm, self._tokenizer = load_causal_lm(config.model)

    @torch.inference_mode()
    def chat(
        self,
        conversations: list[Conversation],
        *,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Greedy at temperature 0; `max_new_tokens` is capped by the configured length."""
        chosen = self._config.temperature if temperature is None else temperature
        length = min(max_new_tokens or self._config.max_new_tokens, self._config.max_new_tokens)
        prompts = [
            self._tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        answers = [""] * len(prompts)
        # Similar lengths share a batch, so left padding wastes little.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        size = self._config.batch_size
        for batch in (order[i : i + size] for i in range(0, len(order), size)):
            encoded = self._tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            )
            sampling = (
                {"do_sample": True, "temperature": chosen, "top_p": 0.95}
                if chosen > 0
                else {"do_sample": False}
            )
            output = self._lm.generate(
                **encoded,
                max_new_tokens=length,
                repetition_penalty=1.1,
                pad_token_id=self._tokenizer.pad_token_id,
                **sampling,
            )
            new = output[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(
                batch, self._tokenizer.batch_decode(new, skip_special_tokens=True), strict=True
            ):
                answers[i] = strip_thinking(text)
        return answers


def open_chat_model(config: LLMConfig) -> ChatModel:
    match config.backend:
        case "openai":
            return OpenAIChat(config)
        case "local":
            return LocalChat(config)
