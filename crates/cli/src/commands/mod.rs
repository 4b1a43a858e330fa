//! One module per `burnish` subcommand.

pub mod bench;
pub mod generate;
pub mod merge;
pub mod score;
