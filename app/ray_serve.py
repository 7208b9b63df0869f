"""`shotcache serve --engine ray`: N replicas of the same FastAPI app under Ray Serve (extra `ray`).

Each replica is a Serve deployment replica whose ASGI app is built on the replica by the HTTP layer's
own factory (`serve.ingress` with `__serve_build_asgi_app__`), so routes, validation, auth, errors and
the app's lifespan (model load, warm-up) are exactly those of `shotcache serve`. Replicas share task
state only through the store: `SHOTCACHE_STORE` must be a PostgreSQL URL (a local directory belongs to
one process). Ray's HTTP proxy spreads requests over the replicas; the controller replaces a replica
that dies, and the proxy stops routing to it.

Settings reach the replicas as constructor arguments (the SHOTCACHE_ variables of this process plus the
command line's), never as a runtime_env, which Ray shows in its dashboard and logs: the store URL may
hold a password.

This module imports ray; nothing in the default service imports this module.
For `serve deploy`/`serve run` with a config file, `app_builder` is the import path
(docs/ray.md has a config with autoscaling).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from app.settings import Settings

log = logging.getLogger(__name__)

APP_FACTORY = "api.main:create_app"  # named, not imported: app/ sits below the HTTP layer
DEPLOYMENT = "shotcache"


@serve.deployment(
    name=DEPLOYMENT,
    # One CPU per replica: a replica runs its encoder and cache math on SHOTCACHE_THREADS threads.
    ray_actor_options={"num_cpus": 1},
    # Requests a replica takes at once before the proxy routes elsewhere (its own admission still applies).
    max_ongoing_requests=32,
    # A stopped replica (scale-down, redeploy) finishes what it has before it goes.
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=60,
    health_check_period_s=5,
    health_check_timeout_s=30,
)
@serve.ingress()
class ShotcacheReplica:
    """One replica: this process's environment set from `env`, then the HTTP layer's app."""

    def __init__(self, env: Mapping[str, str]) -> None:
        os.environ.update(env)

    def __serve_build_asgi_app__(self) -> Any:
        module, _, name = APP_FACTORY.partition(":")
        return getattr(importlib.import_module(module), name)()


def replica_env(overrides: Mapping[str, object] | None = None) -> dict[str, str]:
    """The SHOTCACHE_ variables a replica gets: this process's, then the command line's on top."""
    env = {key: value for key, value in os.environ.items() if key.startswith("SHOTCACHE_")}
    env.update({f"SHOTCACHE_{name.upper()}": str(value) for name, value in (overrides or {}).items()})
    return env


def app_builder(args: Mapping[str, Any]) -> Application:
    """The Serve application (also the `import_path` of a `serve deploy` config).

    `args`: `replicas` (a fixed count, default 2) or `autoscaling` (a Serve autoscaling_config dict), and
    optionally `env` (SHOTCACHE_ variables; default: this process's).
    """
    env = dict(args.get("env") or replica_env())
    store = env.get("SHOTCACHE_STORE", "")
    if not store.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            "the ray engine needs a shared task store: set SHOTCACHE_STORE to a postgresql:// URL "
            "(a local task directory belongs to one process)"
        )
    autoscaling = args.get("autoscaling")
    replica: Any = ShotcacheReplica  # a Serve Deployment (mypy sees the class the decorators wrap)
    if autoscaling:
        deployment = replica.options(autoscaling_config=dict(autoscaling))
    else:
        deployment = replica.options(num_replicas=int(args.get("replicas", 2)))
    return deployment.bind(env)


def serve_with_ray(settings: Settings, overrides: Mapping[str, object], replicas: int) -> None:
    """Start a local Ray instance, Serve's proxy on settings.host:port, and `replicas` replicas; block."""
    import ray

    ray.init(num_cpus=max(replicas, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    application = app_builder({"replicas": replicas, "env": replica_env(overrides)})
    log.info("ray engine: %d replica(s) behind http://%s:%d", replicas, settings.host, settings.port)
    serve.run(application, name=DEPLOYMENT, route_prefix="/", blocking=True)
