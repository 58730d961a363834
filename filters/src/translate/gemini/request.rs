//! OpenAI request → Gemini `generateContent` request (field table in the parent module's doc).

use serde_json::{json, Map, Value};

use crate::translate::{field, is_http_url, parse_data_url, Untranslatable};

fn to_gemini(what: impl std::fmt::Display) -> Untranslatable {
    Untranslatable(format!("{what} cannot be sent to a Gemini model"))
}

fn invalid(what: impl std::fmt::Display) -> Untranslatable {
    Untranslatable(what.to_string())
}

/// OpenAI chat.completions request -> Gemini generateContent request body (the model goes in
/// the URL, not the body; the gateway builds the URL).
pub fn request_from_openai(body: &Value) -> Result<Value, Untranslatable> {
    let req = body
        .as_object()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    refuse(req)?;
    let mut out = Map::new();
    let (system, contents) = contents(req)?;
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    if let Some(tools) = field(req, "tools") {
        let decls = tools
            .as_array()
            .ok_or_else(|| invalid("tools must be an array"))?
            .iter()
            .map(declaration)
            .collect::<Result<Vec<_>, _>>()?;
        if !decls.is_empty() {
            out.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        }
    }
    let mode = match field(req, "tool_choice") {
        None => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"mode": "AUTO"}),
            "none" => json!({"mode": "NONE"}),
            "required" => json!({"mode": "ANY"}),
            other => return Err(invalid(format!("unknown tool_choice `{other}`"))),
        }),
        Some(c) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| to_gemini("a tool_choice other than a named function"))?;
            Some(json!({"mode": "ANY", "allowedFunctionNames": [name]}))
        }
    };
    if let Some(mode) = mode {
        out.insert("toolConfig".into(), json!({"functionCallingConfig": mode}));
    }
    let config = generation_config(req)?;
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(out))
}

