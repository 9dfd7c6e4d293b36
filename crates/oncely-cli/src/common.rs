//! Helpers shared by the subcommands: environment banner, output.
