//! Conversations as chat templates see them: a [`Message`] is a role and a content, the content
//! either text or a list of text parts (OpenAI style). This module owns the message types and the
//! roles burnish accepts; reading them from dataset rows lives in `format.rs`.

use serde::{Deserialize, Serialize};

/// The roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
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
        }
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
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"role":"user","content":[{"type":"text","text":"hi"}]}"#
        );
        assert_eq!(m.text(), "hi");
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), m);
    }
}
