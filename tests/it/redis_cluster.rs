//! Redis Cluster: a real cluster (`common/cluster.rs`) of 3 primaries, each
//! with a replica, started by the test on loopback. The harness's own test
//! kills a primary and moves a slot without any gateway; the gateway tests
//! run `wsgateway serve` processes with `WSGATEWAY_REDIS_MODE=cluster` and
//! check routing across nodes and tenants on different shards, resume from
//! one node on another, a primary's failover and a resharding under a
//! steady stream of events, and a backend's `FCALL` and plain `PUBLISH`.
//!
//! The cluster helpers block (sync Redis connections, `redis-cli`), so
//! these tests run on a multi-threaded runtime and call them inside
//! `block_in_place`.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::RedisCluster;

/// Blocks on the cluster without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_starts_a_cluster_fails_a_primary_over_and_moves_a_slot() {
    let _heavy = common::heavy().await;
    blocking(|| {
        let started = Instant::now();
        let mut cluster = RedisCluster::start(3, 1);
        let start_took = started.elapsed();
        assert_eq!(cluster.nodes.len(), 6);
        let primaries = cluster.primaries();
        assert_eq!(primaries.len(), 3, "{}", cluster.describe());
        for &p in &primaries {
            assert_eq!(cluster.replicas_of(p).len(), 1, "{}", cluster.describe());
        }
        assert_eq!(cluster.seeds().split(',').count(), 6);
        assert!(cluster.seeds().starts_with("redis://127.0.0.1:"));

        // A tenant's keys and scope channels share one slot.
        let slot = cluster.slot_of_tenant(1);
        assert_eq!(cluster.slot_of("wsgateway:{1}:history:branch:5"), slot);
        assert_eq!(cluster.slot_of("wsgateway:events:{1}:staff"), slot);
        assert_ne!(cluster.slot_of_tenant(3), slot);

        // 250 strings and a stream in that slot, on its primary.
        let owner = cluster.primary_of_slot(slot);
        let mut conn = cluster.nodes[owner]
            .client()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        let mut pipe = redis::pipe();
        for n in 0..250 {
            pipe.set(format!("wsgateway:{{1}}:k{n}"), n).ignore();
        }
        pipe.cmd("XADD")
            .arg("wsgateway:{1}:history:branch:5")
            .arg("1-0")
            .arg("e")
            .arg("x")
            .ignore();
        let () = pipe.query(&mut conn).unwrap();
        let keys = 251;
        assert_eq!(cluster.keys_in_slot(owner, slot), keys);

        // Moved step by step to another primary.
        let to = cluster.other_primary(owner);
        let moving = Instant::now();
        let m = cluster.begin_migration(slot, to);
        // Midway, the old owner still answers for the keys it holds.
        let read: i64 = cluster
            .query(owner, redis::cmd("GET").arg("wsgateway:{1}:k7"))
            .unwrap();
        assert_eq!(read, 7);
        assert_eq!(cluster.move_keys(&m, 100), keys);
        assert_eq!(cluster.keys_in_slot(owner, slot), 0);
        cluster.finish_migration(m, Duration::from_secs(10));
        let move_took = moving.elapsed();
        assert_eq!(cluster.primary_of_slot(slot), to);
        assert_eq!(cluster.keys_in_slot(to, slot), keys);
        // redis-cli -c on the old owner follows the MOVED redirection.
        assert_eq!(cluster.cli_on(owner, &["GET", "wsgateway:{1}:k7"]), "7");

        // The new owner dies; its replica takes over, with the keys.
        let replica = cluster.replicas_of(to);
        assert_eq!(replica.len(), 1);
        cluster.wait_replicated(to);
        let killing = Instant::now();
        let killed = cluster.kill_primary_of_slot(slot);
        assert_eq!(killed, to);
        assert!(cluster.nodes[killed].pid().is_none());
        let new = cluster.wait_failover(slot, killed, Duration::from_secs(20));
        let failover_took = killing.elapsed();
        assert_eq!(new, replica[0], "{}", cluster.describe());
        assert_eq!(cluster.keys_in_slot(new, slot), keys);
        assert_eq!(cluster.cli_on(owner, &["GET", "wsgateway:{1}:k249"]), "249");
        assert!(!cluster.seeds().contains(&cluster.nodes[killed].addr()));

        // The killed node comes back as the replica of its successor.
        cluster.restart(killed, Duration::from_secs(20));
        assert_eq!(cluster.replicas_of(new), vec![killed]);
        assert_eq!(cluster.primaries().len(), 3);
        println!(
            "measured: cluster ready in {start_took:?}, slot moved in {move_took:?}, \
             failover in {failover_took:?}; {:?} in all",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(60));
    });
}
