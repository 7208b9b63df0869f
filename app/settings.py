"""Every setting of the service, in one place (environment variables prefixed `SHOTCACHE_`).

The README's settings table is this class; keep them in sync.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Backend = Literal["auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8"]
MAX_VIEWS = 32  # augmented views per shot a task may ask for


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHOTCACHE_", env_file=None, extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        "auto",
        description="open_clip model name (e.g. ViT-B-32), `local-dir:PATH`, `offline` for the stand-in, "
        "or `auto`: the configured real model if its weights load, else the offline stand-in.",
    )
    pretrained: str = Field("openai", description="open_clip pretrained tag or weights file (named models only).")
    auto_model: str = Field("ViT-B-32", description="The real model `auto` tries first.")
    backend: Backend = Field(
        "auto",
        description="Encoder backend: `torch` (eager fp32), `onnx` (ONNX Runtime fp32), `onnx-int8` (int8 "
        "MatMul weights), `openvino` (OpenVINO at the CPU's default precision, bf16 on AMX) or `openvino-int8` "
        "(NNCF int8 image tower; both need the `openvino` extra); `auto` times the available backends on first "
        "use of a model, keeps the fastest within the fidelity bound and caches the choice. Exports are made on "
        "first start, cached under the data dir's `exports/`; if one fails the service runs torch and logs why.",
    )
    threads: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        description="Threads for torch, ONNX Runtime, FAISS and BLAS each (default: the CPU count).",
    )
    views: int = Field(1, ge=1, le=MAX_VIEWS, description="Default augmented views per support image.")
    text_tower_idle_s: float = Field(
        60,
        ge=0,
        description="An exported backend's text tower (ONNX Runtime, OpenVINO) is closed after this many seconds "
        "without a build, and opened again by the next (~0.2 s): classify never uses it, and it is a large share "
        "of a small model's memory. Closed right after the start's warm-up too. 0 keeps it open.",
    )

    # --- storage -----------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Tasks, the stand-in model and exported backends live here.")
    store: SecretStr | None = Field(
        None,
        description="Where tasks live. Unset: `<data dir>/tasks` on the local disk (one process). A `postgresql://` "
        "URL (libpq syntax, e.g. `postgresql://user@db/shotcache` or `postgresql:///shotcache?host=/socket/dir&port="
        "5432`): one PostgreSQL database shared by every replica (needs the `postgres` extra). The password may be in "
        "the URL or libpq's environment (`PGPASSWORD`, `~/.pgpass`); it never appears in logs, `/v1/info` or errors.",
    )
    task_cache_mb: float = Field(
        1024,
        gt=0,
        description="Memory budget for this process's loaded tasks (MB): past it the least recently used are "
        "unloaded, and loaded again from the store when next asked for. A task counts what it holds: its shots, "
        "text and thumbnails, and the methods fitted so far (a loaded task fits its own method; another is fitted "
        "on its first use and counts from then on).",
    )
    check_freshness: bool = Field(
        False,
        description="Before serving a task, ask the store whether its version moved (another replica wrote it) "
        "and reload it if so. Always on with a PostgreSQL `SHOTCACHE_STORE`; off by default for the local store, which "
        "only this process writes.",
    )

    # --- HTTP --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address `shotcache serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `shotcache serve` binds.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated `tenant:key` pairs; unset means open access (local use).",
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated keys allowed to read every tenant's usage."
    )

    # --- work queue --------------------------------------------------------------------------
    max_batch: int = Field(
        32, ge=1, le=512, description="Images per encoder call (requests are micro-batched up to this many)."
    )
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a batch waits to fill up.")
    fill_wait_cap_ms: float = Field(
        30.0,
        ge=0,
        le=1000,
        description="At most this long (and at most 60% of the last encoder call) a classify batch waits for "
        "the recent concurrency to fill it; 0 turns that wait off. It pays where a fuller encoder call saves "
        "time per image and can cost where it does not (measured per host: docs/benchmarks.md, the fill wait).",
    )
    queue_size: int = Field(256, ge=1, description="Images waiting for the encoder before requests get 429.")
    workers: int = Field(2, ge=1, le=64, description="Threads for CPU work outside the encoder.")
    max_pending_builds: int = Field(
        4, ge=1, le=256, description="Task creates / shot additions running or waiting before new ones get 429."
    )

    # --- input limits ------------------------------------------------------------------------
    max_request_mb: float = Field(50, gt=0, description="Largest request body (MB).")
    max_file_mb: float = Field(10, gt=0, description="Largest single uploaded file (MB).")
    max_create_files: int = Field(512, ge=2, description="Most images in one task create / add-shots request.")
    max_classify_files: int = Field(64, ge=1, description="Most images in one classify request.")
    min_image_side: int = Field(16, ge=1, description="Smallest accepted image side (px).")
    max_image_side: int = Field(12000, ge=16, description="Largest accepted image side (px).")
    max_image_pixels: int = Field(40_000_000, ge=256, description="Largest accepted width x height.")
    max_classes: int = Field(1000, ge=2, description="Most classes in one task.")
    max_top_k: int = Field(100, ge=1, description="Largest `top_k` a classify request may ask for.")

    log_level: str = Field("info", description="Python logging level.")
    access_log: bool = Field(
        False,
        description="Log one line per HTTP request (uvicorn's access log). Off by default: /metrics counts every "
        "request by route and status, and the line cost ~0.1 ms of a 6 ms one-image classify.",
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_table() -> str:
    """The README's settings table, generated from this class so the two cannot drift apart."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "CPU count" if name == "threads" else "(none)"
        elif field.default is None:
            default = "(none)"
        else:
            default = str(field.default)
        lines.append(f"| `SHOTCACHE_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(lines)


def write_readme_table(readme: str) -> str:
    """`readme` with the text between the settings markers replaced by `settings_table()`."""
    begin, end = "<!-- BEGIN settings -->", "<!-- END settings -->"
    head, _, rest = readme.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{settings_table()}\n{end}{tail}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-readme"]:
        readme = Path("README.md")
        readme.write_text(write_readme_table(readme.read_text()))
    else:
        print(settings_table())
