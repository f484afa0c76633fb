//! The `wsgateway` binary: parse the command line, run the command.

fn main() -> std::process::ExitCode {
    let cli = wsgateway::cli::Cli::parse_with_defaults();
    match wsgateway::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgateway: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
