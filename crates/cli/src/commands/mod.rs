//! One module per `burnish` subcommand, and the streaming output `generate` and `chat` share.

pub mod bench;
pub mod chat;
pub mod data;
pub mod generate;
pub mod merge;
pub mod push;
pub mod score;
pub mod stream;
pub mod template;
pub mod train;
