//! The version matrix: the core scenarios (pipeline with kill -9, streamed
//! large transactions, snapshots, schema changes, a failover without
//! failover slots) against every supported PostgreSQL major other than the
//! default cluster's, which runs the whole suite (15 on Debian 12). Each
//! major gets one cluster for the test binary (the failover scenario starts
//! its own primary and standby); a major that is not installed is fetched
//! from npm on first use (`steward_devkit::pgbin`). The scenarios are the
//! other modules' own, run on another cluster.
//!
//! One major: `cargo test --test it versions::pg17::`; the whole suite on
//! one major: `STEWARD_PG_MAJOR=17 cargo test --test it`.

use crate::{failover, pipeline, schema, snapshot, streaming, support};

macro_rules! matrix {
    ($($major:literal => $module:ident),* $(,)?) => {$(
        mod $module {
            use super::*;

            fn pg() -> &'static steward_devkit::DevCluster {
                let pg = support::cluster_of($major);
                assert_eq!(pg.major(), $major, "the cluster runs PostgreSQL {}", $major);
                pg
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn changes_arrive_in_commit_order() {
                pipeline::several_tables_in_commit_order(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_restart_resumes_without_gaps() {
                pipeline::restart_resumes_without_gaps(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kill_9_loses_nothing() {
                pipeline::kill9_suite(pg(), 150, 3, 4).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn status_reports_the_slot() {
                pipeline::status_reports_slot_and_targets(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_streamed_transaction_arrives_complete() {
                streaming::streamed_transaction_complete_in_order(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kill_9_during_a_streamed_transaction_loses_nothing() {
                streaming::kill9_while_half_spilled(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_initial_snapshot_is_consistent() {
                snapshot::snapshot_consistent_with_concurrent_writes(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_dropped_slot_stops_and_reset_all_recovers() {
                snapshot::dropped_slot_stops_and_reset_all_recovers(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_added_column_keeps_running() {
                schema::added_column_keeps_running(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_dropped_column_stops_its_entity_until_it_returns() {
                schema::dropped_column_stops_its_entity_and_returns(pg()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failover_without_failover_slots_is_refused_and_repaired() {
                let primary = steward_devkit::DevCluster::start_major(
                    $major,
                    steward_devkit::DevClusterOptions::default(),
                )
                .expect("start a primary");
                failover::refused_after_failover_and_repaired(primary).await;
            }
        }
    )*};
}

matrix!(14 => pg14, 16 => pg16, 17 => pg17, 18 => pg18);
