//! Usage capture: provider usage objects normalised into the event contract, and local
//! token counts when an upstream returned none.
//!
//! Normalised form (the event contract): `input` is every prompt token, cache reads
//! (`cached`) and cache writes (`cache_write`) included; `output` is every completion
//! token, `reasoning` included. Conventions recognised:
//!
//! - OpenAI chat/embeddings: `prompt_tokens` (cached included,
//!   `prompt_tokens_details.cached_tokens`), `completion_tokens` (reasoning included,
//!   `completion_tokens_details.reasoning_tokens`). Cache writes where a gateway reports
//!   them: `prompt_tokens_details.cache_write_tokens` or `cache_creation_input_tokens`.
//! - DeepSeek: `prompt_cache_hit_tokens` (of `prompt_tokens`).
//! - OpenAI Responses: `input_tokens` with `input_tokens_details.cached_tokens` (a
//!   subset), `output_tokens` with `output_tokens_details.reasoning_tokens`.
//! - Anthropic: `input_tokens` EXCLUDES `cache_read_input_tokens` and
//!   `cache_creation_input_tokens`; they are added to `input`.
//! - Cache tokens reported beside `prompt_tokens` rather than inside it (they exceed it,
//!   or `total_tokens` counts them on top of it): added to `input`.
//! - Reasoning reported beside the completion rather than inside it (the completion is
//!   smaller than the reasoning, or `total_tokens` equals prompt + completion + reasoning):
//!   added to `output`.

use serde_json::{Map, Value};
use tiktoken_rs::CoreBPE;

use crate::events::MAX_TOKENS;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub input: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
}

fn num(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// The counts of a provider `usage` object, or why it cannot be used.
pub fn normalise(u: &Value) -> Result<Counts, String> {
    if !u.is_object() {
        return Err("usage is not an object".into());
    }
    let mut c = Counts::default();
    if let Some(p) = num(u, &["prompt_tokens"]) {
        c.input = p;
        c.cached = num(u, &["prompt_tokens_details", "cached_tokens"])
            .or_else(|| num(u, &["prompt_cache_hit_tokens"]))
            .or_else(|| num(u, &["cache_read_input_tokens"]))
            .unwrap_or(0);
        c.cache_write = num(u, &["prompt_tokens_details", "cache_write_tokens"])
            .or_else(|| num(u, &["cache_creation_input_tokens"]))
            .unwrap_or(0);
        c.output = num(u, &["completion_tokens"]).unwrap_or(0);
        c.reasoning = num(u, &["completion_tokens_details", "reasoning_tokens"]).unwrap_or(0);
        let (comp, r) = (c.output, c.reasoning);
        let total = num(u, &["total_tokens"]);
        let sum = |xs: &[u64]| xs.iter().fold(0u64, |a, x| a.saturating_add(*x));
        let total_is = |xs: &[u64]| total == Some(sum(xs));
        // a gateway that reports cache tokens beside the prompt rather than inside it:
        // they exceed it, or `total_tokens` counts them on top of it (unless reasoning
        // of the same size could be what it counts on top: then the cache is taken as
        // inside, as OpenAI reports it)
        let side = c.cached.saturating_add(c.cache_write);
        let cache_beside = side > p
            || (side > 0
                && !total_is(&[p, comp])
                && (total_is(&[p, comp, side, r]) && r > 0
                    || total_is(&[p, comp, side]) && !(r > 0 && r == side)));
        if cache_beside {
            c.input = p.saturating_add(side);
        }
        // reasoning beside the completion, likewise
        if r > 0 && (r > comp || total_is(&[c.input, comp, r]) && !total_is(&[c.input, comp])) {
            c.output = comp.saturating_add(r);
        }
    } else if let Some(i) = num(u, &["input_tokens"]) {
        if u.get("input_tokens_details").is_some() {
            c.input = i;
            c.cached = num(u, &["input_tokens_details", "cached_tokens"]).unwrap_or(0);
        } else {
            c.cached = num(u, &["cache_read_input_tokens"]).unwrap_or(0);
            c.cache_write = num(u, &["cache_creation_input_tokens"]).unwrap_or(0);
            c.input = i.saturating_add(c.cached).saturating_add(c.cache_write);
        }
        c.output = num(u, &["output_tokens"]).unwrap_or(0);
        c.reasoning = num(u, &["output_tokens_details", "reasoning_tokens"]).unwrap_or(0);
        if c.reasoning > c.output {
            c.output = c.output.saturating_add(c.reasoning);
        }
    } else {
        return Err("usage has neither prompt_tokens nor input_tokens".into());
    }
    if c.cached.saturating_add(c.cache_write) > c.input {
        return Err("cached and cache-write tokens exceed the prompt".into());
    }
    if [c.input, c.cached, c.cache_write, c.output, c.reasoning]
        .iter()
        .any(|&n| n > MAX_TOKENS)
    {
        return Err(format!("a token count exceeds {MAX_TOKENS}"));
    }
    Ok(c)
}

/// How tokens are counted locally for a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// OpenAI's current encoding (GPT-4o, 4.1, 5, o-series).
    O200k,
    /// OpenAI's earlier encoding (GPT-4, GPT-3.5, text-embedding-3).
    Cl100k,
    /// Every other vendor: no tokenizer vocabulary ships in a crate, so a deliberate
    /// over-estimate: the larger of o200k_base's count × 1.25 and UTF-8 bytes ÷ 3.
    Approx,
}

