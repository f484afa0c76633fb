//! `wsgateway dev`: a gateway ready to try, with everything printed.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;

use super::{ServeArgs, init_tracing, runtime, shutdown_signals};
use crate::Gateway;
use crate::auth::{Endpoint, StaffClaims, TableClaims, mint, unix_now};
use crate::config::Secret;
use crate::http::{DemoPage, DevSession, DevToken};

/// Fixed development secrets: printed tokens are signed with them. Never
/// use them in production.
pub const DEV_JWT_SECRET: &str = "wsgateway-dev-jwt-secret";
pub const DEV_TABLE_TOKEN_SECRET: &str = "wsgateway-dev-table-token-secret";
pub const DEV_API_KEY: &str = "wsgateway-dev-api-key";

pub fn run(mut args: ServeArgs) -> anyhow::Result<()> {
    // Loopback by default: the secrets are public.
    let s = &mut args.settings;
    s.listen.get_or_insert_with(|| "127.0.0.1:8001".into());
    let mut config = args.load()?;
    let (listen, refused) = loopback_only(config.listen);
    if let Some(refused) = refused {
        eprintln!(
            "wsgateway dev: not listening on {refused} (the development secrets are public); listening on {listen} instead"
        );
    }
    config.listen = listen;
    // `dev` is the one-node development gateway: always the embedded broker.
    if config.redis_url.take().is_some() {
        eprintln!("wsgateway dev: ignoring REDIS_URL (dev always uses the embedded broker)");
    }
    if config.revoked_jti_key.take().is_some() {
        eprintln!("wsgateway dev: ignoring WSGATEWAY_REVOKED_JTI_KEY (it needs Redis)");
    }
    let jwt = config
        .jwt_secret
        .get_or_insert(Secret(DEV_JWT_SECRET.into()))
        .clone();
    let table = config
        .table_token_secret
        .get_or_insert(Secret(DEV_TABLE_TOKEN_SECRET.into()))
        .clone();
    let api_key = config
        .api_key
        .get_or_insert(Secret(DEV_API_KEY.into()))
        .clone();
    let (jwt_shown, table_shown) = (jwt.clone(), table.clone());
    init_tracing(config.log_format);
    runtime()?.block_on(async move {
        let listener = crate::http::server::listen(config.listen, config.listen_backlog)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let session = DevSession {
            api_key: api_key.expose().to_owned(),
            mint: Box::new(move || dev_tokens(&jwt, &table)),
        };
        let secrets = DevSecrets {
            jwt: jwt_shown,
            table: table_shown,
            api_key,
        };
        print_banner(addr, &(session.mint)(), &secrets);
        let gateway = Gateway::new(config)?.with_demo_page(DemoPage::dev(session));
        gateway.serve(listener, shutdown_signals()).await?;
        Ok(())
    })
}

/// `dev` signs with public secrets: anyone who can reach it can mint an
/// ADMIN token. So it listens on loopback only, whatever address it is
/// given (typically a `WSGATEWAY_LISTEN` meant for `serve`), keeping the
/// port. Returns the address to listen on and, when it differs, the one
/// refused.
fn loopback_only(given: SocketAddr) -> (SocketAddr, Option<SocketAddr>) {
    if given.ip().is_loopback() {
        (given, None)
    } else {
        let loopback = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), given.port());
        (loopback, Some(given))
    }
}

/// The development tokens (tenant 1, branch 5; valid 24 h from now): the
/// banner prints them and the demo page gets fresh ones on each load.
fn dev_tokens(jwt: &Secret, table: &Secret) -> Vec<DevToken> {
    let exp = unix_now() + 24 * 3600;
    let staff = |sub: i64, role: &str| {
        mint(
            jwt.expose(),
            &StaffClaims {
                sub,
                tenant_id: 1,
                branch_ids: vec![5],
                roles: vec![role.to_string()],
                exp,
                iat: Some(unix_now()),
                jti: None,
            },
        )
    };
    let diner = mint(
        table.expose(),
        &TableClaims {
            tenant_id: 1,
            branch_id: 5,
            table_id: 12,
            session_id: 77,
            exp,
        },
    );
    vec![
        DevToken::new(Endpoint::Waiter, "waiter 7 (WAITER)", staff(7, "WAITER")),
        DevToken::new(
            Endpoint::Kitchen,
            "kitchen 8 (KITCHEN)",
            staff(8, "KITCHEN"),
        ),
        DevToken::new(Endpoint::Admin, "admin 9 (ADMIN)", staff(9, "ADMIN")),
        DevToken::new(Endpoint::Diner, "diner (table 12, session 77)", diner),
    ]
}

fn print_banner(addr: SocketAddr, tokens: &[DevToken], secrets: &DevSecrets) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "wsgateway".into());
    let key = secrets.api_key.expose();
    println!("wsgateway dev: embedded broker, DEVELOPMENT SECRETS (never use them in production)");
    println!("listening on http://{addr}   demo page: http://{addr}/");
    println!();
    // Printed so that `wsgateway token` and a backend can sign and publish
    // for this gateway; a secret the user gave is theirs, not repeated.
    println!("Secrets:");
    for (env, secret, dev) in [
        ("JWT_SECRET", &secrets.jwt, DEV_JWT_SECRET),
        ("TABLE_TOKEN_SECRET", &secrets.table, DEV_TABLE_TOKEN_SECRET),
        ("WSGATEWAY_API_KEY", &secrets.api_key, DEV_API_KEY),
    ] {
        if secret.expose() == dev {
            println!("  {env}={dev}");
        } else {
            println!("  {env}: as given");
        }
    }
    println!();
    println!("Tokens (tenant 1, branch 5; valid 24 h):");
    for t in tokens {
        let (name, param) = (t.endpoint.as_str(), t.endpoint.token_param());
        println!("  {name:<7} ws://{addr}/ws/{name}?{param}={}", t.token);
    }
    println!();
    // Both commands reach the first URL above (the waiter), as a newcomer
    // connects that one first.
    println!(
        "Publish an event to the waiter (and the admin; for the kitchen use channel:branch:5:kitchen, for the diner channel:session:77 with \"session_id\":77):"
    );
    println!(
        "  {exe} publish --url http://{addr} --api-key {key} --channel channel:branch:5:waiters --event '{{\"type\":\"ROUND_READY\",\"tenant_id\":1,\"branch_id\":5}}'"
    );
    println!("or with curl:");
    println!(
        "  curl -sS -X POST http://{addr}/api/publish -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"channel\":\"channel:branch:5:waiters\",\"event\":{{\"type\":\"ROUND_READY\",\"tenant_id\":1,\"branch_id\":5}}}}'"
    );
    println!();
}

/// The secrets `dev` runs with: its development ones unless given.
struct DevSecrets {
    jwt: Secret,
    table: Secret,
    api_key: Secret,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_listens_on_loopback_only_keeping_the_port() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            loopback_only(addr("127.0.0.1:9000")),
            (addr("127.0.0.1:9000"), None)
        );
        assert_eq!(
            loopback_only(addr("[::1]:9000")),
            (addr("[::1]:9000"), None)
        );
        assert_eq!(
            loopback_only(addr("0.0.0.0:9000")),
            (addr("127.0.0.1:9000"), Some(addr("0.0.0.0:9000")))
        );
        assert_eq!(
            loopback_only(addr("[::]:8001")),
            (addr("127.0.0.1:8001"), Some(addr("[::]:8001")))
        );
        assert_eq!(
            loopback_only(addr("192.0.2.7:8001")),
            (addr("127.0.0.1:8001"), Some(addr("192.0.2.7:8001")))
        );
    }
}
