//! One module per `burnish` subcommand.

pub mod bench;
pub mod data;
pub mod generate;
pub mod merge;
pub mod score;
pub mod template;
pub mod train;
