//! An upstream's JSON response object, read only as far as the router needs it.
//!
//! A chat completion is mostly `choices` the router never looks at. Building a
//! `serde_json::Value` tree of all of it, and writing it back out, was the largest single
//! cost of a non-streamed request in the router's profile. Here the top-level members are
//! split off as raw slices of the upstream's bytes, only `id`, `usage` (and `choices`,
//! when usage must be estimated) are parsed, and the response is written back member by
//! member in the upstream's order, untouched ones byte for byte.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// The top-level members of a JSON object, in the order written; a key written twice keeps
/// its first place and its last value (the value `serde_json::Value` would keep).
pub struct RawObject<'a> {
    members: Vec<(String, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    /// `None` when the bytes are not one JSON object.
    pub fn parse(body: &'a [u8]) -> Option<RawObject<'a>> {
        serde_json::from_slice(body).ok()
    }

    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// A member parsed into a tree; `None` when absent or `null`.
    pub fn value(&self, key: &str) -> Option<Value> {
        let raw = self.get(key)?;
        if raw.get() == "null" {
            return None;
        }
        serde_json::from_str(raw.get()).ok()
    }

    /// A string member (`None` when absent or not a string).
    pub fn string(&self, key: &str) -> Option<String> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// The object written back, `key`'s value replaced by `with` (in its place, or added
    /// last when the upstream did not write it).
    pub fn to_vec_with(&self, key: &str, with: &Value) -> Vec<u8> {
        let size: usize = self
            .members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = Vec::with_capacity(size + 128);
        out.push(b'{');
        let mut replaced = false;
        for (k, v) in &self.members {
            if out.len() > 1 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, k).expect("a string serialises");
            out.push(b':');
            if k == key {
                serde_json::to_writer(&mut out, with).expect("a value serialises");
                replaced = true;
            } else {
                out.extend_from_slice(v.get().as_bytes());
            }
        }
        if !replaced {
            if out.len() > 1 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, key).expect("a string serialises");
            out.push(b':');
            serde_json::to_writer(&mut out, with).expect("a value serialises");
        }
        out.push(b'}');
        out
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut members: Vec<(String, &'de RawValue)> = Vec::with_capacity(8);
                while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                    match members.iter_mut().find(|(have, _)| *have == k) {
                        Some(slot) => slot.1 = v,
                        None => members.push((k, v)),
                    }
                }
                Ok(RawObject { members })
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
                Err(de::Error::custom("not an object"))
            }
        }
        d.deserialize_map(Members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn untouched_members_come_back_byte_for_byte_in_their_order() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"caf\u00e9 1.50"}}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12},"x_extra":1.000000000000000000001}"#;
        let o = RawObject::parse(body).unwrap();
        assert_eq!(o.string("id").as_deref(), Some("chatcmpl-1"));
        let mut usage = o.value("usage").unwrap();
        usage["cost"] = json!(0.5);
        let out = String::from_utf8(o.to_vec_with("usage", &usage)).unwrap();
        assert_eq!(
            out,
            r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"caf\u00e9 1.50"}}],"usage":{"completion_tokens":2,"cost":0.5,"prompt_tokens":10,"total_tokens":12},"x_extra":1.000000000000000000001}"#
        );
        // and it is the same JSON as the whole tree with the member replaced
        let mut whole: Value = serde_json::from_slice(body).unwrap();
        whole["usage"] = usage;
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), whole);
    }

    #[test]
    fn a_missing_or_null_member_is_none_and_is_added_or_replaced() {
        let o = RawObject::parse(br#"{"id":7,"usage":null}"#).unwrap();
        assert_eq!(o.string("id"), None, "not a string");
        assert_eq!(o.value("usage"), None);
        assert_eq!(
            o.to_vec_with("usage", &json!({"total_tokens": 3})),
            br#"{"id":7,"usage":{"total_tokens":3}}"#
        );
        let o = RawObject::parse(br#"{}"#).unwrap();
        assert_eq!(o.to_vec_with("usage", &json!(1)), br#"{"usage":1}"#);
    }

    #[test]
    fn a_key_written_twice_keeps_its_last_value_like_a_value_tree() {
        let body = br#"{"usage":{"total_tokens":1},"id":"a","usage":{"total_tokens":2}}"#;
        let o = RawObject::parse(body).unwrap();
        assert_eq!(o.value("usage"), Some(json!({"total_tokens": 2})));
        assert_eq!(
            serde_json::from_slice::<Value>(&o.to_vec_with("id", &json!("b"))).unwrap(),
            json!({"usage": {"total_tokens": 2}, "id": "b"})
        );
    }

    #[test]
    fn anything_but_one_object_is_refused() {
        for body in [&b"[1,2]"[..], b"\"x\"", b"{\"a\":1", b"{\"a\":1} x", b""] {
            assert!(RawObject::parse(body).is_none(), "{body:?}");
        }
    }
}