impl Counter {
    pub fn for_model(provider: &str, model: &str) -> Counter {
        let m = model.rsplit('/').next().unwrap_or(model);
        let openai = matches!(provider, "openai" | "azure" | "azure_openai")
            || m.starts_with("gpt-")
            || m.starts_with("chatgpt-")
            || m.starts_with("text-embedding-")
            || (m.len() > 1 && m.starts_with('o') && m.as_bytes()[1].is_ascii_digit());
        if !openai {
            Counter::Approx
        } else if m.starts_with("gpt-4o")
            || m.starts_with("gpt-4.1")
            || m.starts_with("gpt-5")
            || m.starts_with("chatgpt-")
            || m.starts_with('o')
        {
            Counter::O200k
        } else if m.starts_with("gpt-4") || m.starts_with("gpt-3.5") || m.starts_with("text-") {
            Counter::Cl100k
        } else {
            Counter::O200k
        }
    }

    /// The `estimate_method` recorded on the event.
    pub fn method(self) -> &'static str {
        match self {
            Counter::O200k => "tiktoken:o200k_base",
            Counter::Cl100k => "tiktoken:cl100k_base",
            Counter::Approx => "approx:max(o200k_base*1.25,bytes/3)",
        }
    }

    /// An upper bound of `count`, in constant time: a byte-level BPE token stands for at
    /// least one byte of UTF-8, so the tiktoken encodings never count more tokens than
    /// bytes; the approximation is at most 1.25 × bytes (o200k_base's count × 1.25, or
    /// bytes ÷ 3).
    pub fn bound(self, text: &str) -> u64 {
        let bytes = text.len() as u64;
        match self {
            Counter::O200k | Counter::Cl100k => bytes,
            Counter::Approx => (bytes * 5).div_ceil(4),
        }
    }

    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        match self {
            Counter::O200k => bpe_o200k().encode_ordinary(text).len() as u64,
            Counter::Cl100k => bpe_cl100k().encode_ordinary(text).len() as u64,
            Counter::Approx => {
                let t = bpe_o200k().encode_ordinary(text).len() as u64;
                (t * 5).div_ceil(4).max((text.len() as u64).div_ceil(3))
            }
        }
    }
}

fn bpe_o200k() -> &'static CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

fn bpe_cl100k() -> &'static CoreBPE {
    tiktoken_rs::cl100k_base_singleton()
}

/// Load both vocabularies (a few hundred milliseconds), so no request pays for it.
pub fn warm_up() {
    let _ = bpe_o200k().encode_ordinary("warm up");
    let _ = bpe_cl100k().encode_ordinary("warm up");
}

/// Tokens per image part when its size is unknown: a 1024×1024 high-detail image
/// (85 base + 4 tiles × 170), an over-estimate for smaller or low-detail images.
pub const IMAGE_TOKENS: u64 = 765;

