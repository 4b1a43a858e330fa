//! Conversations as chat templates see them: a [`Message`] is a role, a content (either text or
//! a list of text parts, OpenAI style) and whatever other keys the message object had
//! (`tool_calls`, `tool_call_id`, `name`, `reasoning_content`, ...), which reach the template as
//! part of the message, as transformers passes each message dict whole. This module owns the
//! message types and the roles burnish accepts; reading them from dataset rows lives in
//! `format.rs`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
    /// The message object's other keys, in their order, passed to the template beside `role`
    /// and `content` (a template reads them as `message.tool_calls`, `message.name`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A message's content: plain text, or a list of parts passed to the template unchanged (so
/// templates that iterate over `content` render it as transformers does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a list content; only text parts are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

impl Message {
    /// A message with text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Content::Text(content.into()),
            extra: Map::new(),
        }
    }

    /// The message's other key `key`, unless it is absent or holds nothing: null, `""`, `[]` or
    /// `{}` (exports of mixed datasets fill keys a message lacks with null).
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.extra.get(key).filter(|v| match v {
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            Value::Bool(_) | Value::Number(_) => true,
        })
    }

    /// Whether the message calls tools: it has a non-empty `tool_calls` (such an assistant turn
    /// may have no text).
    pub fn has_tool_calls(&self) -> bool {
        self.field("tool_calls").is_some()
    }

    /// The content as one string (parts concatenated).
    pub fn text(&self) -> String {
        self.content.text()
    }
}

impl Content {
    /// The text, with list parts concatenated in order.
    pub fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts.iter().map(|p| p.text.as_str()).collect(),
        }
    }

    /// Whether the content holds no text at all.
    pub fn is_empty(&self) -> bool {
        match self {
            Content::Text(t) => t.is_empty(),
            Content::Parts(parts) => parts.iter().all(|p| p.text.is_empty()),
        }
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_string())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_parts_serialize_as_openai_parts() {
        let m = Message {
            role: "user".into(),
            content: Content::Parts(vec![ContentPart {
                kind: "text".into(),
                text: "hi".into(),
            }]),
            extra: Map::new(),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"role":"user","content":[{"type":"text","text":"hi"}]}"#
        );
        assert_eq!(m.text(), "hi");
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), m);
    }

    #[test]
    fn other_keys_are_kept_in_order_after_role_and_content() {
        let json = r#"{"role":"assistant","content":"","tool_calls":[{"type":"function","function":{"name":"f","arguments":{}}}],"name":null}"#;
        let m: Message = serde_json::from_str(json).unwrap();
        assert_eq!(
            m.extra.keys().collect::<Vec<_>>(),
            vec!["tool_calls", "name"]
        );
        assert!(m.has_tool_calls());
        assert_eq!(m.field("name"), None);
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
        let mut empty = Message::new("assistant", "");
        empty
            .extra
            .insert("tool_calls".into(), Value::Array(Vec::new()));
        assert!(!empty.has_tool_calls());
        assert!(!Message::new("assistant", "x").has_tool_calls());
    }
}
