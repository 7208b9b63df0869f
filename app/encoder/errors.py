"""Errors of the encoder layer, each naming the stage that failed and what to do about it."""

from __future__ import annotations


class EncoderLoadError(RuntimeError):
    """Loading a model failed at `stage` (e.g. "resolve", "weights", "tokenizer", "warm-up")."""

    def __init__(self, stage: str, problem: str, hint: str | None = None) -> None:
        self.stage = stage
        self.problem = problem
        self.hint = hint
        message = f"model loading failed at stage '{stage}': {problem}"
        super().__init__(f"{message}. {hint}" if hint else message)