/// Prompt tokens of a chat request, the way OpenAI's chat format counts them: each
/// message's text (string content or text parts) and name, 3 tokens of framing per
/// message and 3 to prime the reply; tool definitions as their JSON.
pub fn chat_input(counter: Counter, body: &Map<String, Value>) -> u64 {
    chat_tokens(body, |s| counter.count(s))
}

/// The largest byte bound of a prompt a budget lease is tried with before the prompt is
/// tokenized: what the bound holds beyond the real count (about three quarters of it for
/// English text) stays small against a budget, and tokenizing a prompt this short costs
/// tens of microseconds, a long one milliseconds.
pub const BOUND_MAX_TOKENS: u64 = 8_192;

/// An upper bound of `chat_input` without tokenizing: each text's bytes instead of its
/// tokens (`Counter::bound`).
pub fn chat_input_bound(counter: Counter, body: &Map<String, Value>) -> u64 {
    chat_tokens(body, |s| counter.bound(s))
}

fn chat_tokens(body: &Map<String, Value>, count: impl Fn(&str) -> u64) -> u64 {
    let mut n = 3;
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        n += 3;
        if let Some(s) = m.get("name").and_then(Value::as_str) {
            n += 1 + count(s);
        }
        match m.get("content") {
            Some(Value::String(s)) => n += count(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            n += count(p.get("text").and_then(Value::as_str).unwrap_or(""))
                        }
                        Some("image_url") | Some("input_image") => n += IMAGE_TOKENS,
                        _ => n += count(&p.to_string()),
                    }
                }
            }
            _ => {}
        }
        if let Some(calls) = m.get("tool_calls") {
            n += count(&calls.to_string());
        }
    }
    for k in ["tools", "functions", "response_format"] {
        if let Some(v) = body.get(k) {
            n += count(&v.to_string());
        }
    }
    n
}

/// Prompt tokens of an embeddings request (`input`: a string, strings, or token arrays).
pub fn embedding_input(counter: Counter, body: &Map<String, Value>) -> u64 {
    embedding_tokens(body, |s| counter.count(s))
}

/// An upper bound of `embedding_input` without tokenizing (`Counter::bound`).
pub fn embedding_input_bound(counter: Counter, body: &Map<String, Value>) -> u64 {
    embedding_tokens(body, |s| counter.bound(s))
}

fn embedding_tokens(body: &Map<String, Value>, count: impl Fn(&str) -> u64) -> u64 {
    match body.get("input") {
        Some(Value::String(s)) => count(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => count(s),
                Value::Array(tokens) => tokens.len() as u64,
                Value::Number(_) => 1,
                other => count(&other.to_string()),
            })
            .sum(),
        _ => 0,
    }
}

/// What a completion produced, collected from a response or stream chunks, for a local
/// count when the upstream reports no usage.
#[derive(Debug, Default)]
pub struct Produced {
    pub text: String,
    /// Chunks that carried any produced text: at least one token each.
    pub chunks: u64,
}

