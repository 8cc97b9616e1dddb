//! One module per subcommand.

pub mod generate;
pub mod prepare;
pub mod request;
