//! One validation (PROTOCOL.md §5, "Refusals"): an event is refused for the
//! same reason whichever way it comes in. A table of invalid events goes
//! through the publish API (a 400 and its code), the `wsgateway_publish`
//! function (an error reply with the same code and reason) and a plain
//! `PUBLISH` (dropped, and counted under the reason the code maps to),
//! against one gateway in Redis mode and its private Redis; clients get
//! the valid controls and nothing else. Then generated events, valid and
//! not, are given to the function and to the gateway's own parser, which
//! must agree on each.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use wsgateway::broker::{LibraryBounds, RedisChannelKey, RedisNames};
use wsgateway::channel::Channel;
use wsgateway::config::{Secret, Secs};
use wsgateway::event::{Fields, InvalidEvent, RESERVED_TYPES, stale_detail, unix_ms};

const LIBRARY: &str = include_str!("../../src/broker/lua/wsgateway.lua");

/// The gateway's stale limit here: not the default 30 s, so that the
/// function is seen to use the one the gateway recorded.
const STALE_S: u64 = 45;

/// PROTOCOL.md §5, "Refusals": each refusal's code (the publish API's and
/// the function's) and the `wsgateway_events_dropped_total` reason of a
/// plain `PUBLISH` refused the same way. Written out here, not taken from
/// the gateway's code, so that a change to either side is seen.
fn dropped_as(code: &str) -> &'static str {
    match code {
        "invalid_event" => "invalid",
        "reserved_type" => "reserved_type",
        "stale_event" => "stale",
        "unknown_channel" => "unknown_channel",
        other => panic!("no drop reason for {other}"),
    }
}

/// What one way in should do with a case.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Delivered,
    Refused(&'static str, String),
}

struct Case {
    what: String,
    channel: &'static str,
    /// The event's text, raw: `1.0` stays `1.0`. Objects get a marker
    /// field `n` first, naming the case and the way it came in.
    event: String,
    /// For the publish API and a plain `PUBLISH`.
    gateway: Outcome,
    /// For the function: the same, but for ids of 2^53 or more.
    function: Outcome,
}

fn refused(code: &'static str, reason: &str) -> Outcome {
    Outcome::Refused(code, reason.to_owned())
}

fn case(what: &str, channel: &'static str, event: &str, outcome: Outcome) -> Case {
    Case {
        what: what.to_owned(),
        channel,
        event: event.to_owned(),
        gateway: outcome.clone(),
        function: outcome,
    }
}

fn wrong_type(field: &str) -> Outcome {
    refused(
        "invalid_event",
        &format!("the event's field `{field}` has the wrong type"),
    )
}

