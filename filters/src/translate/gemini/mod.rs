//! OpenAI Chat Completions → Gemini `generateContent`, and Gemini responses → OpenAI.
//!
//! # OpenAI request → Gemini ([`request_from_openai`])
//!
//! | OpenAI field | Gemini |
//! |---|---|
//! | `model`, `stream`, `stream_options` | not in the body: the gateway puts the model and the method (`generateContent` or `streamGenerateContent?alt=sse`) in the URL |
//! | `system`/`developer` messages | `systemInstruction.parts` (text, in order) |
//! | `user` / `assistant` | `contents` with role `user` / `model`; consecutive same-role turns merged |
//! | text content / `text` part | `{text}` part (an empty string adds no part) |
//! | `image_url` `data:` URL | `{inlineData: {mimeType, data}}` |
//! | `image_url` http(s) URL | `{fileData: {mimeType, fileUri}}`, the type guessed from the extension (default `image/jpeg`) |
//! | `input_audio`, `file` and other parts | **Untranslatable** |
//! | assistant `tool_calls` | `{functionCall: {name, args}}` parts (`args` = parsed `arguments`; not a JSON object → **Untranslatable**) |
//! | `tool` message | a `user` turn with `{functionResponse: {name, response: {content}}}`; `content` = the message parsed as a JSON object, else `{"result": text}`; `name` from the earlier tool call with that id (none → **Untranslatable**) |
//! | `tools` (`function`) | `[{functionDeclarations: [{name, description, parameters}]}]`; other types → **Untranslatable** |
//! | `tool_choice` | auto/none/required → `toolConfig.functionCallingConfig.mode` AUTO/NONE/ANY; a named function → ANY + `allowedFunctionNames` |
//! | `parallel_tool_calls` | ignored: Gemini has no switch |
//! | `max_completion_tokens`, else `max_tokens` | `generationConfig.maxOutputTokens` |
//! | `temperature`, `top_p`, `stop`, `n` | `generationConfig.temperature`, `topP`, `stopSequences`, `candidateCount` |
//! | `presence_penalty`, `frequency_penalty`, `seed` | `generationConfig.presencePenalty`, `frequencyPenalty`, `seed` |
//! | `response_format` `json_object` | `responseMimeType: "application/json"` |
//! | `response_format` `json_schema` | `responseMimeType: "application/json"` + `responseSchema` (the schema as given) |
//! | `logprobs: true`, `top_logprobs` | **Untranslatable** |
//! | `logit_bias` (non-empty) | **Untranslatable** |
//! | `modalities` with `audio`, `audio` | **Untranslatable** |
//! | `reasoning_effort`, `web_search_options`, `functions`, `function_call`, `function` role | **Untranslatable** |
//! | `user`, `safety_identifier`, `store`, `metadata`, `service_tier`, `prediction`, `prompt_cache_key`, `verbosity`, message `name`, image `detail` | ignored: no Gemini field, and none changes the answer's meaning |
//! | anything else | ignored |
//!
//! # Gemini response → OpenAI ([`response_to_openai`], [`StreamToOpenAi`])
//!
//! Candidates become choices: text parts (not `thought` parts) joined, `functionCall` parts
//! become tool calls `call_<n>` (n counts the candidate's calls from 0) with `arguments` the
//! compact JSON of `args`. `finishReason` STOP → `stop` (`tool_calls` when the candidate has
//! function calls), MAX_TOKENS → `length`, SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT,
//! SPII, IMAGE_SAFETY → `content_filter`, anything else → `stop`. `usageMetadata`:
//! `prompt_tokens` = promptTokenCount, `completion_tokens` = candidatesTokenCount +
//! thoughtsTokenCount, cached = cachedContentTokenCount.

mod request;
mod response;

pub use request::request_from_openai;
pub use response::{response_to_openai, StreamToOpenAi};

#[cfg(test)]
mod tests;
