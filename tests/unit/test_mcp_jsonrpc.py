"""The strict JSON-RPC reader: what it refuses is what two readers could read two ways."""

from __future__ import annotations

import json

import pytest

from keyhole_sidecar.mcp import jsonrpc
from keyhole_sidecar.mcp.jsonrpc import Unreadable, read


def call(name, arguments=None, ident=1) -> dict:
    params = {"name": name} if arguments is None else {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": ident, "method": "tools/call", "params": params}


def test_a_call_is_read_with_its_name_and_arguments():
    [message], batch = read(json.dumps(call("get_issue", {"n": 1})).encode())
    assert (message.method, message.id, message.params["name"], batch) == (
        "tools/call", 1, "get_issue", False)


def test_escapes_are_undone_as_the_server_undoes_them():
    [message], _ = read(b'{"jsonrpc":"2.0","id":1,"method":"tools\\/call",'
                        b'"params":{"name":"\\u0064elete_repo"}}')
    assert (message.method, message.params["name"]) == ("tools/call", "delete_repo")


@pytest.mark.parametrize(("body", "why"), [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_issue",'
     b'"name":"delete_repo"}}', "appears twice"),
    (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}', "appears twice"),
    (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', "byte-order mark"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xff"}}', "UTF-8"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\\ud800"}}',
     "lone surrogate"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}', "NaN"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":-Infinity}}', "Infinity"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":1e400}}', "double"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":123456789012345678901234}}',
     "64 bits"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}', "a string"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete repo"}}',
     "A-Z"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_issue",'
     b'"arguments":[1]}}', "arguments is an object"),
    (b'{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"x"}}', "exact"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call ","params":{"name":"x"}}', "exact"),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools_call","params":{"name":"x"}}', "exact"),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', "string or an integer"),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', "string or an integer"),
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', '"2.0"'),
    (b'[]', "1 to 100"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping"} trailing', "not JSON"),
    (b'"tools/call"', "an object"),
    (b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":["a"]}}', "URI"),
    (b'{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":'
     b'{"type":"ref/prompt","name":5}}}', "is a string"),
])
def test_what_could_be_read_two_ways_is_refused(body, why):
    with pytest.raises(Unreadable, match=why):
        read(body)


def test_nesting_and_size_and_batches_are_bounded():
    deep = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + b"[" * 200 + \
        b"]" * 200 + b"}}"
    with pytest.raises(Unreadable, match="nested deeper"):
        read(deep)
    very_deep = b"[" * 100_000 + b"]" * 100_000  # past Python's recursion limit too
    with pytest.raises(Unreadable, match="nested deeper"):
        read(very_deep)
    with pytest.raises(Unreadable, match="MiB"):
        read(b" " * (jsonrpc.MAX_BODY + 1))
    batch = json.dumps([call("get_issue", ident=i) for i in range(jsonrpc.MAX_BATCH + 1)])
    with pytest.raises(Unreadable, match="1 to 100"):
        read(batch.encode())


def test_a_batch_keeps_every_message_and_responses_to_the_server_pass():
    body = json.dumps([call("get_issue"), {"jsonrpc": "2.0", "id": "s1", "result": {}},
                       {"jsonrpc": "2.0", "method": "notifications/initialized"}])
    messages, batch = read(body.encode())
    assert batch and [(m.method, m.id) for m in messages] == [
        ("tools/call", 1), (None, "s1"), ("notifications/initialized", None)]
