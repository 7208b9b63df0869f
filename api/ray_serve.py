"""`shotcache serve --engine ray`: the service's replicas under Ray Serve (extra `ray`).

Three deployments:

- `shotcache-encoder` (api/ray_encoder.py): the model, once per encoder replica, un-multiplexed, with
  `@serve.batch`: image (and class-prompt) batches from every task replica, so from requests of
  different tasks, are encoded together.
- `shotcache-replica` (N of them, `--replicas`): each runs the HTTP layer's own FastAPI app, built by its
  own factory with its lifespan (the store, the core's queue and admission), and answers requests
  in-process through it: routes, validation, auth and errors are exactly those of `shotcache serve`.
  Its encoder backend is the encoder deployment (a handle): it loads no model of its own (with
  `encoder: false` in the builder's args each replica loads its own, as before). Replicas share task
  state only through the store (`SHOTCACHE_STORE` must be a PostgreSQL URL: a local directory belongs to
  one process). `@serve.multiplexed` by task id gives task affinity: requests for a task go to a
  replica that has served it, so its task cache stays warm; the per-replica task count comes from the
  memory budget (`SHOTCACHE_TASK_CACHE_MB`). Correctness never depends on it: every replica checks the
  task's live version in the store on each request.
- `shotcache` (the ingress, behind Ray's HTTP proxy): forwards each HTTP request to a replica, with the
  task id from the URL as the multiplexed model id. If the replica dies under a request (node lost,
  SIGKILL, OOM), an idempotent request (GET, HEAD, classify) is sent again to another replica, so the
  client sees no failure; a create / add-shots / delete whose replica died may or may not have been
  applied and answers 503 `replica_lost` (the client checks the task, then retries).

Settings reach the replicas as constructor arguments (this process's SHOTCACHE_ variables plus the
command line's), never as a runtime_env, which Ray shows in its dashboard and logs: the store URL may
hold a password. This module imports ray; nothing in the default service imports this module.
`app_builder` is the import path for `serve deploy` (deploy/ray/serve-config.yaml).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.settings import Settings

from .ray_encoder import EncoderBatching, EncoderDeployment, ModelDescription, remote_encoders

log = logging.getLogger(__name__)

APP_FACTORY = "api.main:create_app"  # imported on the replica, not in the driver
INGRESS = "shotcache"
REPLICA = "shotcache-replica"
# Ray's multiplexing counts tasks, the service's cache counts bytes: this is the size we assume per task
# to turn the budget into a count (a 100-class x 16-shot stand-in task is ~9 MB of keys and text).
ASSUMED_TASK_MB = 8
_TASK_PATH = re.compile(r"^/v1/tasks/([A-Za-z0-9_-]{1,64})(?:/|$)")
_IDEMPOTENT_POST = re.compile(r"^/v1/tasks/[^/]+/classify$")
_REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)
_ATTEMPTS = 3
REPLICA_HEADER = "x-shotcache-replica"
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "host"}


def _tasks_per_replica() -> int:
    return max(1, int(Settings().task_cache_mb // ASSUMED_TASK_MB))


@serve.deployment(
    name=REPLICA,
    ray_actor_options={"num_cpus": 1},  # its encoder and cache math run on SHOTCACHE_THREADS threads
    max_ongoing_requests=32,  # the service's own admission (429 + Retry-After) still applies inside
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=60,  # a replica being stopped finishes what it has first
    health_check_period_s=5,
    health_check_timeout_s=30,
)
class ShotcacheReplica:
    """One replica: this process's environment set from `env`, then the HTTP layer's app, in-process."""

    # Ray awaits an async constructor (the store opens in the lifespan).
    async def __init__(self, env: Mapping[str, str], encoder: Any = None) -> None:  # type: ignore[misc]
        os.environ.update(env)
        self.replica = serve.get_replica_context().replica_tag
        module, _, name = APP_FACTORY.partition(":")
        create_app = getattr(importlib.import_module(module), name)
        if encoder is None:  # this replica loads its own model
            self.app = create_app()
        else:
            description: ModelDescription = await encoder.describe.remote()
            self.app = create_app(encoders=remote_encoders(encoder, description, self.replica))
        self._lifespan: AbstractAsyncContextManager[Any] = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model and opens the store, as uvicorn's startup would
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://replica", timeout=None
        )

    @serve.multiplexed(max_num_models_per_replica=_tasks_per_replica())
    async def _task_affinity(self, task_id: str) -> str:
        # Nothing to load: the service's task cache loads on demand. Registering the id is what makes
        # Serve route the next request for this task here.
        return task_id

    async def handle(
        self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        task_id = serve.get_multiplexed_model_id()
        if task_id:
            await self._task_affinity(task_id)
        url = f"{path}?{query.decode('latin-1')}" if query else path
        response = await self._client.request(method, url, headers=headers, content=body)
        out_headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _HOP_HEADERS]
        out_headers.append((REPLICA_HEADER, self.replica))  # which replica answered (tests, debugging)
        return response.status_code, out_headers, response.content

    def check_health(self) -> None:
        # Alive = healthy. Readiness (model warm, store reachable) is /readyz's answer: restarting every
        # replica during a database outage would only add a model reload to the outage.
        return None


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)  # forwards only
class ShotcacheIngress:
    """Forwards HTTP requests to replicas, by task id; resends idempotent ones when a replica dies."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        match = _TASK_PATH.match(path)
        handle = self.replicas.options(multiplexed_model_id=match.group(1)) if match else self.replicas
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        idempotent = request.method in ("GET", "HEAD") or (
            request.method == "POST" and _IDEMPOTENT_POST.match(path) is not None
        )
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                status, out_headers, content = await handle.handle.remote(
                    request.method, path, request.url.query.encode("latin-1"), headers, body
                )
            except _REPLICA_LOST as error:
                if idempotent and attempt < _ATTEMPTS:
                    log.warning("replica lost during %s %s (%s); resending", request.method, path, type(error).__name__)
                    continue
                return JSONResponse(
                    {
                        "error": {
                            "code": "replica_lost",
                            "message": "the replica handling this request stopped before it answered; the "
                            "change may or may not have been applied: read the task, then retry",
                        }
                    },
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            response = Response(content=content, status_code=status)
            for key, value in out_headers:
                response.headers.append(key, value)
            return response
        raise AssertionError("unreachable")  # pragma: no cover


def replica_env(overrides: Mapping[str, object] | None = None) -> dict[str, str]:
    """The SHOTCACHE_ variables a replica gets: this process's, then the command line's on top."""
    env = {key: value for key, value in os.environ.items() if key.startswith("SHOTCACHE_")}
    env.update({f"SHOTCACHE_{name.upper()}": str(value) for name, value in (overrides or {}).items()})
    return env


def app_builder(args: Mapping[str, Any]) -> Application:
    """The Serve application (also the `import_path` of a `serve deploy` config).

    `args`: `replicas` (a fixed count, default 2) or `autoscaling` (a Serve autoscaling_config dict) for
    the task replicas; `encoder`: the encoder deployment's `max_batch_size` / `batch_wait_timeout_s`
    (`@serve.batch`) and `replicas` or `autoscaling` (default: 1 replica), or `false` for replicas that
    each load their own model; optionally `env` (SHOTCACHE_ variables; default: this process's).
    """
    env = dict(args.get("env") or replica_env())
    if not env.get("SHOTCACHE_STORE", "").startswith(("postgresql://", "postgres://")):
        raise ValueError(
            "the ray engine needs a shared task store: set SHOTCACHE_STORE to a postgresql:// URL "
            "(a local task directory belongs to one process)"
        )
    replica: Any = ShotcacheReplica  # a Serve Deployment (mypy sees the class the decorator wraps)
    ingress: Any = ShotcacheIngress
    autoscaling = args.get("autoscaling")
    if autoscaling:
        replicas = replica.options(autoscaling_config=dict(autoscaling))
    else:
        replicas = replica.options(num_replicas=int(args.get("replicas", 2)))
    encoder_args = args.get("encoder", {})
    application: Application
    if encoder_args is False:
        application = ingress.bind(replicas.bind(env))
        return application
    encoder: Any = EncoderDeployment
    encoder_args = dict(encoder_args or {})
    if encoder_args.get("autoscaling"):
        encoders = encoder.options(autoscaling_config=dict(encoder_args["autoscaling"]))
    else:
        encoders = encoder.options(num_replicas=int(encoder_args.get("replicas", 1)))
    application = ingress.bind(replicas.bind(env, encoders.bind(env, EncoderBatching.from_args(encoder_args))))
    return application


def serve_with_ray(settings: Settings, overrides: Mapping[str, object], replicas: int) -> None:
    """Start a local Ray instance, Serve's proxy on settings.host:port, and `replicas` replicas; block."""
    import ray

    # Logical CPUs: one per task replica and one for the encoder deployment (the ingress takes none).
    ray.init(num_cpus=max(replicas + 2, os.cpu_count() or 1), include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    application = app_builder({"replicas": replicas, "env": replica_env(overrides)})
    log.info("ray engine: %d replica(s) behind http://%s:%d", replicas, settings.host, settings.port)
    serve.run(application, name=INGRESS, route_prefix="/", blocking=True)
