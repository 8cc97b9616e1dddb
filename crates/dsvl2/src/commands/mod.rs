//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod download;
pub mod generate;
pub mod prepare;
pub mod quantize;
pub mod random_model;
pub mod request;
pub mod serve;