fn table() -> Vec<Case> {
    let now_ms = unix_ms();
    let now_s = now_ms as f64 / 1000.0;
    let stale_ms = now_ms - 60_000;
    let stale_s = now_s - 60.0;
    // Older than the default 30 s, fresh by the gateway's 45 s.
    let older_than_default = now_ms - 38_000;
    let bad_id = refused(
        "invalid_event",
        "`event_id` must be a non-empty string of at most 128 bytes",
    );
    let stale = refused(
        "stale_event",
        &stale_detail(std::time::Duration::from_secs(STALE_S)),
    );
    let admin = "channel:branch:5:admin";
    let waiters = "channel:branch:5:waiters";
    let mut cases = vec![
        case(
            "tenant_id 1.0",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":1.0,"branch_id":5}"#,
            wrong_type("tenant_id"),
        ),
        case(
            "branch_id 5e0",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5e0}"#,
            wrong_type("branch_id"),
        ),
        case(
            "sector_id 3.5",
            "channel:sector:5:3:waiters",
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"sector_id":3.5}"#,
            wrong_type("sector_id"),
        ),
        case(
            "tenant_id -0 (a float to serde_json)",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":-0,"branch_id":5}"#,
            wrong_type("tenant_id"),
        ),
        case(
            "tenant_id beyond i64",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":9223372036854775808,"branch_id":5}"#,
            wrong_type("tenant_id"),
        ),
        case(
            "tenant_id a string",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":"1","branch_id":5}"#,
            wrong_type("tenant_id"),
        ),
        case(
            "a string ts",
            admin,
            &format!(r#"{{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"ts":"{now_ms}"}}"#),
            wrong_type("ts"),
        ),
        case(
            "a stale ts in ms",
            admin,
            &format!(r#"{{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"ts":{stale_ms}}}"#),
            stale.clone(),
        ),
        case(
            "a stale ts in seconds",
            waiters,
            &format!(r#"{{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"ts":{stale_s}}}"#),
            stale,
        ),
        case(
            "no type",
            admin,
            r#"{"tenant_id":1,"branch_id":5}"#,
            refused("invalid_event", "the event lacks the required field `type`"),
        ),
        case(
            "an empty type",
            admin,
            r#"{"type":"","tenant_id":1,"branch_id":5}"#,
            wrong_type("type"),
        ),
        case(
            "no branch_id",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":1}"#,
            refused(
                "invalid_event",
                "the event lacks the required field `branch_id`",
            ),
        ),
        case(
            "an array",
            admin,
            r#"[{"type":"ROUND_READY","tenant_id":1,"branch_id":5}]"#,
            refused("invalid_event", "the event is not a JSON object"),
        ),
        case(
            "a string",
            admin,
            r#""ROUND_READY""#,
            refused("invalid_event", "the event is not a JSON object"),
        ),
        case(
            "an empty event_id",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"event_id":""}"#,
            bad_id.clone(),
        ),
        case(
            "a number event_id",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"event_id":7}"#,
            bad_id.clone(),
        ),
        case(
            "an event_id of 129 bytes",
            admin,
            &format!(
                r#"{{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"event_id":"{}"}}"#,
                "é".repeat(64) + "x"
            ),
            bad_id,
        ),
        case(
            "another branch than its channel's",
            waiters,
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":6}"#,
            refused(
                "invalid_event",
                "the event's `branch_id` differs from its channel's (channel:branch:5:waiters)",
            ),
        ),
        case(
            "another sector than its channel's",
            "channel:sector:5:3:waiters",
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"sector_id":4}"#,
            refused(
                "invalid_event",
                "the event's `sector_id` differs from its channel's (channel:sector:5:3:waiters)",
            ),
        ),
        case(
            "another session than its channel's",
            "channel:session:77",
            r#"{"type":"TABLE_CLEARED","tenant_id":1,"branch_id":5,"session_id":78}"#,
            refused(
                "invalid_event",
                "the event's `session_id` differs from its channel's (channel:session:77)",
            ),
        ),
        case(
            "an array entity",
            admin,
            r#"{"type":"ENTITY_UPDATED","tenant_id":1,"branch_id":5,"entity":[1]}"#,
            wrong_type("entity"),
        ),
        case(
            "an empty array entity",
            admin,
            r#"{"type":"ENTITY_UPDATED","tenant_id":1,"branch_id":5,"entity":[]}"#,
            wrong_type("entity"),
        ),
        case(
            "a string entity",
            admin,
            r#"{"type":"ENTITY_UPDATED","tenant_id":1,"branch_id":5,"entity":"x"}"#,
            wrong_type("entity"),
        ),
        case(
            "a channel that matches a pattern but is no channel",
            "channel:branch:x:admin",
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5}"#,
            refused(
                "unknown_channel",
                r#"unknown channel "channel:branch:x:admin""#,
            ),
        ),
    ];
    for t in RESERVED_TYPES {
        cases.push(case(
            &format!("the reserved type {t}"),
            admin,
            &format!(r#"{{"type":"{t}","tenant_id":1,"branch_id":5}}"#),
            refused(
                "reserved_type",
                &format!("the type `{t}` is reserved for the gateway's own frames"),
            ),
        ));
    }
    // A reserved type spelled with an escape is still reserved.
    cases.push(case(
        "a reserved type spelled with an escape",
        "channel:session:77",
        r#"{"type":"p\u006fng","tenant_id":1,"branch_id":5}"#,
        refused(
            "reserved_type",
            "the type `pong` is reserved for the gateway's own frames",
        ),
    ));
    // The function reads ids as doubles: from 2^53 on it refuses what the
    // gateway takes.
    cases.push(Case {
        what: "sector_id 2^53 + 1".into(),
        channel: admin,
        event: r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"sector_id":9007199254740993}"#
            .into(),
        gateway: Outcome::Delivered,
        function: refused(
            "invalid_event",
            "the event's field `sector_id` is 2^53 or more in magnitude, more than the \
             function reads exactly; publish it through the API",
        ),
    });
    // Valid controls.
    for (what, channel, event) in [
        (
            "a plain event",
            admin,
            r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5}"#.to_owned(),
        ),
        (
            "integers, an entity, a fresh ts in seconds",
            "channel:sector:5:3:waiters",
            format!(
                r#"{{"type":"ENTITY_UPDATED","tenant_id":1,"branch_id":5,"sector_id":3,"entity":{{"a":[1.0,5e0]}},"ts":{now_s}}}"#
            ),
        ),
        (
            "a ts older than 30 s but within the gateway's 45 s",
            admin,
            format!(
                r#"{{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"ts":{older_than_default}}}"#
            ),
        ),
        (
            "nulls, a type like a reserved one, and an unknown one",
            "channel:session:77",
            r#"{"type":"Pong","tenant_id":1,"branch_id":5,"session_id":77,"sector_id":null,"entity":null,"ts":null}"#.to_owned(),
        ),
        (
            "an unknown type",
            waiters,
            r#"{"type":"ROUND_VOIDED","tenant_id":1,"branch_id":5,"table_id":-3}"#.to_owned(),
        ),
    ] {
        cases.push(case(what, channel, &event, Outcome::Delivered));
    }
    cases
}

