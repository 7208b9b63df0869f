"""The HTTP layer: routes, request/response schemas, error mapping, auth. No math, no disk."""