fn refuse(req: &Map<String, Value>) -> Result<(), Untranslatable> {
    if field(req, "logprobs") == Some(&Value::Bool(true)) {
        return Err(to_gemini("logprobs"));
    }
    if field(req, "top_logprobs").is_some() {
        return Err(to_gemini("top_logprobs"));
    }
    if field(req, "logit_bias").is_some_and(|b| b.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(to_gemini("logit_bias"));
    }
    let audio_out = field(req, "modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x == "audio"));
    if audio_out || field(req, "audio").is_some() {
        return Err(to_gemini("audio output (modalities/audio)"));
    }
    for key in super::super::OPENAI_ONLY {
        if field(req, key).is_some() {
            return Err(to_gemini(key));
        }
    }
    Ok(())
}

fn generation_config(req: &Map<String, Value>) -> Result<Map<String, Value>, Untranslatable> {
    let mut c = Map::new();
    if let Some(max) = field(req, "max_completion_tokens").or_else(|| field(req, "max_tokens")) {
        c.insert("maxOutputTokens".into(), max.clone());
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("n", "candidateCount"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ] {
        if let Some(v) = field(req, from) {
            c.insert(to.into(), v.clone());
        }
    }
    match field(req, "stop") {
        Some(Value::String(s)) => {
            c.insert("stopSequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            c.insert("stopSequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(rf) = field(req, "response_format") {
        match rf.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => {}
            "json_object" => {
                c.insert("responseMimeType".into(), "application/json".into());
            }
            "json_schema" => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|s| s.get("schema"))
                    .ok_or_else(|| invalid("response_format.json_schema has no schema"))?;
                c.insert("responseMimeType".into(), "application/json".into());
                c.insert("responseSchema".into(), schema.clone());
            }
            other => return Err(to_gemini(format!("response_format of type `{other}`"))),
        }
    }
    Ok(c)
}

fn declaration(tool: &Value) -> Result<Value, Untranslatable> {
    let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "function" {
        return Err(to_gemini(format!("a tools entry of type `{kind}`")));
    }
    let f = tool.get("function").unwrap_or(&Value::Null);
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("a function tool has no name"))?;
    let mut d = json!({"name": name});
    for key in ["description", "parameters"] {
        if let Some(v) = f.get(key).filter(|v| !v.is_null()) {
            d[key] = v.clone();
        }
    }
    Ok(d)
}

/// The system parts and the `contents` turns.
fn contents(req: &Map<String, Value>) -> Result<(Vec<Value>, Vec<Value>), Untranslatable> {
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages must be an array"))?;
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    // tool_call_id -> function name, from earlier assistant messages.
    let mut call_names: Vec<(String, String)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").filter(|c| !c.is_null());
        let (role, parts) = match role {
            "system" | "developer" => {
                system.extend(parts(content, i)?);
                continue;
            }
            "user" => ("user", parts(content, i)?),
            "assistant" => {
                let mut p = parts(content, i)?;
                for (j, call) in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let f = call.get("function").unwrap_or(&Value::Null);
                    let name = f.get("name").and_then(Value::as_str).unwrap_or("");
                    let args = super::super::call_arguments(call, i, j)?;
                    if let Some(id) = call.get("id").and_then(Value::as_str) {
                        call_names.push((id.to_string(), name.to_string()));
                    }
                    p.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                ("model", p)
            }
            "tool" => {
                let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
                let name = call_names
                    .iter()
                    .rev()
                    .find(|(c, _)| c == id)
                    .map(|(_, n)| n.clone())
                    .ok_or_else(|| {
                        invalid(format!(
                            "messages[{i}].tool_call_id `{id}` matches no earlier tool call"
                        ))
                    })?;
                let text: String = match content {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect(),
                    _ => String::new(),
                };
                let response = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"result": text}));
                let part =
                    json!({"functionResponse": {"name": name, "response": {"content": response}}});
                ("user", vec![part])
            }
            "function" => return Err(to_gemini("a `function` role message")),
            other => return Err(invalid(format!("unknown message role `{other}`"))),
        };
        match turns.last_mut() {
            Some((last, p)) if *last == role => p.extend(parts),
            _ => turns.push((role, parts)),
        }
    }
    let contents = turns
        .into_iter()
        .map(|(role, parts)| json!({"role": role, "parts": parts}))
        .collect();
    Ok((system, contents))
}

fn parts(content: Option<&Value>, i: usize) -> Result<Vec<Value>, Untranslatable> {
    match content {
        None => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![json!({"text": s})]),
        Some(Value::Array(parts)) => parts.iter().map(part).collect(),
        Some(_) => Err(invalid(format!("messages[{i}].content is invalid"))),
    }
}

fn part(p: &Value) -> Result<Value, Untranslatable> {
    match p.get("type").and_then(Value::as_str).unwrap_or("") {
        "text" => Ok(json!({"text": p.get("text").and_then(Value::as_str).unwrap_or("")})),
        "refusal" => Ok(json!({"text": p.get("refusal").and_then(Value::as_str).unwrap_or("")})),
        "image_url" => {
            let url = p
                .get("image_url")
                .and_then(|i| i.get("url").or(Some(i)))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("an image_url part has no url"))?;
            if let Some((mime, data)) = parse_data_url(url) {
                Ok(json!({"inlineData": {"mimeType": mime, "data": data}}))
            } else if is_http_url(url) {
                Ok(json!({"fileData": {"mimeType": guess_mime(url), "fileUri": url}}))
            } else {
                Err(to_gemini(
                    "an image URL that is neither http(s) nor a base64 data URL",
                ))
            }
        }
        "input_audio" => Err(to_gemini("audio input (an input_audio content part)")),
        other => Err(to_gemini(format!("a `{other}` content part"))),
    }
}

/// The image type from a URL's extension (query and fragment ignored), else `image/jpeg`.
fn guess_mime(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        _ => "image/jpeg",
    }
}
