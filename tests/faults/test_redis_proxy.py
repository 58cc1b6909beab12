"""The fault-injecting Redis proxy against the real redis-server on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.retry import Retry

from tests.conftest import REDIS_URL, delete_prefix
from tests.faults.redis_proxy import (
    RedisFaultProxy,
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

UPSTREAM = ("127.0.0.1", 6379)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


@pytest.fixture
def proxy() -> Iterator[RedisFaultProxy]:
    with RedisFaultProxy(upstream=UPSTREAM) as p:
        yield p
    assert not p.errors, p.errors


@pytest.fixture
def direct() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def prefix(direct: redis.Redis) -> Iterator[str]:
    value = f"test-proxy-{uuid.uuid4().hex[:10]}"
    yield value
    delete_prefix(direct, value)


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    """redis-py 8 speaks RESP3 (HELLO 3) unless told ``protocol=2``: test both."""
    return int(request.param)


@pytest.fixture
def make_client(proxy: RedisFaultProxy, protocol: int) -> Iterator[Callable[..., redis.Redis]]:
    """redis-py clients through the proxy; no retries unless asked for."""
    clients: list[redis.Redis] = []

    def make(*, retries: int = 0, db: int = 0, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 10)
        kwargs.setdefault("protocol", protocol)
        client = redis.Redis.from_url(
            proxy.url_for(db=db), retry=Retry(NoBackoff(), retries), **kwargs
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def r(make_client: Callable[..., redis.Redis]) -> redis.Redis:
    return make_client()


def raw_session(proxy: RedisFaultProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=5)
    return sock


def read_exactly(sock: socket.socket, expected: bytes) -> bytes:
    data = b""
    while len(data) < len(expected):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- pass-through


def test_url_keeps_db_and_host(proxy: RedisFaultProxy, direct: redis.Redis, prefix: str) -> None:
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    assert proxy.url_for(db=5).endswith(f":{proxy.port}/5")
    assert proxy.url_for(db=2, password="pw") == f"redis://:pw@127.0.0.1:{proxy.port}/2"
    assert proxy.url_like("redis://u:p@10.0.0.1:6380/7?x=1") == (
        f"redis://u:p@127.0.0.1:{proxy.port}/7?x=1"
    )
    other = redis.Redis.from_url(proxy.url_for(db=3))
    direct3 = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/3")
    try:
        other.set(f"{prefix}:db3", "x")
        assert direct3.get(f"{prefix}:db3") == b"x"
        assert direct.get(f"{prefix}:db3") is None
    finally:
        direct3.delete(f"{prefix}:db3")
        other.close()
        direct3.close()


def test_passthrough_commands_pipelines_transactions(
    proxy: RedisFaultProxy, r: redis.Redis, prefix: str
) -> None:
    assert r.ping()
    assert r.set(f"{prefix}:a", "1")
    assert r.get(f"{prefix}:a") == b"1"
    assert r.get(f"{prefix}:missing") is None
    assert r.incr(f"{prefix}:n", 5) == 5
    assert r.hset(f"{prefix}:h", mapping={"x": "1", "y": "2"}) == 2
    assert r.hmget(f"{prefix}:h", ["x", "nope", "y"]) == [b"1", None, b"2"]

    pipe = r.pipeline(transaction=False)
    for i in range(300):
        pipe.set(f"{prefix}:p{i}", i)
        pipe.get(f"{prefix}:p{i}")
    results = pipe.execute()
    assert results == [x for i in range(300) for x in (True, str(i).encode())]

    with r.pipeline(transaction=True) as tx:  # MULTI ... EXEC
        tx.incr(f"{prefix}:tx").incr(f"{prefix}:tx").get(f"{prefix}:tx")
        assert tx.execute() == [1, 2, b"2"]

    def bump(t: redis.client.Pipeline) -> None:  # WATCH / MULTI / EXEC
        value = int(t.get(f"{prefix}:tx") or 0)
        t.multi()
        t.set(f"{prefix}:tx", value + 10)

    r.transaction(bump, f"{prefix}:tx")
    assert r.get(f"{prefix}:tx") == b"12"
    assert proxy.calls("MULTI") == 2 and proxy.calls("EXEC") == 2
    assert proxy.calls("SET") >= 301
    assert proxy.calls(key_prefix(f"{prefix}:p1")) == 2 * 111  # p1, p10-p19, p100-p199


def test_passthrough_large_and_nested_replies(r: redis.Redis, prefix: str) -> None:
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB with every byte value, CRLFs included
    r.set(f"{prefix}:big", big)
    assert r.get(f"{prefix}:big") == big
    r.rpush(f"{prefix}:list", *range(20_000))
    assert r.lrange(f"{prefix}:list", 0, -1) == [str(i).encode() for i in range(20_000)]
    nested = r.eval("return {1, {2, {3, 'x'}, {}}, 'y', {err='oops'}}", 0)
    assert nested[:3] == [1, [2, [3, b"x"], []], b"y"]
    assert isinstance(nested[3], ResponseError)
    r.xadd(f"{prefix}:stream", {"f": "v"}, id="1-1")
    assert r.xrange(f"{prefix}:stream") == [(b"1-1", {b"f": b"v"})]
    r.zadd(f"{prefix}:z", {"a": 1.5})
    assert [tuple(x) for x in r.zrange(f"{prefix}:z", 0, -1, withscores=True)] == [(b"a", 1.5)]
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        r.get(f"{prefix}:list")


def test_passthrough_scripts(proxy: RedisFaultProxy, r: redis.Redis, prefix: str) -> None:
    # a script Redis has never seen: EVALSHA -> NOSCRIPT -> SCRIPT LOAD -> EVALSHA
    source = f"-- {prefix}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    incr = r.register_script(source)
    assert incr(keys=[f"{prefix}:s"], args=[3]) == 3
    assert incr(keys=[f"{prefix}:s"], args=[4]) == 7
    assert proxy.calls(script(source)) == 3  # the NOSCRIPT one, then two runs
    assert proxy.calls("SCRIPT") == 1
    pipe = r.pipeline()
    incr(keys=[f"{prefix}:s"], args=[1], client=pipe)
    incr(keys=[f"{prefix}:s"], args=[1], client=pipe)
    assert pipe.execute() == [8, 9]


def test_blocking_commands_wait_for_their_reply(
    make_client: Callable[..., redis.Redis], direct: redis.Redis, prefix: str
) -> None:
    r = make_client()
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(r.brpop([f"{prefix}:q"], timeout=10)))
    thread.start()
    wait_until(lambda: any(c.get("cmd") == "brpop" for c in direct.client_list()), what="BRPOP")
    direct.lpush(f"{prefix}:q", "job")
    thread.join(10)
    assert [tuple(x) for x in out] == [(f"{prefix}:q".encode(), b"job")]
    assert r.brpop([f"{prefix}:q"], timeout=0.1) is None  # timeout -> nil array


def test_inline_commands(proxy: RedisFaultProxy) -> None:
    with raw_session(proxy) as sock:
        sock.sendall(b"PING\r\n\r\nECHO hello\r\n")
        assert read_exactly(sock, b"+PONG\r\n$5\r\nhello\r\n") == b"+PONG\r\n$5\r\nhello\r\n"
        proxy.add_rule("ECHO", error("ERR injected"))
        sock.sendall(b"echo again\r\nPING\r\n")
        assert read_exactly(sock, b"-ERR injected\r\n+PONG\r\n") == b"-ERR injected\r\n+PONG\r\n"
    assert proxy.calls("ECHO") == 2


def test_asyncio_client(proxy: RedisFaultProxy, prefix: str) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(
            proxy.url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0)
        )
        try:
            await client.set(f"{prefix}:a", "1")
            assert await client.get(f"{prefix}:a") == b"1"
            pipe = client.pipeline(transaction=True)
            pipe.incr(f"{prefix}:n").incr(f"{prefix}:n")
            assert await pipe.execute() == [1, 2]
            lua = f"-- {prefix}\nreturn redis.call('GET', KEYS[1])"
            get = client.register_script(lua)
            assert await get(keys=[f"{prefix}:a"]) == b"1"

            proxy.add_rule(script(lua), error("NOPERM this user has no permissions"))
            with pytest.raises(NoPermissionError):
                await get(keys=[f"{prefix}:a"])
            proxy.add_rule("GET", close())
            with pytest.raises(redis.exceptions.ConnectionError):
                await client.get(f"{prefix}:a")
            assert await client.get(f"{prefix}:a") == b"1"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_resp3_passthrough(proxy: RedisFaultProxy, direct: redis.Redis, prefix: str) -> None:
    client = redis.Redis.from_url(proxy.url, protocol=3)
    try:
        client.hset(f"{prefix}:h", mapping={"a": "1"})
        assert client.hgetall(f"{prefix}:h") == {b"a": b"1"}  # a RESP3 map
        client.sadd(f"{prefix}:set", "x", "y")
        assert client.smembers(f"{prefix}:set") == {b"x", b"y"}  # a RESP3 set
        client.zadd(f"{prefix}:z", {"m": 2.5})
        assert client.zscore(f"{prefix}:z", "m") == 2.5  # a RESP3 double
        proxy.add_rule("HGETALL", error("READONLY You can't write against a read only replica."))
        with pytest.raises(ReadOnlyError):
            client.hgetall(f"{prefix}:h")

        pubsub = client.pubsub()
        pubsub.subscribe(f"{prefix}:chan")
        first = wait_until(lambda: pubsub.get_message(timeout=0.1), what="subscribe")
        assert first["type"] == "subscribe"
        direct.publish(f"{prefix}:chan", "over resp3")
        message = wait_until(lambda: pubsub.get_message(timeout=0.1), what="message")
        assert message["data"] == b"over resp3"
        pubsub.close()
    finally:
        client.close()
    assert proxy.calls("HELLO") >= 1


# --------------------------------------------------------------------------- pub/sub


def test_pubsub_through_the_proxy(
    proxy: RedisFaultProxy, r: redis.Redis, direct: redis.Redis, prefix: str
) -> None:
    pubsub = r.pubsub()
    pubsub.subscribe(f"{prefix}:chan")
    pubsub.psubscribe(f"{prefix}:pat.*")
    kinds = set()
    while len(kinds) < 2:
        message = wait_until(lambda: pubsub.get_message(timeout=0.1), what="subscriptions")
        kinds.add(message["type"])
    assert kinds == {"subscribe", "psubscribe"}

    r.publish(f"{prefix}:chan", "one")  # PUBLISH through the proxy too
    direct.publish(f"{prefix}:pat.x", "two")
    got = [wait_until(lambda: pubsub.get_message(timeout=0.1), what="message") for _ in "12"]
    assert [(m["type"], m["data"]) for m in got] == [("message", b"one"), ("pmessage", b"two")]

    pubsub.ping("hi")  # PING in subscribe mode: an in-band reply among the pushes
    direct.publish(f"{prefix}:chan", "three")  # may reach Redis before the PING does
    got = [wait_until(lambda: pubsub.get_message(timeout=0.1), what="pong") for _ in "12"]
    assert {(m["type"], m["data"]) for m in got} == {("pong", b"hi"), ("message", b"three")}

    proxy.add_rule("PUBLISH", error("OOM command not allowed when used memory > 'maxmemory'."))
    with pytest.raises(OutOfMemoryError):
        r.publish(f"{prefix}:chan", "lost")
    pubsub.unsubscribe()
    pubsub.punsubscribe()
    pubsub.close()


def test_leaving_subscribe_mode_pairs_replies_again(
    proxy: RedisFaultProxy, direct: redis.Redis, prefix: str
) -> None:
    chan = f"{prefix}:c".encode()
    with raw_session(proxy) as sock:
        sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(chan), chan))
        sub = b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(chan), chan)
        assert read_exactly(sock, sub) == sub
        wait_until(lambda: direct.publish(chan, "m") == 1, what="subscriber")
        msg = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$1\r\nm\r\n" % (len(chan), chan)
        assert read_exactly(sock, msg) == msg
        proxy.add_rule("ECHO", error("ERR injected"))
        sock.sendall(b"UNSUBSCRIBE\r\nECHO x\r\nECHO y\r\n")
        unsub = b"*3\r\n$11\r\nunsubscribe\r\n$%d\r\n%s\r\n:0\r\n" % (len(chan), chan)
        expected = unsub + b"-ERR injected\r\n$1\r\ny\r\n"
        assert read_exactly(sock, expected) == expected


# --------------------------------------------------------------------------- actions


@pytest.mark.parametrize(
    ("message", "exc"),
    [
        ("NOPERM this user has no permissions to run the 'evalsha' command", NoPermissionError),
        ("READONLY You can't write against a read only replica.", ReadOnlyError),
        ("OOM command not allowed when used memory > 'maxmemory'.", OutOfMemoryError),
        ("ERR Error running script (call to f_0123): @user_script:1: boom", ResponseError),
        ("LOADING Redis is loading the dataset in memory", BusyLoadingError),
        ("BUSY Redis is busy running a script", ResponseError),
    ],
)
def test_error_actions(
    proxy: RedisFaultProxy, r: redis.Redis, prefix: str, message: str, exc: type[Exception]
) -> None:
    r.set(f"{prefix}:k", "v")
    rule = proxy.add_rule("GET", error(message))
    with pytest.raises(exc) as info:
        r.get(f"{prefix}:k")
    assert str(info.value) in message
    assert rule.fired == 1 and rule.done
    assert r.get(f"{prefix}:k") == b"v"  # only the first


def test_reply_and_nil_actions(proxy: RedisFaultProxy, r: redis.Redis, prefix: str) -> None:
    r.set(f"{prefix}:k", "v")
    proxy.add_rule("GET", nil())  # $-1 or _ as the connection speaks
    proxy.add_rule("INCRBY", reply(b":41\r\n"))
    assert r.get(f"{prefix}:k") is None
    assert r.incr(f"{prefix}:n") == 41
    assert r.get(f"{prefix}:k") == b"v"
    assert r.get(f"{prefix}:n") is None


def test_close_is_a_connection_error(
    proxy: RedisFaultProxy, make_client: Callable[..., redis.Redis], prefix: str
) -> None:
    r = make_client()
    rule = proxy.add_rule("INCRBY", close())
    with pytest.raises(redis.exceptions.ConnectionError):
        r.incr(f"{prefix}:n")
    assert r.get(f"{prefix}:n") is None  # not forwarded
    assert rule.fired == 1

    retrying = make_client(retries=1)  # redis-py retries on a new connection
    rule = proxy.add_rule("INCRBY", close())
    assert retrying.incr(f"{prefix}:n") == 1
    assert rule.fired == 1 and proxy.calls("INCRBY") == 3


def test_hang_times_out_and_never_reaches_redis(
    proxy: RedisFaultProxy,
    make_client: Callable[..., redis.Redis],
    direct: redis.Redis,
    prefix: str,
) -> None:
    r = make_client(socket_timeout=0.3)
    assert r.ping()
    rule = proxy.add_rule("INCRBY", hang(), count=None)
    with pytest.raises(redis.exceptions.TimeoutError):
        r.incr(f"{prefix}:n")
    r.connection_pool.disconnect()
    proxy.wait_connections(0)  # the proxy noticed the client hang up
    proxy.clear()
    assert direct.get(f"{prefix}:n") is None
    assert rule.fired == 1
    assert r.incr(f"{prefix}:n") == 1  # rule gone


def test_hang_until_cleared_then_forwards(
    proxy: RedisFaultProxy, make_client: Callable[..., redis.Redis], prefix: str
) -> None:
    r = make_client()
    rule = proxy.add_rule("INCRBY", hang())
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(r.incr(f"{prefix}:n")))
    thread.start()
    rule.wait_fired()
    assert out == []
    proxy.clear()
    thread.join(10)
    assert out == [1]


def test_hang_after_forward_runs_the_command_and_times_out(
    proxy: RedisFaultProxy,
    make_client: Callable[..., redis.Redis],
    direct: redis.Redis,
    prefix: str,
) -> None:
    r = make_client(socket_timeout=0.3)
    proxy.add_rule("INCRBY", hang(after_forward=True))
    with pytest.raises(redis.exceptions.TimeoutError):
        r.incr(f"{prefix}:n")
    wait_until(lambda: direct.get(f"{prefix}:n") == b"1", what="INCR applied")
    assert r.incr(f"{prefix}:n") == 2  # a fresh connection; the rule fired once


def test_hang_window_ends_by_itself(
    proxy: RedisFaultProxy, make_client: Callable[..., redis.Redis], prefix: str
) -> None:
    r = make_client()
    started = time.monotonic()
    rule = proxy.add_rule("INCRBY", hang(), for_seconds=0.3)
    assert r.incr(f"{prefix}:n") == 1  # held until the window closed, then forwarded
    assert time.monotonic() - started >= 0.25
    assert rule.fired == 1 and rule.done


def test_after_forward_close_runs_once_but_the_reply_is_lost(
    proxy: RedisFaultProxy,
    make_client: Callable[..., redis.Redis],
    direct: redis.Redis,
    prefix: str,
) -> None:
    r = make_client()
    rule = proxy.add_rule("INCRBY", after_forward_close())
    with pytest.raises(redis.exceptions.ConnectionError):
        r.incr(f"{prefix}:n")
    assert direct.get(f"{prefix}:n") == b"1"
    assert rule.fired == 1

    # a client that retries blindly applies a non-idempotent command twice
    retrying = make_client(retries=1)
    proxy.add_rule("INCRBY", after_forward_close())
    assert retrying.incr(f"{prefix}:n") == 3
    assert direct.get(f"{prefix}:n") == b"3"


def test_after_forward_close_on_a_registered_script(
    proxy: RedisFaultProxy,
    make_client: Callable[..., redis.Redis],
    direct: redis.Redis,
    prefix: str,
) -> None:
    r = make_client()
    source = f"-- {prefix}\nreturn redis.call('RPUSH', KEYS[1], ARGV[1])"
    push = r.register_script(source)
    assert push(keys=[f"{prefix}:l"], args=["a"]) == 1  # loads the script
    rule = proxy.add_rule(script(source), after_forward_close())
    with pytest.raises(redis.exceptions.ConnectionError):
        push(keys=[f"{prefix}:l"], args=["b"])
    assert direct.lrange(f"{prefix}:l", 0, -1) == [b"a", b"b"]
    assert rule.fired == 1
    assert push(keys=[f"{prefix}:l"], args=["c"]) == 3


def test_delay(proxy: RedisFaultProxy, r: redis.Redis, prefix: str) -> None:
    r.set(f"{prefix}:k", "v")
    proxy.add_rule("GET", delay(0.3))
    started = time.monotonic()
    assert r.get(f"{prefix}:k") == b"v"
    assert time.monotonic() - started >= 0.28


# --------------------------------------------------------------------------- which calls


def test_nth_and_count(proxy: RedisFaultProxy, r: redis.Redis, prefix: str) -> None:
    r.set(f"{prefix}:k", "v")
    rule = proxy.add_rule("GET", error("READONLY no"), nth=3, count=2)
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append(r.get(f"{prefix}:k"))
        except ReadOnlyError:
            outcomes.append("err")
    assert outcomes == [b"v", b"v", "err", "err", b"v", b"v"]
    assert (rule.seen, rule.fired) == (6, 2)
    assert [i.command for i in proxy.injected] == ["GET", "GET"]
    assert proxy.injected_count(rule) == 2


def test_every_call_until_cleared(proxy: RedisFaultProxy, r: redis.Redis, prefix: str) -> None:
    rule = proxy.add_rule("SET", error("OOM no"), count=None)
    for _ in range(5):
        with pytest.raises(OutOfMemoryError):
            r.set(f"{prefix}:k", "v")
    proxy.clear()
    assert r.set(f"{prefix}:k", "v")
    assert rule.fired == 5 and not proxy.rules


def test_every_call_in_a_window(proxy: RedisFaultProxy, r: redis.Redis, prefix: str) -> None:
    started = time.monotonic()
    rule = proxy.add_rule("SET", error("LOADING wait"), for_seconds=0.3)
    failures = 0
    while True:
        try:
            r.set(f"{prefix}:k", "v")
            break
        except BusyLoadingError:
            failures += 1
    assert time.monotonic() - started >= 0.3
    assert failures >= 1 and rule.fired == failures and rule.done


def test_rules_count_independently_first_due_fires(
    proxy: RedisFaultProxy, r: redis.Redis, prefix: str
) -> None:
    first = proxy.add_rule("GET", error("ERR first"), nth=2)
    second = proxy.add_rule("GET|MGET", error("ERR second"), nth=1, count=2)
    with pytest.raises(ResponseError, match="second"):
        r.get(f"{prefix}:k")
    with pytest.raises(ResponseError, match="first"):  # both due: the first added wins
        r.get(f"{prefix}:k")
    assert r.get(f"{prefix}:k") is None
    assert (first.fired, second.fired) == (1, 1) and second.seen == 3
    with first:  # a rule is a context manager removing itself
        pass
    assert proxy.rules == [second]


def test_pipeline_faults_keep_reply_order(
    proxy: RedisFaultProxy, r: redis.Redis, direct: redis.Redis, prefix: str
) -> None:
    for i in range(6):
        direct.set(f"{prefix}:{i}", i)
    proxy.add_rule("GET", error("ERR injected"), nth=3, count=2)
    pipe = r.pipeline(transaction=False)
    for i in range(6):
        pipe.get(f"{prefix}:{i}")
    results = pipe.execute(raise_on_error=False)
    assert results[:2] == [b"0", b"1"] and results[4:] == [b"4", b"5"]
    assert all(isinstance(x, ResponseError) for x in results[2:4])

    # a connection dropped mid-pipeline: commands before it ran, the rest were never sent
    proxy.add_rule("INCRBY", close())
    pipe = r.pipeline(transaction=False)
    pipe.set(f"{prefix}:before", 1).incr(f"{prefix}:n").set(f"{prefix}:after", 1)
    with pytest.raises(redis.exceptions.ConnectionError):
        pipe.execute()
    assert direct.get(f"{prefix}:before") == b"1"
    assert direct.get(f"{prefix}:n") is None and direct.get(f"{prefix}:after") is None

    # the same with the reply lost after the command ran
    proxy.add_rule("INCRBY", after_forward_close())
    pipe = r.pipeline(transaction=False)
    pipe.set(f"{prefix}:before2", 1).incr(f"{prefix}:n").set(f"{prefix}:after2", 1)
    with pytest.raises(redis.exceptions.ConnectionError):
        pipe.execute()
    assert direct.get(f"{prefix}:n") == b"1" and direct.get(f"{prefix}:after2") is None


def test_script_matching(
    proxy: RedisFaultProxy, r: redis.Redis, direct: redis.Redis, prefix: str
) -> None:
    target = f"-- {prefix} target\nreturn redis.call('INCR', KEYS[1])"
    other = f"-- {prefix} other\nreturn redis.call('INCR', KEYS[1])"
    run_target, run_other = r.register_script(target), r.register_script(other)
    assert run_target(keys=[f"{prefix}:t"]) == 1
    assert run_other(keys=[f"{prefix}:o"]) == 1
    message = "ERR Error running script (call to f_x): @user_script:1: boom"
    rule = proxy.add_rule(script(target), error(message), count=2)
    with pytest.raises(ResponseError, match="boom"):
        run_target(keys=[f"{prefix}:t"])
    assert run_other(keys=[f"{prefix}:o"]) == 2  # another script is not matched
    with pytest.raises(ResponseError, match="boom"):  # EVAL of the same source is
        r.eval(target, 1, f"{prefix}:t")
    assert run_target(keys=[f"{prefix}:t"]) == 2
    assert rule.fired == 2 and rule.seen == 3
    # EVALSHA (NOSCRIPT), SCRIPT LOAD, EVALSHA; then EVALSHA, EVAL, EVALSHA
    assert proxy.calls(script(target)) == 5
    assert direct.get(f"{prefix}:t") == b"2"


def test_key_prefix_and_predicates(proxy: RedisFaultProxy, r: redis.Redis, prefix: str) -> None:
    hot = f"{prefix}:hot"
    proxy.add_rule(key_prefix(hot), error("READONLY hot"), count=None)
    proxy.add_rule(command("HMGET", where=lambda args: b"secret" in args[2:]), error("NOPERM x"))
    assert r.set(f"{prefix}:cold", 1)
    with pytest.raises(ReadOnlyError):
        r.set(f"{hot}:1", 1)
    with pytest.raises(ReadOnlyError):
        r.eval("return 1", 1, f"{hot}:2")
    assert r.eval("return 1", 1, f"{prefix}:cold") == 1
    assert r.hmget(f"{prefix}:h", ["a"]) == [None]
    with pytest.raises(NoPermissionError):
        r.hmget(f"{prefix}:h", ["a", "secret"])
    assert proxy.calls(key_prefix(hot)) == 2
    assert proxy.commands("HMGET")[-1][-1] == b"secret"


# --------------------------------------------------------------------------- connections


def test_disconnect_all_restart_and_refuse(
    proxy: RedisFaultProxy, make_client: Callable[..., redis.Redis], prefix: str
) -> None:
    r = make_client()
    assert r.set(f"{prefix}:k", "v")
    proxy.wait_connections(1)
    accepted = proxy.accepted
    assert proxy.disconnect_all() == 1
    # redis-py notices the idle pooled connection was closed and reconnects
    assert r.get(f"{prefix}:k") == b"v"
    assert proxy.accepted == accepted + 1
    # a connection dropped while a command is in flight is an error
    proxy.add_rule("GET", hang())
    out: list[Any] = []

    def get() -> None:
        try:
            out.append(r.get(f"{prefix}:k"))
        except redis.exceptions.ConnectionError as exc:
            out.append(exc)

    thread = threading.Thread(target=get)
    thread.start()
    proxy.wait_injected(1)
    assert proxy.disconnect_all() == 1
    thread.join(10)
    assert isinstance(out[0], redis.exceptions.ConnectionError)
    proxy.clear()

    port = proxy.port
    proxy.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        r.get(f"{prefix}:k")
    proxy.start()
    assert proxy.port == port
    assert r.get(f"{prefix}:k") == b"v"

    proxy.refuse_connections()
    r.connection_pool.disconnect()
    with pytest.raises(redis.exceptions.ConnectionError):
        r.get(f"{prefix}:k")
    proxy.refuse_connections(False)
    assert r.get(f"{prefix}:k") == b"v"


def test_many_concurrent_clients(proxy: RedisFaultProxy, prefix: str) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        client = redis.Redis.from_url(proxy.url)
        try:
            for i in range(50):
                pipe = client.pipeline(transaction=False)
                pipe.set(f"{prefix}:{n}:{i}", f"{n}-{i}").get(f"{prefix}:{n}:{i}")
                assert pipe.execute() == [True, f"{n}-{i}".encode()]
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert proxy.accepted >= 16


def test_throughput(prefix: str) -> None:
    with RedisFaultProxy(upstream=UPSTREAM, record=False) as proxy:
        client = redis.Redis.from_url(proxy.url)
        proxy.add_rule("NEVER", error("ERR never"))  # rules are evaluated on every command
        started = time.monotonic()
        n = 0
        for batch in range(20):
            pipe = client.pipeline(transaction=False)
            for i in range(500):
                pipe.hset(f"{prefix}:h{batch}", str(i), "x" * 100)
            pipe.execute()
            n += 500
        for _ in range(2000):
            client.get(f"{prefix}:none")
            n += 1
        elapsed = time.monotonic() - started
        client.close()
        assert proxy.calls("HSET") == 10_000
        print(f"{n} commands in {elapsed:.2f}s through the proxy")
        assert elapsed < 10


# --------------------------------------------------------------------------- kombu / celery


CELERY_WORKER = """
import sys
from celery import Celery

