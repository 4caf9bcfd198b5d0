"""Built-in services, by the names ``--service`` accepts."""

from __future__ import annotations

import importlib

from ..errors import ConfigurationError
from ..node.service import Service
from .echo import Echo, Relay
from .simpledb import SimpleDB

__all__ = ["BUILTIN", "Echo", "Relay", "SimpleDB", "load_service_class"]

BUILTIN: dict[str, type[Service]] = {"echo": Echo, "relay": Relay, "simpledb": SimpleDB}


def load_service_class(spec: str) -> type[Service]:
    """A built-in name (``echo``) or ``package.module:Class``; ConfigurationError if neither."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigurationError(
            f"unknown service {spec!r}: use a built-in ({known}) or package.module:Class"
        )
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except ImportError as e:
        raise ConfigurationError(f"cannot import service {spec!r}: {e}") from None
    except AttributeError:
        raise ConfigurationError(f"module {module_name} has no {attr!r}") from None
    if not callable(cls):
        raise ConfigurationError(f"service {spec!r} is not a class")
    return cls  # type: ignore[no-any-return]
