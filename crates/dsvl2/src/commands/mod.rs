//! One module per subcommand.

pub mod prepare;
pub mod generate;
pub mod request;
