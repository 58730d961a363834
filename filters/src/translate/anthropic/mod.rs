//! OpenAI Chat Completions ⇄ Anthropic Messages.
//!
//! # OpenAI request → Anthropic ([`request_from_openai`])
//!
//! | OpenAI field | Anthropic |
//! |---|---|
//! | `model` | replaced by the `model` argument |
//! | `messages` `system`/`developer` | hoisted, in order, to top-level `system`: a string when there is exactly one such message and its content is a string, else text blocks |
//! | `messages` `user`/`assistant` | kept in order; consecutive same-role messages merged into one block list (a user message's `tool_result` blocks moved first, as Anthropic requires) |
//! | content string / `text` part | string / `text` block |
//! | `image_url` part, `data:` URL | `image` with a `base64` source; `detail` dropped |
//! | `image_url` part, http(s) URL | `image` with a `url` source |
//! | `input_audio`, `file` or other parts | **Untranslatable** |
//! | assistant `refusal` part | `text` block |
//! | assistant `tool_calls` | `tool_use` blocks after the text (`input` = parsed `arguments`; not a JSON object → **Untranslatable**) |
//! | assistant with no content and no tool calls | dropped |
//! | `tool` message | `user` message with a `tool_result` block (consecutive ones merge) |
//! | `function` message, assistant `function_call`, `functions`, `function_call` | **Untranslatable** (deprecated; use tools) |
//! | message `name` | dropped |
//! | `tools` (`function`) | `{name, description, input_schema}` (no parameters → empty object schema); `strict` dropped |
//! | `tools` of another type | **Untranslatable** |
//! | `tool_choice` | auto/required/none/named → `auto`/`any`/`none`/`tool` |
//! | `parallel_tool_calls: false` | `disable_parallel_tool_use: true` on the tool choice (an `auto` one if none was given) |
//! | `max_completion_tokens`, else `max_tokens`, else 4096 | `max_tokens` |
//! | `stop` (string or array) | `stop_sequences` |
//! | `temperature`, `top_p`, `stream` | passed as they are |
//! | `user` (else `safety_identifier`) | `metadata.user_id` |
//! | `n` > 1 | **Untranslatable** |
//! | `logprobs: true`, `top_logprobs` | **Untranslatable** |
//! | `response_format` `json_object`/`json_schema` | **Untranslatable** (`text` is fine) |
//! | `modalities` with `audio`, `audio` | **Untranslatable** |
//! | `logit_bias` (non-empty) | **Untranslatable** |
//! | `seed` | **Untranslatable** |
//! | `frequency_penalty`/`presence_penalty` ≠ 0 | **Untranslatable** |
//! | `reasoning_effort`, `web_search_options` | **Untranslatable** |
//! | `stream_options` | ignored: Anthropic streams always report usage |
//! | `store`, `metadata`, `service_tier`, `prediction`, `prompt_cache_key`, `verbosity` | ignored: storage, routing and latency hints that do not change the answer's meaning |
//! | anything else | ignored |
//!
//! # Anthropic request → OpenAI ([`request_to_openai`])
//!
//! | Anthropic field | OpenAI |
//! |---|---|
//! | `model` | replaced by the `model` argument |
//! | `system` string / text blocks | a leading `system` message with string / text-part content |
//! | user `text` / `image` blocks | content parts (`base64` image → `data:` URL, `url` image → its URL) |
//! | user `tool_result` blocks | `tool` messages placed before the rest of that user message; text-block content → text parts; `is_error: true` → the text prefixed `Error: `; image content → **Untranslatable** |
//! | assistant `text` blocks | `content`: one → a string, several → text parts, none → `null` |
//! | assistant `tool_use` blocks | `tool_calls` (`arguments` = compact JSON of `input`) |
//! | assistant `thinking`/`redacted_thinking` | dropped (OpenAI has no field for earlier reasoning) |
//! | `document`, `search_result`, server tool blocks, other blocks | **Untranslatable** |
//! | `cache_control` | dropped |
//! | `tools` (custom) | function tools; server tools (`type` other than `custom`) → **Untranslatable** |
//! | `tool_choice` | auto/any/none/tool → `auto`/`required`/`none`/named; `disable_parallel_tool_use: true` → `parallel_tool_calls: false` |
//! | `stop_sequences` | `stop` |
//! | `max_tokens`, `temperature`, `top_p` | passed |
//! | `metadata.user_id` | `user` |
//! | `stream: true` | `stream: true`, `stream_options: {"include_usage": true}` |
//! | `top_k` | **Untranslatable** |
//! | `thinking` (enabled) | **Untranslatable** |
//! | `mcp_servers`, `container` | **Untranslatable** |
//! | `service_tier`, anything else | ignored |

mod request;
mod response;
mod stream;
mod to_openai;

pub use request::request_from_openai;
pub use response::{response_from_openai, response_to_openai};
pub use stream::{StreamFromOpenAi, StreamToOpenAi};
pub use to_openai::request_to_openai;

#[cfg(test)]
mod stream_tests;
#[cfg(test)]
mod tests;
