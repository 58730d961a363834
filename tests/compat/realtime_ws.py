"""A Realtime API client (the `websockets` package) against tollgate.

Run by tests/realtime.rs: `realtime_ws.py MODE URL KEY`, where URL is
`ws://127.0.0.1:PORT/v1/realtime?model=…`. Prints one JSON line with what it saw; exits
non-zero on the first failed expectation.

Modes:
- `two`: the key as the browser subprotocol; a text item, two responses (the second
  with audio), each to its `response.done`.
- `bearer`: the key as `Authorization: Bearer`, one response.
- `badkey`: the upgrade must be refused with 401.
- `broke`: the first response.create must get an `error` event (`insufficient_quota`)
  and the session close.
- `limited`: one response, then the next response.create must get an `error` event
  (`rate_limit_exceeded`) and the session close.
"""
import asyncio
import json
import sys

import websockets

mode, url, key = sys.argv[1], sys.argv[2], sys.argv[3]


async def until(ws, kind):
    """Events up to and including the first of type `kind`."""
    seen = []
    while True:
        ev = json.loads(await asyncio.wait_for(ws.recv(), 10))
        seen.append(ev)
        if ev["type"] == kind:
            return seen


async def respond(ws, audio=False):
    create = {"type": "response.create"}
    if audio:
        create["response"] = {"output_modalities": ["audio"]}
    await ws.send(json.dumps(create))
    events = await until(ws, "response.done")
    types = [e["type"] for e in events]
    assert types[0] == "response.created", types
    assert ("response.output_audio.delta" in types) == audio, types
    done = events[-1]["response"]
    assert done["status"] == "completed", done
    return done["usage"]


async def session(ws):
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "session.created", first
    assert ws.subprotocol == "realtime", ws.subprotocol
    await ws.send(
        json.dumps(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hello there, realtime"}],
                },
            }
        )
    )
    await until(ws, "conversation.item.done")


async def main():
    protocols = ["realtime", "openai-insecure-api-key." + key]
    if mode == "two":
        async with websockets.connect(url, subprotocols=protocols) as ws:
            await session(ws)
            usages = [await respond(ws), await respond(ws, audio=True)]
        print(json.dumps({"usages": usages}))
    elif mode == "bearer":
        headers = {"Authorization": "Bearer " + key}
        async with websockets.connect(
            url, subprotocols=["realtime"], additional_headers=headers
        ) as ws:
            await session(ws)
            usages = [await respond(ws)]
        print(json.dumps({"usages": usages}))
    elif mode == "badkey":
        try:
            async with websockets.connect(url, subprotocols=protocols):
                raise SystemExit("a bad key was let through the upgrade")
        except websockets.exceptions.InvalidStatus as e:
            assert e.response.status_code == 401, e.response.status_code
            body = json.loads(e.response.body)
            assert body["error"]["code"] == "invalid_api_key", body
        print(json.dumps({"refused": 401}))
    elif mode in ("broke", "limited"):
        async with websockets.connect(url, subprotocols=protocols) as ws:
            await session(ws)
            if mode == "limited":
                await respond(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            ev = json.loads(await asyncio.wait_for(ws.recv(), 10))
            want = "insufficient_quota" if mode == "broke" else "rate_limit_exceeded"
            assert ev["type"] == "error", ev
            assert ev["error"]["code"] == want, ev
            try:
                extra = await asyncio.wait_for(ws.recv(), 10)
                raise SystemExit(f"the session went on: {extra}")
            except websockets.exceptions.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1008, closed
        print(json.dumps({"closed": 1008, "code": want}))
    else:
        raise SystemExit(f"unknown mode {mode}")


asyncio.run(main())
