from tests.stores.fixtures import postgres, postgres_url

__all__ = ["postgres", "postgres_url"]