impl Produced {
    /// Collect the text of one choice's `message` or `delta`: its text (a string, or a
    /// list of parts such as Mistral's `text` and `thinking`), reasoning, refusal, tool
    /// calls and the legacy `function_call`, and an audio answer's transcript.
    pub fn add(&mut self, msg: &Value) {
        let before = self.text.len();
        for k in ["content", "reasoning_content", "reasoning", "refusal"] {
            match msg.get(k) {
                Some(Value::String(s)) => self.text.push_str(s),
                Some(parts @ Value::Array(_)) => self.add_parts(parts),
                _ => {}
            }
        }
        let calls = msg
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|call| call.get("function"))
            .chain(msg.get("function_call"));
        for f in calls {
            for k in ["name", "arguments"] {
                if let Some(s) = f.get(k).and_then(Value::as_str) {
                    self.text.push_str(s);
                }
            }
        }
        if let Some(s) = msg.pointer("/audio/transcript").and_then(Value::as_str) {
            self.text.push_str(s);
        }
        if self.text.len() > before {
            self.chunks += 1;
        }
    }

    /// The strings of content parts, at any depth, but for the part's kind, ids and
    /// signatures (`{"type": "thinking", "thinking": [{"type": "text", "text": "…"}]}`).
    fn add_parts(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.text.push_str(s),
            Value::Array(a) => a.iter().for_each(|x| self.add_parts(x)),
            Value::Object(m) => {
                for (k, x) in m {
                    if !matches!(k.as_str(), "type" | "id" | "index" | "signature") {
                        self.add_parts(x);
                    }
                }
            }
            _ => {}
        }
    }

    pub fn tokens(&self, counter: Counter) -> u64 {
        counter.count(&self.text).max(self.chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_of_produced_text_is_collected() {
        let mut p = Produced::default();
        // the legacy function call, an audio answer's transcript, content parts (Mistral's
        // thinking and text), and a tool call
        p.add(&json!({"function_call": {"name": "lookup", "arguments": "{\"id\":1}"}}));
        p.add(
            &json!({"audio": {"id": "audio_1", "data": "UklGRg==", "transcript": "hello there"}}),
        );
        p.add(&json!({"content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "consider"}], "signature": "c2ln"},
            {"type": "text", "text": "answer"}]}));
        p.add(&json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}));
        assert_eq!(p.text, "lookup{\"id\":1}hello thereconsideranswer{}");
        assert_eq!(p.chunks, 4);
        // nothing produced: no chunk counted
        p.add(&json!({"role": "assistant", "content": ""}));
        assert_eq!(p.chunks, 4);
    }

    #[test]
    fn total_tokens_tells_whether_cache_tokens_are_beside_the_prompt() {
        // (usage, (input, cached, output, reasoning))
        let cases = [
            // OpenAI: everything inside
            (
                json!({"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
                    "prompt_tokens_details": {"cached_tokens": 40}}),
                (100, 40, 50, 0),
            ),
            // a shim passing Anthropic's input_tokens as prompt_tokens, its total counting
            // the cache reads on top
            (
                json!({"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 160,
                    "cache_read_input_tokens": 40}),
                (140, 40, 20, 0),
            ),
            // cache and reasoning both beside
            (
                json!({"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 170,
                    "prompt_tokens_details": {"cached_tokens": 40},
                    "completion_tokens_details": {"reasoning_tokens": 10}}),
                (140, 40, 30, 10),
            ),
            // only reasoning beside
            (
                json!({"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 130,
                    "prompt_tokens_details": {"cached_tokens": 40},
                    "completion_tokens_details": {"reasoning_tokens": 10}}),
                (100, 40, 30, 10),
            ),
            // ambiguous (cache and reasoning of one size, one of them on top): reasoning
            (
                json!({"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 130,
                    "prompt_tokens_details": {"cached_tokens": 10},
                    "completion_tokens_details": {"reasoning_tokens": 10}}),
                (100, 10, 30, 10),
            ),
            // no total: inside, unless the cache exceeds the prompt
            (
                json!({"prompt_tokens": 100, "completion_tokens": 20,
                    "cache_read_input_tokens": 40}),
                (100, 40, 20, 0),
            ),
        ];
        for (u, want) in cases {
            let c = normalise(&u).unwrap();
            assert_eq!((c.input, c.cached, c.output, c.reasoning), want, "{u}");
        }
    }

    #[test]
    fn absurd_counts_are_refused_not_wrapped() {
        let max = u64::MAX;
        for u in [
            json!({"prompt_tokens": 10, "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": max, "cache_write_tokens": 1}}),
            json!({"prompt_tokens": max, "completion_tokens": max, "total_tokens": 5,
                "completion_tokens_details": {"reasoning_tokens": 2}}),
            json!({"input_tokens": max, "cache_read_input_tokens": 2, "output_tokens": 1}),
            json!({"prompt_tokens": 10, "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": MAX_TOKENS + 1}}),
        ] {
            assert!(normalise(&u).is_err(), "{u}");
        }
    }

    #[test]
    fn openai_cached_and_reasoning_are_subsets() {
        let c = normalise(
            &json!({"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 30}}),
        )
        .unwrap();
        assert_eq!(
            c,
            Counts {
                input: 100,
                cached: 40,
                cache_write: 0,
                output: 50,
                reasoning: 30
            }
        );
    }

    #[test]
    fn anthropic_cache_tokens_are_added_to_input() {
        let c = normalise(&json!({"input_tokens": 10, "cache_read_input_tokens": 300,
            "cache_creation_input_tokens": 50, "output_tokens": 20}))
        .unwrap();
        assert_eq!(
            (c.input, c.cached, c.cache_write, c.output),
            (360, 300, 50, 20)
        );
    }

    #[test]
    fn deepseek_cache_hits_and_separate_reasoning() {
        let c = normalise(&json!({"prompt_tokens": 100, "prompt_cache_hit_tokens": 64,
            "completion_tokens": 10, "total_tokens": 140,
            "completion_tokens_details": {"reasoning_tokens": 30}}))
        .unwrap();
        assert_eq!(
            (c.input, c.cached, c.output, c.reasoning),
            (100, 64, 40, 30)
        );
    }

    #[test]
    fn responses_api_convention() {
        let c = normalise(
            &json!({"input_tokens": 100, "input_tokens_details": {"cached_tokens": 20},
            "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4}}),
        )
        .unwrap();
        assert_eq!((c.input, c.cached, c.output, c.reasoning), (100, 20, 9, 4));
    }

    #[test]
    fn bad_usage_is_refused() {
        assert!(normalise(&json!({"foo": 1})).is_err());
        assert!(normalise(&json!({"prompt_tokens": 200_000_000u64})).is_err());
    }

    #[test]
    fn local_counts_use_the_real_tokenizer_for_openai_and_over_estimate_otherwise() {
        let text = "The quick brown fox jumps over the lazy dog.";
        assert_eq!(Counter::for_model("openai", "gpt-4o"), Counter::O200k);
        assert_eq!(Counter::for_model("openai", "gpt-4"), Counter::Cl100k);
        assert_eq!(
            Counter::for_model("anthropic", "claude-sonnet-4-5"),
            Counter::Approx
        );
        // "The quick brown fox jumps over the lazy dog." is 10 tokens in o200k_base
        assert_eq!(Counter::O200k.count(text), 10);
        assert!(Counter::Approx.count(text) >= 15);
        let body = json!({"messages": [{"role": "user", "content": text}]});
        assert_eq!(chat_input(Counter::O200k, body.as_object().unwrap()), 16);
        let mut p = Produced::default();
        p.add(&json!({"content": "Hello"}));
        p.add(&json!({"content": ""}));
        p.add(&json!({"content": " world"}));
        assert_eq!(p.chunks, 2);
        assert_eq!(p.tokens(Counter::O200k), 2);
    }

    #[test]
    fn the_byte_bound_is_never_below_the_count() {
        let texts = [
            "",
            "a",
            "The quick brown fox jumps over the lazy dog.",
            "    \n\n\t  spaces   and\r\n  newlines  ",
            "1234567890 3.14159 -42 0x1F",
            "日本語のテキストと中文文本",
            "emoji 👩‍👩‍👧‍👦🏳️‍🌈 and accents: café naïve",
            "{\"json\": [1, 2, {\"k\": null}]}",
        ];
        for c in [Counter::O200k, Counter::Cl100k, Counter::Approx] {
            for t in texts {
                assert!(c.bound(t) >= c.count(t), "{c:?} {t:?}");
            }
        }
        let body = json!({
            "messages": [
                {"role": "system", "content": texts[2], "name": "sys"},
                {"role": "user", "content": [{"type": "text", "text": texts[5]},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1",
                    "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        });
        let body = body.as_object().unwrap();
        for c in [Counter::O200k, Counter::Cl100k, Counter::Approx] {
            assert!(chat_input_bound(c, body) >= chat_input(c, body), "{c:?}");
        }
        let emb = json!({"input": [texts[6], [1, 2, 3], texts[3]]});
        let emb = emb.as_object().unwrap();
        assert!(embedding_input_bound(Counter::O200k, emb) >= embedding_input(Counter::O200k, emb));
    }

    proptest::proptest! {
        #[test]
        fn the_byte_bound_holds_for_any_text(t in "\\PC{0,200}", ws in "[ \t\n]{0,40}") {
            let t = format!("{ws}{t}{ws}");
            for c in [Counter::O200k, Counter::Cl100k, Counter::Approx] {
                proptest::prop_assert!(c.bound(&t) >= c.count(&t));
            }
        }
    }
}