/// The case's event with its marker first (objects only).
fn marked(event: &str, marker: &str) -> String {
    match event.strip_prefix('{') {
        Some(rest) => format!(r#"{{"n":"{marker}",{rest}"#),
        None => event.to_owned(),
    }
}

/// `FCALL wsgateway_publish 0 <channels> <event>`: the id, or the error
/// reply as (code, reason).
fn fcall(
    conn: &mut redis::Connection,
    channels: &[&str],
    event: &[u8],
) -> Result<String, (String, String)> {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("wsgateway_publish").arg(0);
    for c in channels {
        cmd.arg(*c);
    }
    cmd.arg(event)
        .query::<(String, String)>(conn)
        .map(|(id, _)| id)
        .map_err(|e| {
            let detail = e.detail().unwrap_or_default();
            let rest = detail
                .strip_prefix("wsgateway ")
                .unwrap_or_else(|| panic!("not the function's refusal: {e}"));
            let (code, reason) = rest.split_once(": ").expect("code: reason");
            (code.to_owned(), reason.to_owned())
        })
}

/// Frames until the one marked `fence`; their markers (`?` for a frame
/// without one).
async fn markers_until(client: &mut Client, fence: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let frame = client
            .next_json()
            .await
            .unwrap_or_else(|| panic!("no fence; got {got:?}"));
        let n = frame["n"].as_str().unwrap_or("?").to_owned();
        if n == fence {
            return got;
        }
        got.push(if n == "?" { frame.to_string() } else { n });
    }
}

