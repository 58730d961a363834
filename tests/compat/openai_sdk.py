"""The official `openai` Python SDK against tollgate.

Run by tests/compat.rs with TOLLGATE_BASE_URL and TOLLGATE_KEY set. Exits non-zero on the
first failed expectation. With TOLLGATE_HTTP2=1 the SDK's httpx client speaks HTTP/2 (the
`h2` package) and every answer must have come over HTTP/2. An `https://` base URL is
verified against the CA in SSL_CERT_FILE.
"""
import os
import sys

import openai

base_url = os.environ["TOLLGATE_BASE_URL"]
key = os.environ["TOLLGATE_KEY"]
http2 = os.environ.get("TOLLGATE_HTTP2") == "1"
want_version = "HTTP/2" if http2 else "HTTP/1.1"


def http_client():
    return openai.DefaultHttpxClient(http2=http2)


client = openai.OpenAI(
    base_url=base_url, api_key=key, max_retries=0, timeout=20, http_client=http_client()
)

# chat, non-streaming
r = client.chat.completions.with_raw_response.create(
    model="m1", messages=[{"role": "user", "content": "hello"}]
)
chat = r.parse()
assert r.http_response.http_version == want_version, r.http_response.http_version
assert r.headers["x-request-id"].startswith("req_"), r.headers
assert chat.choices[0].message.content, chat
assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens == 3, chat.usage

# chat, streaming with usage
parts, usage = [], None
stream = client.chat.completions.create(
    model="m1",
    messages=[{"role": "user", "content": "hello"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == "tok0 tok1 tok2 ", parts
assert usage is not None and usage.completion_tokens == 3, usage

# embeddings (the SDK asks for base64 by default and decodes it)
r = client.embeddings.with_raw_response.create(model="emb", input=["a", "b"])
assert r.http_response.http_version == want_version, r.http_response.http_version
emb = r.parse()
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8, emb
assert emb.usage.prompt_tokens > 0

# models: only the ones this key may use
ids = sorted(m.id for m in client.models.list())
assert ids == ["emb", "m1"], ids

# a bad key is the SDK's AuthenticationError
bad = openai.OpenAI(
    base_url=base_url, api_key="sk-tg-wrong", max_retries=0, timeout=20, http_client=http_client()
)
try:
    bad.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}])
    sys.exit("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401
    assert e.code == "invalid_api_key", e.code

# a model outside the allow-list is PermissionDeniedError
try:
    client.chat.completions.create(model="m2", messages=[{"role": "user", "content": "x"}])
    sys.exit("expected PermissionDeniedError")
except openai.PermissionDeniedError as e:
    assert e.code == "model_not_allowed", e.code

print(f"openai sdk compat ({base_url.split(':')[0]}, {want_version}): ok")
