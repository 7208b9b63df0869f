"""Class text weights: prompt templates (a named default set per model) plus per-class prompts.

A class's weight is the mean of the L2-normalised embeddings of all its prompts, re-normalised
(methods.md). Templates hold one `{}` that the class name replaces; a class may add its own full
sentences (descriptions such as "a thin dark line across woven fabric"), or use only those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .resources import read_config

PLACEHOLDER = "{}"
MAX_PROMPT_CHARS = 300
MAX_PROMPTS_PER_CLASS = 64


@dataclass(frozen=True)
class ClassPrompts:
    """One class: its name and optional extra prompts; `templates=False` uses only the extra prompts."""

    name: str
    prompts: tuple[str, ...] = field(default_factory=tuple)
    templates: bool = True

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("a class name must not be empty")
        if len(self.prompts) > MAX_PROMPTS_PER_CLASS:
            raise ValueError(f"class {self.name!r}: at most {MAX_PROMPTS_PER_CLASS} prompts, got {len(self.prompts)}")
        for prompt in self.prompts:
            if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"class {self.name!r}: prompts must be 1-{MAX_PROMPT_CHARS} characters")
        if not self.templates and not self.prompts:
            raise ValueError(f"class {self.name!r}: without templates it needs its own prompts")


def template_set(name: str) -> list[str]:
    sets = {k: v for k, v in read_config("templates.json").items() if not k.startswith("_")}
    if name not in sets:
        raise ValueError(f"unknown template set {name!r}; known: {', '.join(sorted(sets))}")
    return list(sets[name])


def check_templates(templates: Sequence[str]) -> list[str]:
    """Templates as given, each with exactly one `{}` and no other braces; ValueError otherwise."""
    out = []
    if not templates:
        raise ValueError("templates must not be empty")
    for template in templates:
        if template.count(PLACEHOLDER) != 1 or template.replace(PLACEHOLDER, "").count("{") + template.replace(
            PLACEHOLDER, ""
        ).count("}"):
            raise ValueError(f"template {template!r} must contain exactly one {{}} and no other braces")
        if len(template) > MAX_PROMPT_CHARS:
            raise ValueError(f"template {template[:40]!r}... is longer than {MAX_PROMPT_CHARS} characters")
        out.append(template)
    return out


def class_prompt_texts(cls: ClassPrompts, templates: Sequence[str]) -> list[str]:
    """Every prompt of one class: the templates filled with its name, then its own prompts."""
    filled = [t.replace(PLACEHOLDER, cls.name) for t in templates] if cls.templates else []
    return filled + list(cls.prompts)
