//! The `wsgateway-bench` binary: parse the command line, raise the
//! open-files limit (each connection is a file), run the scenario on a
//! multi-threaded runtime.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = wsgateway_bench::BenchArgs::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(wsgateway_bench::run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgateway-bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
