"""Fault injection helpers for reliability tests (a fault-injecting Redis proxy)."""

from tests.faults.redis_proxy import (
    ANY,
    Action,
    Injection,
    Match,
    RedisFaultProxy,
    Rule,
    after_forward_close,
    close,
    command,
    delay,
    error,
    hang,
    key_prefix,
    nil,
    reply,
    script,
)

__all__ = [
    "ANY",
    "Action",
    "Injection",
    "Match",
    "RedisFaultProxy",
    "Rule",
    "after_forward_close",
    "close",
    "command",
    "delay",
    "error",
    "hang",
    "key_prefix",
    "nil",
    "reply",
    "script",
]
