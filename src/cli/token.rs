//! `wsgateway token`: mint tokens for development and tests.

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::auth::{StaffClaims, TableClaims, mint, unix_now};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    kind: TokenKind,
}

#[derive(Debug, Subcommand)]
enum TokenKind {
    /// A staff JWT (HS256 with JWT_SECRET).
    Staff {
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// User id (`sub`).
        #[arg(long)]
        sub: i64,
        #[arg(long)]
        tenant: i64,
        /// Branch ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        branches: Vec<i64>,
        /// Roles, comma separated: ADMIN, MANAGER, KITCHEN, WAITER.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        #[arg(long)]
        jti: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_s: u64,
    },
    /// A diner's table token (HS256 with TABLE_TOKEN_SECRET).
    Table {
        #[arg(long, env = "TABLE_TOKEN_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long)]
        tenant: i64,
        #[arg(long)]
        branch: i64,
        #[arg(long)]
        table: i64,
        #[arg(long)]
        session: i64,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_s: u64,
    },
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    // `--secret "$JWT_SECRET"` with the variable unset passes an empty
    // secret: a token signed with it is valid for nobody, and silently so.
    let (secret, env) = match &args.kind {
        TokenKind::Staff { secret, .. } => (secret, "JWT_SECRET"),
        TokenKind::Table { secret, .. } => (secret, "TABLE_TOKEN_SECRET"),
    };
    if secret.trim().is_empty() {
        bail!("--secret is empty (is {env} set?): refusing to sign a token with an empty secret");
    }
    let now = unix_now();
    let token = match args.kind {
        TokenKind::Staff {
            secret,
            sub,
            tenant,
            branches,
            roles,
            jti,
            ttl_s,
        } => mint(
            &secret,
            &StaffClaims {
                sub,
                tenant_id: tenant,
                branch_ids: branches,
                roles,
                exp: now + ttl_s,
                iat: Some(now),
                jti,
            },
        ),
        TokenKind::Table {
            secret,
            tenant,
            branch,
            table,
            session,
            ttl_s,
        } => mint(
            &secret,
            &TableClaims {
                tenant_id: tenant,
                branch_id: branch,
                table_id: table,
                session_id: session,
                exp: now + ttl_s,
            },
        ),
    };
    println!("{token}");
    Ok(())
}
