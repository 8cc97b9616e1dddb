//! One module per subcommand.

pub mod chat;
pub mod download;
pub mod generate;
pub mod prepare;
pub mod request;
pub mod serve;