url, prefix = sys.argv[1], sys.argv[2]
app = Celery("proxy-smoke", broker=url, backend=url)
app.conf.task_default_queue = f"{prefix}-q"
app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
app.conf.result_backend_transport_options = {"global_keyprefix": f"{prefix}:"}
app.conf.broker_connection_retry_on_startup = True


@app.task(name="proxy_smoke.add")
def add(a, b):
    return a + b


app.worker_main(
    ["worker", "--pool=solo", "-Q", f"{prefix}-q", "--loglevel=WARNING",
     "--without-gossip", "--without-mingle", "--without-heartbeat"]
)
"""


def test_kombu_simple_queue(proxy: RedisFaultProxy, prefix: str) -> None:
    kombu = pytest.importorskip("kombu")
    options = {"global_keyprefix": f"{prefix}:"}
    with kombu.Connection(proxy.url, transport_options=options) as conn:
        queue = conn.SimpleQueue(f"{prefix}-simple")
        queue.put({"hello": "world"})
        message = queue.get(timeout=5)
        assert message.payload == {"hello": "world"}
        message.ack()
        queue.close()
    assert proxy.calls("LPUSH") >= 1


def test_celery_worker_through_the_proxy(proxy: RedisFaultProxy, prefix: str) -> None:
    """A real worker process on the proxy: BRPOP, MULTI/EXEC, EVALSHA, pub/sub results,
    and it recovers when every connection is dropped."""
    celery = pytest.importorskip("celery")
    worker = subprocess.Popen(
        [sys.executable, "-c", CELERY_WORKER, proxy.url, prefix],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    app = celery.Celery("proxy-smoke-client", broker=proxy.url, backend=proxy.url)
    app.conf.task_default_queue = f"{prefix}-q"
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    app.conf.result_backend_transport_options = {"global_keyprefix": f"{prefix}:"}
    try:
        assert app.send_task("proxy_smoke.add", (2, 3)).get(timeout=60) == 5
        assert proxy.disconnect_all() >= 2  # the worker's and ours
        assert app.send_task("proxy_smoke.add", (4, 5)).get(timeout=60) == 9
        for name in ("BRPOP", "LPUSH", "SUBSCRIBE", "PUBLISH", "MULTI", "EXEC"):
            assert proxy.calls(name) >= 1, name
    finally:
        app.close()
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