/// Waits until `reason` has counted `want` drops; panics, naming the case,
/// when another reason counted it instead.
async fn wait_dropped(gw: &TestGateway, reason: &str, want: f64, what: &str) {
    let sample = format!("wsgateway_events_dropped_total{{reason=\"{reason}\"}}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = gw.metrics().await;
        let n = metric_value(&text, &sample).unwrap_or(0.0);
        if n >= want {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let dropped: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("wsgateway_events_dropped_total"))
                .collect();
            panic!("{what}: not dropped as {reason} within 10 s; {dropped:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Who hears a channel of the table: the branch 5 admin, or the diner of
/// session 77.
fn hears(channel: &str) -> Option<usize> {
    match channel {
        "channel:session:77" => Some(1),
        c if c.starts_with("channel:branch:5:") || c.starts_with("channel:sector:5:") => Some(0),
        _ => None,
    }
}

#[tokio::test]
async fn the_api_the_function_and_plain_publish_refuse_each_invalid_event_alike() {
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.stale_event_s = Secs(Duration::from_secs(STALE_S));
    })
    .await;
    gw.wait_connected().await;
    // The library is loaded, and the settings recorded, on the first
    // command connection.
    gw.wait_health(Duration::from_secs(10), |_, b| b["status"] == "healthy")
        .await;
    let (admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let (diner, _) = gw.join("diner", &diner(1, 5, 1, 77)).await;
    let mut clients = [admin, diner];
    let mut conn = server.client().get_connection().unwrap();
    let mut expected: [BTreeSet<String>; 2] = Default::default();
    let mut drops: std::collections::BTreeMap<&str, f64> = Default::default();

    // The table is made again for each case, so that its timestamps are
    // as old as they say when the case is published.
    for i in 0..table().len() {
        let case = table().swap_remove(i);
        let what = &case.what;
        // (a) The publish API: the body carries the event's text as is.
        let marker = format!("{what} / api");
        let event = marked(&case.event, &marker);
        let body = format!(r#"{{"channel":"{}","event":{event}}}"#, case.channel);
        let (status, answer) = gw.publish_raw(Some(API_KEY), body).await;
        match &case.gateway {
            Outcome::Delivered => {
                assert_eq!(status, 202, "{what}: {answer}");
                expected[hears(case.channel).unwrap()].insert(marker);
            }
            Outcome::Refused(code, reason) => {
                assert_eq!(
                    (status, answer["error"].as_str(), answer["detail"].as_str()),
                    (400, Some(*code), Some(format!("item 0: {reason}").as_str())),
                    "{what}: the publish API"
                );
            }
        }

        // (b) The function.
        let marker = format!("{what} / function");
        let event = marked(&case.event, &marker);
        let answer = fcall(&mut conn, &[case.channel], event.as_bytes());
        match &case.function {
            Outcome::Delivered => {
                assert!(answer.is_ok(), "{what}: the function: {answer:?}");
                expected[hears(case.channel).unwrap()].insert(marker);
            }
            Outcome::Refused(code, reason) => {
                assert_eq!(
                    answer,
                    Err((code.to_string(), reason.clone())),
                    "{what}: the function"
                );
            }
        }

        // (c) A plain PUBLISH: dropped, and counted under its reason.
        let marker = format!("{what} / publish");
        let event = marked(&case.event, &marker);
        match &case.gateway {
            Outcome::Delivered => {
                assert!(server.publish(case.channel, &event) >= 1, "{what}");
                expected[hears(case.channel).unwrap()].insert(marker);
            }
            Outcome::Refused(code, _) => {
                let reason = dropped_as(code);
                let count = drops.entry(reason).or_default();
                *count += 1.0;
                let want = *count;
                assert!(server.publish(case.channel, &event) >= 1, "{what}");
                wait_dropped(&gw, reason, want, what).await;
            }
        }
    }

    // A fence after everything, on one subscription and one dispatcher:
    // what came before it is all that will ever come.
    for (channel, client) in ["channel:branch:5:admin", "channel:session:77"]
        .into_iter()
        .zip(&mut clients)
    {
        let fence = r#"{"n":"fence","type":"ROUND_READY","tenant_id":1,"branch_id":5}"#;
        server.publish(channel, fence);
        let got = markers_until(client, "fence").await;
        let k = hears(channel).unwrap();
        let got_set: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(got.len(), got_set.len(), "each once: {got:?}");
        assert_eq!(got_set, expected[k], "what {channel}'s client received");
    }
    // Exactly the plain PUBLISHes were dropped: nothing the API or the
    // function took was dropped by the node.
    for reason in ["invalid", "reserved_type", "stale", "unknown_channel"] {
        let want = drops.get(reason).copied().unwrap_or(0.0);
        gw.assert_metric(
            &format!("events_dropped_total{{reason=\"{reason}\"}}"),
            want,
        )
        .await;
    }
    gw.assert_metric(
        r#"publish_rejected_total{reason="reserved_type"}"#,
        (RESERVED_TYPES.len() + 1) as f64,
    )
    .await;
    gw.stop().await;
}

/// A connection to `server` with the function library loaded as written
/// (no prefix, no signing key).
fn with_library(server: &RedisServer) -> redis::Connection {
    let mut conn = server.client().get_connection().unwrap();
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(LIBRARY)
        .query(&mut conn)
        .unwrap();
    conn
}

/// The function's stale limit is the one the gateway loaded the library
/// with (`WSGATEWAY_STALE_EVENT_S`), 30 s in the source as written.
#[test]
fn the_stale_limit_is_the_one_the_library_was_loaded_with() {
    let server = RedisServer::start();
    let mut conn = with_library(&server);
    let aged = |conn: &mut redis::Connection, age_s: i64| {
        let ts = unix_ms() - age_s * 1000;
        let event = format!(r#"{{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"ts":{ts}}}"#);
        fcall(conn, &["channel:branch:5:admin"], event.as_bytes())
            .map(|_| ())
            .map_err(|(code, _)| code)
    };
    let stale = Err("stale_event".to_owned());
    assert_eq!(aged(&mut conn, 20), Ok(()));
    assert_eq!(aged(&mut conn, 40), stale);
    let library = RedisNames::default().library(
        &RedisChannelKey::derive("secret", ""),
        &LibraryBounds {
            size: 1000,
            ttl_ms: 600_000,
            max_channels: 100,
            stale_ms: 60_000,
        },
    );
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library)
        .query(&mut conn)
        .unwrap();
    assert_eq!(aged(&mut conn, 40), Ok(()));
    assert_eq!(aged(&mut conn, 90), stale);
}

/// What the gateway does with an event given to the publish API on
/// `channels` (and with a plain `PUBLISH` of it on one of them): `Ok`, or
/// the code and reason of its refusal. `stale_ms` and `now_ms` as the
/// function will see them.
fn gateway_verdict(
    channels: &[&str],
    text: &[u8],
    now_ms: i64,
    stale_ms: i64,
) -> Result<Value, (String, String)> {
    let refusal = |e: InvalidEvent| (e.refusal().code().to_owned(), e.to_string());
    let mut parsed = Vec::new();
    for name in channels {
        let channel: Channel = name
            .parse()
            .map_err(|e: wsgateway::channel::UnknownChannel| {
                ("unknown_channel".to_owned(), e.to_string())
            })?;
        parsed.push(channel);
    }
    let text = std::str::from_utf8(text).map_err(|_| refusal(InvalidEvent::NotUtf8))?;
    let fields = Fields::parse(text).map_err(refusal)?;
    for channel in parsed {
        fields
            .check_channel(channel)
            .map_err(|e| (e.refusal().code().to_owned(), format!("{e} ({channel})")))?;
    }
    if fields
        .ts_ms
        .is_some_and(|ts| now_ms.saturating_sub(ts) > stale_ms)
    {
        let limit = std::time::Duration::from_millis(stale_ms as u64);
        return Err(("stale_event".to_owned(), stale_detail(limit)));
    }
    Ok(serde_json::from_str(text).unwrap())
}

/// The function's verdict: the gateway's, but for ids of 2^53 or more.
fn function_verdict(
    channels: &[&str],
    text: &[u8],
    now_ms: i64,
    stale_ms: i64,
) -> Result<(), (String, String)> {
    let event = gateway_verdict(channels, text, now_ms, stale_ms)?;
    for field in [
        "tenant_id",
        "branch_id",
        "sector_id",
        "session_id",
        "table_id",
    ] {
        if event[field]
            .as_i64()
            .is_some_and(|v| v.unsigned_abs() >= 1 << 53)
        {
            return Err((
                "invalid_event".to_owned(),
                format!(
                    "the event's field `{field}` is 2^53 or more in magnitude, more than the \
                     function reads exactly; publish it through the API"
                ),
            ));
        }
    }
    Ok(())
}

/// Pieces events are made of: valid values most of the time, and the
/// values that JSON decoders disagree on.
const TYPES: &[&str] = &[
    r#""ROUND_READY""#,
    r#""ROUND_READY""#,
    r#""X""#,
    r#""""#,
    r#""pong""#,
    r#""p\u006Fng""#,
    r#""Pong""#,
    r#""token_refreshed""#,
    r#""\ud83d\ude00""#,
    r#""\u0000""#,
    r#"5"#,
    r#"null"#,
    r#"["pong"]"#,
    r#""é""#,
];
const INTS: &[&str] = &[
    "1",
    "5",
    "5",
    "0",
    "-7",
    "1.0",
    "5e0",
    "5E+0",
    "-0",
    "01",
    "+5",
    "0x5",
    ".5",
    "5.",
    "\"5\"",
    "null",
    "true",
    "[]",
    "{}",
    "9007199254740991",
    "9007199254740992",
    "-9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "1e400",
    "NaN",
    "Infinity",
];
const ENTITIES: &[&str] = &[
    "{}",
    r#"{"waiter_id":7}"#,
    r#"{"waiter_id":1.5,"x":[{}]}"#,
    "[]",
    "[1]",
    "\"x\"",
    "5",
    "null",
    "{\"a\":}",
];
const EVENT_IDS: &[&str] = &[r#""e1""#, r#""e\"2""#, r#""""#, "7", "null", r#""\u00e9""#];
const EXTRAS: &[&str] = &[
    r#""plain""#,
    r#""esc \" \\ \/ \b \f \n \r \t \u00e9 \uD83D\uDE00""#,
    r#""\uDE00""#,
    r#""\uD83D""#,
    r#""\uD83Dx""#,
    r#""\x""#,
    "\"tab\tinside\"",
    "\"nul\u{0}inside\"",
    "\"del\u{7f}inside\"",
    "[1,2,[3,{\"a\":null}]]",
    "[1,]",
    "{\"a\":1,}",
    "{\"a\" 1}",
    "[1 2]",
    "1e400",
    "-1e400",
    "1e-400",
    "123456789012345678901234567890",
    "0.5e-3",
    "-",
    "tru",
    "nulll",
    "true",
    "false",
];

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// A random event text for `channels`: fields in a random order, some
/// missing, some repeated, some of the values above; sometimes deep
/// nesting, odd spacing or a byte changed.
fn generate(rng: &mut StdRng, now_ms: i64) -> Vec<u8> {
    let now_s = now_ms as f64 / 1000.0;
    let ts = [
        now_ms.to_string(),
        format!("{now_s}"),
        format!("{}e3", now_s),
        format!("{}", now_s as i64),
        (now_ms - 60_000).to_string(),
        format!("{}", now_s - 60.0),
        "\"now\"".to_owned(),
        "-1e300".to_owned(),
        "1e300".to_owned(),
        "-9223372036854775808".to_owned(),
        "18446744073709551615".to_owned(),
        "null".to_owned(),
        "[]".to_owned(),
    ];
    let mut members: Vec<(String, String)> = Vec::new();
    let mut member = |rng: &mut StdRng, name: &str, valid: &str, odd: &[&str], p_absent: f64| {
        if rng.random_bool(p_absent) {
            return;
        }
        let value = if rng.random_bool(0.85) {
            valid.to_owned()
        } else {
            pick(rng, odd).to_owned()
        };
        members.push((format!("\"{name}\""), value));
    };
    member(rng, "type", r#""ROUND_READY""#, TYPES, 0.05);
    member(rng, "tenant_id", "1", INTS, 0.05);
    member(rng, "branch_id", "5", INTS, 0.05);
    member(rng, "sector_id", "3", INTS, 0.6);
    member(rng, "session_id", "77", INTS, 0.6);
    member(rng, "table_id", "2", INTS, 0.7);
    member(rng, "entity", "{}", ENTITIES, 0.7);
    member(rng, "event_id", r#""e1""#, EVENT_IDS, 0.6);
    // Fresh (the first three) most of the time.
    let t = match rng.random_bool(0.7) {
        true => ts[rng.random_range(0..3)].clone(),
        false => ts[rng.random_range(0..ts.len())].clone(),
    };
    if rng.random_bool(0.5) {
        members.push(("\"ts\"".to_owned(), t));
    }
    for _ in 0..rng.random_range(0..3) {
        let value = match rng.random_bool(0.8) {
            true => r#"{"fine":[1.5,-0,"\u00e9",true,null]}"#,
            false => pick(rng, EXTRAS),
        };
        members.push(("\"x\"".to_owned(), value.to_owned()));
    }
    if rng.random_bool(0.05) {
        let depth = rng.random_range(125..130);
        members.push((
            "\"deep\"".to_owned(),
            "[".repeat(depth) + &"]".repeat(depth),
        ));
    }
    if rng.random_bool(0.05) {
        // A key spelled with an escape, or a repeated field (the last counts).
        let (k, v) = match rng.random_range(0..3) {
            0 => (r#""t\u0079pe""#, r#""resync""#),
            1 => (r#""type""#, r#""ROUND_SERVED""#),
            _ => (r#""branch_id""#, "6"),
        };
        members.push((k.to_owned(), v.to_owned()));
    }
    // Shuffle.
    for i in (1..members.len()).rev() {
        members.swap(i, rng.random_range(0..=i));
    }
    // JSON's four spaces, and three that are not.
    let spaces = [" ", "\t", "\n", "\r", "\u{b}", "\u{c}", "\u{a0}"];
    let space = |rng: &mut StdRng| match rng.random_range(0..100) {
        0..90 => "",
        90..99 => spaces[rng.random_range(0..4)],
        _ => spaces[rng.random_range(4..7)],
    };
    let mut text = String::new();
    text.push_str(space(rng));
    text.push('{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(space(rng));
        text.push_str(k);
        text.push_str(space(rng));
        text.push(':');
        text.push_str(space(rng));
        text.push_str(v);
    }
    text.push('}');
    text.push_str(space(rng));
    let mut bytes = text.into_bytes();
    if rng.random_bool(0.1) && !bytes.is_empty() {
        let at = rng.random_range(0..bytes.len());
        const ODD: &[u8] = b"{}[]\",:\\ 0-.eE\x00\x0b\xc3\xa9\xff\xed\xa0\x80";
        match rng.random_range(0..3) {
            0 => {
                bytes.remove(at);
            }
            1 => bytes.insert(at, ODD[rng.random_range(0..ODD.len())]),
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// Thousands of generated events, valid and not: the function and the
/// gateway's own reading agree on each, code and reason.
#[test]
fn the_function_reads_every_event_as_the_gateway_does() {
    let server = RedisServer::start();
    let mut conn = with_library(&server);
    // The library as written carries the default stale limit.
    let stale_ms: i64 = 30_000;
    let channel_sets: &[&[&str]] = &[
        &["channel:branch:5:waiters"],
        &["channel:branch:5:admin", "channel:session:77"],
        &["channel:sector:5:3:waiters"],
        &["channel:session:77"],
        &["channel:user:7", "channel:tenant:staff"],
        &["channel:session:77", "channel:branch:5:admin"],
        &["channel:branch:5:kitchen"],
        &["channel:tenant:staff"],
        &["channel:branch:6:kitchen"],
        &["channel:branch:05:kitchen"],
    ];
    let mut rng = StdRng::seed_from_u64(28);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..6000 {
        let now_ms = unix_ms();
        let channels = channel_sets[rng.random_range(0..channel_sets.len())];
        let text = generate(&mut rng, now_ms);
        let want = function_verdict(channels, &text, now_ms, stale_ms);
        let got = fcall(&mut conn, channels, &text).map(|_| ());
        assert_eq!(
            got,
            want,
            "case {i} on {channels:?}: {:?}",
            String::from_utf8_lossy(&text)
        );
        match got {
            Ok(()) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    // Both sides were exercised.
    assert!(accepted > 1000 && refused > 1000, "{accepted} / {refused}");
}
