//! `wsgateway outbox schema`: the outbox table's DDL, for `psql`.

use crate::config::{SettingValue, TableName};

#[derive(Debug, clap::Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    command: OutboxCommand,
}

#[derive(Debug, clap::Subcommand)]
enum OutboxCommand {
    /// Print the DDL of the outbox table, its dead letters and its NOTIFY
    /// trigger (`wsgateway outbox schema | psql "$DATABASE_URL"`).
    Schema {
        /// The table: `table` or `schema.table`, lower case.
        #[arg(
            long,
            env = "WSGATEWAY_OUTBOX_TABLE",
            default_value = "wsgateway_outbox",
            value_parser = parse_table
        )]
        table: TableName,
    },
}

fn parse_table(raw: &str) -> Result<TableName, String> {
    TableName::parse_setting(raw)
}

pub fn run(args: OutboxArgs) -> anyhow::Result<()> {
    match args.command {
        OutboxCommand::Schema { table } => print!("{}", crate::outbox::schema(&table)),
    }
    Ok(())
}
