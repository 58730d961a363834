"""The official `anthropic` Python SDK against tollgate, and the `openai` SDK reaching a
Claude model through translation.

Run by tests/compat.rs with TOLLGATE_BASE_URL (the gateway's root, no `/v1`) and
TOLLGATE_KEY set. The gateway serves `claude-x` on an Anthropic channel and `gpt-x` on an
OpenAI-compatible one. Exits non-zero on the first failed expectation.
"""
import json
import os

import anthropic
import openai

base_url = os.environ["TOLLGATE_BASE_URL"]
key = os.environ["TOLLGATE_KEY"]

client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=20)
hello = [{"role": "user", "content": "hello"}]
tools = [
    {
        "name": "lookup",
        "description": "Looks a thing up.",
        "input_schema": {"type": "object", "properties": {"arg": {"type": "string"}}},
    }
]

for model in ("claude-x", "gpt-x"):
    # messages, non-streaming (gpt-x: the request and answer translated)
    r = client.messages.with_raw_response.create(
        model=model, max_tokens=50, system="Be brief.", messages=hello
    )
    msg = r.parse()
    assert r.headers["x-request-id"].startswith("req_"), r.headers
    assert msg.type == "message" and msg.role == "assistant", msg
    assert msg.content[0].type == "text" and msg.content[0].text, msg
    assert msg.stop_reason == "end_turn", msg
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens == 3, msg.usage

    # messages, streaming: the SDK's own event accumulation
    with client.messages.stream(model=model, max_tokens=50, messages=hello) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text, (text, final)
    assert final.usage.output_tokens == 3, final.usage
    assert final.stop_reason == "end_turn", final

# tool use, forced
msg = client.messages.create(
    model="claude-x",
    max_tokens=50,
    messages=hello,
    tools=tools,
    tool_choice={"type": "tool", "name": "lookup"},
)
uses = [b for b in msg.content if b.type == "tool_use"]
assert msg.stop_reason == "tool_use" and uses, msg
assert uses[0].name == "lookup" and uses[0].input == {"arg": "value"}, uses
# the tool's result goes back in the next turn
follow = client.messages.create(
    model="claude-x",
    max_tokens=50,
    tools=tools,
    messages=hello
    + [
        {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "42"}],
        },
    ],
)
assert follow.content[0].type == "text", follow

# count_tokens
count = client.messages.count_tokens(model="claude-x", messages=hello)
assert count.input_tokens > 0, count

# a bad key
bad = anthropic.Anthropic(base_url=base_url, api_key="sk-tg-nope", max_retries=0, timeout=20)
try:
    bad.messages.create(model="claude-x", max_tokens=5, messages=hello)
    raise SystemExit("a bad key was accepted")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401, e
    assert e.body["error"]["type"] == "authentication_error", e.body

# an unknown model
try:
    client.messages.create(model="nope", max_tokens=5, messages=hello)
    raise SystemExit("an unknown model was accepted")
except anthropic.NotFoundError as e:
    assert e.status_code == 404, e

# The openai SDK reaching the Claude model through translation.
oa = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=20)
chat = oa.chat.completions.create(model="claude-x", messages=hello, max_tokens=50)
assert chat.object == "chat.completion" and chat.choices[0].message.content, chat
assert chat.choices[0].finish_reason == "stop", chat
assert chat.usage.completion_tokens == 3, chat.usage

parts, usage, finish = [], None, None
for chunk in oa.chat.completions.create(
    model="claude-x",
    messages=hello,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == chat.choices[0].message.content, (parts, chat)
assert finish == "stop" and usage is not None and usage.completion_tokens == 3, usage

fn_tools = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Looks a thing up.",
            "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}},
        },
    }
]
chat = oa.chat.completions.create(
    model="claude-x",
    messages=hello,
    tools=fn_tools,
    tool_choice={"type": "function", "function": {"name": "lookup"}},
)
call = chat.choices[0].message.tool_calls[0]
assert chat.choices[0].finish_reason == "tool_calls", chat
assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"arg": "value"}

# streamed tool call: the SDK's chunks carry the call id, name and argument fragments
args, name = "", None
for chunk in oa.chat.completions.create(
    model="claude-x",
    messages=hello,
    tools=fn_tools,
    tool_choice="required",
    stream=True,
):
    for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        name = tc.function.name or name
        args += tc.function.arguments or ""
assert name == "lookup" and json.loads(args) == {"arg": "value"}, (name, args)

# what cannot be translated is refused, not dropped
try:
    oa.chat.completions.create(model="claude-x", messages=hello, n=2)
    raise SystemExit("n=2 was accepted for a Claude model")
except openai.BadRequestError as e:
    assert "n" in e.message, e.message

print("ok")
